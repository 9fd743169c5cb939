"""Serving a depth-tuned model: load the delta `offramp tune` wrote and merge it into the weights.

A tune folder holds:
  delta.json         {"format": "offramp-delta/1", "kind": "lora" | "full", "base_model": {"name",
                     "fingerprint"}, "tuned_fingerprint", "rank", "alpha", "targets"}
  delta.safetensors  lora: "<module>.lora_A" [r, in] and "<module>.lora_B" [out, r] per adapted
                     projection; full: the trained parameters under their model names
  heads/             the exit heads trained with it (exits.json names tuned_fingerprint)

A LoRA delta merges as W += B @ A * alpha / rank, once at load, after which serving costs exactly
what the original model costs. Training the deltas is offline work (calibration/lora.py, tune.py).
"""
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

FORMAT = "offramp-delta/1"


class TuneError(ValueError):
    """A tune folder that cannot be applied: missing, malformed, or made for another model (a ValueError,
    so the CLI reports it in one line)."""


def tuned_fingerprint(base_fingerprint: str, tensors: dict[str, torch.Tensor]) -> str:
    """Fingerprint of base weights + delta: heads trained with a delta are tied to it, not to the base."""
    digest = hashlib.sha256(base_fingerprint.encode())
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_delta(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    manifest_path, weights_path = directory / "delta.json", directory / "delta.safetensors"
    for path in (manifest_path, weights_path):
        if not path.is_file():
            raise TuneError(f"{path}: not found (a tune folder holds delta.json, delta.safetensors and heads/)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise TuneError(f"{manifest_path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise TuneError(f"{manifest_path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise TuneError(f"{weights_path}: cannot be read ({err})") from None
    return manifest, tensors


@torch.no_grad()
def merge_delta(model, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Add a LoRA delta to (or, for kind full, copy the trained tensors into) the model's weights."""
    params = dict(model.named_parameters())
    if manifest["kind"] == "full":
        for name, tensor in tensors.items():
            if name not in params or params[name].shape != tensor.shape:
                raise TuneError(f"delta tensor {name} {tuple(tensor.shape)} does not fit the model")
            params[name].copy_(tensor.to(params[name].dtype))
        return
    scaling = manifest["alpha"] / manifest["rank"]
    for key in (k for k in tensors if k.endswith(".lora_A")):
        name = key[: -len(".lora_A")]
        weight = params.get(f"{name}.weight")
        delta = (tensors[f"{name}.lora_B"].float() @ tensors[key].float()) * scaling
        if weight is None or weight.shape != delta.shape:
            raise TuneError(f"LoRA delta for {name} {tuple(delta.shape)} does not fit the model")
        weight += delta.to(weight.device, weight.dtype)


def apply_tune(loaded_model, tune_dir) -> Path:
    """Merge a tune folder's delta into loaded_model.model (in place) and return its head-set folder.

    tune_dir is the folder `offramp tune` wrote, or its heads/ folder (whose exits.json points back
    at the delta). loaded_model.fingerprint becomes the tuned fingerprint, so ExitHeadSet.load of
    the returned folder accepts it, and heads made for the original model are refused (and vice versa).
    """
    tune_dir = Path(tune_dir)
    exits = tune_dir / "exits.json"
    if not (tune_dir / "delta.json").is_file() and exits.is_file():
        pointer = (json.loads(exits.read_text()).get("tune") or {}).get("delta_dir")
        if pointer is None:
            raise TuneError(f"{exits}: a head set for an untuned model (no tune.delta_dir); use it as --heads")
        tune_dir = (tune_dir / pointer).resolve()
    manifest, tensors = load_delta(tune_dir)
    base = manifest["base_model"]
    if base["fingerprint"] != loaded_model.fingerprint:
        raise TuneError(f"{tune_dir / 'delta.json'}: made for model {base.get('name')!r} (fingerprint "
                        f"{base['fingerprint']}), not the loaded model (fingerprint {loaded_model.fingerprint})")
    merge_delta(loaded_model.model, manifest, tensors)
    loaded_model.fingerprint = manifest["tuned_fingerprint"]
    return tune_dir / "heads"
