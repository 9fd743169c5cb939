"""`offramp eval` on the tiny model agrees with a direct computation of the same quantities."""
import copy
import json
import math

import numpy as np
import pytest
import torch

from calibration.data import chat_ids
from server.cli import main
from server.model.exit_heads import ExitHeadSet
from server.model.generate import generate
from tests.calibration.test_fit import CALIB_PROMPTS, prompt_files, tiny_loaded, tiny_model_dir  # noqa: F401
from tests.tiny_model import write_tiny_heads

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def results(tiny_model_dir, tiny_loaded, prompt_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    heads_dir = write_tiny_heads(folder / "heads", tiny_loaded.model, tiny_loaded.fingerprint)
    code = main(["eval", "--model", str(tiny_model_dir), "--heads", str(heads_dir), "--prompts",
                 str(prompt_files / "calib.txt"), "--text", str(prompt_files / "text.txt"), "--max-tokens",
                 str(MAX_TOKENS), "--batch", "4", "--threads", "1", "--json", str(folder / "eval.json")])
    assert code == 0
    heads = ExitHeadSet.load(heads_dir, config=tiny_loaded.config, fingerprint=tiny_loaded.fingerprint)
    return json.loads((folder / "eval.json").read_text()), heads


def full_top1(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.forward(torch.tensor([ids]))[0].argmax(-1)


@pytest.mark.parametrize("eps", [0.9, 0.99])
def test_on_policy_agreement_matches_the_reference_early_exit_generator(results, tiny_loaded, eps):
    report, heads = results
    model, num_layers = tiny_loaded.model, tiny_loaded.config.num_hidden_layers
    exits, agreed, layers = 0, 0, []
    for prompt in CALIB_PROMPTS:
        prompt_ids = chat_ids(tiny_loaded.tokenizer, prompt)
        out = generate(model, prompt_ids, MAX_TOKENS, heads=heads, thresholds=heads.thresholds(eps),
                       eos_token_ids=tiny_loaded.tokenizer.eos_token_ids)
        top1 = full_top1(model, prompt_ids + out.token_ids)
        for i in range(1, len(out.token_ids)):  # token 0 comes from the prefill
            layers.append(out.exit_layers[i])
            if out.exit_layers[i] < num_layers:
                exits += 1
                agreed += int(out.token_ids[i] == int(top1[len(prompt_ids) + i - 1]))
    live = report["epsilons"][f"{eps:g}"]["on_policy"]
    assert exits > 0
    assert live["n_exited"] == exits and live["num_tokens"] == len(layers)
    assert live["agreement"] == pytest.approx(agreed / exits, abs=1e-12)
    for k in heads.layers:
        assert live["heads"][str(k)]["n_exited"] == layers.count(k)
    assert 0 < live["saved_fraction"] < 1  # the tiny model's exits pay: heads cost ~1 layer here


@pytest.mark.parametrize("eps", [0.9, 0.99])
def test_teacher_forced_agreement_matches_a_direct_computation(results, tiny_loaded, eps):
    report, heads = results
    model = tiny_loaded.model
    thresholds = heads.thresholds(eps)
    exited, agreed = 0, 0
    for prompt in CALIB_PROMPTS:
        prompt_ids = chat_ids(tiny_loaded.tokenizer, prompt)
        reply = generate(model, prompt_ids, MAX_TOKENS, eos_token_ids=tiny_loaded.tokenizer.eos_token_ids).token_ids
        ids = prompt_ids + reply
        with torch.no_grad():
            logits, hidden = model.forward(torch.tensor([ids]), output_hidden_states=True)
        for p in range(len(prompt_ids), len(ids) - 1):  # decode rows
            final = int(logits[0, p].argmax())
            for k in heads.layers:
                with torch.no_grad():
                    probs = torch.softmax(heads.head(k).logits(hidden[k][0, p:p + 1], model.lm_head.weight)[0], -1)
                top2 = probs.topk(2)
                if math.isfinite(thresholds[k]) and float(top2.values[0] - top2.values[1]) >= thresholds[k]:
                    exited += 1
                    agreed += int(int(top2.indices[0]) == final)
                    break
    tf = report["epsilons"][f"{eps:g}"]["teacher_forced"]
    assert exited > 0
    assert tf["agreement"] == pytest.approx(agreed / exited, abs=1e-12)
    assert tf["exit_fraction"] * tf["num_tokens"] == pytest.approx(exited)


def test_perplexity_of_the_early_exit_predictions_is_reported_against_full_depth(results):
    report, _ = results
    for entry in report["epsilons"].values():
        ppl = entry["perplexity"]
        assert ppl["num_tokens"] > 0 and ppl["perplexity_full"] > 1
        assert np.isfinite(ppl["perplexity_early_exit"])
    low, high = report["epsilons"]["0.9"]["perplexity"], report["epsilons"]["0.99"]["perplexity"]
    assert low["exit_share"] >= high["exit_share"]


def test_the_gated_plan_runs_gates_before_heads_and_only_ever_removes_exits(results, tiny_loaded):
    from calibration.evaluate import gated_on_policy
    from server.model.costs import CostModel

    heads = copy.deepcopy(results[1])
    heads.add_gates()  # zero probes: every gate score is 0.5
    cost = CostModel.from_config(tiny_loaded.config, head_kind="linear", adapter_rank=8)
    plain = heads.thresholds(0.9)
    for cut, expect_exits in ((0.4, True), (0.6, False)):
        heads.calibration_entry(0.9)["gated"] = {"thresholds": {str(k): t for k, t in plain.items()},
                                                 "gate_cuts": {str(k): cut for k in plain}}
        live = gated_on_policy(tiny_loaded, heads, CALIB_PROMPTS, 0.9, cost, max_tokens=MAX_TOKENS)
        if expect_exits:  # every gate passes: the plain plan's exits, at the price of the gates too
            on = results[0]["epsilons"]["0.9"]["on_policy"]
            assert live["n_exited"] == on["n_exited"] and live["agreement"] == pytest.approx(on["agreement"])
            assert live["saved_fraction"] < on["saved_fraction"]
        else:  # no gate passes: no head is evaluated, nothing exits, the gates alone cost a little
            assert live["n_exited"] == 0 and -0.01 < live["saved_fraction"] < 0
