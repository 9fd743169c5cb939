"""Weight-only quantized linears on PyTorch's own CPU kernels, and the rewrite of a model to use them.

Modes (`--quantization`):
  none  float weights, nn.Linear (the CUDA default; bf16 there).
  int4  every decoder projection as int4, groups of 32 along K, asymmetric:
        W[n, k] = (q[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32], q in 0..15
        (aten._weight_int4pack_mm_for_cpu). A GGUF's Q4_0 / Q4_1 blocks are exactly this grid
        (Q4_1: w = d * q + m, so scale = d, zero = m + 8d; Q4_0: zero = 0), so they are packed as they
        are, never dequantised; other sources are quantised min/max per group.
  int8  int8 per output channel, symmetric (aten._weight_int8pack_mm), except the projections whose
        int8 error is largest (INT8_FP16_SHARE of them, ranked by relative weight error, kept as fp16):
        see `plan_int8`.
In both modes the LM head (and a tied embedding with it) is stored in fp16 and multiplied by fbgemm's
fp16-weight GEMM (fp32 activations and accumulation); int8 or int4 heads lose too many top-1 tokens
(BENCHMARKS.md). Embedding rows are looked up from the same fp16 table.

On AVX2 CPUs the int4 and int8 kernels are vectorised for bf16 activations only (fp32 ones take a scalar
loop 5-20x slower), so the modules below cast their input to bf16 for the kernel and the result back.
Each decoder layer also fuses k/v and gate/up into one call each (fewer, larger kernel calls; q stays
apart so that the KV fill of exited rows computes only k/v).
"""
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "int4")
GROUP_SIZE = 32
INT8_FP16_SHARE = 0.10  # of the decoder projections, by relative int8 weight error: kept in fp16 (int8 mode)
# fused module -> the Hugging Face projections it stacks along the output dimension
FUSED = {
    "self_attn.q_proj": ("self_attn.q_proj",),
    "self_attn.kv_proj": ("self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
PROJECTIONS = tuple(name for parts in FUSED.values() for name in parts)
aten = torch.ops.aten


@dataclass
class Int4Codes:
    """A [N, K] weight on the int4 grid: W = (q - 8) * scale + zero, per group of 32 along K."""
    q: torch.Tensor  # [N, K] int32 in 0..15
    scale: torch.Tensor  # [N, K / 32] f32
    zero: torch.Tensor  # [N, K / 32] f32

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int4Codes":
        """Min/max per group: the group's minimum and maximum are on the grid."""
        rows, cols = weight.shape
        groups = weight.float().view(rows, cols // GROUP_SIZE, GROUP_SIZE)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        return cls(q.view(rows, cols), scale, low + 8 * scale)

    @classmethod
    def cat(cls, parts: list["Int4Codes"]) -> "Int4Codes":
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero")))

    def dequantize(self) -> torch.Tensor:
        """[N, K] f32 with the scales and zeros in f32 (the kernel rounds them to bf16)."""
        expand = lambda t: t.repeat_interleave(GROUP_SIZE, dim=1)
        return (self.q.float() - 8) * expand(self.scale) + expand(self.zero)


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W as Int4Codes packed for aten._weight_int4pack_mm_for_cpu."""

    def __init__(self, codes: Int4Codes, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.q.shape
        self.register_buffer("packed", aten._convert_weight_to_int4pack_for_cpu(codes.q.contiguous(), 1))
        # [K / 32, N, 2] (scale, zero) in the activations' dtype of the kernel: bf16
        self.register_buffer("scales_zeros", torch.stack([codes.scale.T, codes.zero.T], -1).bfloat16().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @staticmethod
    def supports(rows: int, cols: int) -> bool:
        return cols % GROUP_SIZE == 0 and rows % 16 == 0  # the packing works in tiles of 16 rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP_SIZE, self.scales_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T (+ bias): int8 per output channel, aten._weight_int8pack_mm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = int8_per_channel(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale.bfloat16())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @staticmethod
    def supports(rows: int, cols: int) -> bool:
        return cols % GROUP_SIZE == 0  # other K read out of bounds or give wrong sums in torch 2.13

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = aten._weight_int8pack_mm(flat, self.qweight, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> q int8 [N, K] in -127..127, scale [N] f32 with weight ~ q * scale[:, None]."""
    weight = weight.float()
    scale = weight.abs().amax(1).clamp(min=1e-12) / 127
    return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Fp16Linear(nn.Module):
    """y = x @ W.T (+ bias), W stored in fp16: fbgemm's fp16-weight GEMM, fp32 activations and sums.

    `weight` [N, K] fp16 is kept beside fbgemm's packed copy for row lookups: the tied embedding, and
    the listed rows a shortlist exit head copies (`rows`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().half(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.packed = torch.ops.quantized.linear_prepack_fp16(self.weight.float(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        y = torch.ops.quantized.linear_dynamic_fp16(flat, self.packed).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """[K, in] f32: rows `ids` of W exactly as the GEMM uses them."""
        return self.weight.detach()[ids.to(self.weight.device)].float().contiguous()


QUANTIZED_LINEARS = (Int4Linear, Int8Linear, Fp16Linear)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED_LINEARS) for m in model.modules())


WeightSource = Callable[[str], "torch.Tensor | Int4Codes"]  # Hugging Face projection name -> its weight


def quantized_linear(mode: str, parts: list, biases: list, fp16: bool = False) -> nn.Module:
    """One module for the stacked weights `parts` (f32 tensors, or Int4Codes in int4 mode) and biases."""
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(len(p.q if isinstance(p, Int4Codes) else p)) for p, b in zip(parts, biases)])
    if mode == "int4" and all(isinstance(p, Int4Codes) for p in parts):
        codes = Int4Codes.cat(parts)
        if Int4Linear.supports(*codes.q.shape):
            return Int4Linear(codes, bias)
    weight = torch.cat([p.dequantize() if isinstance(p, Int4Codes) else p.float() for p in parts])
    rows, cols = weight.shape
    if mode == "int4" and Int4Linear.supports(rows, cols):
        return Int4Linear(Int4Codes.from_float(weight), bias)
    if mode == "int8" and not fp16 and Int8Linear.supports(rows, cols):
        return Int8Linear(weight, bias)
    if mode == "int8":
        return Fp16Linear(weight, bias)
    log.info("a [%d, %d] projection stays in float: no int4 kernel for that shape", rows, cols)
    linear = nn.Linear(cols, rows, bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.float(), requires_grad=False)
    return linear


def quantize_layer(layer: nn.Module, mode: str, weight: WeightSource, bias: Callable[[str], torch.Tensor | None],
                   fp16: frozenset[str] = frozenset()) -> None:
    """Give decoder layer `layer` its fused quantized projections (FUSED), from `weight` and `bias`;
    int8 mode keeps the Hugging Face projections named in `fp16` in fp16."""
    for fused, names in FUSED.items():
        parent_name, _, leaf = fused.rpartition(".")
        parent = layer.get_submodule(parent_name)
        module = quantized_linear(mode, [weight(n) for n in names], [bias(n) for n in names],
                                  fp16=any(n in fp16 for n in names))
        for name in names:  # the unfused float modules go
            setattr(parent, name.rpartition(".")[2], None)
        setattr(parent, leaf, module)


def int8_error(weight: torch.Tensor) -> float:
    """Relative Frobenius error of int8 per-channel quantisation of weight [N, K]."""
    q, scale = int8_per_channel(weight)
    weight = weight.float()
    return float((q.float() * scale[:, None] - weight).norm() / weight.norm().clamp(min=1e-12))


def plan_int8(errors: dict[str, float], share: float = INT8_FP16_SHARE) -> frozenset[str]:
    """The projections (keys of `errors`, e.g. "3.mlp.down_proj") to keep in fp16 in int8 mode: the
    `share` of them with the largest relative int8 weight error (ties broken by name). The criterion
    and the share were chosen on calibration text (BENCHMARKS.md, "CPU quantization")."""
    count = round(share * len(errors))
    ranked = sorted(errors, key=lambda name: (-errors[name], name))
    return frozenset(ranked[:count])


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Rewrite a float LlamaForCausalLM in place: decoder projections per `mode`, LM head and embedding
    in fp16. Each layer's float weights are freed as soon as its quantized modules exist."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {mode!r}; expected one of {', '.join(QUANTIZATIONS)}")
    if mode == "none":
        return model
    layers = model.model.layers
    fp16 = frozenset()
    if mode == "int8":
        errors = {f"{i}.{name}": int8_error(layer.get_submodule(name).weight)
                  for i, layer in enumerate(layers) for name in PROJECTIONS}
        fp16 = plan_int8(errors)
    for i, layer in enumerate(layers):
        modules = {name: layer.get_submodule(name) for name in PROJECTIONS}
        quantize_layer(layer, mode, lambda name: modules[name].weight, lambda name: modules[name].bias,
                       frozenset(n.partition(".")[2] for n in fp16 if n.startswith(f"{i}.")))
    quantize_head(model)
    return model


def quantize_head(model: nn.Module, embedding: torch.Tensor | None = None, head: torch.Tensor | None = None) -> None:
    """LM head -> Fp16Linear; the embedding table -> fp16, the same tensor when the two are tied.
    embedding / head [V, d]: their float weights when the model does not hold them yet."""
    embedding = model.model.embed_tokens.weight if embedding is None else embedding
    tied = model.config.tie_word_embeddings
    head = (embedding if tied else model.lm_head.weight) if head is None else head
    model.lm_head = Fp16Linear(head)
    table = model.lm_head.weight if tied else nn.Parameter(embedding.detach().half(), requires_grad=False)
    model.model.embed_tokens = nn.Embedding.from_pretrained(table, freeze=True)
    if tied:
        model.model.embed_tokens.weight = model.lm_head.weight
