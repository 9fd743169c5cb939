"""The engine against the reference generator, batch invariance, and what early exit must hold."""
import pytest
import torch

from server.engine.sampling_params import SamplingParams
from server.model.generate import generate as reference_generate
from tests.engine.helpers import context_cache, random_prompts, run_staggered

LENGTHS = [3, 17, 40, 9, 70, 1, 25, 5]
ARRIVALS = [0, 0, 1, 3, 3, 6, 10, 11]


def test_greedy_without_exit_equals_reference(make_engine, tiny):
    engine = make_engine(max_num_batched_tokens=48)  # the 70-token prompt is chunked
    prompts = random_prompts(LENGTHS)
    params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0, early_exit=False, ignore_eos=True)
              for i in range(len(prompts))]
    final = run_staggered(engine, prompts, params, ARRIVALS)
    for i, prompt in enumerate(prompts):
        expected = reference_generate(tiny.model, prompt, params[i].max_tokens)
        got = final[str(i)].outputs[0]
        assert got.token_ids == expected.token_ids, i
        assert got.exit_layers == [tiny.config.num_hidden_layers] * len(got.token_ids)
        assert got.finish_reason == "length"
    assert engine.block_manager.num_used_blocks == 0


def test_early_exit_equals_reference_early_exit(make_engine, tiny, tiny_heads):
    """The reference generator runs early exit one token at a time with the plain-torch head."""
    engine = make_engine()
    prompts = random_prompts(LENGTHS, seed=1)
    for eps in (0.9, 0.99):
        params = SamplingParams(max_tokens=24, temperature=0, exit_epsilon=eps, ignore_eos=True)
        final = run_staggered(engine, prompts, params, ARRIVALS)
        for i, prompt in enumerate(prompts):
            expected = reference_generate(tiny.model, prompt, 24, heads=tiny_heads,
                                          thresholds=tiny_heads.thresholds(eps))
            got = final[str(i)].outputs[0]
            assert (got.token_ids, got.exit_layers) == (expected.token_ids, expected.exit_layers), (eps, i)


def test_batch_invariance_with_early_exit(make_engine):
    prompts = random_prompts([4 + 5 * i for i in range(16)], seed=2)
    params = [SamplingParams(max_tokens=6 + 2 * i, temperature=0, exit_epsilon=0.9, ignore_eos=True)
              for i in range(16)]
    together = run_staggered(make_engine(), prompts, params, arrivals=[i // 2 * 3 for i in range(16)])
    exited = 0
    for i in range(16):
        alone = make_engine().generate([prompts[i]], params[i])[0].outputs[0]
        got = together[str(i)].outputs[0]
        assert (got.token_ids, got.exit_layers) == (alone.token_ids, alone.exit_layers), i
        exited += sum(layer < 6 for layer in got.exit_layers)
    assert exited > 50  # the comparison covers many exited tokens


@torch.inference_mode()
def test_kv_fill_and_exit_tokens(make_engine, tiny, tiny_heads):
    """For exited tokens: the pool holds layer_kv(exit hidden) at every skipped layer, and the token
    emitted is the head's argmax; exit layers are exit points or the final layer."""
    model, num_layers = tiny.model, tiny.config.num_hidden_layers
    engine = make_engine()
    engine.add_request("a", random_prompts([12], seed=3)[0], SamplingParams(max_tokens=200, temperature=0,
                                                                           exit_epsilon=0.9, ignore_eos=True))
    for _ in range(30):
        engine.step()
    seq = engine.requests["a"].seqs[0]
    assert seq.exit_layers[0] == num_layers
    assert set(seq.exit_layers) <= set(tiny_heads.layers) | {num_layers}
    checked = 0
    for i in range(len(seq.exit_layers) - 1):
        exit_layer, position = seq.exit_layers[i + 1], seq.num_prompt_tokens + i  # token i as input
        if exit_layer == num_layers:
            continue
        cache = context_cache(engine, seq, position)
        pos = torch.tensor([position])
        hidden = model.run_layers(model.embed(torch.tensor([seq.token_ids[position]])), pos, 0, exit_layer,
                                  cache.at(pos))
        head_logits = tiny_heads.head(exit_layer).logits(hidden, model.lm_head.weight)
        assert int(head_logits.argmax()) == seq.token_ids[position + 1]
        slot = engine.block_manager.slots(seq, position, position + 1)[0]
        for layer in range(exit_layer, num_layers):
            k, v = model.layer_kv(layer, hidden, pos)
            torch.testing.assert_close(engine.pool.k[layer].flatten(0, 1)[slot], k[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(engine.pool.v[layer].flatten(0, 1)[slot], v[0], atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked >= 10


def test_step_stats_and_accounting(make_engine, tiny):
    engine = make_engine()
    prompts = random_prompts([5, 9, 13], seed=4)
    engine.add_request("0", prompts[0], SamplingParams(max_tokens=10, temperature=0, exit_epsilon=0.9, ignore_eos=True))
    engine.add_request("1", prompts[1], SamplingParams(max_tokens=10, temperature=0, early_exit=False, ignore_eos=True))
    engine.add_request("2", prompts[2], SamplingParams(max_tokens=10, temperature=0, exit_epsilon=0.9, ignore_eos=True,
                                                       n=2))
    emitted, final = 0, {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        stats = engine.last_step
        assert len(stats.exit_layers) == stats.num_generation_tokens
        emitted += stats.num_generation_tokens
        for output in outputs:
            final[output.request_id] = output
    assert emitted == 40
    no_exit, exits = final["1"], final["0"]
    assert no_exit.num_tokens_exited_early == 0
    assert no_exit.decode_flops == pytest.approx(no_exit.decode_flops_full_depth)  # no head was even evaluated
    assert exits.num_tokens_exited_early > 0 and 0 < exits.compute_saved < 1
    assert len(final["2"].outputs) == 2 and all(len(o.token_ids) == 10 for o in final["2"].outputs)


def test_request_validation(make_engine):
    engine = make_engine(max_model_len=64)
    with pytest.raises(ValueError, match="0.9, 0.99"):
        engine.add_request("a", [5, 6], SamplingParams(exit_epsilon=0.5))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("a", list(range(3, 67)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], SamplingParams())
    engine.add_request("a", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="already"):
        engine.add_request("a", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="no exit heads"):
        make_engine(heads=False).add_request("b", [5, 6], SamplingParams(exit_epsilon=0.9))


def test_max_model_len_finishes_with_length(make_engine):
    engine = make_engine(max_model_len=32)
    out = engine.generate([random_prompts([20])[0]], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 12 and out[0].outputs[0].finish_reason == "length"
