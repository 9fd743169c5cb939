"""`load_model(spec)`: resolve an alias, a Hugging Face folder or a .gguf file into a ready model.

Weights are never held twice: the model is built on the meta device and takes the reader's tensors as
its parameters. With a quantization (server/model/quantize.py) a GGUF is read tensor by tensor into
quantized modules (Q4 blocks straight into int4, no float copy of the model); a Hugging Face folder is
read in float and quantized layer by layer.

Every failure a user can cause (a missing path, a corrupt or unsupported file, a failed download)
is a `ModelLoadError` whose message is one line naming the file and the problem.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from server.model.config import ModelConfig
from server.model.fetch import ALIASES, DEFAULT_MODEL, ModelLoadError, fetch_alias
from server.model.gguf_reader import GGUFFile, gguf_tensor_name, read_config, read_gguf, read_tokenizer
from server.model.hf_reader import read_hf_folder
from server.model.llama import LlamaForCausalLM, RotaryEmbedding
from server.model.quantize import (PROJECTIONS, QUANTIZATIONS, int8_error, plan_int8, quantize_head,
                                   quantize_layer, quantize_model)
from server.model.tokenizer import Tokenizer

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "read_model", "resolve", "fingerprint"]

# config fields that fix the weights' shapes; part of the fingerprint
FINGERPRINT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    name: str
    fingerprint: str
    path: Path


@dataclass
class ModelFiles:
    """What a reader returns, before any model is built."""
    name: str
    path: Path
    hf_config: dict
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def resolve(spec: str) -> tuple[str, Path]:
    """(name, local path) of a model spec, fetching an alias into the cache if needed."""
    if spec in ALIASES:
        return spec, fetch_alias(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve().name, path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
        return path.stem, path
    if path.exists():
        raise ModelLoadError(f"{path}: neither a Hugging Face model folder nor a .gguf file")
    raise ModelLoadError(f"{spec}: no such file or folder, and not a model alias "
                         f"(known: {', '.join(sorted(ALIASES))})")


def read_model(spec: str) -> ModelFiles:
    return read_files(*resolve(spec))


def read_files(name: str, path: Path) -> ModelFiles:
    reader = read_hf_folder if path.is_dir() else read_gguf
    hf_config, state_dict, tokenizer, _ = reader(path)
    return ModelFiles(name, path, hf_config, state_dict, tokenizer)


def fingerprint(hf_config: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """Stable short hash of the architecture and the float32 embedding: what exit heads are tied to."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: hf_config.get(k) for k in FINGERPRINT_FIELDS}, sort_keys=True).encode())
    embedding = state_dict["model.embed_tokens.weight"].to(torch.float32).contiguous()
    digest.update(embedding.numpy().tobytes())
    return digest.hexdigest()[:16]


def empty_model(config: ModelConfig) -> LlamaForCausalLM:
    """The module tree with no weights allocated (meta tensors), except the RoPE frequencies."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.model.rotary_emb = RotaryEmbedding(config)
    return model


def build_model(files: ModelFiles, config: ModelConfig) -> LlamaForCausalLM:
    model = empty_model(config)
    state_dict = {k: v for k, v in files.state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)  # no copies
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in allowed and "rotary" not in k]
    if missing or unexpected:
        problem = f"missing weight {missing[0]}" if missing else f"unexpected weight {unexpected[0]}"
        raise ModelLoadError(f"{files.path}: {problem} ({len(missing)} missing, {len(unexpected)} unexpected)")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def model_config(hf_config: dict, path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf_config)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path}: unusable config ({err})") from None


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, quantization: str = "none") -> LoadedModel:
    """quantization: none, int8 or int4 (server/model/quantize.py; CPU only)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none" and torch.device(device).type != "cpu":
        raise ValueError(f"quantization {quantization} runs on the CPU only (its kernels are torch's CPU ones)")
    name, path = resolve(spec)
    if quantization != "none" and path.suffix == ".gguf":
        return load_quantized_gguf(name, path, quantization, dtype)
    files = read_files(name, path)
    if "model.embed_tokens.weight" not in files.state_dict:
        raise ModelLoadError(f"{files.path}: has no token embedding")
    config = model_config(files.hf_config, files.path)
    try:
        model = build_model(files, config)
    except RuntimeError as err:  # load_state_dict's shape mismatches
        raise ModelLoadError(f"{files.path}: weights do not fit the config ({str(err).splitlines()[-1].strip()})") \
            from None
    digest = fingerprint(files.hf_config, files.state_dict)
    files.state_dict.clear()  # the model holds the tensors now; quantizing frees them layer by layer
    model = quantize_model(model.to(device=device, dtype=dtype), quantization).eval()
    return LoadedModel(model=model, tokenizer=files.tokenizer, config=config, name=files.name,
                       fingerprint=digest, path=files.path)


@torch.no_grad()
def load_quantized_gguf(name: str, path: Path, mode: str, dtype: torch.dtype | None) -> LoadedModel:
    """A GGUF straight into quantized modules, one tensor at a time: int4 takes Q4_0 / Q4_1 blocks as
    they are; anything else is dequantised one tensor at a time and quantised."""
    f = GGUFFile(path)
    hf = read_config(f)
    tokenizer = read_tokenizer(f, hf)
    config = model_config(hf, path)
    missing = [n for n in (gguf_tensor_name(f"model.layers.{i}.{p}.weight") for i in range(config.num_hidden_layers)
                           for p in PROJECTIONS) if n not in f.tensors]
    if missing:
        raise ModelLoadError(f"{path}: missing weight {missing[0]} ({len(missing)} missing)")
    dtype = dtype or torch.float32
    weight = lambda hf_name: f.tensor(gguf_tensor_name(hf_name), hf)  # float32, HF row order
    optional = lambda hf_name: weight(hf_name).to(dtype) if gguf_tensor_name(hf_name) in f.tensors else None
    param = lambda hf_name: torch.nn.Parameter(weight(hf_name).to(dtype), requires_grad=False)

    def projection(hf_name: str):
        codes = f.int4_codes(gguf_tensor_name(hf_name), hf) if mode == "int4" else None
        return codes if codes is not None else weight(hf_name)

    model = empty_model(config)
    layers = model.model.layers
    fp16 = frozenset()
    if mode == "int8":
        fp16 = plan_int8({f"{i}.{p}": int8_error(weight(f"model.layers.{i}.{p}.weight"))
                          for i in range(len(layers)) for p in PROJECTIONS})
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        layer.input_layernorm.weight = param(prefix + "input_layernorm.weight")
        layer.post_attention_layernorm.weight = param(prefix + "post_attention_layernorm.weight")
        quantize_layer(layer, mode, lambda p: projection(prefix + p + ".weight"), lambda p: optional(prefix + p + ".bias"),
                       frozenset(n.partition(".")[2] for n in fp16 if n.startswith(f"{i}.")))
    model.model.norm.weight = param("model.norm.weight")
    embedding = f.tensor("token_embd.weight", hf)
    digest = fingerprint(hf, {"model.embed_tokens.weight": embedding})
    quantize_head(model, embedding=embedding, head=None if config.tie_word_embeddings else f.tensor("output.weight", hf))
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, config=config, name=name, fingerprint=digest, path=path)
