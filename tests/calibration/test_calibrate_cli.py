"""`offramp fit-heads` then `offramp calibrate` on the tiny model: a servable, documented head set."""
import json
import math

import numpy as np
import pytest
import torch

from calibration.calibrate import execution, select
from server.cli import main
from server.engine.engine import load_heads
from server.model.costs import CostModel
from server.model.exit_heads import ExitHeadSet
from tests.calibration.test_fit import prompt_files, tiny_loaded, tiny_model_dir  # noqa: F401 (fixtures)

FAST = ["--max-tokens", "12", "--batch", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def fitted_dir(tiny_model_dir, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "heads"
    code = main(["fit-heads", "--model", str(tiny_model_dir), "--layers", "2,3,4", "--head-kind", "linear",
                 "--head-rank", "8", "--prompts", str(prompt_files / "train.txt"), "--text", str(prompt_files / "text.txt"),
                 "--tokens", "600", "--steps", "20", "--batch-size", "64", "--out", str(out), *FAST])
    assert code == 0
    return out


def test_fit_heads_writes_an_uncalibrated_set_with_its_recipe(fitted_dir, tiny_loaded):
    heads = ExitHeadSet.load(fitted_dir, config=tiny_loaded.config, fingerprint=tiny_loaded.fingerprint)
    assert heads.layers == [2, 3, 4] and heads.has_gates and heads.epsilons() == []
    fit = heads.meta["fit"]
    assert fit["loss"] == "kl" and fit["positions"] > fit["reply_positions"] > 0
    assert set(fit["prompts"]) == {"train.txt"} and set(fit["text"]) == {"text.txt"}
    assert heads.meta["weights_dtype"] == "float16"


def test_calibrate_writes_thresholds_and_metadata_per_epsilon(fitted_dir, tiny_model_dir, tiny_loaded, prompt_files,
                                                              tmp_path, capsys):
    out = tmp_path / "calibrated"
    code = main(["calibrate", "--model", str(tiny_model_dir), "--heads", str(fitted_dir), "--out", str(out),
                 "--prompts", str(prompt_files / "calib.txt"), "--epsilon", "0.5,0.8", "--delta", "0.2",
                 "--min-exits", "5", *FAST])
    assert code == 0
    meta = json.loads((out / "exits.json").read_text())
    calibration = meta["calibration"]
    assert calibration["policy"] == "margin" and calibration["delta"] == 0.2
    assert calibration["calibration_prompts"] == 4 and calibration["calibration_tokens"] > 0
    assert set(calibration["data"]) == {"calibration_replies", "calib.txt"} and calibration["date"]
    assert set(calibration["epsilons"]) == {"0.5", "0.8"}
    for eps, entry in calibration["epsilons"].items():
        assert set(entry["thresholds"]) == {"2", "3", "4"}
        tf = entry["teacher_forced"]
        assert {"exit_fraction", "agreement", "saved_fraction", "heads"} <= set(tf)
        for head in tf["heads"]:
            assert head["kept"] == (entry["thresholds"][str(head["layer"])] is not None)
        gated = entry["gated"]  # the fitted heads have gates: a gated plan beside the plain one
        assert set(gated["gate_cuts"]) == {"2", "3", "4"} and "saved_fraction" in gated["teacher_forced"]
        live = entry["on_policy"]
        assert live["agreement"] is None or live["agreement"] >= float(eps)  # tightened or switched off
    heads = load_heads(str(out), tiny_loaded)  # the engine takes it as it is
    assert heads.policy == "margin" and heads.epsilons() == [0.5, 0.8]
    assert "eps 0.5" in capsys.readouterr().out


def test_calibrating_on_the_fitting_prompts_is_refused(fitted_dir, tiny_model_dir, prompt_files, capsys):
    code = main(["calibrate", "--model", str(tiny_model_dir), "--heads", str(fitted_dir),
                 "--prompts", str(prompt_files / "train.txt"), "--out", str(fitted_dir.parent / "x"), *FAST])
    assert code == 1
    assert "calibration prompts are the fitting prompts" in capsys.readouterr().err


def test_selection_counts_every_cost_and_a_gate_only_removes_head_evaluations(tiny_loaded):
    rng = np.random.default_rng(0)
    num_tokens = 4000
    cost = CostModel.from_config(tiny_loaded.config, head_kind="linear", adapter_rank=8)
    stats = rng.uniform(size=(2, num_tokens))
    correct = rng.uniform(size=(2, num_tokens)) < 0.5 + 0.5 * stats  # surer = righter
    gate = np.clip(stats + rng.normal(scale=0.05, size=stats.shape), 0, 1)  # a good probe
    plain = select(lambda s: stats[list(s)], correct, gate, [2, 4], cost, 0.9, recalls=(1.0,))
    gated = select(lambda s: stats[list(s)], correct, gate, [2, 4], cost, 0.9, recalls=(1.0, 0.9))
    assert gated["saved_fraction"] >= plain["saved_fraction"] > 0
    thresholds = [t for t in plain["thresholds"] if math.isfinite(t)]
    kept = [i for i, t in enumerate(plain["thresholds"]) if math.isfinite(t)]
    run = execution(stats[kept], thresholds, gate[kept], [-math.inf] * len(kept), [[2, 4][i] for i in kept], cost, 256)
    exit_layer = np.append(np.asarray([2, 4])[kept], 6)[run["exit_index"]]
    expected = cost.token_flops(exit_layer, np.minimum(run["exit_index"] + 1, len(kept)), 256)
    np.testing.assert_allclose(run["flops"], expected)  # without gates: every reached head is evaluated
    cuts = [0.5] * len(kept)
    gated_run = execution(stats[kept], thresholds, gate[kept], cuts, [[2, 4][i] for i in kept], cost, 256)
    assert np.all(gated_run["heads_evaluated"] <= run["heads_evaluated"])
    exited = gated_run["exit_index"] < len(kept)
    assert np.all(run["exit_index"][exited] <= gated_run["exit_index"][exited])  # no new exits, only fewer or later


@pytest.fixture(scope="module")
def shortlist_dir(tiny_model_dir, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit-shortlist") / "heads"
    code = main(["fit-heads", "--model", str(tiny_model_dir), "--layers", "4,6", "--head-kind", "linear",
                 "--head-rank", "8", "--prompts", str(prompt_files / "train.txt"), "--text", str(prompt_files / "text.txt"),
                 "--tokens", "600", "--steps", "20", "--batch-size", "64", "--no-gate", "--shortlist", "150",
                 "--mass-components", "16", "--mass-steps", "300", "--mass-positions", "600", "--out", str(out), *FAST])
    assert code == 0
    return out


def test_fit_heads_with_a_shortlist_records_it_and_fits_the_estimator(shortlist_dir, tiny_loaded):
    heads = ExitHeadSet.load(shortlist_dir, config=tiny_loaded.config, fingerprint=tiny_loaded.fingerprint,
                             lm_head=tiny_loaded.model.lm_head.weight)
    assert heads.layers == [4, 6] and all(h.num_listed == 150 for h in heads.heads.values())
    assert heads.head(6).adapter is None and not heads.has_gates
    meta = heads.meta["shortlist"]
    assert meta["size"] == 150 and meta["layers"] == [4, 6] and meta["mass_estimator"]["components"] == 16
    assert meta["reply_positions"] > 0 and meta["text_positions"] > 0 and meta["data"]["fit_positions"]
    cover = meta["coverage_on_fit_positions"]
    assert cover["150"] >= cover["1024"] - 1e-9 or cover["1024"] == 1.0  # ranked: a longer list covers more
    errors = heads.meta["fit"]["mass_error_held_out"]
    for layer in ("4", "6"):  # pinball at 0.9 leans high: most held-out positions are over-estimated
        assert errors[layer]["rms"] < 3.0 and errors[layer]["under_share"] < 0.4, errors[layer]
    final = tiny_loaded.model.model.norm.weight.detach()
    assert torch.equal(heads.head(6).norm_weight.detach(), final.half().float())  # never trained: the model's norm


def test_calibrate_and_eval_with_shortlist_heads(shortlist_dir, tiny_model_dir, tiny_loaded, prompt_files, tmp_path):
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--heads", str(shortlist_dir), "--out", str(out),
                 "--prompts", str(prompt_files / "calib.txt"), "--epsilon", "0.5,0.8", "--min-exits", "5",
                 *FAST]) == 0
    heads = load_heads(str(out), tiny_loaded)
    meta = heads.meta["calibration"]
    for eps, entry in meta["epsilons"].items():
        tf = entry["teacher_forced"]
        assert "categories" in tf and tf["saved_fraction"] >= 0.0
        live = entry["on_policy"]
        assert live["agreement"] is None or live["agreement"] >= float(eps)
    evaluated = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--heads", str(out), "--prompts", str(prompt_files / "calib.txt"),
                 "--json", str(evaluated), *FAST]) == 0
    results = json.loads(evaluated.read_text())
    assert set(results["epsilons"]) == {"0.5", "0.8"}
