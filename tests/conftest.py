"""Shared fixtures.

- `smollm2` / `smollm2_path`: the real default model, fetched into $OFFRAMP_HOME once and reused.
- `tiny_vocab` / `tiny_gguf`: a byte-level BPE vocabulary trained here and a random tiny Llama
  written as a GGUF the way llama.cpp's converter writes one (Q/K rows permuted, norms in F32).
"""
import os

# Triton kernels run in the interpreter on CPU; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The end of the story is near.",
    "def main(args):\n    return sum(x * 2 for x in args)  # doubled\n",
    "Café, naïve, crème brûlée, Ærøskøbing; über straße.",
    "numbers like 12345 and 3.14159 are split into single digits",
    "the the the then there these those they them their",
] * 4
TINY_ARCH = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Local path of the default model's GGUF (downloaded on first use, offline afterwards)."""
    from server.model.fetch import DEFAULT_MODEL, fetch_alias

    return fetch_alias(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2():
    """load_model(DEFAULT_MODEL) on CPU, float32: one LoadedModel shared by the whole session."""
    from server.model.loader import load_model

    return load_model()


@dataclass
class TinyVocab:
    tokens: list[str]
    merges: list[str]
    token_types: list[int]


@dataclass
class TinyGGUF:
    path: Path
    hf_config: dict
    state_dict: dict[str, torch.Tensor]  # Hugging Face names and layout, before quantisation
    vocab: TinyVocab


@pytest.fixture(scope="session")
def tiny_vocab() -> TinyVocab:
    """A ~400-token byte-level BPE with SmolLM2's pre-tokenizer (digits split) and ChatML specials."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TINY_CORPUS, trainer)
    model = json.loads(backend.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if token in SPECIAL_TOKENS else 1 for token in tokens]
    return TinyVocab(tokens, merges, types)


def permute_like_llama_cpp(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What convert_hf_to_gguf does to Llama's Q/K rows: each head's halves become interleaved pairs."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="session")
def llama_cpp_permute():
    return permute_like_llama_cpp


def random_llama_state_dict(hf: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, f, hd = hf["hidden_size"], hf["intermediate_size"], hf["hidden_size"] // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (hf["vocab_size"], d), "model.norm.weight": (d,)}
    if not hf["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (hf["vocab_size"], d)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
        if hf["model_type"] == "qwen2":  # biases on q/k/v only
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return {name: (1.0 + 0.2 * torch.randn(shape, generator=g)) if name.endswith("norm.weight")
            else 0.1 * torch.randn(shape, generator=g) for name, shape in shapes.items()}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, index, *module, kind = hf_name.split(".")
        return f"blk.{index}.{LAYER_NAMES['.'.join(module)]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


@pytest.fixture
def tiny_gguf(tmp_path, tiny_vocab):
    """Factory: tiny_gguf(qtype="F32", tied=True, seed=0, edit=None, name="tiny", arch="llama") -> TinyGGUF.

    `edit(writer)` may add metadata or tensors before the file is written.
    """
    import gguf

    def write(qtype: str = "F32", tied: bool = True, seed: int = 0, edit=None, name: str = "tiny",
              arch: str = "llama") -> TinyGGUF:
        hf = dict(TINY_ARCH, model_type=arch, vocab_size=len(tiny_vocab.tokens), tie_word_embeddings=tied,
                  bos_token_id=1, eos_token_id=[2], pad_token_id=0)
        state_dict = random_llama_state_dict(hf, seed)
        path = tmp_path / f"{name}.gguf"
        writer = gguf.GGUFWriter(path, arch)
        writer.add_name(name)
        writer.add_block_count(hf["num_hidden_layers"])
        writer.add_context_length(hf["max_position_embeddings"])
        writer.add_embedding_length(hf["hidden_size"])
        writer.add_feed_forward_length(hf["intermediate_size"])
        writer.add_head_count(hf["num_attention_heads"])
        writer.add_head_count_kv(hf["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
        writer.add_rope_freq_base(hf["rope_theta"])
        writer.add_rope_dimension_count(hf["hidden_size"] // hf["num_attention_heads"])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tiny_vocab.tokens)
        writer.add_token_types(tiny_vocab.token_types)
        writer.add_token_merges(tiny_vocab.merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML)
        quant = gguf.GGMLQuantizationType[qtype]
        for hf_name, tensor in state_dict.items():
            values = tensor.numpy()
            if ".q_proj." in hf_name and arch == "llama":  # llama.cpp permutes Llama's Q/K only
                values = permute_like_llama_cpp(values, hf["num_attention_heads"])
            elif ".k_proj." in hf_name and arch == "llama":
                values = permute_like_llama_cpp(values, hf["num_key_value_heads"])
            if values.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
                writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(values, quant), raw_dtype=quant)
            else:
                writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(values))
        if edit is not None:
            edit(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return TinyGGUF(path, hf, state_dict, tiny_vocab)

    return write


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """(model folder, heads folder) of the tiny random Llama: 6 layers, exits at 2 and 4,
    eps 0.9 (both heads on) and 0.99 (default; layer 4 only)."""
    from server.model.loader import load_model
    from tests.tiny_model import write_tiny_heads, write_tiny_model

    torch.set_num_threads(1)
    model_dir = write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    loaded = load_model(str(model_dir))
    heads_dir = write_tiny_heads(tmp_path_factory.mktemp("heads"), loaded.model, loaded.fingerprint)
    return model_dir, heads_dir
