"""The shortlist path of the exit kernel: K listed rows of the LM head plus one "other" logit.

Three checks, each against something more direct than the thing tested:
- the torch reference equals a float64 computation written out here over materialised shortlist
  logits (the full LM head's logits at the listed ids, plus the other logit);
- the Triton kernel (interpreter on CPU) equals the reference, with the tolerances of
  test_exit_head.py (its module docstring derives them), on rows / K / dtypes / thresholds;
- the "other" cases: a row whose top-1 or sampled outcome is "other" gets token -1 and never exits,
  whatever its margin and threshold.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.exit_head import OTHER_INDEX, ExitDecision, exit_head, exit_head_reference, exit_head_triton
from tests.kernels.test_exit_head import (BASE_SEED, FIELDS, INF, KERNEL_RUNNABLE, assert_within, device, eh, gen,
                                          poisoned)

__all__ = ["device", "gen"]  # fixtures shared with test_exit_head.py


def make_shortlist_case(rows, d, vocab, listed, dtype, gen, device="cpu", other_shift=0.0):
    """A random LM head [vocab, d] of which `listed` rows (random ids, unsorted) form the shortlist;
    other_logit = the exact log-sum-exp of the unlisted logits + other_shift + per-row noise, so some
    rows have "other" first, some second, some far behind. Thresholds cycle 0, 0.3, +inf."""
    hidden = (torch.randn(rows, d, generator=gen) * 2).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
    full = (torch.randn(vocab, d, generator=gen) * (3.0 / math.sqrt(d))).to(dtype)
    ids = torch.randperm(vocab, generator=gen)[:listed]
    unlisted = torch.ones(vocab, dtype=torch.bool)
    unlisted[ids] = False
    jitter = (torch.randn(d, generator=gen) * (3 / math.sqrt(d))).to(device)  # a function of y, ~N(0, 3^2)

    def other_logit(y):  # y [rows, d] in the head's dtype -> [rows] f32; depends on each row's y only
        logits = y.float() @ full.to(y.device).float().T
        return torch.logsumexp(logits[:, unlisted.to(y.device)], -1) + other_shift + y.float() @ jitter

    temperature = 0.3 + 1.5 * torch.rand(rows, generator=gen)
    temperature = torch.where(torch.rand(rows, generator=gen) < 0.5, 0.0, temperature)
    to = lambda t: t.to(device)
    return dict(hidden=to(hidden), norm_weight=to(norm_weight), lm_head=to(full[ids].contiguous()),
                thresholds=to(torch.tensor([0.0, 0.3, INF]).repeat(rows // 3 + 1)[:rows]),
                temperature=to(temperature), seed=to(torch.randint(-2**62, 2**62, (rows,), generator=gen)),
                token_ids=to(ids), other_logit=other_logit), full


def direct(case, greedy):
    """float64 statistics over [rows, K + 1] = (full logits at the listed ids, other), written out."""
    y = eh.rms_norm(case["hidden"], case["norm_weight"], 1e-5, case["lm_head"].dtype)
    listed = y.double() @ case["lm_head"].double().T
    logits = torch.cat([listed, case["other_logit"](y).double()[:, None]], 1)           # [rows, K + 1]
    p = logits.softmax(-1)
    top = p.topk(2, -1).values
    top1 = logits.argmax(-1)
    scores = logits
    if not greedy:
        inv_t = eh.inverse_temperature(case["temperature"]).double()
        ids = torch.cat([case["token_ids"].long(), torch.tensor([OTHER_INDEX], device=logits.device)])
        noise = eh.gumbel_noise(case["seed"], ids).double()
        scores = torch.where(inv_t[:, None] > 0, logits * inv_t[:, None] + noise, logits)
    column = scores.argmax(-1)
    num_listed = listed.shape[1]
    leaves = (top[:, 0] - top[:, 1] >= case["thresholds"].double()) & (top1 < num_listed) & (column < num_listed)
    token = torch.cat([case["token_ids"].long(), torch.tensor([-1], device=logits.device)])[column]
    return dict(token=token, column=column, margin=top[:, 0] - top[:, 1], max_prob=top[:, 0], exit=leaves,
                logprob=p.log()[torch.arange(len(p)), column], entropy=-(p * p.log()).sum(-1),
                scores=scores, logits=logits)


def check(out: ExitDecision, case, greedy, rel):
    """out against the direct computation: tokens equal but for ties within the stated logit error,
    statistics within it, and the exit rule exactly (margin >= threshold, never for "other")."""
    want = direct(case, greedy)
    got = ExitDecision(*(getattr(out, name).cpu() for name in FIELDS))
    want = {k: v.cpu() for k, v in want.items()}
    delta = rel * want["logits"].abs().amax(-1) + 1e-6
    rows = torch.arange(len(delta))
    ids = torch.cat([case["token_ids"].cpu().long(), torch.tensor([-1])])
    column = torch.full_like(got.token, -2)
    for c, token_id in enumerate(ids.tolist()):
        column[got.token == token_id] = c
    assert (column >= 0).all(), f"a token outside shortlist ∪ other (seed={BASE_SEED})"
    inv_t = torch.ones(len(delta)) if greedy else eh.inverse_temperature(case["temperature"].cpu()).clamp_min(1)
    gap = (want["scores"][rows, column] - want["scores"][rows, want["column"]]).abs()
    tie = gap <= 2 * delta * inv_t + 1e-5 * want["scores"].abs().amax(-1)
    assert ((got.token == want["token"]) | tie).all(), f"tokens differ beyond a tie (seed={BASE_SEED})"
    prob_tol = 2 * delta + 1e-6 + 1e-5 * want["max_prob"]
    assert_within("margin", got.margin.double(), want["margin"], prob_tol)
    assert_within("max_prob", got.max_prob.double(), want["max_prob"], prob_tol)
    logprob = want["logits"].log_softmax(-1)[rows, column]
    assert_within("logprob", got.logprob.double(), logprob, 2 * delta + 1e-5 * (1 + logprob.abs()))
    entropy_tol = 2 * delta * math.log(want["logits"].shape[1]) + 1e-5 * (1 + want["entropy"])
    assert_within("entropy", got.entropy.double(), want["entropy"], entropy_tol)
    top1_listed = want["logits"].argmax(-1) < len(ids) - 1
    rule = (got.margin >= case["thresholds"].cpu()) & (got.token >= 0) & top1_listed
    undecided = ((want["margin"] - case["thresholds"].cpu().double()).abs() <= prob_tol) | tie
    assert ((got.exit == rule) | undecided).all(), f"exit rule broken (seed={BASE_SEED})"
    assert not got.exit[got.token < 0].any(), f"an 'other' row exited (seed={BASE_SEED})"
    return want


@pytest.mark.parametrize("other_shift", [-25.0, -4.0, 8.0], ids=["other-far", "other-close", "other-first"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_reference_equals_direct_computation(gen, other_shift, greedy):
    case, _ = make_shortlist_case(90, 48, 3000, 400, torch.float32, gen, other_shift=other_shift)
    args = {k: v for k, v in case.items() if not (greedy and k in ("temperature", "seed"))}
    want = check(exit_head_reference(**args, eps=1e-5), case, greedy, rel=1e-6)
    if other_shift == 8.0:  # most rows have "other" first: token -1, no exit, even at threshold 0
        assert (want["token"] == -1).float().mean() > 0.5
    if other_shift == -25.0:
        assert (want["token"] >= 0).all()


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
KERNEL_CASES = [(1, 300, F32, 0.0), (1, 300, BF16, 8.0), (7, 1000, F16, -4.0), (7, 1000, F32, 8.0),
                (64, 37, BF16, -4.0), (64, 37, F32, 0.0), (130, 1100, F16, 0.0), (130, 1100, BF16, -25.0)]


@pytest.mark.parametrize("rows, listed, dtype, other_shift", KERNEL_CASES,
                         ids=[f"{r}x{k}-{str(t)[6:]}-{s:g}" for r, k, t, s in KERNEL_CASES])
def test_kernel_matches_reference(monkeypatch, device, gen, rows, listed, dtype, other_shift):
    """Every row count, shortlist size and dtype, with "other" far behind (-25), close (-4, 0) or
    mostly first (8); greedy and sampled, on poisoned buffers."""
    case, _ = make_shortlist_case(rows, 64, 4100, listed, dtype, gen, device=device, other_shift=other_shift)
    for greedy in (True, False):
        args = {k: v for k, v in case.items() if not (greedy and k in ("temperature", "seed"))}
        monkeypatch.setattr(eh, "_empty", poisoned(not greedy))
        out = exit_head_triton(**args, eps=1e-5)
        monkeypatch.undo()
        check(out, case, greedy, rel=2e-6 if dtype == torch.float32 else 1e-3)
        ref = exit_head_reference(**args, eps=1e-5)
        same = out.token.cpu() == ref.token.cpu()
        assert same.float().mean() >= 0.9, f"tokens mostly differ from the reference (seed={BASE_SEED})"


def test_other_first_never_exits_and_sampled_other_is_minus_one(device, gen):
    """Rows built so that 'other' dominates (greedy: token -1), or is drawn by the Gumbel sample of a
    row whose top-1 is listed: neither exits at threshold 0."""
    case, _ = make_shortlist_case(200, 32, 2000, 64, torch.float32, gen, device=device, other_shift=-1.0)
    case["thresholds"] = torch.zeros(200, device=device)
    case["temperature"] = torch.full((200,), 1.0, device=device)
    for fn in (exit_head_triton, exit_head_reference):
        greedy = fn(**{k: v for k, v in case.items() if k not in ("temperature", "seed")}, eps=1e-5)
        sampled = fn(**case, eps=1e-5)
        for out in (greedy, sampled):
            assert (out.token == -1).any() and (out.token >= 0).any()
            assert not out.exit[out.token == -1].any()
        drew_other = (sampled.token == -1) & (greedy.token >= 0)  # top-1 listed, the sample drew "other"
        assert drew_other.any(), fn.__name__
        assert not sampled.exit[drew_other].any()


def test_listed_tokens_keep_their_vocabulary_noise(gen):
    """A sampled listed token uses the Gumbel noise of its vocabulary id: with 'other' pushed far down,
    the shortlist sample equals the full-vocabulary sample whenever the latter is listed."""
    case, full = make_shortlist_case(300, 32, 1500, 1200, torch.float32, gen, other_shift=-30.0)
    case["temperature"] = torch.full((300,), 0.9)
    short = exit_head_reference(**case, eps=1e-5)
    whole = exit_head_reference(case["hidden"], case["norm_weight"], full, case["thresholds"], eps=1e-5,
                                temperature=case["temperature"], seed=case["seed"])
    listed = torch.isin(whole.token, case["token_ids"])
    assert listed.float().mean() > 0.5
    assert torch.equal(short.token[listed], whole.token[listed])


def test_dispatcher_special_rows_and_top_logprobs_skip_other(device, gen):
    case, _ = make_shortlist_case(6, 32, 1000, 50, torch.float32, gen, device=device, other_shift=0.0)
    case["temperature"] = torch.full((6,), 1.2, device=device)
    num_logprobs = torch.tensor([0, 3, 0, 5, 0, 0])
    top_k = torch.tensor([0, 0, 2, 0, 0, 0])
    out = exit_head(**case, eps=1e-5, num_logprobs=num_logprobs, top_k=top_k, backend="triton")
    assert out.top_tokens.shape == (6, 5)
    for row in (1, 3):
        n = int(num_logprobs[row])
        assert torch.isin(out.top_tokens[row, :n].cpu(), case["token_ids"].cpu()).all()  # never "other" (-1)
        assert (out.top_tokens[row, n:] == -1).all()
    ref = exit_head_reference(**{k: v[2:3] if k in ("hidden", "thresholds", "temperature", "seed") else v
                                 for k, v in case.items()}, eps=1e-5, top_k=top_k[2:3])
    assert out.token[2].item() == ref.token[0].item()


@pytest.mark.skipif(KERNEL_RUNNABLE or not eh.HAS_TRITON, reason="the kernel tests run in this process")
def test_shortlist_suite_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "EXIT_HEAD_TEST_SEED": str(BASE_SEED)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
