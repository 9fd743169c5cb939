"""Gated plans in the engine: a head is asked only where its gate probe passes, the threshold still
decides; the engine equals the reference generator's gated path and counts the gates it ran."""
import math

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.model.exit_heads import ExitHeadSet
from server.model.generate import generate as reference_generate
from tests.engine.helpers import random_prompts, run_staggered
from tests.tiny_model import write_tiny_heads

PLAIN = {2: 0.05, 4: 0.02}  # the fixture's eps-0.9 thresholds: many exits at both heads
CUT_MOST_PASS = 0.012  # the probes below score about 10% of rows under it: a batch of 4 often passes whole
GATED = {"thresholds": {2: 0.05, 4: 0.02}, "gate_cuts": {2: 0.5, 4: -math.inf}}  # gate only at layer 2


def gated_heads(tiny, folder, plain_saved: float, gated_saved: float, cut: float = 0.5) -> ExitHeadSet:
    """The tiny heads with random gate probes and one calibrated eps (0.9) holding both plans."""
    heads = ExitHeadSet.load(write_tiny_heads(folder, tiny.model, tiny.fingerprint), config=tiny.config,
                             fingerprint=tiny.fingerprint)
    heads.add_gates()
    torch.manual_seed(5)
    with torch.no_grad():
        for head in heads.heads.values():
            head.gate.weight.normal_(0.0, 0.5)  # scores spread around 0.5: the cut passes about half the rows
    entry = {"thresholds": PLAIN, "teacher_forced": {"saved_fraction": plain_saved},
             "gated": {"thresholds": GATED["thresholds"], "gate_cuts": {**GATED["gate_cuts"], 2: cut},
                       "teacher_forced": {"saved_fraction": gated_saved}}}
    heads.set_calibration("margin", {0.9: entry}, default_epsilon=0.9)
    return heads


def engine_with(tiny, heads, **overrides) -> LLMEngine:
    return LLMEngine(tiny.model, tiny.tokenizer, EngineConfig(model="tiny", max_num_seqs=32, **overrides), heads)


def test_plan_choice(tiny, tmp_path):
    better = gated_heads(tiny, tmp_path / "a", plain_saved=0.1, gated_saved=0.2)
    assert better.uses_gates(0.9)
    thresholds, cuts = better.served_thresholds(0.9)
    assert thresholds == GATED["thresholds"] and cuts == GATED["gate_cuts"]
    worse = gated_heads(tiny, tmp_path / "b", plain_saved=0.2, gated_saved=0.1)
    assert not worse.uses_gates(0.9)
    thresholds, cuts = worse.served_thresholds(0.9)
    assert thresholds == PLAIN and all(c == -math.inf for c in cuts.values())


def test_gated_engine_equals_reference(tiny, tmp_path):
    """Per-row gating (gate_whole_batch off): each row asks the head where its own gate passes."""
    heads = gated_heads(tiny, tmp_path / "h", plain_saved=0.0, gated_saved=0.1)
    engine = engine_with(tiny, heads, gate_whole_batch=False)
    prompts = random_prompts([3, 17, 40, 9, 25, 5], seed=7)
    params = SamplingParams(max_tokens=24, temperature=0, exit_epsilon=0.9, ignore_eos=True)
    final = run_staggered(engine, prompts, params, arrivals=[0, 0, 1, 3, 3, 6])
    gated_exits = plain_exits = 0
    for i, prompt in enumerate(prompts):
        expected = reference_generate(tiny.model, prompt, 24, heads=heads, thresholds=GATED["thresholds"],
                                      gate_cuts=GATED["gate_cuts"])
        got = final[str(i)].outputs[0]
        assert (got.token_ids, got.exit_layers) == (expected.token_ids, expected.exit_layers), i
        plain = reference_generate(tiny.model, prompt, 24, heads=heads, thresholds=PLAIN)
        gated_exits += got.exit_layers.count(2)
        plain_exits += plain.exit_layers.count(2)
    # the gate skipped some layer-2 evaluations that would have exited, and let others through
    assert 0 < gated_exits < plain_exits


def test_gates_are_counted(tiny, tmp_path):
    """Decode FLOPs count the gate probe every decode token runs at layer 2 and only the head
    evaluations the gate let through (one margin is reported per head evaluation)."""
    heads = gated_heads(tiny, tmp_path / "h", plain_saved=0.0, gated_saved=0.1)
    engine = engine_with(tiny, heads)
    engine.add_request("g", random_prompts([11], seed=1)[0],
                       SamplingParams(max_tokens=40, temperature=0, exit_epsilon=0.9, ignore_eos=True))
    costs, checked, blocked = engine.runner.costs, 0, 0
    while engine.has_unfinished_requests():
        engine.step()
        stats, seq = engine.last_step, engine.requests["g"].seqs[0] if "g" in engine.requests else None
        if not stats.decode_flops:
            continue  # the prefill step
        (layer,), evaluated = stats.exit_layers, len(stats.exit_margins)
        context = seq.num_tokens - 1 if seq is not None else 11 + 40 - 1
        assert stats.decode_flops == pytest.approx(float(costs.token_flops(layer, evaluated, context, 1)), rel=1e-9)
        blocked += all(margin_layer != 2 for margin_layer, _ in stats.exit_margins)
        checked += 1
    assert checked == 39 and 0 < blocked < checked


def test_whole_batch_gating(tiny, tmp_path):
    """gate_whole_batch (`serve --gate-whole-batch`): a gated head is asked for all decode rows of a step
    or none; a lone sequence runs exactly the reference's gated path."""
    heads = gated_heads(tiny, tmp_path / "h", plain_saved=0.0, gated_saved=0.1, cut=CUT_MOST_PASS)
    prompts = random_prompts([3, 17, 40, 9], seed=7)
    params = SamplingParams(max_tokens=24, temperature=0, exit_epsilon=0.9, ignore_eos=True)
    alone = engine_with(tiny, heads, gate_whole_batch=True).generate([prompts[1]], params)[0].outputs[0]
    expected = reference_generate(tiny.model, prompts[1], 24, heads=heads, thresholds=GATED["thresholds"],
                                  gate_cuts={2: CUT_MOST_PASS, 4: -math.inf})
    assert (alone.token_ids, alone.exit_layers) == (expected.token_ids, expected.exit_layers)

    engine = engine_with(tiny, heads, gate_whole_batch=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    asked_steps = skipped_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.last_step
        if stats.num_prompt_tokens:
            continue  # prefill steps (all prompts arrive at once): decode rows are checked after
        asked = sum(layer == 2 for layer, _ in stats.exit_margins)  # layer 2 is the first head
        assert asked in (0, len(stats.exit_layers)), (asked, len(stats.exit_layers))
        asked_steps += asked > 0
        skipped_steps += asked == 0
    assert asked_steps > 0 and skipped_steps > 0  # the batch asked together sometimes, and was held back


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_per_row_gating_is_batch_invariant(tiny, tmp_path, temperature):
    """With per-row gating each row's gate, head and threshold see only that row, so a request's
    tokens and exit layers are the same alone and among 8 staggered requests (greedy and seeded
    sampling). Whole-batch gating gives this up by design (test_whole_batch_gating)."""
    heads = gated_heads(tiny, tmp_path / "h", plain_saved=0.0, gated_saved=0.1, cut=CUT_MOST_PASS)
    prompts = random_prompts([3, 17, 40, 9, 25, 5, 31, 12], seed=11)
    params = [SamplingParams(max_tokens=20, temperature=temperature, seed=100 + i, exit_epsilon=0.9, ignore_eos=True)
              for i in range(len(prompts))]
    together = run_staggered(engine_with(tiny, heads, gate_whole_batch=False), prompts, params,
                             arrivals=[0, 0, 1, 2, 2, 5, 7, 8])
    exits = 0
    for i, prompt in enumerate(prompts):
        alone = engine_with(tiny, heads, gate_whole_batch=False).generate([prompt], params[i])[0].outputs[0]
        got = together[str(i)].outputs[0]
        assert (got.token_ids, got.exit_layers) == (alone.token_ids, alone.exit_layers), i
        exits += sum(layer < tiny.config.num_hidden_layers for layer in got.exit_layers)
    assert exits > 0  # the gated heads did let tokens out
