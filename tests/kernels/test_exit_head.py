"""Triton exit kernel (interpreter on CPU, or a real GPU with TRITON_INTERPRET=0) against the torch reference.

Inputs are drawn fresh each run from EXIT_HEAD_TEST_SEED (random unless set); every failure message
names the seed. Tolerances, per row, in terms of delta = the logit error we accept:
- fp32 inputs: delta = 2e-6 * max|logit| + 1e-6. The paths differ only in summation order (the norm's
  mean and the dot's accumulation), a few fp32 ulps of the largest logit.
- fp16/bf16 inputs: delta = 1e-3 * max|logit| + 1e-6. Both paths use the same recipe (fp32 norm, cast
  to the weight dtype, exact products summed in fp32), but on a GPU the fp32 norms can differ in their
  last bit (rsqrt, reduction order), and then the cast rounds a hidden element to the neighbouring value,
  moving a logit by up to ~2^-8 of one term. In the interpreter the two agree bit for bit.
Probabilities (margin, max_prob) move by at most ~2*delta, logprobs by 2*delta, the entropy by
2*delta*log(V) (its derivative w.r.t. a logit is bounded by p_i*|log p_i + H|); fp32 rounding of
exp/log adds ~1e-6 relative. Tokens must be identical unless the reference's top two scores (logits,
or logits/t + gumbel for sampled rows) are within 2*delta of each other.

If kernels.exit_head was imported before tests/kernels/conftest.py could set TRITON_INTERPRET (another
test directory imports the engine first), the kernel tests here skip and one test reruns this file in a
fresh process with the flag set.
"""
import importlib
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

eh = importlib.import_module("kernels.exit_head")
from kernels import ExitDecision, KernelConfig, exit_head, exit_head_reference, exit_head_triton

INTERPRETED = eh.HAS_TRITON and eh._INTERPRETED
ON_GPU = eh.HAS_TRITON and not INTERPRETED and torch.cuda.is_available()
KERNEL_RUNNABLE = INTERPRETED or ON_GPU
BASE_SEED = int(os.environ.get("EXIT_HEAD_TEST_SEED", torch.randint(0, 2**31, ()).item()))
FIELDS = ("token", "margin", "exit", "logprob", "max_prob", "entropy")
INF = float("inf")


@pytest.fixture
def device():
    if not KERNEL_RUNNABLE:
        pytest.skip("kernels.exit_head was imported without TRITON_INTERPRET and there is no GPU; "
                    "test_kernel_suite_in_fresh_process covers these tests")
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture
def gen(request):
    # A fresh stream per test, derived from the run's seed and the test's id.
    return torch.Generator().manual_seed(BASE_SEED ^ zlib.crc32(request.node.nodeid.encode()))


def make_case(rows, d, vocab, dtype, gen, scale=3.0, device="cpu"):
    """Random head inputs whose logits are ~N(0, scale^2); thresholds cycle 0, 0.5, +inf; about half the
    rows sample at a temperature in [0.3, 1.8]."""
    hidden = (torch.randn(rows, d, generator=gen) * 2).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
    lm_head = (torch.randn(vocab, d, generator=gen) * (scale / math.sqrt(d))).to(dtype)
    thresholds = torch.tensor([0.0, 0.5, INF]).repeat(rows // 3 + 1)[:rows]
    temperature = 0.3 + 1.5 * torch.rand(rows, generator=gen)
    temperature = torch.where(torch.rand(rows, generator=gen) < 0.5, 0.0, temperature)
    seed = torch.randint(-2**62, 2**62, (rows,), generator=gen)
    to = lambda t: t.to(device)
    return dict(hidden=to(hidden), norm_weight=to(norm_weight), lm_head=to(lm_head), thresholds=to(thresholds),
                temperature=to(temperature), seed=to(seed))


def poisoned(fill_bool: bool):
    """An allocator that fills every buffer the Triton path allocates with garbage, so an unwritten
    element shows: NaN floats, huge ints, and a bool value that differs between two runs."""
    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if dtype == torch.bool:
            return t.fill_(fill_bool)
        return t.fill_(float("nan") if dtype.is_floating_point else 2**30 + 7)
    return alloc


def run_kernel(monkeypatch, case, config=None, greedy=False):
    """Runs the kernel on buffers poisoned with NaN / huge ints and exit = True for the sampled variant,
    exit = False for the greedy one: every test runs both, so an unwritten exit shows in one of them."""
    args = {k: v for k, v in case.items() if not (greedy and k in ("temperature", "seed"))}
    monkeypatch.setattr(eh, "_empty", poisoned(not greedy))
    out = exit_head_triton(**args, eps=1e-5, config=config)
    monkeypatch.undo()
    return out


def reference_scores(case, greedy):
    # [rows, V] fp32 reference logits and the scores the token is the argmax of.
    y = eh.rms_norm(case["hidden"], case["norm_weight"], 1e-5, case["lm_head"].dtype)
    logits = y.float() @ case["lm_head"].float().T
    if greedy:
        return logits, logits
    inv_t = eh.inverse_temperature(case["temperature"])
    scores = logits * inv_t[:, None] + eh.gumbel_noise(case["seed"], logits.shape[1])
    return logits, torch.where(inv_t[:, None] > 0, scores, logits)


def assert_within(name, got, want, tol):
    # |got - want| <= tol elementwise (tol a tensor of per-row tolerances).
    err = (got - want).abs()
    assert (err <= tol).all(), f"{name}: max error {err.max().item():.3g}, worst excess " \
        f"{(err - tol).max().item():.3g} (seed={BASE_SEED})"


def assert_close_to_reference(out: ExitDecision, case, greedy=False):
    args = {k: v for k, v in case.items() if not (greedy and k in ("temperature", "seed"))}
    ref = exit_head_reference(**args, eps=1e-5)
    ref, out = (ExitDecision(*(getattr(o, name).cpu() for name in FIELDS)) for o in (ref, out))
    logits, scores = (t.cpu() for t in reference_scores(case, greedy))
    thresholds = case["thresholds"].cpu()
    rel = 2e-6 if case["lm_head"].dtype == torch.float32 else 1e-3
    delta = rel * logits.abs().amax(-1) + 1e-6                                           # [rows]
    inv_t = torch.ones(len(delta)) if greedy else eh.inverse_temperature(case["temperature"].cpu()).clamp_min(1)
    assert out.token.dtype == torch.int64 and out.exit.dtype == torch.bool
    for name in ("margin", "logprob", "max_prob", "entropy"):
        assert getattr(out, name).dtype == torch.float32 and torch.isfinite(getattr(out, name)).all(), name
    rows = torch.arange(len(delta))
    gap = (scores[rows, out.token] - scores[rows, ref.token]).abs()
    tie = gap <= 2 * delta * inv_t + 1e-5 * scores.abs().amax(-1)
    assert ((out.token == ref.token) | tie).all(), f"tokens differ beyond a tie (seed={BASE_SEED})"
    prob_tol = 2 * delta + 1e-6 + 1e-5 * ref.max_prob
    assert_within("margin", out.margin, ref.margin, prob_tol)
    assert_within("max_prob", out.max_prob, ref.max_prob, prob_tol)
    ref_logprob = logits.log_softmax(-1)[rows, out.token]  # of the kernel's token, in case of a tie
    assert_within("logprob", out.logprob, ref_logprob, 2 * delta + 1e-5 * (1 + ref_logprob.abs()))
    entropy_tol = 2 * delta * math.log(logits.shape[1]) + 1e-5 * (1 + ref.entropy)
    assert_within("entropy", out.entropy, ref.entropy, entropy_tol)
    assert torch.equal(out.exit, out.margin >= thresholds), f"exit != margin >= threshold (seed={BASE_SEED})"
    near = (ref.margin - thresholds).abs() <= prob_tol
    assert ((out.exit == ref.exit) | near).all(), f"exit differs away from the threshold (seed={BASE_SEED})"
    assert not out.exit[thresholds == INF].any() and out.exit[thresholds == 0].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1000, 4099])
@pytest.mark.parametrize("rows", [1, 3, 64, 257])
def test_matches_reference(monkeypatch, device, gen, rows, vocab, dtype):
    case = make_case(rows, 96, vocab, dtype, gen, device=device)
    assert_close_to_reference(run_kernel(monkeypatch, case), case)
    assert_close_to_reference(run_kernel(monkeypatch, case, greedy=True), case, greedy=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [1e-3, 1e3], ids=["tiny", "huge"])
def test_logit_ranges(monkeypatch, device, gen, scale, dtype):
    # tiny: near-uniform softmax (p ~ 1/V, margins ~1e-7); huge: logits in the thousands, exp overflows
    # without the running max.
    case = make_case(64, 64, 4099, dtype, gen, scale=scale, device=device)
    assert_close_to_reference(run_kernel(monkeypatch, case), case)


@pytest.mark.parametrize("name, d, vocab", [("smollm2/8", 72, 6144), ("llama3-8b/32", 128, 4008),
                                            ("mistral-7b/32", 128, 1000)])
def test_scaled_down_real_shapes(monkeypatch, device, gen, name, d, vocab):
    case = make_case(8, d, vocab, torch.bfloat16, gen, device=device)
    assert_close_to_reference(run_kernel(monkeypatch, case), case)


@pytest.mark.parametrize("rows, config", [
    (40, KernelConfig(block_r=16, block_v=128, block_d=32, num_splits=12)),  # GPU-like tiles, 3 row blocks
    (3, KernelConfig(block_r=16, block_v=256, block_d=64, num_splits=1)),    # the whole vocabulary in one program
    (20, KernelConfig(block_r=32, block_v=256, block_d=128, num_splits=5)),  # uneven: the last split is short
], ids=["gpu-like", "one-split", "uneven"])
def test_tile_configs(monkeypatch, device, gen, rows, config):
    case = make_case(rows, 80, 1500, torch.bfloat16, gen, device=device)
    assert_close_to_reference(run_kernel(monkeypatch, case, config=config), case)
    assert_close_to_reference(run_kernel(monkeypatch, case, config=config, greedy=True), case, greedy=True)


def test_exact_ties_pick_lowest_index_and_zero_margin(monkeypatch, device, gen):
    # Hidden = +-1, unit norm weight, eps = 0 and LM-head entries in multiples of 1/8: every logit is exact
    # in fp32 whatever the summation order. Duplicating the best row far away in the vocabulary (another
    # tile and split) makes p1 == p2 exactly; the lower index must win on both paths.
    rows, d, vocab = 4, 64, 3000
    hidden = torch.randn(rows, d, generator=gen).sign()
    lm_head = (torch.randn(vocab, d, generator=gen) * 8).round() / 8
    best = (hidden[0] @ lm_head.T).argmax().item()
    lm_head = torch.cat([lm_head, lm_head[best:best + 1]])                                # index 3000 == best
    args = dict(hidden=hidden.to(device), norm_weight=torch.ones(d, device=device), lm_head=lm_head.to(device),
                thresholds=torch.zeros(rows, device=device))
    cfg = KernelConfig(block_r=16, block_v=128, block_d=64, num_splits=24)
    for fill in (True, False):
        monkeypatch.setattr(eh, "_empty", poisoned(fill))
        out = exit_head_triton(**args, eps=0.0, config=cfg)
        assert out.token[0].item() == best and out.margin[0].item() == 0.0
    ref = exit_head_reference(**args, eps=0.0)
    assert ref.token[0].item() == best and ref.margin[0].item() == 0.0


def test_sampling_reproducible(monkeypatch, device, gen):
    case = make_case(16, 64, 1000, torch.bfloat16, gen, scale=1.0, device=device)
    case["temperature"] = torch.full((16,), 1.0, device=device)
    first = run_kernel(monkeypatch, case).token
    assert torch.equal(run_kernel(monkeypatch, case).token, first)
    assert torch.equal(exit_head_reference(**case, eps=1e-5).token.cpu(), first.cpu())
    case["seed"] = case["seed"] + 1
    assert not torch.equal(run_kernel(monkeypatch, case).token, first)  # all 16 rows unchanged: p < 1e-9 at scale 1
    case.pop("seed")
    torch.manual_seed(123)
    drawn = exit_head(**case, eps=1e-5, backend="triton").token
    torch.manual_seed(123)
    assert torch.equal(exit_head(**case, eps=1e-5, backend="triton").token, drawn)


def test_sampling_distribution_chi_square(device):
    # 2 x 3000 rows with the same hidden state and distinct seeds, at t = 0.6 and t = 1.7: the empirical token
    # distributions must match softmax(logits / t). Fixed seeds, so the p-values are fixed numbers, not coin
    # flips; the kernel and the reference sampler are both checked.
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(7)
    per_t, d, vocab, temperatures = 3000, 32, 700, (0.6, 1.7)
    rows = per_t * len(temperatures)
    case = make_case(1, d, vocab, torch.float32, g, scale=1.5, device=device)
    logits, _ = reference_scores(case, greedy=True)
    case["hidden"] = case["hidden"].expand(rows, d)
    case["thresholds"] = torch.zeros(rows, device=device)
    case["temperature"] = torch.tensor(temperatures, device=device).repeat_interleave(per_t)
    case["seed"] = torch.arange(rows, device=device) * 7919 + 11
    for sampler in (exit_head_triton, exit_head_reference):
        tokens = sampler(**case, eps=1e-5).token.cpu().view(len(temperatures), per_t)
        for t, row_tokens in zip(temperatures, tokens):
            expected = (logits[0].cpu() / t).softmax(-1).double() * per_t
            counts = torch.bincount(row_tokens, minlength=vocab).double()
            big = expected >= 5  # pool the rare tokens into one cell so every cell expects >= 5
            observed = torch.cat([counts[big], counts[~big].sum()[None]])
            expected = torch.cat([expected[big], expected[~big].sum()[None]])
            _, p_value = scipy_stats.chisquare(observed.numpy(), expected.numpy() * per_t / expected.sum().item())
            assert p_value > 1e-3, (sampler.__name__, t, p_value, int(big.sum()))


def test_adapter_is_applied_before_the_norm(monkeypatch, device, gen):
    case = make_case(5, 64, 1000, torch.float32, gen, device=device)
    delta = torch.randn(64, 64, generator=gen).to(device) * 0.1
    adapter = lambda h: h + h @ delta
    adapted = dict(case, hidden=adapter(case["hidden"]))
    with_adapter = exit_head_triton(**case, eps=1e-5, adapter=adapter)
    for name in FIELDS:
        assert torch.equal(getattr(with_adapter, name), getattr(exit_head_triton(**adapted, eps=1e-5), name)), name
    ref = exit_head_reference(**case, eps=1e-5, adapter=adapter)
    torch.testing.assert_close(ref.margin, exit_head_reference(**adapted, eps=1e-5).margin)


def test_dispatcher_routes_special_rows_through_reference(device, gen):
    rows = 6
    case = make_case(rows, 64, 1000, torch.float32, gen, device=device)
    case["temperature"] = torch.full((rows,), 1.5, device=device)
    top_k = torch.tensor([0, 1, 0, 3, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 1.0])
    num_logprobs = torch.tensor([0, 0, 0, 0, 2, 0])
    out = exit_head(**case, eps=1e-5, top_k=top_k, top_p=top_p, num_logprobs=num_logprobs, backend="triton")
    fused = exit_head_triton(**case, eps=1e-5)
    special = torch.tensor([False, True, True, True, True, False])
    idx = special.nonzero()[:, 0]
    per_row = ("hidden", "thresholds", "temperature", "seed")
    ref = exit_head_reference(**{k: v[idx.to(v.device)] if k in per_row else v for k, v in case.items()}, eps=1e-5,
                              top_k=top_k[idx], top_p=top_p[idx], num_logprobs=num_logprobs[idx])
    for name in FIELDS:
        got, fused_v = getattr(out, name).cpu(), getattr(fused, name).cpu()
        assert torch.equal(got[~special], fused_v[~special]), name
        assert torch.equal(got[special], getattr(ref, name).cpu()), name
    logits, _ = reference_scores(case, greedy=True)
    assert out.token[1].item() == logits[1].argmax().item()  # top_k = 1 is greedy at any temperature
    assert out.top_logprobs.shape == (rows, 2) and out.top_tokens.shape == (rows, 2)
    torch.testing.assert_close(out.top_logprobs[4].cpu(), logits[4].log_softmax(-1).topk(2).values)
    assert (out.top_tokens[special.logical_not().nonzero()[:, 0].to(out.top_tokens.device)] == -1).all()


def test_dispatcher_backends(gen):
    case = make_case(3, 32, 500, torch.float32, gen)
    auto = exit_head(**case, eps=1e-5)  # CPU tensors: the reference
    ref = exit_head_reference(**case, eps=1e-5)
    for name in FIELDS:
        assert torch.equal(getattr(auto, name), getattr(ref, name)), name
    with pytest.raises(ValueError, match="backend"):
        exit_head(**case, eps=1e-5, backend="cuda")


def test_reference_top_k_top_p_filters_samples(gen):
    rows, vocab = 400, 50
    case = make_case(1, 16, vocab, torch.float32, gen, scale=2.0)
    case = {k: (v.expand(rows, -1) if k == "hidden" else v) for k, v in case.items()}
    case.update(thresholds=torch.zeros(rows), temperature=torch.full((rows,), 2.0),
                seed=torch.arange(rows, dtype=torch.int64))
    logits, _ = reference_scores({**case, "hidden": case["hidden"][:1]}, greedy=True)
    order = logits[0].argsort(descending=True)
    top3 = exit_head_reference(**case, eps=1e-5, top_k=torch.full((rows,), 3)).token
    assert set(top3.tolist()) == set(order[:3].tolist())
    probs = (logits[0] / 2.0).softmax(-1)[order]
    nucleus = int((probs.cumsum(0) < 0.6).sum()) + 1  # the smallest prefix whose mass reaches 0.6
    top_p = exit_head_reference(**case, eps=1e-5, top_p=torch.full((rows,), 0.6)).token
    assert set(top_p.tolist()) <= set(order[:nucleus].tolist()) and len(set(top_p.tolist())) > 1


def test_empty_batch(device, gen):
    case = make_case(0, 32, 100, torch.float32, gen, device=device)
    out = exit_head(**case, eps=1e-5, backend="triton")
    assert out.token.shape == (0,) and out.exit.dtype == torch.bool


@pytest.mark.skipif(KERNEL_RUNNABLE or not eh.HAS_TRITON, reason="the kernel tests run in this process")
def test_kernel_suite_in_fresh_process():
    # kernels.exit_head was imported (by another test directory) before TRITON_INTERPRET was set, so its
    # kernels are compiled for a GPU this machine lacks: rerun this file where the flag is set first.
    env = {**os.environ, "TRITON_INTERPRET": "1", "EXIT_HEAD_TEST_SEED": str(BASE_SEED)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
