"""Our Llama against transformers' LlamaForCausalLM built from the same weights."""
import pytest
import torch
import transformers

from server.model.config import ModelConfig
from server.model.llama import ContiguousKVCache, LlamaForCausalLM

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6)
CASES = {
    "mha-untied": {},
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-llama3-rope": dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "linear-rope": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "attention-bias": dict(attention_bias=True, num_key_value_heads=2),
}


def build_pair(overrides, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY, **overrides})
    hf_config = transformers.LlamaConfig(**config.to_hf())
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # random norms and biases too, so a wrong norm or bias path shows
        for name, p in reference.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    ours = LlamaForCausalLM(config).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ours, reference


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    ours, reference = build_pair(CASES[case])
    ids = torch.randint(0, TINY["vocab_size"], (2, 150))  # long enough for llama3 scaling to matter
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    # fp32 with identical op order up to fused kernels: differences are rounding only.
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["gqa-tied", "attention-bias"])
def test_padded_batch_matches_unpadded(case):
    ours, _ = build_pair(CASES[case])
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding on row 1
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask)
        alone = ours(ids[1:, 7:])
    assert (padded[1, 7:] - alone[0]).abs().max().item() <= 1e-4


def test_cached_decode_matches_full_forward():
    ours, _ = build_pair(CASES["gqa-tied"])
    ids = torch.randint(0, TINY["vocab_size"], (1, 40))
    cache = ContiguousKVCache(ours.config, max_len=64)
    with torch.no_grad():
        full = ours(ids)[0]
        pos = torch.arange(25)
        out = [ours.final_logits(ours.run_layers(ours.embed(ids[0, :25]), pos, 0, 3, cache.at(pos)))]
        for t in range(25, 40):  # one token at a time
            pos = torch.tensor([t])
            out.append(ours.final_logits(ours.run_layers(ours.embed(ids[0, t:t + 1]), pos, 0, 3, cache.at(pos))))
    assert (torch.cat(out) - full).abs().max().item() <= 1e-4


def test_layer_kv_equals_what_the_layer_stores():
    ours, _ = build_pair(CASES["attention-bias"])
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    cache = ContiguousKVCache(ours.config, max_len=16)
    pos = torch.arange(12)
    with torch.no_grad():
        _, states = ours(ids, output_hidden_states=True)
        ours.run_layers(ours.embed(ids[0]), pos, 0, 3, cache.at(pos))
        for i in range(3):
            k, v = ours.layer_kv(i, states[i][0], pos)
            assert torch.allclose(k, cache.k[i, :12], atol=1e-5) and torch.allclose(v, cache.v[i, :12], atol=1e-5)
