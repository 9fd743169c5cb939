"""FLOPs of one decode token, so that early exit can be priced against running the full model.

A FLOP is one multiply or one add (a matmul of m x k by k x n costs 2mkn). Matmuls dominate;
element-wise work (norms, RoPE, SiLU, softmax) is counted with a few FLOPs per element so that
nothing is left out, but its exact constant hardly matters.

A token that exits at layer k with h exit heads evaluated on the way costs
    k * layer + h * head + g * gate + (L - k) * kv_fill     (+ final norm and LM head if it ran them),
because the layers it skipped still need its K/V (input norm, k/v projections, RoPE on k);
g counts the gate probes run (exit_heads.py: a gate decides whether a head is evaluated at all).
For SmolLM2-135M one full-vocabulary exit head (d x V projection) costs about eight decoder layers;
a shortlist head of K rows and a C-piece mass estimator costs 2d(K + C) plus the softmax over K + 1
outcomes, about 0.65 of a layer for K = 4096. Heads differ in cost, so `token_flops` takes the FLOPs of
the heads a token evaluated (`head_flops`) and whether it ran the full LM head (`full_head`): a token
that exits at the head after the last layer ran every layer but not the LM head.
"""
from dataclasses import dataclass

import numpy as np

NORM_FLOPS = 4  # per element of an RMSNorm: square, sum, scale, weight
ROPE_FLOPS = 3  # per rotated element: x * cos + rotate(x) * sin
SWIGLU_FLOPS = 5  # per intermediate element: silu (4) and the gate * up product
SOFTMAX_FLOPS = 5  # per attention score: scale, max, exp, sum, divide
VOCAB_FLOPS = 10  # per vocabulary entry after the LM head: softmax (5), top-2 (2), entropy (3)


@dataclass(frozen=True)
class CostModel:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    adapter_flops: int = 0
    """FLOPs of the exit head's residual adapter for one token (0 for a norm-only head)."""
    context_len: int = 256
    """Keys attended by a decode token (prompt + generated so far) when a method is given none."""

    @classmethod
    def from_config(cls, config, *, head_kind: str = "norm", adapter_rank: int = 0,
                    context_len: int = 256) -> "CostModel":
        """config: a ModelConfig (or anything with its field names); head_kind/adapter_rank as in
        the head set's AdapterSpec: linear rank 0 = full d x d, mlp rank = hidden width (0 = d)."""
        d = config.hidden_size
        head_dim = getattr(config, "head_dim", 0) or d // config.num_attention_heads
        return cls(hidden_size=d, intermediate_size=config.intermediate_size,
                   num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                   num_key_value_heads=config.num_key_value_heads, head_dim=head_dim,
                   vocab_size=config.vocab_size, adapter_flops=adapter_flops(d, head_kind, adapter_rank),
                   context_len=context_len)

    def layer_flops(self, context_len=None):
        """One decoder layer for one token attending over context_len keys (itself included)."""
        ctx = self.context_len if context_len is None else context_len
        d, inter = self.hidden_size, self.intermediate_size
        q_dim = self.num_attention_heads * self.head_dim
        kv_dim = self.num_key_value_heads * self.head_dim
        projections = 2 * d * q_dim + 2 * 2 * d * kv_dim + 2 * q_dim * d  # q, k, v, o
        rope = ROPE_FLOPS * (q_dim + kv_dim)
        attention = 2 * 2 * q_dim * ctx + SOFTMAX_FLOPS * self.num_attention_heads * ctx  # q.k, softmax, p.v
        mlp = 3 * 2 * d * inter + SWIGLU_FLOPS * inter  # gate, up, down
        norms_and_residuals = 2 * NORM_FLOPS * d + 2 * d
        return projections + rope + attention + mlp + norms_and_residuals

    @property
    def kv_fill_flops(self) -> int:
        """K/V of one skipped layer for one exited token: input norm, k and v projections, RoPE on k."""
        kv_dim = self.num_key_value_heads * self.head_dim
        return NORM_FLOPS * self.hidden_size + 2 * 2 * self.hidden_size * kv_dim + ROPE_FLOPS * kv_dim

    @property
    def final_flops(self) -> int:
        """Final norm, LM head and the softmax over the vocabulary."""
        d, vocab = self.hidden_size, self.vocab_size
        return NORM_FLOPS * d + 2 * d * vocab + VOCAB_FLOPS * vocab

    @property
    def head_flops(self) -> int:
        """One full-vocabulary exit-head evaluation: adapter, RMSNorm, the shared d x V projection,
        softmax and top-2."""
        return self.exit_head_flops()

    def exit_head_flops(self, num_listed: int = 0, mass_components: int = 0, adapter: bool = True) -> int:
        """One exit-head evaluation: the adapter (if the head has one), RMSNorm, then the projection over
        the whole vocabulary (num_listed = 0) or over a shortlist of num_listed rows plus the mass
        estimator's mass_components pieces and their log-sum-exp, then softmax statistics over the
        outcomes (V, or K + 1 with "other")."""
        d = self.hidden_size
        flops = (self.adapter_flops if adapter else 0) + NORM_FLOPS * d
        if not num_listed:
            return flops + 2 * d * self.vocab_size + VOCAB_FLOPS * self.vocab_size
        return (flops + 2 * d * num_listed + 2 * d * mass_components + SOFTMAX_FLOPS * mass_components
                + VOCAB_FLOPS * (num_listed + 1))

    @property
    def gate_flops(self) -> int:
        """One gate probe: RMS-normalise the hidden state, a d-vector dot product, a sigmoid."""
        return NORM_FLOPS * self.hidden_size + 2 * self.hidden_size + 5

    def token_flops(self, exit_layer, heads_evaluated=0, context_len=None, gates_evaluated=0, *,
                    head_flops=None, full_head=None):
        """Cost of one token (or arrays of tokens, element-wise): exit_layer in 1..L (L = ran every
        layer), heads_evaluated = number of full-vocabulary exit heads evaluated for it, its own exit
        included, or head_flops = the FLOPs of the heads it evaluated (heads of different costs:
        `exit_head_flops` each); gates_evaluated = number of gate probes run for it; full_head = it ran
        the final norm and the full LM head (default: exit_layer == L)."""
        num_layers = self.num_hidden_layers
        exit_layer = np.asarray(exit_layer)
        if np.any((exit_layer < 1) | (exit_layer > num_layers)):
            raise ValueError(f"exit_layer must be in 1..{num_layers}")
        heads = np.asarray(heads_evaluated) * self.head_flops if head_flops is None else np.asarray(head_flops)
        full_head = exit_layer >= num_layers if full_head is None else np.asarray(full_head, dtype=bool)
        flops = (exit_layer * self.layer_flops(context_len) + heads + np.asarray(gates_evaluated) * self.gate_flops
                 + (num_layers - exit_layer) * self.kv_fill_flops + full_head * self.final_flops)
        return float(flops) if np.ndim(flops) == 0 else flops

    def full_depth_flops(self, context_len=None):
        """A token without early exit and without exit heads: the baseline savings are measured against."""
        return self.num_hidden_layers * self.layer_flops(context_len) + self.final_flops


def adapter_flops(hidden_size: int, kind: str, rank: int = 0) -> int:
    """FLOPs of a residual adapter h + adapter(h) for one token."""
    d = hidden_size
    if kind == "norm":
        return 0
    if kind == "linear":
        return (2 * d * d if rank == 0 else 2 * 2 * d * rank) + d
    if kind == "mlp":
        width = rank or d
        return 3 * 2 * d * width + SWIGLU_FLOPS * width + d
    raise ValueError(f"unknown head kind {kind!r}; expected norm, linear or mlp")
