"""load_model on each source kind, the fingerprint, and one-line errors."""
import json
import re

import pytest
import torch
import transformers

from server.model.fetch import DEFAULT_MODEL
from server.model.gguf_reader import read_gguf
from server.model.loader import ModelLoadError, fingerprint, load_model, read_model

HEX16 = re.compile(r"[0-9a-f]{16}")


def transformers_logits(hf_config: dict, state_dict: dict, ids: torch.Tensor) -> torch.Tensor:
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "eos_token_id"})
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    reference.load_state_dict(state_dict, strict=not config.tie_word_embeddings)
    with torch.no_grad():
        return reference(ids).logits


@pytest.mark.parametrize("qtype, tied, arch", [("F32", True, "llama"), ("Q8_0", False, "llama"),
                                               ("F32", False, "qwen2")])
def test_gguf_model_matches_transformers_on_the_original_weights(tiny_gguf, qtype, tied, arch):
    tiny = tiny_gguf(qtype, tied=tied, arch=arch)
    loaded = load_model(str(tiny.path))
    assert loaded.name == "tiny" and loaded.path == tiny.path
    assert loaded.config.num_hidden_layers == 2 and loaded.config.tie_word_embeddings == tied
    assert loaded.config.eos_token_id == [2] and loaded.tokenizer.eos_token_ids == [2]
    assert not loaded.model.training and HEX16.fullmatch(loaded.fingerprint)
    if tied:
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.model(ids)
    # F32: the original weights themselves; Q8_0: the dequantised ones (their error bound is test_gguf's)
    weights = tiny.state_dict if qtype == "F32" else read_gguf(tiny.path)[1]
    torch.testing.assert_close(ours, transformers_logits(tiny.hf_config, weights, ids), rtol=0, atol=1e-4)


@pytest.fixture
def hf_folder(tmp_path, tiny_gguf):
    """Factory: a Hugging Face folder saved by transformers itself, with the tiny tokenizer."""

    def make(tied=False, shard=False, seed=0, **config_overrides):
        tiny = tiny_gguf()
        _, _, tokenizer, _ = read_gguf(tiny.path)
        folder = tmp_path / f"hf-{tied}-{shard}-{seed}"
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(**{**tiny.hf_config, "eos_token_id": 2, "tie_word_embeddings": tied,
                                             **config_overrides})
        model = transformers.LlamaForCausalLM(config)
        model.generation_config.eos_token_id = [2, 1]
        model.save_pretrained(folder, max_shard_size="40KB" if shard else "1GB")
        tokenizer.backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "chat_template": tokenizer.chat_template}))
        return folder, model.eval()

    return make


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)


@pytest.mark.parametrize("tied, shard, overrides", [(False, False, {}), (True, False, {}), (False, True, {}),
                                                    (True, False, {"rope_scaling": LLAMA3_ROPE})],
                         ids=["untied", "tied", "sharded", "llama3-rope"])
def test_hf_folder_matches_transformers(hf_folder, tied, shard, overrides):
    folder, reference = hf_folder(tied=tied, shard=shard, **overrides)
    assert (folder / "model.safetensors.index.json").exists() == shard
    loaded = load_model(str(folder))
    assert loaded.name == folder.name and loaded.config.tie_word_embeddings == tied
    assert (loaded.config.rope_scaling or {}).get("rope_type") == overrides.get("rope_scaling", {}).get("rope_type")
    # config.json's, then generation_config.json's, then tokenizer_config.json's end tokens
    assert loaded.tokenizer.eos_token_ids == [2, 1, 0] and loaded.config.eos_token_id == [2, 1, 0]
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")
    ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), reference(ids).logits, rtol=0, atol=1e-4)


def test_fingerprint_is_stable_and_tracks_the_weights(tiny_gguf, hf_folder):
    tiny = tiny_gguf()
    first, again = load_model(str(tiny.path)), load_model(str(tiny.path), dtype=torch.bfloat16)
    assert first.fingerprint == again.fingerprint  # independent of the runtime dtype
    assert again.model.model.embed_tokens.weight.dtype == torch.bfloat16
    files = read_model(str(tiny.path))
    assert fingerprint(files.hf_config, files.state_dict) == first.fingerprint
    other = load_model(str(tiny_gguf(seed=1, name="other").path))
    assert other.fingerprint != first.fingerprint


def test_missing_and_unusable_specs(tmp_path):
    cases = {
        "nothing-here": r"nothing-here: no such file or folder, and not a model alias \(known: smollm2-135m\)",
        str(tmp_path / "gone.gguf"): r"gone\.gguf: no such file",
    }
    (tmp_path / "notes.txt").write_text("hello")
    cases[str(tmp_path / "notes.txt")] = r"notes\.txt: neither a Hugging Face model folder nor a \.gguf file"
    (tmp_path / "empty").mkdir()
    cases[str(tmp_path / "empty")] = r"empty/config\.json: no such file"
    for spec, message in cases.items():
        with pytest.raises(ModelLoadError, match=message) as info:
            load_model(spec)
        assert "\n" not in str(info.value)


def test_broken_hf_folders(hf_folder):
    folder, _ = hf_folder()
    config = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ModelLoadError, match=r"weights do not fit the config"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load_model(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_model(str(folder))


def test_cli_prints_one_line(tmp_path, capsys):
    from server.cli import main

    assert main(["generate", "--model", str(tmp_path / "gone.gguf"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gone.gguf: no such file" in err


@pytest.mark.slow
def test_default_model(smollm2):
    assert smollm2.name == DEFAULT_MODEL and smollm2.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.config.num_hidden_layers == 30 and smollm2.config.vocab_size == 49152
    assert smollm2.tokenizer.eos_token_ids == [2] and HEX16.fullmatch(smollm2.fingerprint)
    from server.model.generate import generate

    tok = smollm2.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    result = generate(smollm2.model, prompt, 8, temperature=0.0, eos_token_ids=tok.eos_token_ids)
    assert "Paris" in tok.decode(result.token_ids)
