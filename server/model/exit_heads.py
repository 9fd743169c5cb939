"""Exit heads: a light read-out of an intermediate hidden state through the model's own LM head.

head(h) = lm_head @ rms_norm(h + adapter(h)) * norm_weight

The LM head is shared with the model, never copied; a head owns only its RMSNorm weight
(initialised from the final norm) and an optional zero-initialised residual adapter, so a
fresh head is exactly the logit lens. A head set is saved as exits.safetensors + exits.json.

Optional gate: a linear probe on the RMS-normalised hidden state, sigmoid(w . h / rms(h) + b),
that predicts the head's confidence (its top-2 margin) for about 6d FLOPs. A calibration entry
may hold, beside the plain plan (`thresholds`: every reached head is evaluated), a gated plan
(`gated`: thresholds and gate cuts): an engine that runs gates evaluates a head only for rows whose
gate score is >= the cut, so the gate can only skip head evaluations (and with them exits); the
policy's threshold still decides every exit, and those thresholds were calibrated with the gates
in place. `thresholds(eps, gated=True)` + `gate_cuts(eps)` give the gated plan.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from server.model.llama import rms_norm

FORMAT = "offramp-exits/1"
SHIPPED_HEADS = Path(__file__).parent / "heads"  # package data: heads/<model alias>/exits.{json,safetensors}
HEAD_KINDS = ("norm", "linear", "mlp")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


class HeadSetError(Exception):
    """A head set that cannot be used: missing, malformed, or made for another model."""


@dataclass
class AdapterSpec:
    kind: str = "norm"  # norm (no adapter) | linear | mlp
    rank: int = 0  # linear: 0 = full d x d, else low rank; mlp: hidden width

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; expected one of {', '.join(HEAD_KINDS)}")


class ResidualAdapter(nn.Module):
    """Zero-initialised residual map d -> d: a linear (full or low-rank) or a SwiGLU MLP."""

    def __init__(self, dim: int, spec: AdapterSpec):
        super().__init__()
        self.kind = spec.kind
        if spec.kind == "linear" and spec.rank == 0:
            self.proj = nn.Linear(dim, dim, bias=False)
            nn.init.zeros_(self.proj.weight)
        elif spec.kind == "linear":
            self.down = nn.Linear(dim, spec.rank, bias=False)
            self.up = nn.Linear(spec.rank, dim, bias=False)
            nn.init.zeros_(self.up.weight)
        else:
            width = spec.rank or dim
            self.gate = nn.Linear(dim, width, bias=False)
            self.up = nn.Linear(dim, width, bias=False)
            self.down = nn.Linear(width, dim, bias=False)
            nn.init.zeros_(self.down.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "proj"):
            return self.proj(h)
        if self.kind == "linear":
            return self.up(self.down(h))
        return self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class ExitHead(nn.Module):
    def __init__(self, layer: int, dim: int, eps: float, spec: AdapterSpec, norm_init: torch.Tensor | None = None,
                 gate: bool = False):
        super().__init__()
        self.layer = layer
        self.eps = eps
        self.norm_weight = nn.Parameter(norm_init.detach().clone().float() if norm_init is not None else torch.ones(dim))
        self.adapter = None if spec.kind == "norm" else ResidualAdapter(dim, spec)
        self.gate = nn.Linear(dim, 1) if gate else None

    def gate_score(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, d] -> [N] float32 in (0, 1): the probe's guess of the head's margin (1 without a gate)."""
        if self.gate is None:
            return hidden.new_ones(hidden.shape[0], dtype=torch.float32)
        normed = rms_norm(hidden.float(), torch.ones_like(self.gate.weight[0]), self.eps)
        return torch.sigmoid(self.gate(normed)[:, 0])

    def adapted(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, d] -> hidden + adapter(hidden), the input of the head's norm."""
        if self.adapter is None:
            return hidden
        return hidden + self.adapter(hidden.to(self.norm_weight.dtype)).to(hidden.dtype)

    def logits(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """hidden [N, d] -> logits [N, V] through the shared LM head."""
        normed = rms_norm(self.adapted(hidden), self.norm_weight.to(hidden.dtype), self.eps)
        return normed.to(lm_head_weight.dtype) @ lm_head_weight.T


def _key(eps: float) -> str:
    return f"{eps:g}"


def match_epsilon(eps: float, calibrated):
    """The element of `calibrated` (floats, or exits.json's string keys) that `eps` names, equal up
    to 1e-9 so that 0.95 and 0.9500000001 are one; None if there is none."""
    return next((e for e in calibrated if math.isclose(float(e), eps, abs_tol=1e-9)), None)


def _stored(entry: dict) -> dict:
    """A calibration entry as exits.json holds it: layer keys as strings, inf thresholds and
    -inf gate cuts (off / no gate) as null, also in its gated plan."""
    out = dict(entry)
    for name in ("thresholds", "gate_cuts"):
        if name in entry:
            out[name] = {str(k): (None if not math.isfinite(v) else float(v)) for k, v in entry[name].items()}
    if entry.get("gated"):
        out["gated"] = _stored(entry["gated"])
    return out


class ExitHeadSet(nn.Module):
    """Heads at several layers plus their calibration (thresholds per epsilon) and provenance."""

    def __init__(self, heads: list[ExitHead], meta: dict):
        super().__init__()
        self.heads = nn.ModuleDict({str(h.layer): h for h in sorted(heads, key=lambda h: h.layer)})
        self.meta = meta

    @classmethod
    def create(cls, model, layers: list[int], spec: AdapterSpec, base: dict) -> "ExitHeadSet":
        """Fresh heads (logit lens + zero adapters) for `model`; base = {"name", "fingerprint"}."""
        config = model.config
        bad = [k for k in layers if not 1 <= k < config.num_hidden_layers]
        if bad:
            raise ValueError(f"exit layers must be in 1..{config.num_hidden_layers - 1}, got {bad}")
        norm = model.model.norm.weight
        heads = [ExitHead(k, config.hidden_size, config.rms_norm_eps, spec, norm) for k in sorted(set(layers))]
        meta = {
            "format": FORMAT,
            "base_model": {**base, "num_hidden_layers": config.num_hidden_layers,
                           "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
                           "rms_norm_eps": config.rms_norm_eps},
            "head_kind": spec.kind, "adapter_rank": spec.rank,
            "layers": sorted(set(layers)),
            "calibration": None,
        }
        return cls(heads, meta)

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.heads]

    def head(self, layer: int) -> ExitHead:
        return self.heads[str(layer)]

    @property
    def policy(self) -> str:
        return (self.meta.get("calibration") or {}).get("policy", "margin")

    @property
    def policy_params(self) -> dict:
        return (self.meta.get("calibration") or {}).get("policy_params", {})

    def epsilons(self) -> list[float]:
        calibration = self.meta.get("calibration") or {}
        return sorted(float(e) for e in calibration.get("epsilons", {}))

    @property
    def default_epsilon(self) -> float | None:
        calibration = self.meta.get("calibration") or {}
        eps = calibration.get("default_epsilon")
        return float(eps) if eps is not None else (self.epsilons()[-1] if self.epsilons() else None)

    def thresholds(self, eps: float, gated: bool = False) -> dict[int, float]:
        """Per exit layer, the threshold at eps; +inf where the head is off at that eps.
        gated: the thresholds of the gated plan (with gate_cuts), the plain ones if there is none."""
        entry = self.calibration_entry(eps)
        raw = (entry.get("gated") or entry)["thresholds"] if gated else entry["thresholds"]
        return {k: (math.inf if raw.get(str(k)) is None else float(raw[str(k)])) for k in self.layers}

    def calibration_entry(self, eps: float) -> dict:
        calibration = self.meta.get("calibration") or {}
        entries = calibration.get("epsilons", {})
        key = match_epsilon(eps, entries)
        if key is not None:
            return entries[key]
        raise KeyError(f"exit_epsilon {eps:g} is not calibrated; available: {', '.join(_key(e) for e in self.epsilons()) or 'none'}")

    def active_layers(self, eps: float) -> list[int]:
        return [k for k, t in self.thresholds(eps).items() if math.isfinite(t)]

    @property
    def has_gates(self) -> bool:
        return any(head.gate is not None for head in self.heads.values())

    def add_gates(self) -> None:
        """Give every head a fresh gate probe (zero weights: score 0.5 for every row)."""
        for head in self.heads.values():
            head.gate = nn.Linear(head.norm_weight.shape[0], 1).to(head.norm_weight.device)
            nn.init.zeros_(head.gate.weight)
            nn.init.zeros_(head.gate.bias)
        self.meta["gate"] = {"kind": "linear-probe", "target": "margin"}

    def gate_cuts(self, eps: float) -> dict[int, float]:
        """Per exit layer, the gated plan's cut at eps: evaluate the head only where gate_score >= cut
        (-inf = no gate: always evaluate)."""
        raw = (self.calibration_entry(eps).get("gated") or {}).get("gate_cuts") or {}
        return {k: (-math.inf if raw.get(str(k)) is None else float(raw[str(k)])) for k in self.layers}

    def uses_gates(self, eps: float) -> bool:
        """Whether a server runs the gated plan at eps: the set has gate probes, the plan has an active
        head, and it saved at least as much compute as the plain plan where both were measured."""
        gated = self.calibration_entry(eps).get("gated")
        if not self.has_gates or not gated or not any(math.isfinite(t) for t in self.thresholds(eps, gated=True).values()):
            return False
        if not self.active_layers(eps):
            return True
        plain_saved = (self.calibration_entry(eps).get("teacher_forced") or {}).get("saved_fraction")
        gated_saved = (gated.get("teacher_forced") or {}).get("saved_fraction")
        return plain_saved is None or gated_saved is None or gated_saved >= plain_saved

    def served_thresholds(self, eps: float) -> tuple[dict[int, float], dict[int, float]]:
        """What a server runs at eps: per exit layer (threshold, gate cut), the gated plan where
        `uses_gates`, else the plain thresholds with no gates (cut -inf)."""
        if self.uses_gates(eps):
            return self.thresholds(eps, gated=True), self.gate_cuts(eps)
        return self.thresholds(eps), {k: -math.inf for k in self.layers}

    def set_calibration(self, policy: str, entries: dict[float, dict], default_epsilon: float, **extra):
        """entries: eps -> {"thresholds": {layer: float | inf}, ...stats}. inf is stored as null."""
        stored = {_key(eps): _stored(entry) for eps, entry in entries.items()}
        self.meta["calibration"] = {"policy": policy, "epsilons": stored, "default_epsilon": default_epsilon, **extra}

    def save(self, directory, dtype: torch.dtype | None = None) -> None:
        """dtype of the stored weights: float32, or float16 to ship a small file (the heads are
        rounded to it in place first, so a saved set and its loaded copy hold the same numbers)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = dtype or DTYPES[self.meta.get("weights_dtype", "float32")]
        self.meta["weights_dtype"] = str(dtype).removeprefix("torch.")
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.to(dtype))
        tensors = {f"layer{k}.{name}": p.detach().to(dtype).contiguous().cpu()
                   for k, head in self.heads.items() for name, p in head.named_parameters()}
        save_file(tensors, str(directory / "exits.safetensors"))
        (directory / "exits.json").write_text(json.dumps(self.meta, indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, directory, config=None, fingerprint: str | None = None) -> "ExitHeadSet":
        """Load a head set; refuse one made for another model (by fingerprint and shapes)."""
        directory = Path(directory)
        meta_path, weights_path = directory / "exits.json", directory / "exits.safetensors"
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise HeadSetError(f"{path}: not found (a head set is a folder with exits.json and exits.safetensors)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise HeadSetError(f"{meta_path}: not valid JSON ({err})") from None
        if meta.get("format") != FORMAT:
            raise HeadSetError(f"{meta_path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
        base = meta["base_model"]
        if fingerprint is not None and base.get("fingerprint") != fingerprint:
            raise HeadSetError(f"{meta_path}: made for model {base.get('name')!r} (fingerprint {base.get('fingerprint')}), "
                               f"not the loaded model (fingerprint {fingerprint})")
        if config is not None:
            for field in ("num_hidden_layers", "hidden_size", "vocab_size"):
                if base.get(field) != getattr(config, field):
                    raise HeadSetError(f"{meta_path}: made for a model with {field}={base.get(field)}, "
                                       f"the loaded model has {getattr(config, field)}")
        spec = AdapterSpec(meta["head_kind"], meta.get("adapter_rank", 0))
        try:
            tensors = load_file(str(weights_path))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise HeadSetError(f"{weights_path}: cannot be read ({err})") from None
        heads = []
        for k in meta["layers"]:
            norm = tensors[f"layer{k}.norm_weight"]
            head = ExitHead(k, norm.shape[0], base.get("rms_norm_eps", 1e-5), spec, gate=f"layer{k}.gate.weight" in tensors)
            state = {name[len(f"layer{k}."):]: t for name, t in tensors.items() if name.startswith(f"layer{k}.")}
            head.load_state_dict(state)
            heads.append(head)
        return cls(heads, meta)
