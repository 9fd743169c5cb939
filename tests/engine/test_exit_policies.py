from types import SimpleNamespace

import numpy as np
import pytest
import torch

from server.engine.exit_policies import POLICIES, ExitFeatures, PolicyState, get_policy, pairwise_cosine
from calibration.thresholds import assign_exits

LAYERS = [2, 4, 6, 8, 10]


def synthetic_pass(seed=0, num_tokens=400, dim=32):
    """Exit-kernel outputs and hidden states of num_tokens tokens at every head of LAYERS."""
    gen = torch.Generator().manual_seed(seed)
    sharpness = torch.linspace(0.5, 4, len(LAYERS))[:, None, None]  # deeper heads are surer
    logits = torch.randn(len(LAYERS), num_tokens, 50, generator=gen) * sharpness
    probs = logits.softmax(-1)
    top2 = probs.topk(2, dim=-1).values
    decisions = SimpleNamespace(margin=top2[..., 0] - top2[..., 1], max_prob=top2[..., 0],
                                entropy=-(probs * probs.log()).sum(-1), token=probs.argmax(-1))
    steps = torch.randn(len(LAYERS) + 1, num_tokens, dim, generator=gen)
    steps[1:] *= torch.rand(len(LAYERS), num_tokens, 1, generator=gen)  # residual updates of varied size
    hiddens = steps.cumsum(0)  # [H+1, N, d], row 0 = layer 0
    features = ExitFeatures(LAYERS, decisions.margin.numpy(), decisions.max_prob.numpy(),
                            decisions.entropy.numpy(), pairwise_cosine(hiddens))
    return decisions, hiddens, features


def run_engine(policy, decisions, hiddens, heads, thresholds):
    """Exit the way the engine does: rows leave at their exit, the state follows the live rows.

    Returns ([N] position in `heads` of each token's exit, len(heads) = none; per head the scores)."""
    num_tokens = hiddens.shape[1]
    exit_at = np.full(num_tokens, len(heads))
    live = torch.arange(num_tokens)
    state = policy.init_state(hiddens[0])
    scores = []
    for position, (head, threshold) in enumerate(zip(heads, thresholds)):
        decision = SimpleNamespace(**{k: getattr(decisions, k)[head][live]
                                      for k in ("margin", "max_prob", "entropy", "token")})
        hidden = hiddens[head + 1][live]
        peek = PolicyState(*(None if t is None else t.clone() for t in (state.last_probs, state.prev_hidden)))
        scores.append((live.clone(), policy.score(decision, hidden, peek, LAYERS[head])))
        exits = policy.decide(decision, hidden, state, threshold, LAYERS[head])
        exit_at[live[exits].numpy()] = position
        live, state = live[~exits], state.select(~exits)
    return exit_at, scores


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("heads", [(0, 1, 2, 3, 4), (1, 3, 4)])
def test_offline_statistic_and_engine_decide_agree(name, heads):
    policy = get_policy(name)
    decisions, hiddens, features = synthetic_pass()
    stats = policy.statistic(features.subset(heads))  # [len(heads), N]
    assert stats.shape == (len(heads), hiddens.shape[1])
    thresholds = []
    for stat in stats:
        finite = np.sort(stat[np.isfinite(stat)])
        # Thresholds between two distinct scores, so float rounding cannot flip a comparison.
        middle = finite[int(0.6 * len(finite))] if len(finite) else np.inf
        above = finite[finite > middle + 1e-4]
        thresholds.append(float((middle + above[0]) / 2) if len(above) else np.inf)
    exit_at, scores = run_engine(policy, decisions, hiddens, heads, thresholds)
    np.testing.assert_array_equal(exit_at, assign_exits(stats, thresholds))
    assert 0 < np.mean(exit_at < len(heads)) < 1
    for position, (rows, score) in enumerate(scores):
        np.testing.assert_allclose(score.numpy(), stats[position][rows.numpy()], rtol=0, atol=1e-6)


def test_monotonic_requires_a_rise_and_the_minimum_layer():
    policy = get_policy("monotonic", {"min_layer": 4})
    probs = np.array([[0.5, 0.5, 0.9, 0.7],
                      [0.6, 0.4, 0.95, 0.6],
                      [0.7, 0.3, 0.97, 0.8]], dtype=np.float32)  # [H=3, N=4]
    features = ExitFeatures([2, 4, 6], probs, probs, probs)
    stats = policy.statistic(features)
    assert np.all(stats[0] == -np.inf)  # layer 2 < min_layer
    np.testing.assert_array_equal(stats[1], np.float32([0.6, -np.inf, 0.95, -np.inf]))  # the one rise so far
    np.testing.assert_array_equal(stats[2], np.float32([0.7, -np.inf, 0.97, -np.inf]))  # both rises: 4th fell before
    assert policy.params() == {"min_layer": 4}


def test_saturation_compares_consecutive_active_exits():
    hiddens = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 1.0]]])  # layer 0, head 0, head 1; one token
    features = ExitFeatures([3, 6], np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), pairwise_cosine(hiddens))
    stats = get_policy("saturation").statistic(features)
    np.testing.assert_allclose(stats[:, 0], [2 ** -0.5, 2 ** -0.5], atol=1e-6)
    # Without head 0, head 1 is compared with layer 0: orthogonal.
    np.testing.assert_allclose(get_policy("saturation").statistic(features.subset([1]))[:, 0], [0.0], atol=1e-6)
    with pytest.raises(ValueError, match="hidden_cosine"):
        get_policy("saturation").statistic(ExitFeatures([3], np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1))))


def test_decide_takes_a_threshold_per_row_and_entropy_is_negated():
    decision = SimpleNamespace(margin=torch.tensor([0.2, 0.5, 0.9]), max_prob=torch.tensor([0.5, 0.7, 0.95]),
                               entropy=torch.tensor([2.0, 1.0, 0.1]), token=torch.tensor([1, 2, 3]))
    hidden = torch.zeros(3, 4)
    margin = get_policy("margin")
    mask = margin.decide(decision, hidden, margin.init_state(hidden), torch.tensor([0.1, 0.6, 0.6]), 5)
    assert mask.tolist() == [True, False, True]
    entropy = get_policy("entropy")
    assert entropy.decide(decision, hidden, entropy.init_state(hidden), -1.0, 5).tolist() == [False, True, True]


@pytest.mark.parametrize("name", ["monotonic", "saturation"])
def test_deciding_on_a_subset_leaves_the_other_rows_memory_alone(name):
    policy = get_policy(name, {"min_layer": 0} if name == "monotonic" else None)
    decisions, hiddens, _ = synthetic_pass(num_tokens=6)
    full, partial = policy.init_state(hiddens[0]), policy.init_state(hiddens[0])
    subset = torch.tensor([1, 4])
    for head in range(3):
        decision = SimpleNamespace(**{k: getattr(decisions, k)[head] for k in ("margin", "max_prob", "entropy")})
        expected = policy.score(decision, hiddens[head + 1], full, LAYERS[head])
        if head == 1:  # rows outside the subset skip this head: decide on the subset, write it back
            sub = partial.select(subset)
            sub_decision = SimpleNamespace(**{k: v[subset] for k, v in vars(decision).items()})
            policy.decide(sub_decision, hiddens[head + 1][subset], sub, 0.5, LAYERS[head])
            partial.assign(subset, sub)
        else:
            got = policy.score(decision, hiddens[head + 1], partial, LAYERS[head])
            # The subset rows saw every head, like the full pass; the others saw one head fewer.
            torch.testing.assert_close(got[subset], expected[subset])
    if name == "saturation":
        torch.testing.assert_close(partial.prev_hidden, full.prev_hidden)
    else:
        assert not torch.equal(partial.last_probs[0].nan_to_num(), full.last_probs[0].nan_to_num())
        torch.testing.assert_close(partial.last_probs[subset], full.last_probs[subset])


def test_registry_names_and_unknown_policy():
    assert set(POLICIES) == {"margin", "maxprob", "entropy", "monotonic", "saturation"}
    assert all(cls.name == name for name, cls in POLICIES.items())
    with pytest.raises(ValueError, match="unknown exit policy 'breaking'"):
        get_policy("breaking")
