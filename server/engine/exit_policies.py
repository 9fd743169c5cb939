"""Exit policies: when a token may leave at an exit head. One rule, two views of it.

Offline, `statistic(features) -> [H, N]` scores every calibration token at every head, for
calibration/thresholds.py. In the engine, `decide(decision, hidden, state, threshold, layer)`
scores the live rows at one exit (from the exit kernel's ExitDecision and the hidden state) and
returns the exit mask [rows]; both views compute the same number, and a row exits when it is
>= the threshold. Policies with memory keep a tiny per-row PolicyState across the exits of one
token's pass (made by `init_state` at the start of each decode step, narrowed by `select` when
exited rows leave the batch; `select` + `assign` to decide on a subset of the live rows).

Memory only covers exits that were evaluated, i.e. the active heads at the chosen epsilon, in
depth order; offline, `features.subset(heads)` gives exactly that view, so calibration of a head
subset sees what the engine will see. Consequences: `monotonic` looks at fewer than three
probabilities at the first two active exits (a rise is only required where there is a previous
one), and `saturation` compares the first active exit with the layer-0 hidden state (the token
embedding).
"""
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ExitFeatures:
    """Offline inputs of every policy for N calibration tokens at H heads, in depth order."""
    layers: list[int]
    margin: np.ndarray  # [H, N] p1 - p2 of the head's softmax
    max_prob: np.ndarray  # [H, N] p1
    entropy: np.ndarray  # [H, N] nats
    hidden_cosine: np.ndarray | None = None  # [H+1, H+1, N] row 0 = layer 0 (embedding), row i+1 = head i

    def subset(self, heads) -> "ExitFeatures":
        """The features of the heads with these indices (depth order), as if only they existed."""
        heads = list(heads)
        rows = [0] + [i + 1 for i in heads]
        cosine = None if self.hidden_cosine is None else self.hidden_cosine[np.ix_(rows, rows)]
        return ExitFeatures([self.layers[i] for i in heads], self.margin[heads], self.max_prob[heads],
                            self.entropy[heads], cosine)


@dataclass
class PolicyState:
    """Per-row memory across the exits of one token's pass; rows follow the live rows of the batch."""
    last_probs: torch.Tensor | None = None  # [rows, 2] p1 at the previous and the one before; NaN = none
    prev_hidden: torch.Tensor | None = None  # [rows, d] hidden at the previous active exit (layer 0 first)

    def select(self, rows: torch.Tensor) -> "PolicyState":
        """Keep these rows (index or bool mask), e.g. the ones that did not exit."""
        return PolicyState(*(None if t is None else t[rows] for t in (self.last_probs, self.prev_hidden)))

    def assign(self, rows: torch.Tensor, other: "PolicyState") -> None:
        """Write back the state of a subset after deciding on it alone (rows whose epsilon switches
        this head off are not evaluated there, and their memory must not move)."""
        for name in ("last_probs", "prev_hidden"):
            if getattr(self, name) is not None:
                getattr(self, name)[rows] = getattr(other, name).to(getattr(self, name).dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., d] x [..., d] -> [...] cosine similarity in float32."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def pairwise_cosine(hiddens: torch.Tensor) -> np.ndarray:
    """hiddens [E, N, d] (layer 0, then each head's layer) -> [E, E, N] for ExitFeatures.hidden_cosine."""
    num = hiddens.shape[0]
    out = np.ones((num, num, hiddens.shape[1]), dtype=np.float32)
    for i in range(num):
        for j in range(i + 1, num):
            out[i, j] = out[j, i] = cosine(hiddens[j], hiddens[i]).cpu().numpy()
    return out


class ExitPolicy:
    name = ""

    def params(self) -> dict:
        """Constructor arguments, recorded in the head set (exits.json calibration.policy_params)."""
        return {}

    def statistic(self, features: ExitFeatures) -> np.ndarray:
        """[H, N] offline score of every token at every head (higher = surer)."""
        raise NotImplementedError

    def score(self, decision, hidden: torch.Tensor, state: PolicyState, layer: int) -> torch.Tensor:
        """[rows] engine score at one exit; updates state for the next exit."""
        raise NotImplementedError

    def init_state(self, hidden0: torch.Tensor) -> PolicyState:
        """State at the start of a decode step; hidden0 [rows, d] = the token embeddings (layer 0)."""
        return PolicyState()

    def decide(self, decision, hidden: torch.Tensor, state: PolicyState, threshold, layer: int) -> torch.Tensor:
        """[rows] bool exit mask; threshold is a float or a [rows] tensor (per-request epsilon)."""
        return self.score(decision, hidden, state, layer) >= threshold


class MarginPolicy(ExitPolicy):
    """Top-2 softmax margin p1 - p2 ('breaking ties'); the default."""
    name = "margin"

    def statistic(self, features):
        return np.asarray(features.margin, dtype=np.float32)

    def score(self, decision, hidden, state, layer):
        return decision.margin.float()


class MaxProbPolicy(ExitPolicy):
    """Top-1 softmax probability."""
    name = "maxprob"

    def statistic(self, features):
        return np.asarray(features.max_prob, dtype=np.float32)

    def score(self, decision, hidden, state, layer):
        return decision.max_prob.float()


class EntropyPolicy(ExitPolicy):
    """Negative entropy of the head's softmax (thresholds are <= 0)."""
    name = "entropy"

    def statistic(self, features):
        return -np.asarray(features.entropy, dtype=np.float32)

    def score(self, decision, hidden, state, layer):
        return -decision.entropy.float()


class MonotonicPolicy(ExitPolicy):
    """p1 when it has risen at each of the last (up to) three active exits and the layer is >= min_layer, else -inf."""
    name = "monotonic"

    def __init__(self, min_layer: int = 4):
        self.min_layer = min_layer

    def params(self):
        return {"min_layer": self.min_layer}

    def statistic(self, features):
        probs = np.asarray(features.max_prob, dtype=np.float32)  # [H, N]
        previous = np.full((2,) + probs.shape, np.nan, dtype=np.float32)  # [2, H, N]
        previous[0, 1:], previous[1, 2:] = probs[:-1], probs[:-2]
        return np.stack([self._score(torch.from_numpy(p), torch.from_numpy(prev.T), layer).numpy()
                         for p, prev, layer in zip(probs, previous.transpose(1, 0, 2), features.layers)])

    def init_state(self, hidden0):
        return PolicyState(last_probs=torch.full((hidden0.shape[0], 2), float("nan"), device=hidden0.device))

    def score(self, decision, hidden, state, layer):
        probs = decision.max_prob.float()
        result = self._score(probs, state.last_probs, layer)
        state.last_probs = torch.stack([probs, state.last_probs[:, 0]], dim=1)
        return result

    def _score(self, probs, last_probs, layer):
        """probs [rows], last_probs [rows, 2] (previous, the one before; NaN = none)."""
        prev, before = last_probs[:, 0], last_probs[:, 1]
        rising = (prev.isnan() | (probs > prev)) & (before.isnan() | (prev > before))
        allowed = rising & (layer >= self.min_layer)
        return torch.where(allowed, probs, torch.full_like(probs, -torch.inf))


class SaturationPolicy(ExitPolicy):
    """Cosine similarity of the hidden states at this and the previous active exit (layer 0 before the first)."""
    name = "saturation"

    def statistic(self, features):
        if features.hidden_cosine is None:
            raise ValueError("the saturation policy needs ExitFeatures.hidden_cosine")
        num_heads = len(features.layers)
        return np.stack([features.hidden_cosine[i + 1, i] for i in range(num_heads)]).astype(np.float32)

    def init_state(self, hidden0):
        return PolicyState(prev_hidden=hidden0)

    def score(self, decision, hidden, state, layer):
        result = cosine(hidden, state.prev_hidden)
        state.prev_hidden = hidden
        return result


POLICIES: dict[str, type[ExitPolicy]] = {
    cls.name: cls for cls in (MarginPolicy, MaxProbPolicy, EntropyPolicy, MonotonicPolicy, SaturationPolicy)}
DEFAULT_POLICY = "margin"


def get_policy(name: str, params: dict | None = None) -> ExitPolicy:
    """The policy called `name` (as recorded in a head set), built with its recorded params."""
    if name not in POLICIES:
        raise ValueError(f"unknown exit policy {name!r}; expected one of {', '.join(POLICIES)}")
    return POLICIES[name](**(params or {}))
