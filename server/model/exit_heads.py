"""A set of exit heads: the heads at their layers, their calibration (thresholds per epsilon), and
their storage as exits.safetensors + exits.json, tied to one model by its fingerprint.

One head (server/model/exit_head.py) reads a hidden state out through the model's LM head, or, a
shortlist head, through K listed rows of it plus an estimated "other" logit for the rest; a head
after the last layer (layer == num_hidden_layers) reads the final hidden state through the model's
own final norm, so its listed logits are exactly the full model's and a row that exits there skips
only the full LM head. Only a shortlist's ids are stored; its rows are copied from the model at
load (`bind`).

A calibration entry per epsilon holds the plain plan (`thresholds`: every reached head is
evaluated, inf = off) and, for heads with gate probes, a gated plan (`gated`: thresholds and gate
cuts): an engine that runs gates evaluates a head only for rows whose gate score is >= the cut, so
the gate can only skip head evaluations (and with them exits); the policy's threshold still decides
every exit, and those thresholds were calibrated with the gates in place. `served_thresholds(eps)`
is what a server runs.
"""
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from server.model.exit_head import AdapterSpec, ExitHead

FORMAT = "offramp-exits/1"
SHIPPED_HEADS = Path(__file__).parent / "heads"  # package data: heads/<model alias>/exits.{json,safetensors}
DTYPES = {"float32": torch.float32, "float16": torch.float16}


class HeadSetError(Exception):
    """A head set that cannot be used: missing, malformed, or made for another model."""


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
    def create(cls, model, layers: list[int], spec: AdapterSpec, base: dict, *, shortlist: torch.Tensor | None = None,
               shortlist_layers: list[int] | None = None, mass_components: int = 0,
               shortlist_meta: dict | None = None) -> "ExitHeadSet":
        """Fresh heads (logit lens + zero adapters) for `model`; base = {"name", "fingerprint"}.

        shortlist [K] token ids: the heads at shortlist_layers (default: all) read out only those rows
        plus a mass estimator of mass_components pieces (untrained); shortlist_meta (how the list was
        built, its data hashes) is recorded in exits.json. A head at layer num_hidden_layers (after the
        last layer) must be a shortlist head; it uses the model's final norm and never an adapter."""
        config = model.config
        num_layers = config.num_hidden_layers
        layers = sorted(set(layers))
        shortlist_layers = sorted(set(layers if shortlist_layers is None else shortlist_layers))
        bad = [k for k in layers if not 1 <= k <= num_layers]
        if bad:
            raise ValueError(f"exit layers must be in 1..{num_layers}, got {bad}")
        if shortlist is None:
            shortlist_layers = []
        if not set(shortlist_layers) <= set(layers):
            raise ValueError(f"shortlist layers {shortlist_layers} must be exit layers ({layers})")
        if num_layers in layers and num_layers not in shortlist_layers:
            raise ValueError(f"a head after the last layer ({num_layers}) must be a shortlist head: the full LM "
                             "head is what it saves")
        if shortlist is not None:
            shortlist = torch.as_tensor(shortlist, dtype=torch.long)
            if len(shortlist) < 1 or shortlist.unique().numel() != len(shortlist) or \
                    not bool(((shortlist >= 0) & (shortlist < config.vocab_size)).all()):
                raise ValueError(f"the shortlist must be distinct token ids in [0, {config.vocab_size})")
        norm = model.model.norm.weight
        heads = [ExitHead(k, config.hidden_size, config.rms_norm_eps, AdapterSpec() if k == num_layers else spec, norm,
                          shortlist_ids=shortlist if k in shortlist_layers else None,
                          mass_components=mass_components if k in shortlist_layers else 0) for k in layers]
        meta = {
            "format": FORMAT,
            "base_model": {**base, "num_hidden_layers": num_layers,
                           "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
                           "rms_norm_eps": config.rms_norm_eps},
            "head_kind": spec.kind, "adapter_rank": spec.rank,
            "layers": layers,
            "calibration": None,
        }
        if shortlist_layers:
            meta["shortlist"] = {"layers": shortlist_layers, "size": len(shortlist), "mass_estimator": {
                "kind": "lse-mixture", "components": mass_components}, **(shortlist_meta or {})}
        heads = cls(heads, meta)
        heads.bind(model.lm_head.weight)
        return heads

    def bind(self, lm_head_weight: torch.Tensor) -> "ExitHeadSet":
        """Copy each shortlist head's LM-head rows from the model ([V, d]); heads with the same list
        share one copy."""
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for head in self.heads.values():
            if not head.has_shortlist:
                continue
            same = next((w for ids, w in copies if torch.equal(ids, head.shortlist_ids.cpu())), None)
            if same is not None:
                head.shortlist_weight = same
            else:
                head.bind(lm_head_weight)
                copies.append((head.shortlist_ids.cpu(), head.shortlist_weight))
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to() moves parameters and buffers; the bound LM-head rows follow (shared copies stay shared)
        result = super()._apply(fn, *args, **kwargs)
        moved: dict[int, torch.Tensor] = {}
        for head in self.heads.values():
            if head.shortlist_weight is not None:
                key = id(head.shortlist_weight)
                head.shortlist_weight = moved.setdefault(key, fn(head.shortlist_weight))
        return result

    def evaluation_flops(self, costs) -> list[float]:
        """Per head (layer order), the FLOPs of one evaluation under a CostModel: its adapter, norm, the
        rows it reads (the whole LM head, or its shortlist and mass estimator) and softmax statistics."""
        return [float(costs.exit_head_flops(head.num_listed, head.mass.num_components if head.has_shortlist else 0,
                                            adapter=head.adapter is not None)) for head in self.heads.values()]

    @property
    def num_layers(self) -> int:
        """The model's decoder layers: a head at this layer sits after the last one."""
        return int(self.meta["base_model"]["num_hidden_layers"])

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
        tensors.update({f"layer{k}.shortlist_ids": head.shortlist_ids.cpu().contiguous()
                        for k, head in self.heads.items() if head.has_shortlist})
        save_file(tensors, str(directory / "exits.safetensors"))
        (directory / "exits.json").write_text(json.dumps(self.meta, indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, directory, config=None, fingerprint: str | None = None,
             lm_head: torch.Tensor | None = None) -> "ExitHeadSet":
        """Load a head set; refuse one made for another model (by fingerprint and shapes). lm_head: the
        model's [V, d] LM head, whose listed rows shortlist heads copy (`bind`; needed before use)."""
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
        num_layers = base["num_hidden_layers"]
        for k in meta["layers"]:
            state = {name[len(f"layer{k}."):]: t for name, t in tensors.items() if name.startswith(f"layer{k}.")}
            ids = state.get("shortlist_ids")
            if k == num_layers and ids is None:
                raise HeadSetError(f"{meta_path}: the head after the last layer ({k}) has no shortlist")
            if ids is not None and (ids.dtype != torch.int64 or not bool(((ids >= 0) & (ids < base["vocab_size"])).all())):
                raise HeadSetError(f"{weights_path}: layer {k}'s shortlist holds ids outside the vocabulary")
            components = state["mass.proj.bias"].shape[0] if ids is not None and "mass.proj.bias" in state else 0
            try:
                head = ExitHead(k, state["norm_weight"].shape[0], base.get("rms_norm_eps", 1e-5),
                                AdapterSpec() if k == num_layers else spec, gate="gate.weight" in state,
                                shortlist_ids=ids, mass_components=components)
                head.load_state_dict(state)
            except (KeyError, RuntimeError, ValueError) as err:
                raise HeadSetError(f"{weights_path}: layer {k} does not fit its exits.json ({err})") from None
            heads.append(head)
        loaded = cls(heads, meta)
        return loaded.bind(lm_head) if lm_head is not None else loaded
