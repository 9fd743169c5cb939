"""Head sets on disk, and fitting heads on the frozen tiny model."""
import math

import pytest
import torch
import torch.nn.functional as F

from calibration.data import Sample, text_samples
from calibration.fit import FitConfig, StateCache, collect_states, fit_gates, fit_heads, head_loss
from server.model.exit_head import AdapterSpec
from server.model.exit_heads import ExitHeadSet, HeadSetError
from server.model.loader import load_model
from tests.tiny_model import write_tiny_model

TRAIN_PROMPTS = ["the cat sat", "hello world", "what is the capital of france", "red green blue",
                 "the quick brown fox", "one two three", "sun moon star", "def f return"]
CALIB_PROMPTS = ["the dog ran", "blue sky day", "big small house", "water fire earth"]
TEXT = " ".join(f"the {w} sat on the mat and the {w} ran home" for w in ("cat", "dog", "fox", "sun", "tree") * 12)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (folder / "calib.txt").write_text("\n".join(CALIB_PROMPTS) + "\n")
    (folder / "text.txt").write_text(TEXT)
    return folder


def random_heads(loaded, kind="linear", rank=8, seed=3) -> ExitHeadSet:
    torch.manual_seed(seed)
    heads = ExitHeadSet.create(loaded.model, [2, 4], AdapterSpec(kind, rank),
                               {"name": loaded.name, "fingerprint": loaded.fingerprint})
    heads.add_gates()
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    heads.set_calibration("margin", {0.9: {"thresholds": {2: 0.3, 4: math.inf}, "exit_rate": 0.25,
                                           "gated": {"thresholds": {2: 0.35, 4: 0.5}, "gate_cuts": {2: 0.4, 4: -math.inf}}}},
                          default_epsilon=0.9, delta=0.05)
    return heads


@pytest.mark.parametrize("kind,rank", [("linear", 8), ("mlp", 16), ("norm", 0)])
def test_a_saved_head_set_loads_back_exactly(tiny_loaded, tmp_path, kind, rank):
    heads = random_heads(tiny_loaded, kind, rank)
    heads.save(tmp_path)
    loaded = ExitHeadSet.load(tmp_path, config=tiny_loaded.config, fingerprint=tiny_loaded.fingerprint)
    assert loaded.meta == heads.meta
    assert loaded.state_dict().keys() == heads.state_dict().keys()
    for name, tensor in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.thresholds(0.9) == {2: 0.3, 4: math.inf}
    assert loaded.thresholds(0.9, gated=True) == {2: 0.35, 4: 0.5}
    assert loaded.gate_cuts(0.9) == {2: 0.4, 4: -math.inf}
    hidden = torch.randn(5, tiny_loaded.config.hidden_size)
    weight = tiny_loaded.model.lm_head.weight
    for k in (2, 4):
        assert torch.equal(loaded.head(k).logits(hidden, weight), heads.head(k).logits(hidden, weight))
        assert torch.equal(loaded.head(k).gate_score(hidden), heads.head(k).gate_score(hidden))


def test_float16_storage_rounds_the_heads_first_so_the_round_trip_is_exact(tiny_loaded, tmp_path):
    heads = random_heads(tiny_loaded)
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    heads.save(tmp_path, torch.float16)
    loaded = ExitHeadSet.load(tmp_path, config=tiny_loaded.config, fingerprint=tiny_loaded.fingerprint)
    for name, tensor in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
        assert torch.allclose(tensor, before[name], rtol=1e-3, atol=1e-4)  # fp16 rounding only
    assert loaded.meta["weights_dtype"] == "float16"


def test_a_head_set_for_another_model_is_refused(tiny_loaded, tmp_path, tmp_path_factory):
    random_heads(tiny_loaded).save(tmp_path)
    other = load_model(str(write_tiny_model(tmp_path_factory.mktemp("other") / "other", seed=7)))
    assert other.fingerprint != tiny_loaded.fingerprint
    with pytest.raises(HeadSetError, match=r"made for model 'tiny-llama' \(fingerprint .*\), not the loaded model"):
        ExitHeadSet.load(tmp_path, config=other.config, fingerprint=other.fingerprint)
    wider = load_model(str(write_tiny_model(tmp_path_factory.mktemp("wide") / "wide", hidden_size=96)))
    with pytest.raises(HeadSetError, match="hidden_size=64, the loaded model has 96"):
        ExitHeadSet.load(tmp_path, config=wider.config)


def test_truncated_kl_is_the_exact_kl_when_the_top_k_covers_the_vocabulary():
    torch.manual_seed(0)
    final, head = torch.randn(6, 20) * 2, torch.randn(6, 20)
    p = torch.softmax(final, -1)
    probs, ids = p.topk(20, dim=-1)
    exact = F.kl_div(torch.log_softmax(head, -1), p, reduction="batchmean")
    torch.testing.assert_close(head_loss(head, ids, probs, "kl"), exact, rtol=1e-5, atol=1e-6)
    # Truncated to 5 tokens + remainder: never more than the exact KL (merging bins loses information).
    probs5, ids5 = p.topk(5, dim=-1)
    assert head_loss(head, ids5, probs5, "kl") <= exact + 1e-6


def test_ce_entropy_is_cross_entropy_to_the_top1_minus_lambda_entropy():
    torch.manual_seed(1)
    logits, ids = torch.randn(4, 10), torch.randint(0, 10, (4, 3))
    logq = torch.log_softmax(logits, -1)
    entropy = -(logq.exp() * logq).sum(-1)
    expected = (F.cross_entropy(logits, ids[:, 0], reduction="none") - 0.3 * entropy).mean()
    torch.testing.assert_close(head_loss(logits, ids, torch.ones(4, 3), "ce-entropy", 0.3), expected)
    assert FitConfig(loss="ce-entropy:0.3").entropy_weight == 0.3
    with pytest.raises(ValueError, match="unknown loss"):
        FitConfig(loss="mse")


@pytest.fixture(scope="module")
def text(tiny_loaded, prompt_files) -> list[Sample]:
    return text_samples(prompt_files / "text.txt", tiny_loaded.tokenizer, seq_len=64)


@pytest.fixture(scope="module")
def states(tiny_loaded, text) -> StateCache:
    return collect_states(tiny_loaded.model, text, [2, 4], top_k=16)


def test_states_hold_each_layer_and_the_final_top_k(tiny_loaded, text, tmp_path):
    states = collect_states(tiny_loaded.model, text[:1], [2, 4], top_k=16)
    ids = torch.tensor([text[0].token_ids])
    logits, hidden = tiny_loaded.model.forward(ids, output_hidden_states=True)
    n = ids.shape[1] - 1  # every position but the last is counted
    torch.testing.assert_close(states.hidden[:n, 1].float(), hidden[4][0, :n], rtol=1e-3, atol=1e-3)  # float16
    torch.testing.assert_close(states.top_probs[:n, 0], torch.softmax(logits[0, :n], -1).max(-1).values)
    states.save(tmp_path / "s.pt")
    again = StateCache.load(tmp_path / "s.pt")
    assert torch.equal(again.hidden, states.hidden) and torch.equal(again.top_ids, states.top_ids)


def fitted(loaded, states, seed=0, steps=40):
    torch.manual_seed(123)
    heads = ExitHeadSet.create(loaded.model, [2, 4], AdapterSpec("linear", 8),
                               {"name": loaded.name, "fingerprint": loaded.fingerprint})
    history = fit_heads(heads, loaded.model.lm_head.weight, states,
                        FitConfig(steps=steps, batch_size=64, lr=3e-3, seed=seed))
    return heads, history


def test_fitting_lowers_the_kl_and_is_reproducible(tiny_loaded, states):
    heads, history = fitted(tiny_loaded, states)
    for k in (2, 4):
        assert history[-1]["loss"][k] < 0.8 * history[0]["loss"][k]
    again, _ = fitted(tiny_loaded, states)
    for name, tensor in heads.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    other, _ = fitted(tiny_loaded, states, seed=1)
    assert not torch.equal(other.head(2).adapter.up.weight, heads.head(2).adapter.up.weight)


def test_gates_learn_to_predict_the_heads_margin(tiny_loaded, states):
    heads, _ = fitted(tiny_loaded, states)
    errors = fit_gates(heads, tiny_loaded.model.lm_head.weight, states, num_tokens=len(states), steps=300)
    weight = tiny_loaded.model.lm_head.weight
    for k in (2, 4):
        hidden = states.hidden[:, [2, 4].index(k)].float()
        with torch.no_grad():
            probs = torch.softmax(heads.head(k).logits(hidden, weight), -1).topk(2).values
        margin = probs[:, 0] - probs[:, 1]
        baseline = float((margin - margin.mean()).abs().mean())  # a constant guess
        assert errors[k] < baseline
