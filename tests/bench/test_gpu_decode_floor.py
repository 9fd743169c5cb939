"""bench.gpu_decode_floor: the byte accounting of a step, and a smoke run at the tiny shape on the CPU."""
import json
import math

import torch

from bench import gpu_decode_floor as floor
from server.model.config import ModelConfig


def test_full_depth_step_reads_every_weight_once():
    torch.manual_seed(0)
    model, _, _, config = floor.build("tiny", torch.device("cpu"), torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: the LM head is the embedding
    kv = 2 * config.num_key_value_heads * config.head_dim * 4  # one token, one layer, K and V
    moved = floor.step_bytes(config, [config.num_hidden_layers], set(), context_len=1, element=4)
    assert moved["weights"] == weights
    assert moved["total"] == weights + config.hidden_size * 4 + 2 * config.num_hidden_layers * kv


def test_exited_rows_read_less():
    config = ModelConfig(**floor.SHAPES["llama-3-8b"])
    L, element = config.num_hidden_layers, 2
    full = floor.step_bytes(config, [L] * 4, set(), 512, element)
    half = floor.step_bytes(config, [L // 2] * 4, {L // 2}, 512, element)
    lm_head = config.vocab_size * config.hidden_size * element
    fill = (config.hidden_size + 2 * config.hidden_size * config.num_key_value_heads * config.head_dim) * element
    assert full["weights"] - half["weights"] == (L // 2) * floor.layer_weight_bytes(config, element) \
        + config.hidden_size * element - config.hidden_size * 4 - (L // 2) * fill
    assert half["kv_read"] * 2 == full["kv_read"]
    assert 15e9 < full["weights"] < 17e9 and lm_head == 1_050_673_152  # Llama-3-8B: 16 GB of bf16 weights


def test_mix_rows():
    assert floor.rows_for(floor.MIXES["50% L/2, 50% full"], 4, 16) == [8, 8, 16, 16]
    assert floor.rows_for(floor.MIXES["50% L/2, 50% full"], 1, 16) is None
    assert floor.rows_for(floor.MIXES["all L/4"], 2, 32) == [8, 8]


def test_smoke_run_on_cpu(tmp_path):
    torch.set_num_threads(1)
    assert floor.main(["--shapes", "tiny", "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1", "4",
                       "--prompt-len", "16", "--steps", "3", "--copy-bytes", str(1 << 20),
                       "--output", str(tmp_path / "floor.json")]) == 0
    report = json.loads((tmp_path / "floor.json").read_text())
    results = report["shapes"][0]["results"]
    assert {(r["batch"], r["mix"]) for r in results} >= {(1, "full"), (1, "all L/2"), (4, "50% L/2, 50% full")}
    assert all(r["batch"] == 4 for r in results if r["mix"].startswith(("50%", "25%")))
    for r in results:
        assert r["steps"] == 3 and r["step_ms"] > 0 and math.isfinite(r["step_over_floor"])
    by_mix = {(r["batch"], r["mix"]): r for r in results}
    assert by_mix[(4, "all L/4")]["floor_mb"] < by_mix[(4, "all L/2")]["floor_mb"] < by_mix[(4, "full")]["floor_mb"]
