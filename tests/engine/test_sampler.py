"""Sampler: greedy, seeds, top-k / top-p support, logprobs; and sampling through the engine."""
import math

import pytest
import torch

from kernels.exit_head import filter_top_k_top_p
from server.engine.sampler import SamplingTensors, sample
from server.engine.sampling_params import SamplingParams
from tests.engine.helpers import random_prompts


def controls(rows, temperature=1.0, top_k=0, top_p=1.0, seed=0, num_logprobs=-1, suppressed=None):
    full = lambda value, dtype: torch.full((rows,), value, dtype=dtype)
    seeds = torch.arange(rows, dtype=torch.long) + seed
    return SamplingTensors(full(temperature, torch.float32), full(top_k, torch.long), full(top_p, torch.float32),
                           seeds, full(num_logprobs, torch.long), suppressed or [[] for _ in range(rows)])


LOGITS = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))


def test_greedy_is_argmax_and_suppression_masks():
    logits = torch.randn(5, 50)
    out = sample(logits, controls(5, temperature=0.0))
    assert torch.equal(out.token, logits.argmax(-1))
    banned = [[int(logits[0].argmax())]] + [[] for _ in range(4)]
    out = sample(logits, controls(5, temperature=0.0, suppressed=banned))
    assert int(out.token[0]) == int(logits[0].topk(2).indices[1])


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed():
    logits = LOGITS.expand(400, -1)
    a = sample(logits, controls(400, seed=7)).token
    b = sample(logits, controls(400, seed=7)).token
    c = sample(logits, controls(400, seed=8)).token
    assert torch.equal(a, b) and not torch.equal(a, c)
    frequencies = torch.bincount(a, minlength=6).float() / 400  # 400 distinct seeds: close to the distribution
    assert (frequencies - LOGITS.exp()).abs().max() < 0.08


@pytest.mark.parametrize("top_k, top_p, support", [(2, 1.0, {0, 1}), (0, 0.6, {0, 1}), (0, 0.66, {0, 1, 2}),
                                                   (3, 0.55, {0, 1}), (3, 0.45, {0}), (1, 1.0, {0})])
def test_top_k_top_p_restrict_the_support(top_k, top_p, support):
    kept = filter_top_k_top_p(LOGITS[None].clone(), torch.tensor([top_k]), torch.tensor([top_p]))
    assert set(torch.isfinite(kept[0]).nonzero()[:, 0].tolist()) == support
    drawn = sample(LOGITS.expand(500, -1), controls(500, top_k=top_k, top_p=top_p)).token
    assert set(drawn.tolist()) == support  # 500 draws reach every kept token


def test_logprobs_are_of_the_untempered_distribution():
    logits = torch.randn(3, 40)
    out = sample(logits, controls(3, temperature=0.7, num_logprobs=4))
    expected = logits.log_softmax(-1)
    assert torch.allclose(out.logprob, expected.gather(-1, out.token[:, None])[:, 0])
    assert torch.equal(out.top_tokens, expected.topk(4).indices)
    assert torch.allclose(out.top_logprobs, expected.topk(4).values)


def test_engine_seeded_requests_reproduce_in_any_batch(make_engine):
    prompts = random_prompts([8, 15, 4], seed=9)
    params = [SamplingParams(max_tokens=20, temperature=1.0, seed=s, exit_epsilon=0.9, ignore_eos=True)
              for s in (1, 2, 3)]
    batch = make_engine().generate(prompts, params)
    alone = make_engine().generate([prompts[0]], params[0])[0]
    assert batch[0].outputs[0].token_ids == alone.outputs[0].token_ids
    assert batch[0].outputs[0].exit_layers == alone.outputs[0].exit_layers
    other_seed = make_engine().generate([prompts[0]], SamplingParams(max_tokens=20, temperature=1.0, seed=5,
                                                                      exit_epsilon=0.9, ignore_eos=True))[0]
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids
    n2 = make_engine().generate([prompts[0]], SamplingParams(max_tokens=20, temperature=1.0, seed=1, n=2,
                                                             exit_epsilon=0.9, ignore_eos=True))[0]
    assert n2.outputs[0].token_ids == alone.outputs[0].token_ids  # choice i uses seed + i
    assert n2.outputs[1].token_ids != n2.outputs[0].token_ids


def test_engine_top_k_one_is_greedy_and_logprobs_come_from_the_producing_layer(make_engine, tiny, tiny_heads):
    prompt = random_prompts([10], seed=10)[0]
    greedy = make_engine().generate([prompt], SamplingParams(max_tokens=16, temperature=0, exit_epsilon=0.9,
                                                             ignore_eos=True))[0].outputs[0]
    top1 = make_engine().generate([prompt], SamplingParams(max_tokens=16, temperature=0.8, top_k=1, seed=3,
                                                           exit_epsilon=0.9, ignore_eos=True, logprobs=3))[0].outputs[0]
    assert top1.token_ids == greedy.token_ids and top1.exit_layers == greedy.exit_layers
    assert len(top1.logprobs) == 16
    for entry, token in zip(top1.logprobs, top1.token_ids):
        assert entry.token_id == token and len(entry.top) == 3
        assert max(entry.top, key=entry.top.get) == token  # greedy: the chosen token is the most likely
        assert math.isclose(entry.logprob, entry.top[token], rel_tol=1e-5)
