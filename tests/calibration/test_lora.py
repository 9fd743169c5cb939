"""LoRA deltas: a fresh delta changes nothing, merge/unmerge round-trips, and a delta saved, loaded
and merged into a freshly loaded model gives the logits of the unmerged model it was trained on."""
import json

import pytest
import torch

from calibration.lora import LoRALinear, attach_lora, detach_lora, lora_disabled, lora_modules, lora_state, save_delta
from server.model.tune_delta import TuneError, apply_tune
from server.model.exit_head import AdapterSpec
from server.model.exit_heads import ExitHeadSet, HeadSetError
from server.model.loader import load_model


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.copy_(0.05 * torch.randn(module.lora_B.shape, generator=g))


def test_fresh_delta_is_identity_and_merge_round_trips():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    original = base.weight.detach().clone()
    lora = LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(5, 16)
    assert torch.equal(lora(x), base(x))  # B = 0
    with torch.no_grad():
        lora.lora_B.normal_()
    unmerged = lora(x)
    assert not torch.allclose(unmerged, base(x), atol=1e-3)
    lora.merge()
    assert torch.allclose(lora(x), unmerged, atol=1e-5)
    assert torch.allclose(base.weight, original + lora.delta_weight(), atol=1e-6)
    lora.unmerge()
    assert torch.allclose(base.weight, original, atol=1e-6)


def test_attach_targets_every_projection_and_disable_gives_the_original(tiny_dir):
    loaded = load_model(str(tiny_dir))
    ids = torch.tensor([[5, 9, 17, 3, 40, 41]])
    original = loaded.model(ids)
    wrapped = attach_lora(loaded.model, rank=4, alpha=8)
    assert len(wrapped) == 7 * loaded.config.num_hidden_layers
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    randomise(loaded.model)
    assert (loaded.model(ids) - original).abs().max() > 1e-3
    with lora_disabled(loaded.model):
        assert torch.allclose(loaded.model(ids), original, atol=1e-6)


def test_saved_loaded_merged_delta_matches_unmerged_logits(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir))
    base = {"name": loaded.name, "fingerprint": loaded.fingerprint}
    attach_lora(loaded.model, rank=4, alpha=8)
    randomise(loaded.model, seed=1)
    ids = torch.tensor([[5, 9, 17, 3, 40, 41, 7, 2], [11, 12, 13, 14, 15, 16, 17, 18]])
    unmerged = loaded.model(ids)
    manifest = save_delta(tmp_path, lora_state(loaded.model), {"kind": "lora", "base_model": base, "rank": 4,
                                                                "alpha": 8.0})
    tuned = {**base, "fingerprint": manifest["tuned_fingerprint"]}
    heads = ExitHeadSet.create(loaded.model, [2], AdapterSpec("norm"), tuned)
    heads.meta["tune"] = {"delta_dir": ".."}
    heads.save(tmp_path / "heads")

    fresh = load_model(str(tiny_dir))
    heads_dir = apply_tune(fresh, tmp_path)
    assert heads_dir == tmp_path / "heads"
    assert fresh.fingerprint == manifest["tuned_fingerprint"] != base["fingerprint"]
    assert (fresh.model(ids) - unmerged).abs().max() < 1e-4
    ExitHeadSet.load(heads_dir, config=fresh.config, fingerprint=fresh.fingerprint)  # tied to the tuned model

    detach_lora(loaded.model, merge=True)  # in-place merge agrees as well
    assert (loaded.model(ids) - unmerged).abs().max() < 1e-4

    with pytest.raises(TuneError, match="fingerprint"):
        apply_tune(fresh, tmp_path)  # already tuned: its fingerprint is no longer the base's
    untuned = load_model(str(tiny_dir))
    with pytest.raises(HeadSetError, match="fingerprint"):
        ExitHeadSet.load(heads_dir, config=untuned.config, fingerprint=untuned.fingerprint)
    via_heads = apply_tune(untuned, tmp_path / "heads")  # the head set points at its delta
    assert via_heads == tmp_path / "heads" and untuned.fingerprint == manifest["tuned_fingerprint"]


def test_bad_tune_folders_fail_with_one_line(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir))
    with pytest.raises(TuneError, match="delta.json: not found"):
        apply_tune(loaded, tmp_path)
    (tmp_path / "delta.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "delta.safetensors").write_bytes(b"")
    with pytest.raises(TuneError, match="unknown format"):
        apply_tune(loaded, tmp_path)
