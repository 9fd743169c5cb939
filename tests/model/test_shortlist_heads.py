"""Shortlist exit heads as stored objects: creation rules, binding to the LM head, the exact round trip
of exits.json + exits.safetensors, and refusal of a set made for another model."""
import json
import math

import pytest
import torch

from server.model.exit_head import AdapterSpec
from server.model.exit_heads import ExitHeadSet, HeadSetError
from server.model.loader import load_model
from tests.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")))


def shortlist_set(tiny, listed=40, components=8, seed=0) -> ExitHeadSet:
    """Heads at 2 (full vocabulary), 4 (shortlist, linear adapter) and 6 = after the last layer (shortlist)."""
    torch.manual_seed(seed)
    ids = torch.randperm(tiny.config.vocab_size)[:listed]
    heads = ExitHeadSet.create(tiny.model, [2, 4, 6], AdapterSpec("linear", 8),
                               {"name": tiny.name, "fingerprint": tiny.fingerprint}, shortlist=ids,
                               shortlist_layers=[4, 6], mass_components=components,
                               shortlist_meta={"built_from": "test", "data": {"replies": "abc"}})
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    heads.set_calibration("margin", {0.95: {"thresholds": {2: math.inf, 4: 0.4, 6: 0.1}}}, default_epsilon=0.95)
    return heads


def test_creation_rules(tiny):
    base = {"name": tiny.name, "fingerprint": tiny.fingerprint}
    with pytest.raises(ValueError, match="after the last layer"):
        ExitHeadSet.create(tiny.model, [2, 6], AdapterSpec("norm"), base)  # a full head at L saves nothing
    with pytest.raises(ValueError, match="distinct token ids"):
        ExitHeadSet.create(tiny.model, [6], AdapterSpec("norm"), base, shortlist=torch.tensor([1, 1, 2]),
                           mass_components=4)
    with pytest.raises(ValueError, match="mass estimator"):
        ExitHeadSet.create(tiny.model, [6], AdapterSpec("norm"), base, shortlist=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="exit layers must be in 1..6"):
        ExitHeadSet.create(tiny.model, [7], AdapterSpec("norm"), base)
    heads = shortlist_set(tiny)
    assert heads.layers == [2, 4, 6] and heads.num_layers == 6
    assert heads.head(6).adapter is None and heads.head(4).adapter is not None  # the last-layer head reads as the model does
    fresh = ExitHeadSet.create(tiny.model, [6], AdapterSpec("linear", 8), base, shortlist=torch.tensor([5, 3]),
                               mass_components=2)
    assert fresh.head(6).adapter is None
    assert torch.equal(fresh.head(6).norm_weight.detach(), tiny.model.model.norm.weight.detach())
    assert heads.meta["shortlist"] == {"layers": [4, 6], "size": 40, "built_from": "test", "data": {"replies": "abc"},
                                       "mass_estimator": {"kind": "lse-mixture", "components": 8}}


def test_binding_copies_the_listed_rows_once_and_follows_the_model(tiny):
    heads = shortlist_set(tiny)
    weight = tiny.model.lm_head.weight
    listed = heads.head(4).bound_weight
    assert listed.is_contiguous() and listed.shape == (40, tiny.config.hidden_size)
    assert torch.equal(listed, weight[heads.head(4).shortlist_ids])
    assert listed.data_ptr() != weight.data_ptr()  # a copy, not a view into the LM head
    assert heads.head(6).bound_weight is listed  # the same list: one copy for both heads
    unbound = ExitHeadSet(list(heads.heads.values()), heads.meta)
    for head in unbound.heads.values():
        head.shortlist_weight = None
    with pytest.raises(RuntimeError, match="not bound"):
        unbound.head(6).shortlist_logits(torch.randn(2, tiny.config.hidden_size))


def test_the_last_layer_head_reads_the_full_models_logits(tiny):
    """After the last layer the listed logits are exactly the model's final logits at those ids."""
    heads = shortlist_set(tiny)
    with torch.no_grad():
        heads.head(6).norm_weight.copy_(tiny.model.model.norm.weight)
    ids = torch.randint(3, tiny.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits, hidden = tiny.model.forward(ids, output_hidden_states=True)
        final_hidden = hidden[6].reshape(-1, tiny.config.hidden_size)
        listed = heads.head(6).shortlist_logits(final_hidden)
    want = logits.reshape(-1, tiny.config.vocab_size)[:, heads.head(6).shortlist_ids]
    torch.testing.assert_close(listed[:, :-1], want, rtol=0, atol=1e-5)
    assert listed.shape == (18, 41) and torch.isfinite(listed[:, -1]).all()  # the other logit follows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_shortlist_set_round_trips_exactly(tiny, tmp_path, dtype):
    heads = shortlist_set(tiny)
    heads.save(tmp_path, dtype)
    stored = json.loads((tmp_path / "exits.json").read_text())
    assert stored["shortlist"]["size"] == 40 and stored["shortlist"]["data"] == {"replies": "abc"}
    loaded = ExitHeadSet.load(tmp_path, config=tiny.config, fingerprint=tiny.fingerprint,
                              lm_head=tiny.model.lm_head.weight)
    assert loaded.meta == heads.meta and loaded.layers == [2, 4, 6]
    assert loaded.state_dict().keys() == heads.state_dict().keys()
    for name, tensor in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.head(4).shortlist_ids.dtype == torch.int64
    hidden = torch.randn(5, tiny.config.hidden_size)
    for k in (4, 6):
        assert torch.equal(loaded.head(k).shortlist_logits(hidden), heads.head(k).shortlist_logits(hidden))
    assert torch.equal(loaded.head(2).logits(hidden, tiny.model.lm_head.weight),
                       heads.head(2).logits(hidden, tiny.model.lm_head.weight))
    assert loaded.thresholds(0.95) == {2: math.inf, 4: 0.4, 6: 0.1}


def test_a_shortlist_set_for_another_model_is_refused(tiny, tmp_path, tmp_path_factory):
    shortlist_set(tiny).save(tmp_path)
    other = load_model(str(write_tiny_model(tmp_path_factory.mktemp("other") / "other", seed=7)))
    with pytest.raises(HeadSetError, match="made for model"):
        ExitHeadSet.load(tmp_path, config=other.config, fingerprint=other.fingerprint)


def test_a_damaged_shortlist_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    shortlist_set(tiny).save(tmp_path)
    tensors = load_file(str(tmp_path / "exits.safetensors"))
    tensors["layer6.shortlist_ids"] = tensors["layer6.shortlist_ids"] + tiny.config.vocab_size
    save_file(tensors, str(tmp_path / "exits.safetensors"))
    with pytest.raises(HeadSetError, match="outside the vocabulary"):
        ExitHeadSet.load(tmp_path, config=tiny.config, fingerprint=tiny.fingerprint)
    del tensors["layer6.shortlist_ids"]
    save_file(tensors, str(tmp_path / "exits.safetensors"))
    with pytest.raises(HeadSetError, match="after the last layer"):
        ExitHeadSet.load(tmp_path, config=tiny.config, fingerprint=tiny.fingerprint)
