import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as scipy_stats

from calibration.thresholds import (assign_exits, binomial_tail, calibrate_head, calibrate_sequential,
                                    clopper_pearson_lower, cost_aware_select, exit_counts)
from server.model.costs import CostModel

SMOLLM2 = SimpleNamespace(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64)


def levels(*groups):
    """groups of (statistic, count, num_correct) -> (stat [N], correct [N])."""
    stat = np.concatenate([np.full(count, s) for s, count, _ in groups])
    correct = np.concatenate([np.arange(count) < agree for _, count, agree in groups])
    return stat, correct


def known_case():
    """Three heads over 1000 tokens whose thresholds at epsilon = 0.9 are known by hand.

    Head 0: 0.9 -> 196/200 agree (0.98); adding 0.6 -> 356/400 (0.89); adding 0.3 -> 476/1000.
      => 0.9. The 200 tokens at 0.9 exit there.
    Head 1 on the other 800: 0.8 -> 380/400 (0.95); adding 0.5 -> 720/800 (exactly 0.9) => 0.5.
      The 200 tokens that exited at head 0 score 0.5 here and all disagree: a calibration that
      forgot they left would see 720/1000 at 0.5 and pick 0.8.
    Head 2 on nobody: every token has exited => inf.
    """
    s0, c0 = levels((0.9, 200, 196), (0.6, 200, 160), (0.3, 600, 120))
    s1, c1 = np.empty(1000), np.empty(1000, dtype=bool)
    s1[:200], c1[:200] = 0.5, False
    s1[200:], c1[200:] = levels((0.8, 400, 380), (0.5, 400, 340))
    s2, c2 = np.full(1000, 0.99), np.ones(1000, dtype=bool)
    return np.stack([s0, s1, s2]), np.stack([c0, c1, c2])


def test_binomial_tail_and_clopper_pearson_match_scipy():
    n = np.array([1, 10, 60, 100, 100, 1000, 5000, 15000])
    k = np.array([1, 5, 50, 90, 100, 900, 4600, 14900])
    for p in (0.5, 0.9, 0.99):
        np.testing.assert_allclose(binomial_tail(k, n, p), scipy_stats.binom.sf(k - 1, n, p), rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(clopper_pearson_lower(k, n, 0.05), scipy_stats.beta.ppf(0.05, k, n - k + 1), atol=1e-12)
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert binomial_tail(0, 10, 0.3) == 1.0 and binomial_tail(11, 10, 0.3) == 0.0


def test_exit_counts_handle_ties_and_non_finite_statistics():
    stat = np.array([0.5, 0.9, 0.5, -np.inf, np.nan, 0.1])
    correct = np.array([True, False, True, True, True, False])
    candidates, n, agreed = exit_counts(stat, correct)
    np.testing.assert_array_equal(candidates, [0.9, 0.5, 0.1])
    np.testing.assert_array_equal(n, [1, 3, 4])
    np.testing.assert_array_equal(agreed, [0, 2, 2])


def test_sequential_calibration_picks_the_known_thresholds():
    stats, correct = known_case()
    assert calibrate_sequential(stats, correct, 0.9) == [0.9, 0.5, math.inf]
    assert calibrate_sequential(stats, correct, 0.85)[0] == 0.6  # 0.89 >= 0.85
    # Calibrating head 1 on all tokens (not sequentially) would be fooled into 0.8.
    assert calibrate_head(stats[1], correct[1], 0.9) == 0.8
    exits = assign_exits(stats, [0.9, 0.5, math.inf])
    assert np.bincount(exits, minlength=4).tolist() == [200, 800, 0, 0]


def test_min_exits_guard_ignores_thresholds_that_exit_a_handful():
    stat, correct = levels((0.95, 5, 5), (0.7, 500, 300))
    assert calibrate_head(stat, correct, 0.9, min_exits=1) == 0.95
    assert calibrate_head(stat, correct, 0.9) == math.inf


def test_delta_version_on_the_known_case():
    stats, correct = known_case()
    assert calibrate_sequential(stats, correct, 0.9, delta=0.05)[0] == 0.9  # 196/200 certifies >= 0.9
    # 720/800 is exactly 0.9: fine empirically, never certifiable.
    assert calibrate_sequential(stats, correct, 0.9, delta=0.05)[1] == 0.8


def random_head(rng, num_tokens):
    stat = rng.random(num_tokens)
    slope = rng.uniform(0.1, 0.6)
    correct = rng.random(num_tokens) < 1 - slope + slope * stat ** rng.uniform(0.5, 3)
    return stat, correct


def test_delta_threshold_is_never_looser_than_empirical():
    rng = np.random.default_rng(0)
    for trial in range(200):
        num_heads, num_tokens = rng.integers(1, 4), rng.integers(200, 3000)
        stats, correct = zip(*(random_head(rng, num_tokens) for _ in range(num_heads)))
        stats, correct = np.array(stats), np.array(correct)
        epsilon, delta = rng.choice([0.8, 0.9, 0.95]), rng.choice([0.01, 0.05, 0.2])
        with_delta = calibrate_sequential(stats, correct, epsilon, delta)
        # Compare head by head on the same tokens: those the delta thresholds let reach the head.
        remaining = np.ones(num_tokens, dtype=bool)
        for stat, agree, threshold in zip(stats, correct, with_delta):
            assert threshold >= calibrate_head(stat[remaining], agree[remaining], epsilon), trial
            remaining &= ~(stat >= threshold)


def test_delta_guarantee_holds_over_repeated_draws():
    """Two heads with known populations; the guarantee fails at most delta of the time.

    s0, s1 ~ U(0, 1) independent. P(head 0 agrees | s0) = 0.6 + 0.4 s0, so the tokens exiting at
    threshold t0 agree at 0.8 + 0.2 t0 (>= 0.9 iff t0 >= 0.5). P(head 1 agrees | s0, s1) =
    0.5 + 0.45 s1 + 0.1 s0; the tokens reaching it have s0 < t0, so those exiting at t1 agree at
    0.5 + 0.225 (1 + t1) + 0.05 t0.
    """
    epsilon, delta, num_tokens, repeats = 0.9, 0.1, 2000, 200
    rng = np.random.default_rng(1234)

    def true_agreement(t0, t1):
        head0 = 0.8 + 0.2 * t0 if math.isfinite(t0) else 1.0
        head1 = 0.5 + 0.225 * (1 + t1) + 0.05 * min(t0, 1.0) if math.isfinite(t1) else 1.0
        return head0, head1

    failures = {"delta": 0, "empirical": 0}
    exited = []
    for _ in range(repeats):
        s = rng.random((2, num_tokens))
        correct = np.stack([rng.random(num_tokens) < 0.6 + 0.4 * s[0],
                            rng.random(num_tokens) < 0.5 + 0.45 * s[1] + 0.1 * s[0]])
        for name, rule_delta in (("delta", delta), ("empirical", None)):
            t0, t1 = calibrate_sequential(s, correct, epsilon, rule_delta)
            failures[name] += min(true_agreement(t0, t1)) < epsilon
            if name == "delta":
                exited.append(np.mean(assign_exits(s, [t0, t1]) < 2))
    assert failures["delta"] / repeats <= delta
    assert failures["empirical"] / repeats > 0.3  # the empirical rule alone does not guarantee anything
    assert np.mean(exited) > 0.3  # and the guarantee is not bought by exiting nothing


def test_cost_aware_selection_drops_a_head_that_cannot_pay_and_keeps_one_that_does():
    cost = CostModel.from_config(SMOLLM2, context_len=128)
    rng = np.random.default_rng(7)
    num_tokens = 4000
    # Head at layer 6: confident and right on ~70% of tokens. Head at layer 26: right on the ~12%
    # of the rest it is surest of; each of those exits saves 4 layers and the final LM head
    # (~12 layers' worth), but every token that reaches it pays ~8 layers for its evaluation.
    early = np.where(rng.random(num_tokens) < 0.7, rng.uniform(0.8, 1.0, num_tokens), rng.uniform(0, 0.5, num_tokens))
    late = rng.uniform(0.6, 1.0, num_tokens)
    stats = np.stack([early, late])
    correct = np.stack([early > 0.7, late > 0.95])
    thresholds, report = cost_aware_select(stats, correct, [6, 26], cost, 0.95)
    assert math.isfinite(thresholds[0]) and thresholds[1] == math.inf
    assert [h["kept"] for h in report["heads"]] == [True, False]
    # Both heads calibrate fine on their own; the late one is dropped for cost, not agreement.
    assert all(math.isfinite(t) for t in calibrate_sequential(stats, correct, 0.95))
    exit_layer = np.where(stats[0] >= thresholds[0], 6, 30)
    expected = np.mean(cost.token_flops(exit_layer, 1))
    assert report["saved_fraction"] == pytest.approx(1 - expected / cost.full_depth_flops(), rel=1e-9)
    assert report["saved_fraction"] > 0.3  # ~75% exit 24 layers early, all pay one head
    assert report["heads"][0]["exit_rate"] == pytest.approx(np.mean(stats[0] >= thresholds[0]))
    assert report["heads"][0]["agreement"] >= 0.95


def test_cost_aware_selection_keeps_no_head_when_none_saves_compute():
    cost = CostModel.from_config(SMOLLM2, context_len=128)
    rng = np.random.default_rng(8)
    stat = rng.random(3000)
    correct = stat > 0.95  # only the top 5% agree: 5% x (10 layers + final head) < one head (~8 layers)
    thresholds, report = cost_aware_select(stat[None], correct[None], [20], cost, 0.9)
    assert math.isfinite(calibrate_sequential(stat[None], correct[None], 0.9)[0])
    assert thresholds == [math.inf]
    assert report["saved_fraction"] == 0.0 and report["exit_fraction"] == 0.0


def test_cost_aware_selection_recalibrates_each_subset():
    cost = CostModel.from_config(SMOLLM2, context_len=64)
    rng = np.random.default_rng(9)
    num_tokens = 3000
    stats = rng.random((3, num_tokens))
    correct = rng.random((3, num_tokens)) < 0.5 + 0.5 * stats
    thresholds, report = cost_aware_select(stats, correct, [4, 8, 12], cost, 0.9, delta=0.1)
    kept = [i for i, t in enumerate(thresholds) if math.isfinite(t)]
    assert kept and report["subsets_searched"] == 7
    # The kept heads' thresholds are those of a sequential calibration of that subset alone,
    # with delta split over the 7 subsets searched.
    assert [thresholds[i] for i in kept] == calibrate_sequential(stats[kept], correct[kept], 0.9, 0.1 / 7)
    for head in report["heads"]:
        if head["kept"]:
            assert head["agreement_lower_bound"] <= head["agreement"]
    # A callable statistic (history policies) is asked for exactly the subsets it searches.
    asked = []
    cost_aware_select(lambda subset: asked.append(subset) or stats[list(subset)], correct, [4, 8, 12], cost, 0.9)
    assert set(asked) >= {(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)}
