"""Read a llama.cpp GGUF file into Hugging Face form: config.json dict, float32 state dict, tokenizer.

GGUF differs from a Hugging Face checkpoint in three ways that matter here:
- tensor names (blk.3.attn_q.weight for model.layers.3.self_attn.q_proj.weight);
- shapes are listed fastest-dimension first, so a [out, in] weight reads as [in, out];
- Llama's Q and K rows are permuted (convert_hf_to_gguf's `permute`) so that llama.cpp can rotate
  adjacent pairs; Hugging Face rotates the two halves of each head, so the permutation is undone.
"""
import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from tqdm import tqdm

from server.model.fetch import ModelLoadError
from server.model.quantize import Int4Codes
from server.model.tokenizer import Tokenizer, byte_level_bpe

log = logging.getLogger(__name__)

SUPPORTED_TYPES = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_MISSING = object()


def hf_tensor_name(name: str) -> str | None:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".")  # blk.3.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def gguf_tensor_name(hf_name: str) -> str:
    """Inverse of hf_tensor_name: model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    for gguf_name, name in GLOBAL_TENSORS.items():
        if name == hf_name:
            return gguf_name
    _, _, index, *module, leaf = hf_name.split(".")
    short = next(key for key, value in LAYER_TENSORS.items() if value == ".".join(module))
    return f"blk.{index}.{short}.{leaf}"


def rope_heads(name: str, hf: dict) -> int | None:
    """How many heads llama.cpp's Q/K permutation ran over in tensor `name` (GGUF name), None if unpermuted."""
    if hf["model_type"] != "llama":  # convert_hf_to_gguf permutes Q/K for Llama only
        return None
    if ".attn_q." in name:
        return hf["num_attention_heads"]
    return hf["num_key_value_heads"] if ".attn_k." in name else None


def unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. w [num_heads * head_dim, ...] (a weight or a bias).

    llama.cpp stores row (h, i, j) of each head, i < head_dim/2, j in {0, 1}, as Hugging Face's row
    (h, j, i): pairs (x_i, x_{i + head_dim/2}) become neighbours. Swapping back the two inner axes
    restores Hugging Face's halves.
    """
    shape = w.shape
    return w.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class GGUFFile:
    """Metadata access with errors that name the file and the key."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, OSError, IndexError, KeyError, EOFError) as err:
            raise ModelLoadError(f"{path}: not a readable GGUF file ({err})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=_MISSING):
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ModelLoadError(f"{self.path}: GGUF metadata has no {key}")
            return default
        value = field.contents()
        return value.item() if isinstance(value, np.generic) else value

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as float32, in Hugging Face's (slowest-first) shape."""
        tensor = self.tensors[name]
        if tensor.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
            raise ModelLoadError(f"{self.path}: tensor {name} has type {tensor.tensor_type.name}, which Offramp "
                                 f"does not load (supported: {supported})")
        shape = tuple(int(n) for n in reversed(tensor.shape))
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        except ValueError as err:
            raise ModelLoadError(f"{self.path}: tensor {name} is corrupt ({err})") from None
        return np.require(values, np.float32, ["C", "W"])  # writable: torch.from_numpy shares it

    def tensor(self, name: str, hf: dict) -> torch.Tensor:
        """Tensor `name` as float32 in Hugging Face's shape and row order (Q/K permutation undone)."""
        values = self.dequantize(name)
        heads = rope_heads(name, hf)
        return torch.from_numpy(values if heads is None else unpermute_rope(values, heads))

    def int4_codes(self, name: str, hf: dict) -> Int4Codes | None:
        """A Q4_0 / Q4_1 tensor as its own int4 grid, read from the blocks without a float detour, in
        Hugging Face's row order; None for other types.

        A block is 32 weights along a row: fp16 d (Q4_1: then fp16 m), then 16 bytes whose low nibbles
        are weights 0-15 and high nibbles weights 16-31. Q4_1: w = d * q + m = (q - 8) * d + (m + 8d);
        Q4_0: w = d * (q - 8)."""
        tensor = self.tensors[name]
        if tensor.tensor_type not in (Q.Q4_0, Q.Q4_1) or len(tensor.shape) != 2:
            return None
        cols, rows = (int(n) for n in tensor.shape)
        has_min = tensor.tensor_type == Q.Q4_1
        blocks = np.asarray(tensor.data).reshape(rows, cols // 32, 20 if has_min else 18)
        fp16 = lambda start: blocks[..., start:start + 2].copy().view(np.float16)[..., 0].astype(np.float32)
        d = fp16(0)
        m = fp16(2) if has_min else np.zeros_like(d)
        nibbles = blocks[..., -16:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols).astype(np.int32)
        heads = rope_heads(name, hf)
        if heads is not None:  # the permutation moves whole rows: codes and per-block scales alike
            q, d, m = (unpermute_rope(a, heads) for a in (q, d, m))
        d, m = torch.from_numpy(np.ascontiguousarray(d)), torch.from_numpy(np.ascontiguousarray(m))
        return Int4Codes(torch.from_numpy(np.ascontiguousarray(q)), d, m + 8 * d if has_min else torch.zeros_like(d))


def read_config(f: GGUFFile) -> dict:
    arch = f.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{f.path}: architecture {arch!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if "token_embd.weight" not in f.tensors:
        raise ModelLoadError(f"{f.path}: has no token_embd.weight tensor")
    if "rope_freqs.weight" in f.tensors:
        raise ModelLoadError(f"{f.path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are not supported")
    num_heads = f.get(f"{arch}.attention.head_count")
    num_kv_heads = f.get(f"{arch}.attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        raise ModelLoadError(f"{f.path}: per-layer key/value head counts are not supported")
    hidden_size = f.get(f"{arch}.embedding_length")
    head_dim = f.get(f"{arch}.attention.key_length", hidden_size // num_heads)
    if f.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError(f"{f.path}: partial rotary embeddings ({arch}.rope.dimension_count) are not supported")
    eos_ids = [f.get(f"tokenizer.ggml.{key}", None) for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    hf = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "vocab_size": int(f.tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden_size,
        "intermediate_size": f.get(f"{arch}.feed_forward_length"),
        "num_hidden_layers": f.get(f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": f.get(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": f.get(f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": read_rope_scaling(f, arch),
        "max_position_embeddings": f.get(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "attention_bias": "blk.0.attn_q.bias" in f.tensors,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": list(dict.fromkeys(i for i in eos_ids if i is not None)),
        "pad_token_id": f.get("tokenizer.ggml.padding_token_id", None),
    }
    return hf


def read_rope_scaling(f: GGUFFile, arch: str) -> dict | None:
    kind = f.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ModelLoadError(f"{f.path}: RoPE scaling {kind!r} is not supported (supported: linear)")
    return {"rope_type": "linear", "factor": f.get(f"{arch}.rope.scaling.factor")}


def read_tokenizer(f: GGUFFile, hf: dict) -> Tokenizer:
    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"{f.path}: tokenizer {kind!r} is not supported (supported: gpt2 byte-level BPE)")
    tokens = f.get("tokenizer.ggml.tokens")
    backend = byte_level_bpe(tokens, f.get("tokenizer.ggml.merges"), f.get("tokenizer.ggml.token_type", None),
                             f.get("tokenizer.ggml.pre", None), bos_token_id=hf["bos_token_id"],
                             add_bos_token=bool(f.get("tokenizer.ggml.add_bos_token", False)))
    named = {"bos_token": hf["bos_token_id"], "eos_token": f.get("tokenizer.ggml.eos_token_id", None),
             "unk_token": f.get("tokenizer.ggml.unknown_token_id", None), "pad_token": hf["pad_token_id"]}
    return Tokenizer(backend, eos_token_ids=hf["eos_token_id"], bos_token_id=hf["bos_token_id"],
                     pad_token_id=hf["pad_token_id"], chat_template=f.get("tokenizer.chat_template", None),
                     template_tokens={name: tokens[i] for name, i in named.items() if i is not None})


def read_state_dict(f: GGUFFile, hf: dict) -> dict[str, torch.Tensor]:
    unknown = [name for name in f.tensors if hf_tensor_name(name) is None]
    if unknown:
        raise ModelLoadError(f"{f.path}: unexpected tensor {unknown[0]} ({len(unknown)} unknown in all)")
    state_dict = {}
    for name in tqdm(f.tensors, desc=f"dequantising {f.path.name}", unit="tensor", disable=None, leave=False):
        state_dict[hf_tensor_name(name)] = f.tensor(name, hf)
    return state_dict


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Tokenizer, str | None]:
    """(hf_config, state_dict, tokenizer, chat_template) of a GGUF file; ModelLoadError if it cannot be used."""
    f = GGUFFile(Path(path))
    hf = read_config(f)
    tokenizer = read_tokenizer(f, hf)
    state_dict = read_state_dict(f, hf)
    return hf, state_dict, tokenizer, tokenizer.chat_template
