"""`offramp bench quality`: its agreement equals a direct count against transformers' forward on the same
tokens, its generations are the reference generator's, and the command writes its JSON and plot."""
import json
import math

import pytest
import torch
import transformers

from bench.prompts import chat_prompt_ids, read_prompts
from bench.quality import evaluate, first_divergence
from server.cli import main
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.model.exit_head import AdapterSpec
from server.model.exit_heads import ExitHeadSet
from server.model.generate import generate
from server.model.loader import load_model

MAX_TOKENS = 10
# eps 0.5: every decode token leaves at layer 2; eps 0.9: at layer 4. Thresholds of 0 (margin >= 0 always
# holds) or +inf leave no near-threshold decisions, so batched and one-at-a-time runs exit alike.
THRESHOLDS = {0.5: {2: 0.0, 4: math.inf}, 0.9: {2: math.inf, 4: 0.0}}


@pytest.fixture(scope="module")
def setup(tiny_folders, prompts_file):
    loaded = load_model(str(tiny_folders[0]))
    torch.manual_seed(3)
    heads = ExitHeadSet.create(loaded.model, [2, 4], AdapterSpec("linear", 8),
                               {"name": loaded.name, "fingerprint": loaded.fingerprint})
    with torch.no_grad():  # adapters strong enough that exited tokens often disagree with the full model
        for p in heads.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    heads.set_calibration("margin", {eps: {"thresholds": t} for eps, t in THRESHOLDS.items()}, default_epsilon=0.9)
    heads.eval()
    config = EngineConfig(model=str(tiny_folders[0]), heads=None, device="cpu", max_num_seqs=8,
                          max_num_batched_tokens=256)
    engine = LLMEngine(loaded.model, loaded.tokenizer, config, heads)
    prompts = chat_prompt_ids(loaded.tokenizer, read_prompts(prompts_file))
    report = evaluate(engine, prompts, sorted(THRESHOLDS), MAX_TOKENS, ignore_eos=True)
    return loaded, heads, prompts, report


def hf_argmax(loaded, prompt: list[int], tokens: list[int]) -> list[int]:
    """transformers' full model, teacher-forced over prompt + tokens: its argmax for each token's position."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**loaded.config.to_hf())).eval()
    hf.load_state_dict(loaded.model.state_dict(), strict=False)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)].argmax(-1).tolist()


def test_agreement_equals_a_direct_count(setup):
    loaded, _, prompts, report = setup
    for run in [report["full_depth"], *report["epsilons"]]:
        agreeing = total = 0
        for prompt, seq in zip(prompts, run["sequences"]):
            argmax = hf_argmax(loaded, prompt, seq["token_ids"])
            assert seq["full_model_argmax"] == argmax
            agreeing += sum(t == a for t, a in zip(seq["token_ids"], argmax))
            total += len(seq["token_ids"])
        assert run["num_tokens"] == total == len(prompts) * MAX_TOKENS
        assert run["agreement"] == agreeing / total, run["label"]
    assert report["full_depth"]["agreement"] == 1.0
    assert report["epsilons"][0]["agreement"] < 1.0  # the case is not trivial: exits at layer 2 do disagree


def test_generations_exit_shares_and_divergence(setup):
    loaded, heads, prompts, report = setup
    full = [generate(loaded.model, p, MAX_TOKENS).token_ids for p in prompts]
    assert [s["token_ids"] for s in report["full_depth"]["sequences"]] == full
    for run, (eps, layer) in zip(report["epsilons"], [(0.5, 2), (0.9, 4)]):
        assert run["epsilon"] == eps
        for prompt, seq in zip(prompts, run["sequences"]):
            reference = generate(loaded.model, prompt, MAX_TOKENS, heads=heads, thresholds=heads.thresholds(eps))
            assert seq["token_ids"] == reference.token_ids
            assert seq["exit_layers"] == reference.exit_layers == [6] + [layer] * (MAX_TOKENS - 1)
        assert run["exit_layer_shares"] == {str(layer): (MAX_TOKENS - 1) / MAX_TOKENS, "6": 1 / MAX_TOKENS}
        assert run["exited_early_share"] == pytest.approx((MAX_TOKENS - 1) / MAX_TOKENS)
        assert 0 < run["compute_saved"] < 1
        divergence = [first_divergence(s["token_ids"], f) for s, f in zip(run["sequences"], full)]
        assert run["first_divergence"]["per_prompt"] == divergence
    assert report["epsilons"][0]["compute_saved"] > report["epsilons"][1]["compute_saved"]
    assert report["full_depth"]["compute_saved"] == 0.0


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_command_writes_json_and_plot(tiny_folders, prompts_file, tmp_path, capsys):
    model_dir, heads_dir = tiny_folders
    output = tmp_path / "quality.json"
    assert main(["bench", "quality", "--model", str(model_dir), "--heads", str(heads_dir), "--prompts",
                 str(prompts_file), "--num-prompts", "3", "--max-tokens", "6", "--epsilon", "0.9",
                 "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert [r["epsilon"] for r in report["epsilons"]] == [0.9]
    assert report["num_prompts"] == 3 and report["synthetic_heads"] is True
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eps=0.9" in capsys.readouterr().out
    assert main(["bench", "quality", "--model", str(model_dir), "--heads", str(heads_dir), "--prompts",
                 str(prompts_file), "--epsilon", "0.7", "--output", str(output)]) == 1  # not calibrated
