"""Shortlist heads in the engine, including the exit after the last layer: the engine equals the
reference generator's early-exit path, exits off (or the last head at +inf) equal full depth, a
request is the same alone and among others, and every step's FLOPs are the cost model's count for
the heads actually evaluated and the rows that ran the full LM head."""
import math

import pytest

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.model.exit_heads import ExitHeadSet
from server.model.generate import generate as reference_generate
from tests.engine.helpers import random_prompts, run_staggered
from tests.tiny_model import SHORTLIST_LAYERS, write_tiny_shortlist_heads

LAST = SHORTLIST_LAYERS[-1]


@pytest.fixture(scope="module")
def shortlist_heads(tiny, tmp_path_factory):
    folder = write_tiny_shortlist_heads(tmp_path_factory.mktemp("shortlist"), tiny.model, tiny.fingerprint)
    return ExitHeadSet.load(folder, config=tiny.config, fingerprint=tiny.fingerprint, lm_head=tiny.model.lm_head.weight)


def engine_with(tiny, heads, **overrides) -> LLMEngine:
    config = EngineConfig(**{"model": "tiny", "max_num_seqs": 32, "max_num_batched_tokens": 256, **overrides})
    return LLMEngine(tiny.model, tiny.tokenizer, config, heads)


@pytest.mark.parametrize("eps", [0.9, 0.99])
def test_engine_equals_reference_early_exit(tiny, shortlist_heads, eps):
    prompts = random_prompts([3, 17, 40, 9, 25, 5], seed=21)
    params = SamplingParams(max_tokens=24, temperature=0, exit_epsilon=eps, ignore_eos=True)
    final = run_staggered(engine_with(tiny, shortlist_heads), prompts, params, arrivals=[0, 0, 1, 3, 3, 6])
    layers = []
    for i, prompt in enumerate(prompts):
        expected = reference_generate(tiny.model, prompt, 24, heads=shortlist_heads,
                                      thresholds=shortlist_heads.thresholds(eps))
        got = final[str(i)].outputs[0]
        assert (got.token_ids, got.exit_layers) == (expected.token_ids, expected.exit_layers), i
        layers += got.exit_layers[1:]
    skipped = sum(final[str(i)].num_tokens_lm_head_skipped for i in range(len(prompts)))
    assert 0 < skipped < len(layers)  # some tokens took a head's answer, others ran the LM head
    if eps == 0.9:
        assert 0 < layers.count(SHORTLIST_LAYERS[0]) < len(layers)  # and some left at the intermediate head


def test_exits_off_and_an_infinite_last_threshold_equal_full_depth(tiny, shortlist_heads, tmp_path):
    prompts = random_prompts([5, 30, 12], seed=4)
    full = [reference_generate(tiny.model, p, 20).token_ids for p in prompts]
    off = engine_with(tiny, shortlist_heads).generate(prompts, SamplingParams(max_tokens=20, temperature=0,
                                                                              early_exit=False, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in off] == full
    assert all(o.num_tokens_lm_head_skipped == 0 and o.compute_saved == 0.0 for o in off)
    closed = write_tiny_shortlist_heads(tmp_path, tiny.model, tiny.fingerprint,
                                        thresholds={0.95: {SHORTLIST_LAYERS[0]: math.inf, LAST: math.inf}})
    heads = ExitHeadSet.load(closed, config=tiny.config, fingerprint=tiny.fingerprint, lm_head=tiny.model.lm_head.weight)
    out = engine_with(tiny, heads).generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in out] == full
    assert all(set(o.outputs[0].exit_layers) == {LAST} and o.num_tokens_lm_head_skipped == 0 for o in out)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_request_is_the_same_alone_and_among_eight(tiny, shortlist_heads, temperature):
    prompts = random_prompts([3, 17, 40, 9, 25, 5, 31, 12], seed=9)
    params = [SamplingParams(max_tokens=20, temperature=temperature, seed=50 + i, exit_epsilon=0.9, ignore_eos=True)
              for i in range(len(prompts))]
    together = run_staggered(engine_with(tiny, shortlist_heads), prompts, params, arrivals=[0, 0, 1, 2, 2, 5, 7, 8])
    for i, prompt in enumerate(prompts):
        alone = engine_with(tiny, shortlist_heads).generate([prompt], params[i])[0].outputs[0]
        got = together[str(i)].outputs[0]
        assert (got.token_ids, got.exit_layers) == (alone.token_ids, alone.exit_layers), i


def test_step_flops_are_the_cost_models_count(tiny, shortlist_heads):
    """Per decode step of a lone sequence: layers run, each head evaluated at its own cost (the
    margins list one entry per evaluation), KV fill of skipped layers, and the LM head only if the
    row did not take a head's answer."""
    engine = engine_with(tiny, shortlist_heads)
    costs = engine.runner.costs
    per_head = dict(zip(shortlist_heads.layers, shortlist_heads.evaluation_flops(costs)))
    assert per_head[LAST] < per_head[SHORTLIST_LAYERS[0]] < costs.head_flops  # no adapter at the last layer
    engine.add_request("r", random_prompts([11], seed=3)[0],
                       SamplingParams(max_tokens=40, temperature=0.8, seed=1, exit_epsilon=0.9, ignore_eos=True))
    checked, skipped_steps = 0, 0
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.last_step
        if not stats.decode_flops:
            continue  # the prefill step
        (layer,) = stats.exit_layers
        context = 11 + checked + 1  # the decode row attends over the prompt and every token so far
        spent_on_heads = sum(per_head[k] for k, _ in stats.exit_margins)
        ran_lm_head = stats.num_lm_head_skipped == 0
        want = costs.token_flops(layer, context_len=context, head_flops=spent_on_heads, full_head=ran_lm_head)
        assert stats.decode_flops == pytest.approx(want, rel=1e-12)
        assert stats.decode_flops_full_depth == pytest.approx(costs.full_depth_flops(context), rel=1e-12)
        skipped_steps += not ran_lm_head
        checked += 1
    assert checked == 39 and 0 < skipped_steps < checked


def test_each_token_says_whether_it_skipped_the_lm_head(tiny, shortlist_heads):
    """CompletionOutput.lm_head_skipped is per token and adds up to the request's count; a token that
    left before the last layer skipped the LM head too, and one produced at full depth did not."""
    prompts = random_prompts([7, 30, 12, 4], seed=5)
    params = SamplingParams(max_tokens=12, temperature=0, exit_epsilon=0.9, ignore_eos=True)
    final = run_staggered(engine_with(tiny, shortlist_heads), prompts, params, arrivals=[0, 0, 1, 2])
    for out in final.values():
        completion = out.outputs[0]
        assert len(completion.lm_head_skipped) == len(completion.exit_layers) == len(completion.token_ids)
        assert sum(completion.lm_head_skipped) == out.num_tokens_lm_head_skipped
        assert completion.lm_head_skipped[0] is False  # the first token comes from the prefill
        for layer, skipped in zip(completion.exit_layers, completion.lm_head_skipped):
            assert skipped or layer == LAST  # an exit before the last layer never runs the LM head
    skipped_at_last = [s for out in final.values() for k, s in zip(out.outputs[0].exit_layers, out.outputs[0].lm_head_skipped)
                       if k == LAST]
    assert any(skipped_at_last) and not all(skipped_at_last)  # the last-layer head let some go, not all
