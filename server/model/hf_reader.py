"""Read a local Hugging Face model folder: config.json, *.safetensors, tokenizer files, generation config."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as BackendTokenizer

from server.model.fetch import ModelLoadError
from server.model.tokenizer import Tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path}: no such file")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: has no weight_map")
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    state_dict = {}
    for path in safetensors_files(folder):
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file (listed in model.safetensors.index.json)")
        try:
            shard = load_file(path)
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({err})") from None
        state_dict.update({name: tensor.float() for name, tensor in shard.items()})
    return state_dict


def special_token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as "<s>" or as {"content": "<s>", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def read_chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    jinja_file = folder / "chat_template.jinja"  # transformers >= 4.43 may save it on its own
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {item["name"]: item["template"] for item in template}
        template = named.get("default")
    return template


def read_tokenizer(folder: Path, hf: dict) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        raise ModelLoadError(f"{path}: not a readable tokenizer ({str(err).splitlines()[0]})") from None
    tokenizer_config = read_json(folder / "tokenizer_config.json", required=False)
    template_tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = special_token_text(tokenizer_config.get(name))
        if text is not None:
            template_tokens[name] = text
    pad_id = hf.get("pad_token_id")
    if pad_id is None and "pad_token" in template_tokens:
        pad_id = backend.token_to_id(template_tokens["pad_token"])
    # a chat model's tokenizer may name an end-of-turn token its config.json leaves out
    tokenizer_eos = backend.token_to_id(template_tokens.get("eos_token", ""))
    eos_ids = hf["eos_token_id"] + ([tokenizer_eos] if tokenizer_eos is not None else [])
    return Tokenizer(backend, eos_token_ids=eos_ids, bos_token_id=hf.get("bos_token_id"),
                     pad_token_id=pad_id, chat_template=read_chat_template(folder, tokenizer_config),
                     template_tokens=template_tokens)


def as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], Tokenizer, str | None]:
    """(hf_config, state_dict, tokenizer, chat_template) of a Hugging Face folder; ModelLoadError if unusable."""
    folder = Path(folder)
    hf = read_json(folder / "config.json")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{folder / 'config.json'}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    generation = read_json(folder / "generation_config.json", required=False)
    # generation_config.json is what transformers' generate() stops on; config.json may list fewer
    hf["eos_token_id"] = list(dict.fromkeys(as_id_list(hf.get("eos_token_id"))
                                            + as_id_list(generation.get("eos_token_id"))))
    hf.setdefault("bos_token_id", generation.get("bos_token_id"))
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 folds rope_scaling into rope_parameters
    if hf.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        hf["rope_scaling"] = rope
    tokenizer = read_tokenizer(folder, hf)
    hf["eos_token_id"] = tokenizer.eos_token_ids
    state_dict = read_state_dict(folder)
    # LlamaConfig defaults to untied, but a checkpoint without a head can only mean tied
    hf.setdefault("tie_word_embeddings", "lm_head.weight" not in state_dict)
    if hf["tie_word_embeddings"]:
        state_dict.pop("lm_head.weight", None)  # the embedding is the head
    return hf, state_dict, tokenizer, tokenizer.chat_template
