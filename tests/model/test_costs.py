from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from server.model.costs import CostModel, adapter_flops

# SmolLM2-135M's shape (config.json of HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM2 = SimpleNamespace(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64)


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("context_len", [1, 64, 256])
def test_one_exit_head_costs_about_eight_layers_for_smollm2(context_len):
    cost = CostModel.from_config(SMOLLM2)
    ratio = cost.head_flops / cost.layer_flops(context_len)
    assert 7 <= ratio <= 9


def test_layer_matmuls_match_torch_flop_counter():
    cost = CostModel.from_config(SMOLLM2)
    c, ctx = SMOLLM2, 100
    d, q_dim, kv_dim = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h = torch.empty(1, d, device="meta")  # shapes only: the counter needs no data
    w = {name: torch.empty(out, inp, device="meta") for name, out, inp in [
        ("q", q_dim, d), ("k", kv_dim, d), ("v", kv_dim, d), ("o", d, q_dim),
        ("gate", c.intermediate_size, d), ("up", c.intermediate_size, d), ("down", d, c.intermediate_size)]}
    keys = torch.empty(c.num_attention_heads, ctx, c.head_dim, device="meta")

    def layer():
        q = F.linear(h, w["q"]).view(c.num_attention_heads, 1, c.head_dim)
        F.linear(h, w["k"]), F.linear(h, w["v"])
        probs = torch.softmax(q @ keys.transpose(1, 2), dim=-1)  # [Hq, 1, ctx]
        attended = (probs @ keys).reshape(1, q_dim)
        out = F.linear(attended, w["o"])
        F.linear(F.silu(F.linear(out, w["gate"])) * F.linear(out, w["up"]), w["down"])

    matmuls = counted_flops(layer)
    # The model adds only element-wise work (norms, RoPE, softmax, SiLU): under 2% of the layer.
    assert 0 < cost.layer_flops(ctx) - matmuls < 0.02 * cost.layer_flops(ctx)
    lm_head = torch.empty(c.vocab_size, d, device="meta")
    projection = counted_flops(lambda: F.linear(h, lm_head))
    assert 0 < cost.head_flops - projection < 0.02 * cost.head_flops


def test_token_flops_counts_layers_heads_kv_fill_and_final_head():
    cost = CostModel.from_config(SMOLLM2, context_len=128)
    layers = SMOLLM2.num_hidden_layers
    assert cost.token_flops(layers, 0) == cost.full_depth_flops()
    assert cost.token_flops(layers, 2) == cost.full_depth_flops() + 2 * cost.head_flops
    expected = 10 * cost.layer_flops() + 1 * cost.head_flops + 20 * cost.kv_fill_flops
    assert cost.token_flops(10, 1) == pytest.approx(expected, rel=1e-12)
    # Exiting at layer 10 pays for itself: 20 skipped layers minus their KV fill beat one head.
    assert cost.token_flops(10, 1) < cost.full_depth_flops()
    # A KV fill is the k/v projections only: a small fraction of a layer (GQA: 3 of 9 heads).
    assert 0.04 < cost.kv_fill_flops / cost.layer_flops() < 0.08
    with pytest.raises(ValueError):
        cost.token_flops(0, 0)


def test_token_flops_vectorised_matches_scalar_and_context_grows_cost():
    cost = CostModel.from_config(SMOLLM2)
    exit_layer, heads = np.array([4, 12, 30, 30]), np.array([1, 3, 0, 5])
    contexts = np.array([10, 500, 1000, 3])
    vector = cost.token_flops(exit_layer, heads, contexts)
    scalar = [cost.token_flops(int(e), int(h), int(c)) for e, h, c in zip(exit_layer, heads, contexts)]
    np.testing.assert_allclose(vector, scalar, rtol=1e-12)
    assert cost.layer_flops(1000) > cost.layer_flops(10)


def test_adapter_kinds_add_their_flops_to_a_head():
    d = SMOLLM2.hidden_size
    assert adapter_flops(d, "norm") == 0
    assert adapter_flops(d, "linear", 64) < adapter_flops(d, "linear", 0) < adapter_flops(d, "mlp", 0)
    assert adapter_flops(d, "linear", 0) == 2 * d * d + d
    norm_head = CostModel.from_config(SMOLLM2)
    linear_head = CostModel.from_config(SMOLLM2, head_kind="linear", adapter_rank=0)
    assert linear_head.head_flops - norm_head.head_flops == adapter_flops(d, "linear", 0)
    assert linear_head.full_depth_flops() == norm_head.full_depth_flops()
    with pytest.raises(ValueError, match="unknown head kind"):
        adapter_flops(d, "conv")


def test_a_shortlist_head_costs_its_rows_and_estimator():
    cost = CostModel.from_config(SMOLLM2, head_kind="linear", adapter_rank=64)
    d = SMOLLM2.hidden_size
    short = cost.exit_head_flops(num_listed=4096, mass_components=256, adapter=False)
    y, rows, pieces = (torch.empty(1, d, device="meta"), torch.empty(4096, d, device="meta"),
                       torch.empty(256, d, device="meta"))
    matmuls = counted_flops(lambda: (F.linear(y, rows), F.linear(y, pieces)))
    assert 0 < short - matmuls < 0.02 * short  # the rest: norm, log-sum-exp, softmax over 4097 outcomes
    assert cost.exit_head_flops(4096, 256, adapter=True) - short == adapter_flops(d, "linear", 64)
    assert cost.exit_head_flops() == cost.head_flops  # no shortlist: the whole vocabulary
    assert 0.55 < short / cost.layer_flops() < 0.75  # K = 4096: about 0.65 of a layer, against ~7.4 for a full head


def test_a_last_layer_exit_skips_only_the_lm_head():
    cost = CostModel.from_config(SMOLLM2, context_len=128)
    layers = SMOLLM2.num_hidden_layers
    head = cost.exit_head_flops(4096, 256, adapter=False)
    exited = cost.token_flops(layers, head_flops=head, full_head=False)
    stayed = cost.token_flops(layers, head_flops=head, full_head=True)
    assert exited == pytest.approx(layers * cost.layer_flops() + head, rel=1e-12)
    assert stayed - exited == cost.final_flops and stayed > cost.full_depth_flops()
    saved = 1 - exited / cost.full_depth_flops()
    assert 0.15 < saved < 0.20  # the LM head is about a sixth of a full-depth token, minus the shortlist
    vector = cost.token_flops(np.array([10, 30, 30]), head_flops=np.array([2 * head, head, head]),
                              full_head=np.array([False, False, True]))
    np.testing.assert_allclose(vector, [cost.token_flops(10, head_flops=2 * head), exited, stayed], rtol=1e-12)
