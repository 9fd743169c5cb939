"""Low-rank deltas for the backbone, trained by `offramp tune` (serving them: server/model/tune_delta.py).

A LoRA linear computes y = base(x) + (x @ A.T @ B.T) * alpha / rank, A [r, in] random and
B [out, r] zero, so a fresh delta changes nothing. Merging adds B @ A * alpha / rank to the
base weight once, after which serving costs exactly what the original model costs.

A tune folder's layout is described in server/model/tune_delta.py, which loads and merges it.
"""
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from server.model.tune_delta import FORMAT, TuneError, tuned_fingerprint
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


