"""One exit head: a light read-out of a hidden state through the model's own LM head (exit_heads.py
holds the set: layers, calibration, storage).

head(h) = lm_head @ rms_norm(h + adapter(h)) * norm_weight

The LM head is shared with the model; a full-vocabulary head owns only its RMSNorm weight
(initialised from the final norm) and an optional zero-initialised residual adapter, so a fresh
head is exactly the logit lens. A shortlist head reads only its K listed rows (a contiguous copy made
by `bind`) plus the "other" logit of its mass estimator. The optional gate is a linear probe that
predicts the head's margin for about 6d FLOPs.
"""
from dataclasses import dataclass

import torch
from torch import nn

from server.model.llama import rms_norm

HEAD_KINDS = ("norm", "linear", "mlp")


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


class MassEstimator(nn.Module):
    """o(y) = logsumexp_c(a_c . y + b_c) ~= log sum_{j not listed} exp(w_j . y), y the head's normed
    input [N, d] -> [N] f32. C linear pieces of a convex function that is itself a log-sum-exp of
    linear pieces (one per unlisted token): initialised from clusters of the unlisted LM-head rows
    (a_c = centroid, b_c = log cluster size), then fitted to the exact value (calibration/fit.py)."""

    def __init__(self, dim: int, components: int):
        super().__init__()
        self.proj = nn.Linear(dim, components)

    @property
    def num_components(self) -> int:
        return self.proj.out_features

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.proj(y.to(self.proj.weight.dtype)).float(), dim=-1)


class ExitHead(nn.Module):
    def __init__(self, layer: int, dim: int, eps: float, spec: AdapterSpec, norm_init: torch.Tensor | None = None,
                 gate: bool = False, shortlist_ids: torch.Tensor | None = None, mass_components: int = 0):
        super().__init__()
        self.layer = layer
        self.eps = eps
        self.norm_weight = nn.Parameter(norm_init.detach().clone().float() if norm_init is not None else torch.ones(dim))
        self.adapter = None if spec.kind == "norm" else ResidualAdapter(dim, spec)
        self.gate = nn.Linear(dim, 1) if gate else None
        if shortlist_ids is not None and mass_components < 1:
            raise ValueError("a shortlist head needs a mass estimator (mass_components >= 1)")
        # [K] int64 vocabulary ids, most frequent first; None = a full-vocabulary head
        self.register_buffer("shortlist_ids", None if shortlist_ids is None else shortlist_ids.long().clone())
        self.mass = MassEstimator(dim, mass_components) if shortlist_ids is not None else None
        self.shortlist_weight: torch.Tensor | None = None  # [K, d] rows of the LM head, set by `bind`

    @property
    def has_shortlist(self) -> bool:
        return self.shortlist_ids is not None

    @property
    def num_listed(self) -> int:
        return len(self.shortlist_ids) if self.has_shortlist else 0

    def bind(self, lm_head_weight: "torch.Tensor | nn.Module") -> None:
        """Copy the listed rows of the LM head into a contiguous [K, d]: from its weight [V, d] (same dtype
        and device), or from a quantized head (server/model/quantize.py) as the rows it multiplies by."""
        if not self.has_shortlist:
            return
        if isinstance(lm_head_weight, torch.Tensor):
            self.shortlist_weight = lm_head_weight.detach()[self.shortlist_ids.to(lm_head_weight.device)].contiguous()
        else:
            self.shortlist_weight = lm_head_weight.rows(self.shortlist_ids)

    @property
    def bound_weight(self) -> torch.Tensor:
        """[K, d] the listed LM-head rows (after `bind`)."""
        if self.shortlist_weight is None:
            raise RuntimeError(f"the shortlist head at layer {self.layer} is not bound to an LM head (ExitHeadSet.bind)")
        return self.shortlist_weight

    def normed(self, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """hidden [N, d] -> y [N, d] in dtype: the head's RMSNorm of its adapted input (the LM head's input)."""
        return rms_norm(self.adapted(hidden), self.norm_weight.to(hidden.dtype), self.eps).to(dtype)

    def shortlist_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, d] -> [N, K + 1] f32: the listed tokens' logits, then the estimated other logit."""
        weight = self.bound_weight
        y = self.normed(hidden, weight.dtype)
        return torch.cat([(y @ weight.T).float(), self.mass(y)[:, None]], dim=1)

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

    def logits(self, hidden: torch.Tensor, lm_head_weight: "torch.Tensor | nn.Module") -> torch.Tensor:
        """hidden [N, d] -> logits [N, V] through the whole shared LM head, its weight [V, d] or a quantized
        head module (offline: fitting, calibration; the reference generation)."""
        if not isinstance(lm_head_weight, torch.Tensor):
            return lm_head_weight(self.normed(hidden, hidden.dtype))
        return self.normed(hidden, lm_head_weight.dtype) @ lm_head_weight.T
