"""Depth-tuning on the tiny random model: loss weights and layer dropout as the seeds define them,
the anchor keeping the tuned model faithful (and its absence letting it drift), resumable training
and the `offramp tune` command end to end."""
import argparse
import itertools
import json
import math

import pytest
import torch

from calibration.tune import (TuneConfig, Tuner, exit_loss_weights, layer_dropout_rates, parse_anchor,
                              parse_method, run_backbone)
from calibration.tune_cli import batches, documents
from server.errors import UsageError
from server.model.exit_head import AdapterSpec
from server.model.exit_heads import ExitHeadSet
from server.model.loader import load_model
from tests.tiny_model import _corpus


def test_uniform_weights_are_equal():
    assert exit_loss_weights("uniform", [2, 4], 6) == pytest.approx({2: 1 / 3, 4: 1 / 3, 6: 1 / 3})


def test_calm_weights_are_proportional_to_depth():
    weights = exit_loss_weights("calm", [10, 20], 30)
    assert weights == pytest.approx({10: 10 / 60, 20: 20 / 60, 30: 30 / 60})
    assert sum(weights.values()) == pytest.approx(1.0)


def test_asym_weights_put_alpha_on_the_shallowest_exit_and_the_rest_on_the_final():
    assert exit_loss_weights("asym:0.7", [8, 16, 24], 30) == pytest.approx({8: 0.7, 16: 0.0, 24: 0.0, 30: 0.3})
    assert exit_loss_weights("asym:0.7", [20], 30) == pytest.approx({20: 0.7, 30: 0.3})
    assert exit_loss_weights("asym", [4], 6) == pytest.approx({4: 0.7, 6: 0.3})  # the seeds' best alpha


@pytest.mark.parametrize("scheme, layers, message", [
    ("asym:1.5", [2], "alpha in"), ("lognormal", [2], "unknown loss weighting"),
    ("uniform", [2, 6], "in 1..5"), ("uniform", [2, 2], "distinct")])
def test_bad_weightings_are_refused(scheme, layers, message):
    with pytest.raises(ValueError, match=message):
        exit_loss_weights(scheme, layers, 6)


def test_layer_dropout_rises_with_depth_to_p():
    linear = layer_dropout_rates(5, 0.2, "linear")
    assert linear == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    exp = layer_dropout_rates(5, 0.2, "exp")
    assert exp[0] == 0.0 and exp[-1] == pytest.approx(0.2)
    assert exp == pytest.approx([0.2 * (2 ** (i / 4) - 1) for i in range(5)])
    assert all(a < b for a, b in zip(exp, exp[1:])) and all(e <= l for e, l in zip(exp, linear))
    with pytest.raises(ValueError, match="layer dropout"):
        layer_dropout_rates(5, 1.0)


def test_method_and_anchor_parsing():
    assert parse_method("lora:8") == ("lora", 8) and parse_method("full") == ("full", 0)
    assert parse_method("heads") == ("heads", 0)
    assert parse_anchor("kl:0.5") == 0.5 and parse_anchor("none") is None
    for bad in ("lora:0", "adapter"):
        with pytest.raises(ValueError):
            parse_method(bad)
    with pytest.raises(ValueError, match="anchor"):
        parse_anchor("l2:1")


def test_backbone_matches_the_model_and_layer_dropout_skips_whole_sequences(tiny_dir):
    model = load_model(str(tiny_dir)).model
    ids = torch.tensor([[5, 9, 17, 3, 40, 41], [7, 8, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    _, hidden = model(ids, attention_mask=mask, output_hidden_states=True)
    states = run_backbone(model, ids, mask, {2, 6})
    for k in (2, 6):
        assert torch.allclose(states[k].view(2, 6, -1)[mask.bool()], hidden[k][mask.bool()], atol=1e-5)
    always = [0.0, 0.0, 0.0, 0.999999, 0.0, 0.0]  # layer index 3 is (almost surely) skipped
    skipped = run_backbone(model, ids, mask, {3, 4}, dropout=always, generator=torch.Generator().manual_seed(0))
    assert torch.equal(skipped[3], skipped[4])


def tiny_tuner(tiny_dir, anchor, seed=0):
    loaded = load_model(str(tiny_dir))
    torch.manual_seed(seed)
    heads = ExitHeadSet.create(loaded.model, [2, 4], AdapterSpec("linear"),
                               {"name": loaded.name, "fingerprint": loaded.fingerprint})
    config = TuneConfig(layers=[2, 4], method="lora:8", anchor=anchor, tokens=10**9, lr=2e-3, head_lr=5e-2,
                        warmup_tokens=1, seed=seed)
    docs = [loaded.tokenizer.encode(line) for line in _corpus()[:400]]
    return Tuner(loaded.model, heads, config), docs[:360], docs[360:]


def test_anchor_keeps_the_final_layer_faithful_while_exits_learn_and_without_it_the_model_drifts(tiny_dir):
    results = {}
    for anchor in ("kl:4.0", "none"):
        tuner, train, held_out = tiny_tuner(tiny_dir, anchor)
        held_out = list(batches(iter(held_out), 32, 8))
        before = tuner.evaluate(held_out)
        for ids, mask in itertools.islice(batches(itertools.cycle(train), 32, 8), 50):
            tuner.train_step(ids, mask)
        results[anchor] = before, tuner.evaluate(held_out)  # agreement with the ORIGINAL model's top-1
    before, anchored = results["kl:4.0"]
    assert before[6] == 1.0
    assert anchored[6] >= 0.90  # stated bound: the tuned final layer agrees with the original on >= 90%
    assert anchored[2] >= before[2] + 0.08 and anchored[4] >= before[4] + 0.1  # observed: +0.13, +0.23
    _, unanchored = results["none"]
    assert unanchored[6] <= 0.5  # trained on the text's next tokens, it becomes another model (observed ~0)


def test_checkpointed_training_resumes_exactly(tiny_dir, tmp_path):
    def stream(docs):
        return batches(documents(docs, [], None, 0, seed=3), 32, 4)

    straight, train, _ = tiny_tuner(tiny_dir, "kl:1.0")
    for ids, mask in itertools.islice(stream(train), 6):
        straight.train_step(ids, mask)

    first, _, _ = tiny_tuner(tiny_dir, "kl:1.0")
    for ids, mask in itertools.islice(stream(train), 3):
        first.train_step(ids, mask)
    torch.save(first.state_dict(), tmp_path / "checkpoint.pt")
    resumed, _, _ = tiny_tuner(tiny_dir, "kl:1.0", seed=99)  # other init: everything must come from the checkpoint
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    for ids, mask in itertools.islice(stream(train), resumed.batches_seen, 6):
        resumed.train_step(ids, mask)
    assert resumed.tokens_seen == straight.tokens_seen and resumed.steps == 6
    for name, tensor in straight.backbone_state().items():
        assert torch.allclose(resumed.backbone_state()[name], tensor, atol=1e-6), name
    for name, tensor in straight.heads.state_dict().items():
        assert torch.allclose(resumed.heads.state_dict()[name], tensor, atol=1e-6), name


def tune(argv) -> None:
    """`offramp tune ARGS` through this command's own parser (other commands need not import)."""
    import argparse

    from calibration.tune_cli import register

    parser = argparse.ArgumentParser(prog="offramp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def tune_args(tiny_dir, out, text, *extra):
    return ["tune", "--model", str(tiny_dir), "--layers", "2,4", "--text", str(text), "--prompts", str(text),
            "--reply-tokens", "8", "--calib-prompts", str(text), "--calib-reply-tokens", "8", "--seq-len", "32",
            "--batch-size", "4", "--checkpoint-every", "2",
            "--lr", "1e-3", "--out", str(out), *extra]


def test_tune_command_writes_a_servable_delta_and_resumes(tiny_dir, tmp_path, capsys):
    from server.model.tune_delta import apply_tune

    text = tmp_path / "text.txt"
    text.write_text("\n".join(_corpus()[:40]) + "\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is the capital of france\nhello world\n")
    out = tmp_path / "tuned"
    args = tune_args(tiny_dir, out, text, "--tokens", "600", "--weights", "asym:0.7", "--layer-dropout", "0.2")
    args[args.index("--prompts") + 1] = str(prompts)
    args[args.index("--calib-prompts") + 1] = str(prompts)
    tune(args)
    assert "of decode compute saved" in capsys.readouterr().out
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 4  # two prompts, sampled for training and greedy for calibration
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    manifest = json.loads((out / "delta.json").read_text())
    assert manifest["kind"] == "lora" and manifest["recipe"]["weights"] == "asym:0.7"
    assert manifest["recipe"]["tokens_trained"] >= 600

    tune(args[:args.index("--tokens") + 1] + ["900"] + args[args.index("--tokens") + 2:])  # more tokens: resumes
    more = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert more[:len(steps)] == steps and more[len(steps):] == list(range(len(steps) + 1, len(more) + 1))
    assert len(more) > len(steps)

    args[args.index("--lr") + 1] = "5e-4"
    with pytest.raises(UsageError, match="other settings"):
        tune(args)  # a checkpoint made with other settings is not silently mixed in

    loaded = load_model(str(tiny_dir))
    heads = ExitHeadSet.load(apply_tune(loaded, out), config=loaded.config, fingerprint=loaded.fingerprint)
    assert heads.layers == [2, 4] and heads.meta["tune"]["recipe"]["anchor"] == "kl:1.0"
    assert heads.epsilons() == [0.9, 0.95, 0.99] and heads.default_epsilon == 0.95
    assert heads.meta["calibration"]["agreement_with"] == "original model"
    assert math.isclose(heads.meta["tune"]["recipe"]["layer_dropout"], 0.2)
    served_by_engine_with_tune(tiny_dir, out, loaded)
    evaluated_against_the_original(tiny_dir, out, prompts, tmp_path)


def evaluated_against_the_original(tiny_dir, out, prompts, tmp_path):
    """`offramp eval --tune OUT`: teacher-forced on the ORIGINAL model's greedy replies, a tuned head
    agrees when its top-1 equals the original's. Checked directly with every token exiting at layer 2."""
    import shutil

    from calibration.data import chat_ids
    from server.model.tune_delta import apply_tune
    from server.cli import main
    from server.model.generate import generate

    heads_dir = tmp_path / "heads-exit-at-2"
    shutil.copytree(out / "heads", heads_dir)
    meta = json.loads((heads_dir / "exits.json").read_text())
    meta["calibration"]["epsilons"] = {"0.9": {"thresholds": {"2": 0.0, "4": None}}}
    meta["calibration"]["default_epsilon"] = 0.9
    (heads_dir / "exits.json").write_text(json.dumps(meta))
    report_path = tmp_path / "eval-tune.json"
    assert main(["eval", "--model", str(tiny_dir), "--tune", str(out), "--heads", str(heads_dir), "--prompts",
                 str(prompts), "--max-tokens", "8", "--batch", "2", "--threads", "1", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    original, tuned = load_model(str(tiny_dir)), load_model(str(tiny_dir))
    apply_tune(tuned, out)
    heads = ExitHeadSet.load(heads_dir, config=tuned.config, fingerprint=tuned.fingerprint)
    agreed = total = 0
    for prompt in prompts.read_text().splitlines():
        prompt_ids = chat_ids(original.tokenizer, prompt)
        ids = prompt_ids + generate(original.model, prompt_ids, 8,
                                    eos_token_ids=original.tokenizer.eos_token_ids).token_ids
        with torch.no_grad():
            labels = original.model.forward(torch.tensor([ids]))[0].argmax(-1)
            _, hidden = tuned.model.forward(torch.tensor([ids]), output_hidden_states=True)
            head_top1 = heads.head(2).logits(hidden[2][0], tuned.model.lm_head.weight).argmax(-1)
        for p in range(len(prompt_ids), len(ids) - 1):  # decode rows
            total += 1
            agreed += int(head_top1[p] == labels[p])
    tf = report["epsilons"]["0.9"]["teacher_forced"]
    assert report["agreement_with"] == "original model"
    assert tf["num_tokens"] == total and tf["exit_fraction"] == 1.0
    assert tf["agreement"] == pytest.approx(agreed / total, abs=1e-12)


def served_by_engine_with_tune(tiny_dir, out, merged):
    """`offramp serve --tune OUT`: the engine runs original + delta (same greedy tokens as the merged
    model at full depth) with the tune's own heads; heads of the original model are refused."""
    from server.api.serve import engine_config, register as register_serve
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.sampling_params import SamplingParams
    from server.model.exit_heads import HeadSetError
    from server.model.generate import generate

    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(tiny_dir), "--tune", str(out), "--device", "cpu"])
    config = engine_config(args)
    assert config.tune == str(out) and config.heads == "auto" and not config.gate_whole_batch  # per-row gating
    engine = LLMEngine.from_config(config)
    assert engine.heads is not None and engine.heads.layers == [2, 4]
    assert engine.heads.meta["base_model"]["fingerprint"] == merged.fingerprint  # the tuned fingerprint
    prompt = merged.tokenizer.encode("what is the capital of france")
    got = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, early_exit=False,
                                                   ignore_eos=True))[0].outputs[0].token_ids
    assert got == generate(merged.model, prompt, 12).token_ids
    original = load_model(str(tiny_dir))
    tuned_state = merged.model.state_dict()
    assert any(not torch.equal(t, tuned_state[name]) for name, t in original.model.state_dict().items())
    original_heads = tiny_dir.parent / "original-heads"
    ExitHeadSet.create(original.model, [2], AdapterSpec("norm"), {"name": original.name,
                                                                  "fingerprint": original.fingerprint}).save(original_heads)
    with pytest.raises(HeadSetError, match="fingerprint"):
        LLMEngine.from_config(EngineConfig(model=str(tiny_dir), tune=str(out), heads=str(original_heads), device="cpu"))


def test_agreement_is_counted_against_the_original_model_not_the_tuned_one(tiny_dir):
    from calibration.data import Sample
    from calibration.tune import exit_features

    tuner, train, held_out = tiny_tuner(tiny_dir, "none")
    for ids, mask in itertools.islice(batches(itertools.cycle(train), 32, 8), 10):
        tuner.train_step(ids, mask)  # drifts: the tuned final layer no longer agrees with the original
    original = load_model(str(tiny_dir)).model
    ids = torch.tensor([held_out[0] + held_out[1]])
    assert torch.allclose(tuner.reference_logits(ids), original(ids)[0], atol=1e-5)
    sample = Sample(held_out[0] + held_out[1], 3)
    margins, correct = exit_features(tuner.model, tuner.heads, [sample], lambda x: original(x)[0])
    n = len(sample.token_ids) - 4
    assert margins.shape == correct.shape == (2, n) and ((margins >= 0) & (margins <= 1)).all()
    tuner.model.eval()
    states = run_backbone(tuner.model, ids, torch.ones_like(ids), {4})
    head_top1 = tuner.heads.head(4).logits(states[4][3:-1], tuner.model.lm_head.weight).argmax(-1)
    assert (correct[1] == (head_top1 == original(ids)[0, 3:-1].argmax(-1)).numpy()).all()


def test_full_tuning_trains_every_layer_against_a_frozen_copy_and_its_weights_serve(tiny_dir, tmp_path):
    import copy

    from calibration.lora import save_delta
    from server.model.tune_delta import apply_tune

    loaded = load_model(str(tiny_dir))
    heads = ExitHeadSet.create(loaded.model, [3], AdapterSpec("norm"), {"name": loaded.name,
                                                                        "fingerprint": loaded.fingerprint})
    teacher = copy.deepcopy(loaded.model).requires_grad_(False)
    tuner = Tuner(loaded.model, heads, TuneConfig(layers=[3], method="full", tokens=10**6, lr=1e-3, warmup_tokens=1),
                  teacher)
    docs = [loaded.tokenizer.encode(line) for line in _corpus()[:40]]
    for ids, mask in itertools.islice(batches(itertools.cycle(docs), 32, 4), 3):
        tuner.train_step(ids, mask)
    state = tuner.backbone_state()
    assert "model.layers.0.self_attn.q_proj.weight" in state and "model.embed_tokens.weight" not in state
    ids = torch.tensor([docs[0]])
    original = load_model(str(tiny_dir)).model
    assert torch.allclose(tuner.reference_logits(ids), original(ids)[0], atol=1e-5)
    tuned_logits = loaded.model(ids)
    assert (tuned_logits - original(ids)).abs().max() > 1e-4
    save_delta(tmp_path, state, {"kind": "full", "base_model": {"name": loaded.name, "fingerprint": loaded.fingerprint}})
    fresh = load_model(str(tiny_dir))
    apply_tune(fresh, tmp_path)
    assert torch.allclose(fresh.model(ids), tuned_logits, atol=1e-5)
