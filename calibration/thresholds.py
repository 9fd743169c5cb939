"""Exit thresholds from calibration statistics: sequential, optionally with a finite-sample guarantee.

Inputs, heads in depth order over the same N calibration tokens:
  stats   [H, N] float  a head's confidence in its top-1 (higher = surer); a token exits at the
                        first head where stat >= threshold (the kernel's `margin >= threshold`).
                        NaN or -inf = the token cannot exit there.
  correct [H, N] bool   the head's top-1 equals the full model's top-1.

Empirical rule: from the shallowest head, among tokens that did not exit earlier, the lowest
threshold whose exited tokens agree at rate >= epsilon. A threshold that exits fewer than
`min_exits` tokens is not considered: with 3 exits, a head that agrees 80% of the time passes
epsilon = 0.9 half the time by luck, and a threshold that exits almost nothing saves nothing.

With delta (Learn then Test, fixed-sequence testing): candidates from strictest to loosest; a
candidate passes when the one-sided Clopper-Pearson lower bound of its agreement at level delta_k
is >= epsilon (equivalently P(Binomial(n, epsilon) >= agreed) <= delta_k); the loosest candidate
before the first failure is chosen. Fixed-sequence testing needs no correction across candidates
(the first true null in the fixed order must be rejected before any other can be), so the
candidates may be as fine as the data: every distinct statistic value. Choices:
- delta is split evenly across heads (delta_k = delta / H, Bonferroni): the claim is that every
  head's exited tokens agree at >= epsilon at once, hence also all exited tokens together.
- The sequence starts at the first candidate where the test has power: it exits at least
  min_exits tokens, and enough that a set agreeing at (1 + epsilon) / 2 would pass (about 100
  tokens at epsilon = 0.9, 1,000 at 0.99). The start depends on the exit counts only, never on
  agreement, and the candidates skipped exit few tokens; starting any earlier lets one early
  disagreement among a handful of exits stop the sequence before it reaches useful thresholds.
- Each head's population is "tokens that reach it" given the earlier heads' chosen thresholds,
  which come from the same data; this is treated as fixed (tests check the failure rate by
  simulation).
- cost_aware_select looks at many subsets of heads and keeps the best: the claim must hold for
  whichever it keeps, so delta is further split across the subsets it searched.
Any candidate that passes the delta test (delta < 1/2) also satisfies the empirical rule, so on
the same tokens the delta threshold is never looser than the empirical one.
"""
import math
from functools import cache
from itertools import combinations

import numpy as np

MIN_EXITS = 30


def binomial_tail(successes, n, p):
    """P(Binomial(n, p) >= successes), element-wise and exact (regularised incomplete beta)."""
    k, n, p = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (successes, n, p)))
    tail = np.where(k <= 0, 1.0, 0.0)
    inside = (k > 0) & (k <= n)
    if inside.any():
        tail[inside] = _betainc(k[inside], n[inside] - k[inside] + 1, p[inside])  # P(X >= k) = I_p(k, n - k + 1)
    return tail


def clopper_pearson_lower(successes, n, delta):
    """One-sided lower confidence bound at level delta of a binomial rate (0 when nothing succeeded)."""
    k, n = np.broadcast_arrays(np.asarray(successes, dtype=float), np.asarray(n, dtype=float))
    low, high = np.zeros(k.shape), np.ones(k.shape)
    for _ in range(60):  # bisection on p: binomial_tail(k, n, p) rises with p
        mid = (low + high) / 2
        too_high = binomial_tail(k, n, mid) > delta
        high, low = np.where(too_high, mid, high), np.where(too_high, low, mid)
    return np.where(k > 0, low, 0.0)


@cache
def _log_factorials(size: int) -> np.ndarray:
    """[size] log(i!) for i < size, from math.lgamma (a cumulative sum of logs drifts)."""
    return np.array([math.lgamma(i + 1) for i in range(size)])


def _betainc(a, b, x):
    """Regularised incomplete beta I_x(a, b), element-wise for integers a, b >= 1 and x in [0, 1]."""
    edge = np.where(x >= 1, 1.0, 0.0)
    inside = (x > 0) & (x < 1)
    x = np.where(inside, x, 0.5)
    log_factorials = _log_factorials(1 << int(np.max(a + b)).bit_length())
    ia, ib = a.astype(np.int64), b.astype(np.int64)
    log_beta = log_factorials[ia - 1] + log_factorials[ib - 1] - log_factorials[ia + ib - 1]  # lgamma(m) = log((m-1)!)
    swap = x > (a + 1) / (a + b + 2)  # the continued fraction converges fast on this side only
    a2, b2, x2 = np.where(swap, b, a), np.where(swap, a, b), np.where(swap, 1 - x, x)
    front = np.exp(a2 * np.log(x2) + b2 * np.log1p(-x2) - log_beta) / a2
    value = front * _beta_continued_fraction(a2, b2, x2)
    return np.where(inside, np.where(swap, 1 - value, value), edge)


def _beta_continued_fraction(a, b, x, tol=1e-13):
    """Lentz's evaluation of the continued fraction of I_x(a, b) (converges in O(sqrt(max(a, b))) steps)."""
    tiny = 1e-300

    def guard(v):
        return np.where(np.abs(v) < tiny, tiny, v)

    c = np.ones_like(a)
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    h = d.copy()
    for m in range(1, int(10 * np.sqrt(np.max(np.maximum(a, b)))) + 100):
        for coeff in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / guard(1 + coeff * d)
            c = guard(1 + coeff / c)
            step = c * d
            h = h * step
        if np.all(np.abs(step - 1) < tol):
            break
    return h


def exit_counts(stat, correct, candidates=None):
    """For one head: candidate thresholds (descending) with how many tokens would exit (n) and agree.

    candidates=None: every distinct finite statistic value (a finer grid changes no exited set)."""
    stat, correct = np.asarray(stat, dtype=float), np.asarray(correct, dtype=bool)
    finite = np.isfinite(stat)
    order = np.argsort(-stat[finite], kind="stable")
    ranked = stat[finite][order]  # descending
    agreed_so_far = np.cumsum(correct[finite][order])
    if candidates is None:
        candidates = np.unique(ranked)[::-1]
    else:
        candidates = np.sort(np.asarray(candidates, dtype=float))[::-1]
    n = np.searchsorted(-ranked, -candidates, side="right")  # tokens with stat >= candidate
    agreed = np.where(n > 0, agreed_so_far[np.maximum(n - 1, 0)] if len(ranked) else 0, 0)
    return candidates, n, agreed


def calibrate_head(stat, correct, epsilon, delta=None, candidates=None, min_exits=MIN_EXITS) -> float:
    """Threshold for one head over the tokens that reach it; inf when none qualifies."""
    candidates, n, agreed = exit_counts(stat, correct, candidates)
    if delta is None:
        rate = np.divide(agreed, n, out=np.zeros(len(n)), where=n > 0)
        ok = (n >= max(min_exits, 1)) & (rate >= epsilon)
        return float(candidates[ok][-1]) if ok.any() else math.inf
    halfway = np.ceil(n * (1 + epsilon) / 2 - 1e-9)  # agreed count of a set agreeing at (1 + epsilon) / 2
    start = _first(lambda i: (n[i] >= min_exits) & (binomial_tail(halfway[i], n[i], epsilon) <= delta), 0, len(n))
    first_failure = _first(lambda i: binomial_tail(agreed[i], n[i], epsilon) > delta, start, len(n))
    return float(candidates[first_failure - 1]) if first_failure > start else math.inf


def _first(predicate, start: int, stop: int, chunk: int = 256) -> int:
    """First index in [start, stop) where predicate(slice) -> bool array holds, else stop; evaluated
    in doubling chunks, since the answer is usually near start and each evaluation costs."""
    while start < stop:
        end = min(stop, start + chunk)
        hits = predicate(slice(start, end))
        if hits.any():
            return start + int(np.argmax(hits))
        start, chunk = end, 2 * chunk
    return stop


def calibrate_sequential(stats, correct, epsilon, delta=None, candidates=None, min_exits=MIN_EXITS) -> list[float]:
    """Thresholds for heads in depth order (inf = off): each head sees only tokens not exited earlier."""
    stats, correct = np.asarray(stats, dtype=float), np.asarray(correct, dtype=bool)
    delta_head = None if delta is None else delta / len(stats)
    remaining = np.ones(stats.shape[1], dtype=bool)
    thresholds = []
    for stat, agree in zip(stats, correct):
        threshold = calibrate_head(stat[remaining], agree[remaining], epsilon, delta_head, candidates, min_exits)
        thresholds.append(threshold)
        remaining &= ~(stat >= threshold)
    return thresholds


def assign_exits(stats, thresholds) -> np.ndarray:
    """[N] index of the head each token exits at; H (= len(thresholds)) for tokens that run to the end."""
    stats = np.asarray(stats, dtype=float)
    if len(stats) == 0:
        return np.zeros(stats.shape[1], dtype=int)
    exits = stats >= np.asarray(thresholds, dtype=float)[:, None]  # [H, N]
    return np.where(exits.any(axis=0), exits.argmax(axis=0), len(stats))


def mean_token_flops(exit_index, layers, cost_model, context_len=None) -> float:
    """Average cost per token when heads at `layers` (all evaluated until exit) give these exits."""
    exit_layer = np.append(np.asarray(layers, dtype=int), cost_model.num_hidden_layers)[exit_index]
    heads_evaluated = np.minimum(exit_index + 1, len(layers))
    return float(np.mean(cost_model.token_flops(exit_layer, heads_evaluated, context_len)))


def exit_report(stats, correct, thresholds, layers, cost_model, context_len=None, delta_head=None) -> dict:
    """Per head and overall: who exits where, their agreement, and the compute saved per token."""
    stats, correct = np.asarray(stats, dtype=float), np.asarray(correct, dtype=bool)
    num_tokens = stats.shape[1]
    exit_index = assign_exits(stats, thresholds)
    heads = []
    for k, (layer, threshold) in enumerate(zip(layers, thresholds)):
        exited = exit_index == k
        n, agreed = int(exited.sum()), int(correct[k][exited].sum())
        head = {"layer": int(layer), "threshold": float(threshold) if math.isfinite(threshold) else None,
                "n_reached": int((exit_index >= k).sum()), "n_exited": n,
                "exit_rate": n / num_tokens, "agreement": agreed / n if n else None}
        if delta_head is not None:
            head["agreement_lower_bound"] = float(clopper_pearson_lower(agreed, n, delta_head)) if n else None
        heads.append(head)
    exited = exit_index < len(layers)
    agreed = np.zeros(num_tokens, dtype=bool)
    agreed[exited] = correct[exit_index[exited], np.flatnonzero(exited)]
    flops = mean_token_flops(exit_index, layers, cost_model, context_len)
    full = float(np.mean(cost_model.full_depth_flops(context_len)))
    return {"heads": heads, "num_tokens": num_tokens, "exit_fraction": float(exited.mean()),
            "agreement": float(agreed.sum() / exited.sum()) if exited.any() else None,
            "flops_per_token": flops, "full_depth_flops_per_token": full, "saved_fraction": 1 - flops / full}


def cost_aware_select(stats, correct, layers, cost_model, epsilon, delta=None, *, candidates=None,
                      min_exits=MIN_EXITS, context_len=None, max_heads=12):
    """Keep the subset of heads that saves the most compute, every cost counted; thresholds re-calibrated per subset.

    stats: [H, N] array, or a callable taking a tuple of head indices (depth order) and returning
    their [len, N] statistics, for policies whose statistic depends on which heads run (monotonic,
    saturation). Dropping a head changes who reaches the next one, so each subset is calibrated
    from scratch; a subset in which some head would never exit is skipped (the same subset without
    that head is searched on its own). A token pays for every kept head it reaches, the layers it
    runs and the KV fill of the layers it skips; context_len is an int or one per token [N].
    Returns (thresholds [H] with inf for dropped heads, report); if no subset saves compute, every
    threshold is inf.
    """
    correct = np.asarray(correct, dtype=bool)
    num_heads = len(layers)
    if num_heads > max_heads:
        raise ValueError(f"{num_heads} heads: the exhaustive search over subsets is limited to {max_heads}")
    statistic = stats if callable(stats) else (lambda subset, table=np.asarray(stats, dtype=float): table[list(subset)])
    subsets = [s for size in range(1, num_heads + 1) for s in combinations(range(num_heads), size)]
    delta_subset = None if delta is None else delta / len(subsets)
    full = float(np.mean(cost_model.full_depth_flops(context_len)))
    best, best_saved = None, 0.0
    for subset in subsets:
        sub_stats, sub_layers = statistic(subset), [layers[i] for i in subset]
        thresholds = calibrate_sequential(sub_stats, correct[list(subset)], epsilon, delta_subset,
                                          candidates, min_exits)
        if not all(math.isfinite(t) for t in thresholds):
            continue
        exit_index = assign_exits(sub_stats, thresholds)
        saved = 1 - mean_token_flops(exit_index, sub_layers, cost_model, context_len) / full
        if saved > best_saved:
            best, best_saved = (subset, thresholds), saved
    kept, kept_thresholds = best if best else ((), [])
    delta_head = None if delta is None else delta_subset / max(len(kept), 1)
    report = exit_report(statistic(kept) if kept else np.zeros((0, correct.shape[1])), correct[list(kept)],
                         kept_thresholds, [layers[i] for i in kept], cost_model, context_len, delta_head)
    by_layer = {head["layer"]: head for head in report["heads"]}
    report["heads"] = [by_layer.get(layer, {"layer": int(layer), "threshold": None, "kept": False})
                       for layer in layers]
    for head in report["heads"]:
        head.setdefault("kept", True)
    report.update(epsilon=epsilon, delta=delta, subsets_searched=len(subsets))
    thresholds = [math.inf] * num_heads
    for i, t in zip(kept, kept_thresholds):
        thresholds[i] = t
    return thresholds, report
