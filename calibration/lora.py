"""Low-rank deltas for the backbone, and `apply_tune`, which serves a tuned model.

A LoRA linear computes y = base(x) + (x @ A.T @ B.T) * alpha / rank, A [r, in] random and
B [out, r] zero, so a fresh delta changes nothing. Merging adds B @ A * alpha / rank to the
base weight once, after which serving costs exactly what the original model costs.

A tune folder (what `offramp tune` writes) holds:
  delta.json         {"format": "offramp-delta/1", "kind": "lora" | "full", "base_model": {"name",
                     "fingerprint"}, "tuned_fingerprint", "rank", "alpha", "targets"}
  delta.safetensors  lora: "<module>.lora_A" [r, in] and "<module>.lora_B" [out, r] per adapted
                     projection; full: the trained parameters under their model names
  heads/             the exit heads trained with it (exits.json names tuned_fingerprint)
"""
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "offramp-delta/1"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TuneError(ValueError):
    """A tune folder that cannot be applied: missing, malformed, or made for another model (a ValueError,
    so the CLI reports it in one line)."""


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank delta; `enabled = False` gives the base output."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # as nn.Linear initialises its weight
        self.enabled = True
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """[out, in] what merging adds to the base weight (float32)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled or self.merged:
            return out
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T  # [..., r] then [..., out]
        return out + (delta * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def target_linears(model, targets=TARGETS) -> dict[str, nn.Linear]:
    """Module name -> the projection, for every decoder layer's targeted projections."""
    return {name: module for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in targets and ".layers." in f".{name}"}


def attach_lora(model, rank: int, alpha: float, targets=TARGETS) -> dict[str, LoRALinear]:
    """Wrap the targeted projections in place; freezes every base parameter. Returns name -> LoRALinear."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, linear in target_linears(model, targets).items():
        parent_name, attr = name.rsplit(".", 1)
        wrapped[name] = LoRALinear(linear, rank, alpha)
        setattr(model.get_submodule(parent_name), attr, wrapped[name])
    if not wrapped:
        raise ValueError(f"no projection named {', '.join(targets)} in the model")
    return wrapped


def lora_modules(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def detach_lora(model, merge: bool = True) -> None:
    """Put the plain projections back, with the delta merged into them (or dropped)."""
    for name, module in lora_modules(model).items():
        if merge:
            module.merge()
        else:
            module.unmerge()
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, module.base)


@contextmanager
def lora_disabled(model):
    """Run the model as the original (the deltas bypassed, not merged), e.g. for teacher targets."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise ValueError("cannot bypass LoRA deltas that are merged")
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


def lora_state(model) -> dict[str, torch.Tensor]:
    """The deltas as "<module>.lora_A" / "<module>.lora_B" float32 tensors."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A"] = module.lora_A.detach().float().cpu().contiguous()
        state[f"{name}.lora_B"] = module.lora_B.detach().float().cpu().contiguous()
    return state


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    modules = lora_modules(model)
    with torch.no_grad():
        for key, tensor in state.items():
            name, part = key.rsplit(".", 1)
            if name not in modules:
                raise TuneError(f"LoRA delta for {name}, which the model does not have")
            getattr(modules[name], part).copy_(tensor)


def tuned_fingerprint(base_fingerprint: str, tensors: dict[str, torch.Tensor]) -> str:
    """Fingerprint of base weights + delta: heads trained with a delta are tied to it, not to the base."""
    digest = hashlib.sha256(base_fingerprint.encode())
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_delta(directory, tensors: dict[str, torch.Tensor], manifest: dict) -> dict:
    """Write delta.safetensors + delta.json; manifest needs kind and base_model. Returns the full manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    manifest = {"format": FORMAT, **manifest,
                "tuned_fingerprint": tuned_fingerprint(manifest["base_model"]["fingerprint"], tensors)}
    save_file(tensors, str(directory / "delta.safetensors"))
    (directory / "delta.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


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
