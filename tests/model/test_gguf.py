"""GGUF reading: dequantisation, the Q/K un-permutation, config, and clear errors."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from server.model.fetch import ModelLoadError
from server.model.gguf_reader import GGUFFile, read_gguf, unpermute_rope


def write_tensors(path, tensors: dict[str, tuple[np.ndarray, Q | None]]):
    writer = gguf.GGUFWriter(path, "llama")
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


def block_step(x: np.ndarray, qtype: Q) -> np.ndarray:
    """One quantisation step of each 32-value block, broadcast back to x's shape."""
    blocks = x.reshape(-1, 32)
    amax, spread = np.abs(blocks).max(1), blocks.max(1) - blocks.min(1)
    step = {Q.Q8_0: amax / 127, Q.Q4_0: amax / 8, Q.Q5_0: amax / 16, Q.Q4_1: spread / 15, Q.Q5_1: spread / 31}[qtype]
    # the block scale is stored as fp16, which moves every value by up to amax * 2^-11
    return np.repeat(step + amax * 2.0 ** -10, 32).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_block_quants_dequantise_within_one_step(tmp_path, qtype):
    x = np.random.default_rng(0).normal(size=(8, 128)).astype(np.float32)
    f = write_tensors(tmp_path / "q.gguf", {"w": (gguf.quants.quantize(x, qtype), qtype)})
    assert f.tensors["w"].tensor_type == qtype
    y = f.dequantize("w")
    assert y.shape == x.shape and y.dtype == np.float32
    err = np.abs(y - x)
    assert (err <= block_step(x, qtype)).all(), err.max()
    assert err.max() > 0  # really quantised


@pytest.mark.parametrize("qtype, rel", [(Q.F32, 0.0), (Q.F16, 2.0 ** -11), (Q.BF16, 2.0 ** -8)],
                         ids=["F32", "F16", "BF16"])
def test_float_types_dequantise_to_rounding(tmp_path, qtype, rel):
    x = np.random.default_rng(1).normal(size=(3, 5, 64)).astype(np.float32)
    data = x if qtype == Q.F32 else gguf.quants.quantize(x, qtype)
    f = write_tensors(tmp_path / "f.gguf", {"w": (data, None if qtype == Q.F32 else qtype)})
    y = f.dequantize("w")
    assert y.shape == x.shape
    assert (np.abs(y - x) <= rel * np.abs(x)).all()


# bytes per 256-value block and the offsets of its fp16 scales (ggml's block_q*_K layouts)
K_QUANTS = {Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)),
            Q.Q6_K: (210, (208,))}


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda q: q.name)
def test_k_quants_match_transformers_dequantiser(tmp_path, qtype):
    """gguf cannot quantise K-quants, so random blocks (with finite scales) are checked against
    transformers' own torch dequantiser, an independent implementation of the same layouts."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rows, cols = 4, 512
    block_bytes, scale_offsets = K_QUANTS[qtype]
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        raw[:, offset:offset + 2] = rng.uniform(0.001, 0.05, size=(len(raw), 1)).astype(np.float16).view(np.uint8)
    f = write_tensors(tmp_path / "k.gguf", {"w": (raw.reshape(rows, -1), qtype)})
    assert tuple(int(n) for n in f.tensors["w"].shape) == (cols, rows)  # GGUF lists the fast dimension first
    ours = f.dequantize("w")
    reference = hf_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).reshape(rows, cols)
    torch.testing.assert_close(torch.from_numpy(ours), reference, rtol=1e-5, atol=1e-6)
    assert ours.std() > 0


def test_unsupported_tensor_type_is_a_clear_error(tmp_path):
    raw = np.zeros((2, 18), dtype=np.uint8)  # two IQ4_NL blocks
    f = write_tensors(tmp_path / "iq.gguf", {"w": (raw, Q.IQ4_NL)})
    with pytest.raises(ModelLoadError, match=r"iq\.gguf: tensor w has type IQ4_NL.*supported: F32"):
        f.dequantize("w")


def test_unpermute_inverts_llama_cpp_permutation(llama_cpp_permute):
    w = np.random.default_rng(3).normal(size=(4 * 16, 8))
    assert np.array_equal(unpermute_rope(llama_cpp_permute(w, 4), 4), w)
    bias = np.arange(2 * 16.0)
    assert np.array_equal(unpermute_rope(llama_cpp_permute(bias, 2), 2), bias)


def test_unpermuted_weights_give_the_same_rotation(llama_cpp_permute):
    """llama.cpp rotates adjacent pairs of a head on the permuted weight; Hugging Face rotates its
    two halves on the original. Same angles, so the rotated vectors must agree up to the permutation."""
    heads, head_dim, d = 2, 8, 6
    rng = np.random.default_rng(4)
    w_hf = rng.normal(size=(heads * head_dim, d))
    x = rng.normal(size=d)
    angles = 3.0 * 10000.0 ** (-np.arange(head_dim // 2) * 2 / head_dim)  # position 3
    cos, sin = np.cos(angles), np.sin(angles)

    q = (w_hf @ x).reshape(heads, 2, head_dim // 2)  # Hugging Face: halves
    hf_rot = np.stack([q[:, 0] * cos - q[:, 1] * sin, q[:, 1] * cos + q[:, 0] * sin], axis=1)
    p = (llama_cpp_permute(w_hf, heads) @ x).reshape(heads, head_dim // 2, 2)  # llama.cpp: pairs
    cpp_rot = np.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 1] * cos + p[..., 0] * sin], axis=-1)
    assert np.allclose(unpermute_rope(cpp_rot.reshape(-1), heads), hf_rot.reshape(-1))


def test_tiny_gguf_reads_back_exactly(tiny_gguf):
    tiny = tiny_gguf(tied=True)
    hf, state_dict, tokenizer, chat_template = read_gguf(tiny.path)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "rope_theta",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert hf[key] == tiny.hf_config[key], key
    assert hf["model_type"] == "llama" and hf["head_dim"] == 16 and hf["rope_scaling"] is None
    assert hf["rms_norm_eps"] == pytest.approx(1e-5) and hf["tie_word_embeddings"] and not hf["attention_bias"]
    assert set(state_dict) == set(tiny.state_dict)  # no lm_head.weight: tied
    for name, tensor in tiny.state_dict.items():
        assert state_dict[name].dtype == torch.float32
        assert torch.equal(state_dict[name], tensor), name
    assert chat_template == tokenizer.chat_template and "<|im_start|>" in chat_template
    assert tokenizer.eos_token_ids == [2] and tokenizer.bos_token_id == 1


def test_untied_quantised_gguf(tiny_gguf):
    tiny = tiny_gguf("Q8_0", tied=False)
    hf, state_dict, _, _ = read_gguf(tiny.path)
    assert not hf["tie_word_embeddings"] and "lm_head.weight" in state_dict
    for name, tensor in tiny.state_dict.items():
        amax = tensor.abs().max().item()
        assert (state_dict[name] - tensor).abs().max().item() <= amax / 127 + 1e-6, name


def test_linear_rope_scaling(tiny_gguf):
    def edit(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    hf, _, _, _ = read_gguf(tiny_gguf(edit=edit).path)
    assert hf["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.add_string("general.architecture", "bert"), r"architecture 'bert' is not supported"),
    (lambda w: w.add_tokenizer_model("llama"), r"tokenizer 'llama' is not supported"),
    (lambda w: w.add_tensor("blk.0.mystery.weight", np.zeros(4, np.float32)), r"unexpected tensor blk\.0\.mystery"),
    (lambda w: w.add_tensor("rope_freqs.weight", np.ones(8, np.float32)), r"rope_freqs"),
    (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN), r"RoPE scaling 'yarn' is not supported"),
])
def test_unsupported_models_are_clear_errors(tiny_gguf, edit, message):
    tiny = tiny_gguf(edit=edit)
    with pytest.raises(ModelLoadError, match=message) as info:
        read_gguf(tiny.path)
    assert str(tiny.path) in str(info.value) and "\n" not in str(info.value)


def test_missing_metadata_is_a_clear_error(tmp_path):
    f = write_tensors(tmp_path / "bare.gguf", {"token_embd.weight": (np.zeros((4, 32), np.float32), None)})
    with pytest.raises(ModelLoadError, match=r"bare\.gguf: GGUF metadata has no llama\.attention\.head_count"):
        read_gguf(f.path)


def test_missing_and_corrupt_files(tmp_path, tiny_gguf):
    with pytest.raises(ModelLoadError, match=r"nothing\.gguf: no such file"):
        read_gguf(tmp_path / "nothing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match=r"junk\.gguf: not a readable GGUF file"):
        read_gguf(junk)
    whole = tiny_gguf().path.read_bytes()
    for cut in (len(whole) // 3, len(whole) - 100):
        truncated = tmp_path / "truncated.gguf"
        truncated.write_bytes(whole[:cut])
        with pytest.raises(ModelLoadError, match=r"truncated\.gguf: ") as info:
            read_gguf(truncated)
        assert "\n" not in str(info.value)


@pytest.mark.slow
def test_smollm2_state_dict_equals_transformers_gguf_loader(smollm2_path, monkeypatch):
    """End to end on the real file: transformers' GGUF loader dequantises and un-permutes on its own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    hf, ours, _, _ = read_gguf(smollm2_path)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name).state_dict()
    assert hf["num_hidden_layers"] == 30 and hf["tie_word_embeddings"] and hf["eos_token_id"] == [2]
    assert set(ours) == set(reference) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_state_dict_equals_transformers_gguf_loader(tiny_gguf, monkeypatch, arch):
    """transformers un-permutes Llama's Q/K (and leaves Qwen2's alone) on its own; we must agree."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    tiny = tiny_gguf("Q8_0", tied=False, arch=arch)
    hf, ours, _, _ = read_gguf(tiny.path)
    assert hf["model_type"] == arch and hf["attention_bias"] == (arch == "qwen2")
    reference = AutoModelForCausalLM.from_pretrained(tiny.path.parent, gguf_file=tiny.path.name).state_dict()
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
