"""A Llama-family decoder in plain PyTorch, structured for early exit.

Everything works on token-flat tensors: `hidden` is [N, d] with N the tokens of one call,
across sequences. The model never knows the KV-cache layout; it hands q/k/v to a `KVStore`,
which stores K/V and returns attention. That lets the same layers run a full batch, a subset
of rows (the ones that did not exit), or a KV fill for rows that did.

Parameter names equal Hugging Face's `LlamaForCausalLM`, so its state dicts load as they are.
"""
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from server.model.config import ModelConfig


class KVStore(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v [N, Hkv, Dh] of these tokens, return attention output [N, Hq, Dh]."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Only store k/v [N, Hkv, Dh] (KV fill for tokens that exited before `layer`)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, cast back before the weight, as Hugging Face does.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables [max_pos, Dh], grown on demand."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.cos = self.sin = None

    def tables(self, max_pos: int, device, dtype):
        if self.cos is None or self.cos.shape[0] < max_pos or self.cos.device != device or self.cos.dtype != dtype:
            length = max(max_pos, 2 * (0 if self.cos is None else self.cos.shape[0]), 256)
            t = torch.arange(length, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return self.cos, self.sin

    def at(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, Dh] for positions [N]; computed once per call, shared by all layers."""
        cos, sin = self.tables(int(positions.max()) + 1 if len(positions) else 1, positions.device, dtype)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [N, H, Dh] rotated by rope = (cos, sin) [N, 1, Dh] (Hugging Face's rotate-half layout)."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.attention_out_bias)
        self.kv_proj = None  # k and v stacked in one module, in place of k_proj and v_proj (quantize.py)

    def kv(self, x: torch.Tensor, rope):
        """x [N, d] (already normed) -> k, v [N, Hkv, Dh], k rotated."""
        if self.kv_proj is not None:
            k, v = self.kv_proj(x).chunk(2, dim=-1)
        else:
            k, v = self.k_proj(x), self.v_proj(x)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        return apply_rope(k, rope), v.reshape(-1, self.num_kv_heads, self.head_dim)

    def forward(self, x, rope, layer: int, kv_store: KVStore):
        q = apply_rope(self.q_proj(x).view(-1, self.num_heads, self.head_dim), rope)
        k, v = self.kv(x, rope)
        out = kv_store.attend(layer, q, k, v)  # [N, Hq, Dh]
        return self.o_proj(out.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.gate_up_proj = None  # gate and up stacked in one module, in place of the two (quantize.py)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, rope, kv_store: KVStore):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, self.index, kv_store)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (hidden states, KV); quantized weights have their own."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def head_weight(self) -> "torch.Tensor | nn.Module":
        """The LM head as exit heads read it: its weight [V, d], or a quantized head itself (quantize.py:
        called on [N, d] in self.dtype, `rows(ids)` gives the rows a shortlist head copies)."""
        return self.lm_head.weight if isinstance(self.lm_head, nn.Linear) else self.lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids).to(self.dtype)

    def run_layers(self, hidden, positions, start: int, end: int, kv_store: KVStore) -> torch.Tensor:
        """Take "layer start" hidden [N, d] to "layer end" hidden by running layers[start:end]."""
        rope = self.model.rotary_emb.at(positions, hidden.dtype)
        for layer in self.model.layers[start:end]:
            hidden = layer(hidden, rope, kv_store)
        return hidden

    def layer_kv(self, index: int, hidden, positions):
        """K/V [N, Hkv, Dh] that decoder layer `index` computes from its input hidden [N, d]."""
        layer = self.model.layers[index]
        return layer.self_attn.kv(layer.input_layernorm(hidden), self.model.rotary_emb.at(positions, hidden.dtype))

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False):
        """input_ids [B, T] (padding marked 0 in attention_mask) -> logits [B, T, V]."""
        batch, length = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        store = DenseCausalStore(batch, length, attention_mask)
        hidden = self.embed(input_ids.reshape(-1))
        positions = positions.reshape(-1)
        states = [hidden]
        rope = self.model.rotary_emb.at(positions, hidden.dtype)
        for layer in self.model.layers:
            hidden = layer(hidden, rope, store)
            states.append(hidden)
        logits = self.final_logits(hidden).view(batch, length, -1)
        if not output_hidden_states:
            return logits
        return logits, [h.view(batch, length, -1) for h in states]


def attention(q, k, v, mask):
    """q [Hq, Nq, Dh], k/v [Hkv, Nk, Dh], mask [Nq, Nk] bool (True = may attend) or None -> [Hq, Nq, Dh]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[0] != k.shape[0])


class DenseCausalStore:
    """No cache: whole [B, T] sequences in one call (tests, head fitting, calibration)."""

    def __init__(self, batch: int, length: int, attention_mask: torch.Tensor | None = None):
        self.batch, self.length = batch, length
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        if attention_mask is not None:
            keep = attention_mask.bool()
            # Every query also sees itself, so padded queries never attend to nothing (NaN).
            eye = torch.eye(length, dtype=torch.bool, device=keep.device)
            causal = (causal.to(keep.device) & keep[:, None, :]) | eye
            self.mask = causal[:, None]  # [B, 1, T, T]
        else:
            self.mask = None
        self.causal = attention_mask is None

    def attend(self, layer, q, k, v):
        shape = lambda t: t.view(self.batch, self.length, t.shape[1], t.shape[2]).transpose(1, 2)
        q4, k4, v4 = shape(q), shape(k), shape(v)
        gqa = q4.shape[1] != k4.shape[1]
        if self.causal:
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=self.mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)

    def write(self, layer, k, v):
        pass


class ContiguousKVCache:
    """One sequence, one preallocated [layers, max_len, Hkv, Dh] cache (reference generation).

    Call `at(positions)` before each forward to say where the tokens of this call sit.
    """

    def __init__(self, config: ModelConfig, max_len: int, device="cpu", dtype=torch.float32):
        shape = (config.num_hidden_layers, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = None

    def at(self, positions: torch.Tensor) -> "ContiguousKVCache":
        self.positions = positions
        self.start, self.end = int(positions[0]), int(positions[-1]) + 1
        self.mask = None
        if self.end - self.start > 1:  # prefill chunk: causal within the chunk, full view of the past
            ctx = torch.arange(self.end, device=positions.device)
            self.mask = ctx[None, :] <= positions[:, None]
        return self

    def write(self, layer, k, v):
        self.k[layer, self.start:self.end] = k
        self.v[layer, self.start:self.end] = v

    def attend(self, layer, q, k, v):
        self.write(layer, k, v)
        keys = self.k[layer, :self.end].transpose(0, 1)  # [Hkv, L, Dh]
        values = self.v[layer, :self.end].transpose(0, 1)
        return attention(q.transpose(0, 1), keys, values, self.mask).transpose(0, 1)
