"""`load_model(spec)`: resolve an alias, a Hugging Face folder or a .gguf file into a ready model.

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
from server.model.gguf_reader import read_gguf
from server.model.hf_reader import read_hf_folder
from server.model.llama import LlamaForCausalLM
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
    name, path = resolve(spec)
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


def build_model(files: ModelFiles, config: ModelConfig) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config)
    state_dict = {k: v for k, v in files.state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in allowed and "rotary" not in k]
    if missing or unexpected:
        problem = f"missing weight {missing[0]}" if missing else f"unexpected weight {unexpected[0]}"
        raise ModelLoadError(f"{files.path}: {problem} ({len(missing)} missing, {len(unexpected)} unexpected)")
    return model


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> LoadedModel:
    files = read_model(spec)
    if "model.embed_tokens.weight" not in files.state_dict:
        raise ModelLoadError(f"{files.path}: has no token embedding")
    try:
        config = ModelConfig.from_hf(files.hf_config)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{files.path}: unusable config ({err})") from None
    try:
        model = build_model(files, config)
    except RuntimeError as err:  # load_state_dict's shape mismatches
        raise ModelLoadError(f"{files.path}: weights do not fit the config ({str(err).splitlines()[-1].strip()})") \
            from None
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model=model, tokenizer=files.tokenizer, config=config, name=files.name,
                       fingerprint=fingerprint(files.hf_config, files.state_dict), path=files.path)
