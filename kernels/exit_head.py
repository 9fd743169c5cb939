"""Fused exit decision: RMSNorm -> LM head -> softmax statistics -> token, without [rows, vocab] logits.

Three things live here, llm.c style:
- `exit_head_triton`: the Triton path. A tiny RMSNorm kernel writes the normalised hidden [rows, d] once;
  `_partial_kernel` splits the vocabulary across programs (so one row still fills the GPU) and keeps a
  running top-1, top-2, log-sum-exp, entropy sum and Gumbel-max sample per row in registers;
  `_reduce_kernel` merges the per-split partials into the final decision.
- `exit_head_reference`: plain torch through materialised logits, same precision recipe.
- `exit_head`: the dispatcher (Triton on CUDA, reference on CPU; rows that need top-k / top-p or the
  logprobs of other tokens go through the reference for just those rows).

Precision recipe (both paths): the head RMSNorm runs in fp32, y = h * rsqrt(mean(h^2) + eps) * w, then y is
cast to lm_head's dtype (as a bf16 model would); logits are fp32 sums of exact products of those
lm_head-dtype values. All softmax statistics are of the temperature-1 distribution.

Sampling is Gumbel-max with a counter-based integer hash keyed by (row seed, vocab index), implemented
identically in Triton (uint32) and torch (int64 masked to 32 bits), so the same seed gives the same token
on either path up to rounding ties: token = argmax(logits * (1 / t) + gumbel).

Shortlist heads: `lm_head` may be K rows of the LM head, `token_ids` [K] their vocabulary ids, and
`other_logit` a callable giving one more logit per row, an estimate of the log-sum-exp of the logits of
every token outside the list. Every statistic is then over shortlist ∪ {other}: "other" is one outcome
with that logit (its own Gumbel noise at index OTHER_INDEX; at temperature t its score is other / t).
Listed tokens keep the noise of their vocabulary id, so a row that does not exit and samples from the
full LM head with the same seed sees the same noise on them. A row whose top-1 or sampled token is
"other" gets token -1 and never exits: the head cannot say which token it would be.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch reference still serves
    HAS_TRITON = False

_MASK32 = 0xFFFFFFFF
# Hash constants: multipliers stay below 2**31 so the torch twin multiplies 32-bit values in int64
# without overflow; 0x21F0AAAD / 0x735A2D97 with shifts 16/15/15 is a well-mixing 2-round 32-bit hash.
_MUL_A, _MUL_B, _MUL_IDX = 0x21F0AAAD, 0x735A2D97, 0x61C88647
_SALT_LO, _SALT_HI = 0x3C6EF372, 0x1B873593
OTHER_INDEX = 0x7FFFFFFF  # the hash index of the "other" outcome of a shortlist head: no vocabulary id


@dataclass
class ExitDecision:
    token: torch.Tensor          # [rows] int64: argmax, or the Gumbel-max sample at the row's temperature
    margin: torch.Tensor         # [rows] f32: p1 - p2 of the temperature-1 softmax
    exit: torch.Tensor           # [rows] bool: margin >= threshold
    logprob: torch.Tensor        # [rows] f32: temperature-1 log-softmax of `token`
    max_prob: torch.Tensor       # [rows] f32: p1
    entropy: torch.Tensor        # [rows] f32: entropy (nats) of the temperature-1 softmax
    top_logprobs: torch.Tensor | None = None  # [rows, n] f32, only when num_logprobs was asked (-inf pads)
    top_tokens: torch.Tensor | None = None    # [rows, n] int64, matching top_logprobs (-1 pads)


@dataclass(frozen=True)
class KernelConfig:
    block_r: int      # rows per program (>= 16: tl.dot's minimum)
    block_v: int      # vocabulary tile
    block_d: int      # hidden-dim chunk of the dot
    num_splits: int   # programs along the vocabulary
    num_warps: int = 4
    num_stages: int = 3


def _empty(shape, dtype, device) -> torch.Tensor:
    # The one allocator of the Triton path; tests replace it to poison every output and partial buffer.
    return torch.empty(shape, dtype=dtype, device=device)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_config(rows: int, d: int, vocab: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    if _INTERPRETED:
        # The interpreter's cost is per op, not per element: few large tiles, but still a few splits.
        block_r = min(128, max(16, triton.next_power_of_2(rows)))
        block_v, block_d = 1024, min(128, triton.next_power_of_2(d))
        num_warps, num_programs = 4, 4
    else:
        block_r = 16 if rows <= 16 else 32 if rows <= 32 else 64
        block_v, block_d = 128, 32 if dtype == torch.float32 else 64
        num_warps = 4 if block_r <= 32 else 8
        num_programs = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    row_blocks = triton.cdiv(rows, block_r)
    num_tiles = triton.cdiv(vocab, block_v)
    # Each split gets whole tiles and none is empty.
    splits = max(1, min(num_tiles, triton.cdiv(num_programs, row_blocks)))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    return KernelConfig(block_r, block_v, block_d, triton.cdiv(num_tiles, tiles_per_split), num_warps)


def rms_norm(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    h = hidden.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(dtype)


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    # [rows] f32; 0 marks a greedy row. Both paths multiply by this exact value.
    t = temperature.float()
    return torch.where(t > 0, 1.0 / t, torch.zeros_like(t))


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    # x int64 holding uint32 values; twin of _mix32 below.
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 15)


def gumbel_noise(seed: torch.Tensor, vocab: int | torch.Tensor) -> torch.Tensor:
    """[rows] int64 seeds -> [rows, vocab] f32 standard Gumbel noise, bit-identical to the Triton kernel's
    hash; vocab: the vocabulary size (noise of ids 0..vocab-1), or [n] int64 ids to draw the noise of."""
    seed = seed.to(torch.int64)
    key_a = _mix32_torch((seed & _MASK32) ^ _SALT_LO)[:, None]
    key_b = _mix32_torch(((seed >> 32) & _MASK32) ^ _SALT_HI ^ key_a[:, 0])[:, None]
    if isinstance(vocab, torch.Tensor):
        idx = vocab.to(seed.device, torch.int64)[None, :]
    else:
        idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]
    h = _mix32_torch((key_a + ((idx * _MUL_IDX) & _MASK32)) & _MASK32)
    h = _mix32_torch(h ^ key_b)
    # 23 random bits -> u in (0, 1) exactly representable, never 0 or 1.
    u = ((h >> 9).float() + 0.5) * (2.0 ** -23)
    return -torch.log(-torch.log(u))


def random_seeds(rows: int, device: torch.device) -> torch.Tensor:
    # seed=None: draw row seeds from torch's default generator.
    return torch.randint(0, 2**62, (rows,), dtype=torch.int64).to(device)


def filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor | None = None,
                       top_p: torch.Tensor | None = None) -> torch.Tensor:
    """scaled [rows, V] (logits / temperature) with the tokens outside top-k, then outside the top-p
    nucleus of what is left, set to -inf. top_k [rows] (0 = off), top_p [rows] (1 = off), or None.
    The nucleus is the smallest set of most probable tokens whose probability reaches top_p; the most
    probable token always stays, and a row with top_p = 1 keeps everything even where the cumulative
    sum rounds past 1. The one filter of both sampling paths (the sampler and this kernel's reference)."""
    vocab = scaled.shape[-1]
    if top_k is not None and bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).long().to(scaled.device)
        kth = scaled.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])  # [rows, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p is not None and bool((top_p < 1).any()):
        ordered, order = scaled.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        top_p = top_p.float().to(scaled.device)[:, None]
        drop = ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1)  # mass before this token already enough
        scaled = scaled.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return scaled


def exit_head_reference(hidden, norm_weight, lm_head, thresholds, *, eps, temperature=None, seed=None,
                        adapter=None, top_k=None, top_p=None, num_logprobs=None, token_ids=None, other_logit=None,
                        fp32_logits=True) -> ExitDecision:
    """Plain-torch exit decision through materialised [rows, K (+ 1)] logits.

    fp32_logits=True follows the kernel's recipe (fp32 products of lm_head-dtype values); False runs the
    projection in lm_head's dtype and rounds the logits to it, as an eager bf16 model would (benchmarks).
    top_k [rows] int (0 = off), top_p [rows] float (1 = off) filter the sampled token only; num_logprobs
    [rows] int asks for that many top temperature-1 logprobs per row (never "other"). token_ids [K] and
    other_logit (y [rows, d] -> [rows] f32): a shortlist head (module docstring). lm_head may also be a
    quantized LM head module (server/model/quantize.py), called on the fp32 normed rows: its own kernel
    then computes the logits.
    """
    if adapter is not None:
        hidden = adapter(hidden)
    if not isinstance(lm_head, torch.Tensor):
        y = rms_norm(hidden, norm_weight, eps, torch.float32)                # [rows, d]
        logits = lm_head(y).float()                                           # [rows, V]
    elif fp32_logits:
        y = rms_norm(hidden, norm_weight, eps, lm_head.dtype)
        logits = y.float() @ lm_head.float().T                                # [rows, K]
    else:
        y = rms_norm(hidden, norm_weight, eps, lm_head.dtype)
        logits = F.linear(y, lm_head).float()
    num_listed = logits.shape[1]
    ids = torch.arange(num_listed, device=logits.device) if token_ids is None else token_ids.to(logits.device)
    noise_ids = ids
    if other_logit is not None:  # one more column: the log-mass outside the list
        logits = torch.cat([logits, other_logit(y).float().to(logits.device)[:, None]], dim=1)   # [rows, K + 1]
        noise_ids = torch.cat([ids, ids.new_full((1,), OTHER_INDEX)])
    logprobs = logits.log_softmax(-1)
    top2 = logprobs.topk(2, dim=-1).values.exp()                              # [rows, 2]
    entropy = -(logprobs.exp() * logprobs).nan_to_num(nan=0.0).sum(-1)
    top1 = token = logits.argmax(-1)                                          # column index; ties: the lowest
    if temperature is not None:
        inv_t = inverse_temperature(temperature.to(logits.device))
        if seed is None:
            seed = random_seeds(logits.shape[0], logits.device)
        on_device = lambda x: None if x is None else x.to(logits.device)
        scaled = filter_top_k_top_p(logits * inv_t[:, None], on_device(top_k), on_device(top_p))
        sampled = (scaled + gumbel_noise(seed.to(logits.device), noise_ids)).argmax(-1)
        token = torch.where(inv_t > 0, sampled, token)
    margin = top2[:, 0] - top2[:, 1]
    exit = margin >= thresholds.to(logits.device, torch.float32)
    logprob = logprobs.gather(-1, token[:, None])[:, 0]
    if other_logit is not None:
        exit &= (top1 < num_listed) & (token < num_listed)
    token = torch.cat([ids, ids.new_full((1,), -1)])[token]                   # column -> vocabulary id, other -> -1
    decision = ExitDecision(token=token, margin=margin, exit=exit, logprob=logprob, max_prob=top2[:, 0],
                            entropy=entropy)
    if num_logprobs is not None and int(num_logprobs.max()) > 0:
        n = min(int(num_logprobs.max()), num_listed)
        values, columns = logprobs[:, :num_listed].topk(n, dim=-1)           # [rows, n]
        keep = torch.arange(n, device=logits.device)[None, :] < num_logprobs.to(logits.device)[:, None]
        decision.top_logprobs = values.masked_fill(~keep, float("-inf"))
        decision.top_tokens = ids[columns].masked_fill(~keep, -1)
    return decision


if HAS_TRITON:
    @triton.jit
    def _mix32(x):
        # uint32 hash; twin of _mix32_torch.
        x = x ^ (x >> 16)
        x = x * 0x21F0AAAD
        x = x ^ (x >> 15)
        x = x * 0x735A2D97
        return x ^ (x >> 15)

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, rows, d, stride_x, eps,
                        ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # y [rows, d] = (x * rsqrt(mean(x^2) + eps) * w) in fp32, stored in y's dtype; BLOCK_R rows a program.
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_r < rows)[:, None] & (offs_d < d)[None, :]
        x = tl.load(x_ptr + offs_r[:, None] * stride_x + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / d + eps)
        y = x * inv_rms[:, None] * w[None, :]
        if ROUND_BF16:
            # The interpreter's fp32 -> bf16 cast truncates; round to nearest even by hand, as the GPU does.
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            y_out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y_out = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_r[:, None] * d + offs_d[None, :], y_out, mask=mask)

    @triton.jit
    def _partial_kernel(y_ptr, w_ptr, inv_temp_ptr, seed_ptr, ids_ptr, part_f_ptr, part_i_ptr,
                        rows, d, vocab, tiles_per_split, stride_w,
                        SAMPLE: tl.constexpr, HAS_IDS: tl.constexpr, DOT_FP32: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        # Grid (row blocks, splits); row blocks vary fastest so programs sharing a vocabulary slice run
        # together and the slice is read from HBM once. `vocab` counts the rows of w (a shortlist's K);
        # HAS_IDS: ids [vocab] int32 holds each row's vocabulary id, which keys its Gumbel noise. Partials: part_f [6, splits, rows] f32 =
        # (top-1 logit = running max m, top-2 logit, S0 = sum e^(x-m), S1 = sum (x-m) e^(x-m),
        # best sample score, logit of the sample); part_i [2, splits, rows] i32 = (top-1 index, sample index).
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
        num_splits = tl.num_programs(1)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = offs_r < rows
        lane = tl.arange(0, BLOCK_V)
        v1 = tl.full([BLOCK_R], float("-inf"), tl.float32)
        v2 = tl.full([BLOCK_R], float("-inf"), tl.float32)
        i1 = tl.zeros([BLOCK_R], tl.int32)
        s0 = tl.zeros([BLOCK_R], tl.float32)
        s1 = tl.zeros([BLOCK_R], tl.float32)
        if SAMPLE:
            inv_t = tl.load(inv_temp_ptr + offs_r, mask=row_ok, other=0.0)
            seed = tl.load(seed_ptr + offs_r, mask=row_ok, other=0)
            key_a = _mix32(seed.to(tl.uint32) ^ 0x3C6EF372)
            key_b = _mix32((seed >> 32).to(tl.uint32) ^ 0x1B873593 ^ key_a)
            best = tl.full([BLOCK_R], float("-inf"), tl.float32)
            best_x = tl.zeros([BLOCK_R], tl.float32)
            best_i = tl.zeros([BLOCK_R], tl.int32)
        for t in range(0, tiles_per_split):
            v_start = (pid_s * tiles_per_split + t) * BLOCK_V
            offs_v = v_start + lane
            v_ok = offs_v < vocab
            acc = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
            for k in range(0, d, BLOCK_D):
                offs_d = k + tl.arange(0, BLOCK_D)
                d_ok = offs_d < d
                y = tl.load(y_ptr + offs_r[:, None] * d + offs_d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)                  # [R, D]
                w = tl.load(w_ptr + offs_v.to(tl.int64)[None, :] * stride_w + offs_d[:, None],
                            mask=d_ok[:, None] & v_ok[None, :], other=0.0)                    # [D, V]
                if DOT_FP32:
                    y = y.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(y, w, acc, input_precision=DOT_PRECISION)                        # [R, V]
            x = tl.where(v_ok[None, :], acc, float("-inf"))
            tile_1, tile_j = tl.max(x, axis=1, return_indices=True, return_indices_tie_break_left=True)
            tile_2 = tl.max(tl.where(lane[None, :] == tile_j[:, None], float("-inf"), x), axis=1)
            # Online softmax with S1 kept relative to the running max, so huge logits never cancel.
            m_new = tl.maximum(v1, tile_1)
            alpha = tl.exp(v1 - m_new)  # 0 on the first tile (v1 = -inf)
            p = tl.exp(x - m_new[:, None])
            xp = tl.where(v_ok[None, :], x - m_new[:, None], 0.0) * p
            s1 = alpha * (s1 + tl.where(s0 > 0, v1 - m_new, 0.0) * s0) + tl.sum(xp, axis=1)
            s0 = alpha * s0 + tl.sum(p, axis=1)
            v2 = tl.maximum(tl.minimum(v1, tile_1), tl.maximum(v2, tile_2))
            i1 = tl.where(tile_1 > v1, v_start + tile_j, i1)  # strict: the earlier index wins ties
            v1 = m_new
            if SAMPLE:
                if HAS_IDS:
                    noise_index = tl.load(ids_ptr + offs_v, mask=v_ok, other=0).to(tl.uint32)
                else:
                    noise_index = offs_v.to(tl.uint32)
                h = _mix32(key_a[:, None] + noise_index[None, :] * 0x61C88647)
                h = _mix32(h ^ key_b[:, None])
                u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
                score = tl.where(v_ok[None, :], acc * inv_t[:, None] - tl.log(-tl.log(u)), float("-inf"))
                tile_best, tile_k = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
                take = tile_best > best
                best_x = tl.where(take, tl.sum(tl.where(lane[None, :] == tile_k[:, None], x, 0.0), axis=1), best_x)
                best_i = tl.where(take, v_start + tile_k, best_i)
                best = tl.maximum(best, tile_best)
        out = pid_s * rows + offs_r
        plane = num_splits * rows
        tl.store(part_f_ptr + out, v1, mask=row_ok)
        tl.store(part_f_ptr + plane + out, v2, mask=row_ok)
        tl.store(part_f_ptr + 2 * plane + out, s0, mask=row_ok)
        tl.store(part_f_ptr + 3 * plane + out, s1, mask=row_ok)
        tl.store(part_i_ptr + out, i1, mask=row_ok)
        if SAMPLE:
            tl.store(part_f_ptr + 4 * plane + out, best, mask=row_ok)
            tl.store(part_f_ptr + 5 * plane + out, best_x, mask=row_ok)
            tl.store(part_i_ptr + plane + out, best_i, mask=row_ok)

    @triton.jit
    def _reduce_kernel(part_f_ptr, part_i_ptr, thresholds_ptr, inv_temp_ptr, seed_ptr, other_ptr, ids_ptr,
                       token_ptr, margin_ptr, exit_ptr, logprob_ptr, max_prob_ptr, entropy_ptr,
                       rows, num_splits, num_listed, SAMPLE: tl.constexpr, HAS_OTHER: tl.constexpr,
                       HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
        # Each program merges the num_splits partials of BLOCK_R rows; splits are in vocabulary order.
        # HAS_OTHER: other [rows] f32 is one more outcome (index num_listed), merged into every statistic.
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = offs_r < rows
        offs_s = tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (offs_s < num_splits)[None, :]
        plane = num_splits * rows
        at = offs_s[None, :] * rows + offs_r[:, None]                                        # [R, S]
        v1 = tl.load(part_f_ptr + at, mask=ok, other=float("-inf"))
        v2 = tl.load(part_f_ptr + plane + at, mask=ok, other=float("-inf"))
        s0 = tl.load(part_f_ptr + 2 * plane + at, mask=ok, other=0.0)
        s1 = tl.load(part_f_ptr + 3 * plane + at, mask=ok, other=0.0)
        i1 = tl.load(part_i_ptr + at, mask=ok, other=0)
        # On ties the lowest split wins, i.e. the lowest vocabulary index.
        m, j = tl.max(v1, axis=1, return_indices=True, return_indices_tie_break_left=True)
        m = tl.where(row_ok, m, 0.0)  # padded rows get finite garbage, never stored
        is_j = offs_s[None, :] == j[:, None]
        shift = tl.where(ok, v1 - m[:, None], 0.0)
        scale = tl.where(ok, tl.exp(shift), 0.0)
        total_s0 = tl.where(row_ok, tl.sum(scale * s0, axis=1), 1.0)
        total_s1 = tl.sum(scale * (s1 + shift * s0), axis=1)
        top_2 = tl.maximum(tl.max(tl.where(is_j, float("-inf"), v1), axis=1), tl.max(v2, axis=1))
        token = tl.sum(tl.where(is_j, i1, 0), axis=1)
        if HAS_OTHER:  # rebase S0, S1 on the larger of the listed max and the other logit
            other = tl.load(other_ptr + offs_r, mask=row_ok, other=0.0)
            other_first = other > m  # a tie goes to the listed token, the lower index
            top = tl.maximum(m, other)
            keep = tl.exp(m - top)
            e_other = tl.exp(other - top)
            total_s1 = keep * (total_s1 + (m - top) * total_s0) + tl.where(e_other > 0, (other - top) * e_other, 0.0)
            total_s0 = keep * total_s0 + e_other
            top_2 = tl.where(other_first, m, tl.maximum(top_2, other))
            token = tl.where(other_first, num_listed, token)
            m = top
        top1 = token
        log_s0 = tl.log(total_s0)
        max_prob = 1.0 / total_s0                      # p1 = e^(m - lse), lse = m + log S0
        margin = max_prob - tl.exp(top_2 - m) / total_s0
        logprob = -log_s0
        if SAMPLE:
            best = tl.load(part_f_ptr + 4 * plane + at, mask=ok, other=float("-inf"))
            best_x = tl.load(part_f_ptr + 5 * plane + at, mask=ok, other=0.0)
            best_i = tl.load(part_i_ptr + plane + at, mask=ok, other=0)
            is_b = offs_s[None, :] == tl.argmax(best, axis=1, tie_break_left=True)[:, None]
            inv_t = tl.load(inv_temp_ptr + offs_r, mask=row_ok, other=0.0)
            sampled = inv_t > 0
            pick_i = tl.sum(tl.where(is_b, best_i, 0), axis=1)
            pick_x = tl.sum(tl.where(is_b, best_x, 0.0), axis=1)
            if HAS_OTHER:  # the other outcome's own Gumbel draw, at hash index OTHER_INDEX
                seed = tl.load(seed_ptr + offs_r, mask=row_ok, other=0)
                key_a = _mix32(seed.to(tl.uint32) ^ 0x3C6EF372)
                key_b = _mix32((seed >> 32).to(tl.uint32) ^ 0x1B873593 ^ key_a)
                h = _mix32(key_a + tl.full([BLOCK_R], 0x7FFFFFFF, tl.uint32) * 0x61C88647)
                u = ((_mix32(h ^ key_b) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
                take_other = other * inv_t - tl.log(-tl.log(u)) > tl.max(best, axis=1)
                pick_i = tl.where(take_other, num_listed, pick_i)
                pick_x = tl.where(take_other, other, pick_x)
            token = tl.where(sampled, pick_i, token)
            logprob = tl.where(sampled, pick_x - m - log_s0, logprob)
        threshold = tl.load(thresholds_ptr + offs_r, mask=row_ok, other=0.0)
        leaves = margin >= threshold
        if HAS_OTHER:  # "other" names no token: such a row stays
            leaves = leaves & (top1 != num_listed) & (token != num_listed)
            is_other = token == num_listed
            if HAS_IDS:
                token = tl.load(ids_ptr + token, mask=row_ok & ~is_other, other=0)
            token = tl.where(is_other, -1, token)
        elif HAS_IDS:
            token = tl.load(ids_ptr + token, mask=row_ok, other=0)
        tl.store(token_ptr + offs_r, token.to(tl.int64), mask=row_ok)
        tl.store(margin_ptr + offs_r, margin, mask=row_ok)
        tl.store(exit_ptr + offs_r, leaves, mask=row_ok)
        tl.store(logprob_ptr + offs_r, logprob, mask=row_ok)
        tl.store(max_prob_ptr + offs_r, max_prob, mask=row_ok)
        tl.store(entropy_ptr + offs_r, log_s0 - total_s1 / total_s0, mask=row_ok)

    _INTERPRETED = type(_partial_kernel).__name__ == "InterpretedFunction"


def exit_head_triton(hidden, norm_weight, lm_head, thresholds, *, eps, temperature=None, seed=None,
                     adapter=None, token_ids=None, other_logit=None, config: KernelConfig | None = None
                     ) -> ExitDecision:
    """The fused path. temperature=None compiles the greedy variant (no hash per logit): pass None for an
    all-greedy batch. hidden [rows, d] any float dtype; lm_head [V, d] (or a shortlist's [K, d], with
    token_ids [K] and other_logit, as in exit_head_reference) f32/f16/bf16 with unit last stride."""
    if not HAS_TRITON:
        raise RuntimeError("exit_head: backend='triton' needs the triton package (pip install offramp[gpu])")
    if adapter is not None:
        hidden = adapter(hidden)
    rows, d = hidden.shape
    vocab = lm_head.shape[0]
    device = hidden.device
    if rows == 0:
        return exit_head_reference(hidden, norm_weight, lm_head, thresholds, eps=eps, token_ids=token_ids,
                                   other_logit=other_logit)
    if lm_head.stride(1) != 1:
        lm_head = lm_head.contiguous()
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    cfg = config or pick_config(rows, d, vocab, lm_head.dtype, device)
    y = _empty((rows, d), lm_head.dtype, device)
    block_d = triton.next_power_of_2(d)
    norm_rows = min(triton.next_power_of_2(rows), max(1, 8192 // block_d))
    _rmsnorm_kernel[(triton.cdiv(rows, norm_rows),)](hidden, norm_weight, y, rows, d, hidden.stride(0), eps,
                                                     ROUND_BF16=_INTERPRETED and y.dtype == torch.bfloat16,
                                                     BLOCK_R=norm_rows, BLOCK_D=block_d)
    thresholds = thresholds.to(device=device, dtype=torch.float32)
    ids = thresholds if token_ids is None else token_ids.to(device=device, dtype=torch.int32).contiguous()
    other = thresholds if other_logit is None else other_logit(y).to(device=device, dtype=torch.float32).contiguous()
    sample = temperature is not None
    if sample:
        inv_temp = inverse_temperature(temperature.to(device))
        seed = random_seeds(rows, device) if seed is None else seed.to(device=device, dtype=torch.int64)
    else:
        inv_temp = seed = thresholds  # unused placeholders: the greedy variant never reads them
    tiles_per_split = triton.cdiv(triton.cdiv(vocab, cfg.block_v), cfg.num_splits)
    num_splits = triton.cdiv(triton.cdiv(vocab, cfg.block_v), tiles_per_split)
    # Triton 3.9's interpreter multiplies bf16 dot operands as raw uint16; products of bf16/fp16 values are
    # exact in fp32, so upcasting the operands there changes no result.
    dot_fp32 = lm_head.dtype == torch.float32 or _INTERPRETED
    part_f = _empty((6, num_splits, rows), torch.float32, device)
    part_i = _empty((2, num_splits, rows), torch.int32, device)
    _partial_kernel[(triton.cdiv(rows, cfg.block_r), num_splits)](
        y, lm_head, inv_temp, seed, ids, part_f, part_i, rows, d, vocab, tiles_per_split, lm_head.stride(0),
        SAMPLE=sample, HAS_IDS=token_ids is not None, DOT_FP32=dot_fp32, DOT_PRECISION="ieee" if dot_fp32 else "tf32",
        BLOCK_R=cfg.block_r, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=True)  # pinned: Triton 3.10 flips the default
    decision = ExitDecision(
        token=_empty((rows,), torch.int64, device), margin=_empty((rows,), torch.float32, device),
        exit=_empty((rows,), torch.bool, device), logprob=_empty((rows,), torch.float32, device),
        max_prob=_empty((rows,), torch.float32, device), entropy=_empty((rows,), torch.float32, device))
    block_s = triton.next_power_of_2(num_splits)
    reduce_rows = min(triton.next_power_of_2(rows), max(1, 4096 // block_s))
    _reduce_kernel[(triton.cdiv(rows, reduce_rows),)](
        part_f, part_i, thresholds, inv_temp, seed, other, ids,
        decision.token, decision.margin, decision.exit, decision.logprob, decision.max_prob, decision.entropy,
        rows, num_splits, vocab, SAMPLE=sample, HAS_OTHER=other_logit is not None, HAS_IDS=token_ids is not None,
        BLOCK_R=reduce_rows, BLOCK_S=block_s)
    return decision


def exit_head(hidden, norm_weight, lm_head, thresholds, *, eps, temperature=None, seed=None, adapter=None,
              top_k=None, top_p=None, num_logprobs=None, token_ids=None, other_logit=None,
              backend="auto") -> ExitDecision:
    """Decide, for each row, the token and whether it exits here.

    hidden [rows, d]; norm_weight [d] (the head's RMSNorm); lm_head [V, d] (or a quantized LM head module,
    which takes the reference path); thresholds [rows] f32
    (+inf = never exit); temperature [rows] (0 = greedy; None = all greedy); seed [rows] int64 (None =
    drawn from torch's generator); adapter: callable hidden -> adapted hidden, applied before the RMSNorm.
    top_k [rows] (0 = off), top_p [rows] (1 = off), num_logprobs [rows] (0 = none): rows that use any of
    them take the reference path for just those rows (their outputs come from exit_head_reference).
    Pass these per-row tensors on the CPU to avoid a device sync. token_ids [K], other_logit: a shortlist
    head (lm_head is then its [K, d] rows; module docstring). backend: "auto" (Triton on CUDA, torch
    elsewhere), "triton" or "torch".
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"exit_head: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and hidden.is_cuda and HAS_TRITON)
    use_triton &= isinstance(lm_head, torch.Tensor)  # a quantized head computes its own logits
    extras = dict(top_k=top_k, top_p=top_p, num_logprobs=num_logprobs)
    shortlist = dict(token_ids=token_ids, other_logit=other_logit)
    if not use_triton:
        return exit_head_reference(hidden, norm_weight, lm_head, thresholds, eps=eps, temperature=temperature,
                                   seed=seed, adapter=adapter, **extras, **shortlist)
    if adapter is not None:
        hidden = adapter(hidden)
    rows = hidden.shape[0]
    if temperature is not None and seed is None:
        seed = random_seeds(rows, hidden.device)  # one draw shared by both paths
    decision = exit_head_triton(hidden, norm_weight, lm_head, thresholds, eps=eps, temperature=temperature,
                                seed=seed, **shortlist)
    special = torch.zeros(rows, dtype=torch.bool)
    if top_k is not None:
        special |= top_k.cpu() > 0
    if top_p is not None:
        special |= top_p.cpu() < 1
    if num_logprobs is not None:
        special |= num_logprobs.cpu() > 0
    if not special.any():
        return decision
    idx = special.nonzero()[:, 0]
    pick = lambda x: None if x is None else x[idx.to(x.device)]
    ref = exit_head_reference(
        hidden[idx.to(hidden.device)], norm_weight, lm_head, pick(thresholds), eps=eps,
        temperature=pick(temperature), seed=pick(seed), top_k=pick(top_k), top_p=pick(top_p),
        num_logprobs=pick(num_logprobs), **shortlist)
    dev_idx = idx.to(hidden.device)
    for name in ("token", "margin", "exit", "logprob", "max_prob", "entropy"):
        getattr(decision, name)[dev_idx] = getattr(ref, name).to(hidden.device)
    if ref.top_logprobs is not None:
        n = ref.top_logprobs.shape[1]
        decision.top_logprobs = torch.full((rows, n), float("-inf"), device=hidden.device)
        decision.top_tokens = torch.full((rows, n), -1, dtype=torch.int64, device=hidden.device)
        decision.top_logprobs[dev_idx] = ref.top_logprobs
        decision.top_tokens[dev_idx] = ref.top_tokens
    return decision
