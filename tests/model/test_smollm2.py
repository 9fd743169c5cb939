"""The real default model against transformers' LlamaForCausalLM on the same weights."""
import pytest
import torch
import transformers

from server.model.generate import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model(smollm2):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**smollm2.config.to_hf())).eval()
    missing, unexpected = model.load_state_dict(smollm2.model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def test_config_is_smollm2_135m(smollm2):
    config = smollm2.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and config.num_key_value_heads == 3


def test_logits_match_transformers_on_a_64_token_prompt(smollm2, hf_model):
    text = ("The history of the lighthouse begins in antiquity. Sailors needed a way to find harbours at night, "
            "and fires were lit on hills and towers along the coast to guide them home safely through storms. "
            "Later, the famous Pharos of Alexandria stood for centuries as one of the wonders of the ancient world, "
            "its light visible for miles across the Mediterranean sea.")
    ids = smollm2.tokenizer.encode(text)
    assert len(ids) >= 64
    ids = torch.tensor([ids[:64]])
    with torch.inference_mode():
        expected = hf_model(ids).logits
        got = smollm2.model(ids)
    # fp32 over 30 layers; logits reach |30|, so 1e-3 absolute is ~3e-5 relative.
    assert (got - expected).abs().max().item() <= 1e-3


def test_greedy_generate_matches_transformers_generate(smollm2, hf_model):
    tokenizer = smollm2.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True)
    prompt = tokenizer.encode(text)
    # The answer ends with EOS after a few tokens: both sides ignore EOS so 30 tokens are compared.
    ours = generate(smollm2.model, prompt, 30, eos_token_ids=())
    hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_ids[0])
    assert ours.token_ids == theirs[0, len(prompt):].tolist()
    assert "Paris" in tokenizer.decode(ours.token_ids)
