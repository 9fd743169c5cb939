"""bench/tune_recipes.py on the tiny model: a head set on the original model is judged against the
original (final agreement 1), its per-head agreement equals a direct computation, and a tuned
recipe is judged against the original too, not against itself."""
import json

import torch

from bench.tune_recipes import main
from calibration.data import chat_ids
from server.model.exit_heads import ExitHeadSet
from server.model.generate import generate
from server.model.loader import load_model
from tests.calibration.test_tune import tune, tune_args

MAX_TOKENS = 10


def test_recipes_are_judged_against_the_original(tiny_folders, prompts_file, tmp_path):
    model_dir, heads_dir = tiny_folders
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\nhello world code one two three\n" * 20)
    tuned = tmp_path / "tuned"
    # full tuning, no anchor, no final-layer loss, a large step: the final layer drifts from the original
    tune(tune_args(model_dir, tuned, text, "--tokens", "1500", "--anchor", "none", "--method", "full",
                   "--weights", "asym:1.0", "--lr", "5e-2", "--warmup-tokens", "1"))
    out = tmp_path / "recipes.json"
    assert main([f"frozen=heads:{heads_dir}", f"drifted=tune:{tuned}", "--model", str(model_dir), "--prompts",
                 str(prompts_file), "--calib-prompts", "3", "--test-prompts", "3", "--max-tokens", str(MAX_TOKENS),
                 "--on-policy-prompts", "3", "--on-policy-epsilon", "0.9", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    frozen, drifted = report["frozen"], report["drifted"]
    assert frozen["final_agreement_teacher_forced"] == 1.0  # the original against itself
    assert drifted["final_agreement_teacher_forced"] < 1.0  # tuned without an anchor: judged by the original

    original = load_model(str(model_dir))
    heads = ExitHeadSet.load(heads_dir, config=original.config, fingerprint=original.fingerprint)
    agree = {k: 0 for k in heads.layers}
    total = 0
    for prompt in [json.loads(line)["turns"][0] for line in prompts_file.read_text().splitlines()][3:6]:
        prompt_ids = chat_ids(original.tokenizer, prompt)
        ids = prompt_ids + generate(original.model, prompt_ids, MAX_TOKENS,
                                    eos_token_ids=original.tokenizer.eos_token_ids).token_ids
        start = len(prompt_ids)  # decode rows: the positions that predict reply tokens 2..n
        with torch.no_grad():
            logits, hidden = original.model.forward(torch.tensor([ids]), output_hidden_states=True)
            for k in heads.layers:
                head = heads.head(k).logits(hidden[k][0], original.model.lm_head.weight).argmax(-1)
                agree[k] += int((head[start:-1] == logits[0, start:-1].argmax(-1)).sum())
        total += len(ids) - 1 - start
    assert frozen["test_tokens"] == total
    for k in heads.layers:
        assert frozen["head_top1_agreement"][str(k)] == agree[k] / total
    for recipe in (frozen, drifted):
        live = recipe["on_policy_all_heads"]
        assert 0 <= live["exited"] <= live["tokens"] and 0 <= live["agreement_all"] <= 1
        for entry in recipe["eps"].values():
            assert entry["cost_aware"]["saved"] >= 0 or not entry["cost_aware"]["kept"]
