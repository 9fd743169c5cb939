"""KV blocks, preemption, abort, chunked prefill and continuous batching."""
from server.engine.kv_cache import KVPool
from server.engine.sampling_params import SamplingParams
from tests.engine.helpers import random_prompts, run_staggered


def _block_bytes(tiny, block_size=16):
    import torch

    return KVPool.bytes_per_block(tiny.config, block_size, torch.float32)


def test_pool_is_sized_from_the_memory_budget(make_engine, tiny):
    engine = make_engine(kv_cache_memory=10 * _block_bytes(tiny) + 5)
    assert engine.block_manager.num_blocks == 10
    assert engine.kv_capacity_tokens == 160 and engine.max_model_len == 160


def test_a_sequence_may_fill_the_whole_pool(make_engine, tiny):
    engine = make_engine(kv_cache_memory=4 * _block_bytes(tiny))
    out = engine.generate(random_prompts([60, 5]), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 10]
    assert out[0].outputs[0].finish_reason == "length" and engine.block_manager.num_used_blocks == 0


def test_preemption_keeps_outputs_and_frees_everything(make_engine, tiny):
    prompts = random_prompts([20, 31, 12, 40, 7, 25], seed=5)
    params = SamplingParams(max_tokens=40, temperature=0, exit_epsilon=0.9, ignore_eos=True)
    arrivals = [0, 0, 1, 2, 4, 4]
    roomy = run_staggered(make_engine(), prompts, params, arrivals)
    tight = make_engine(kv_cache_memory=14 * _block_bytes(tiny))  # 224 slots for ~400 tokens of demand
    preemptions = 0
    original_step = tight.step

    def counting_step():
        nonlocal preemptions
        outputs = original_step()
        preemptions += tight.last_step.num_preemptions
        assert tight.block_manager.num_used_blocks <= 14
        return outputs

    tight.step = counting_step
    squeezed = run_staggered(tight, prompts, params, arrivals)
    assert preemptions >= 3
    for i in range(len(prompts)):
        a, b = roomy[str(i)].outputs[0], squeezed[str(i)].outputs[0]
        assert (a.token_ids, a.exit_layers) == (b.token_ids, b.exit_layers), i
    assert tight.block_manager.num_used_blocks == 0 and not tight.scheduler.num_unfinished


def test_abort_mid_generation_frees_blocks(make_engine):
    engine = make_engine()
    prompts = random_prompts([30, 10, 50], seed=6)
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True, n=2 if i else 1)
        engine.add_request(str(i), prompt, params)
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    out = engine.abort_request("1")
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort", "abort"]
    assert len(out.outputs[0].token_ids) == 5
    assert engine.abort_request("1") is None
    engine.abort_request("0")
    engine.abort_request("2")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert engine.step() == []


def test_abort_of_a_waiting_request(make_engine):
    engine = make_engine(max_num_seqs=1)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=50))
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.abort_request("b").outputs[0].token_ids == []
    engine.abort_request("a")
    assert engine.block_manager.num_used_blocks == 0


def test_long_prompt_is_chunked_while_others_decode(make_engine, tiny):
    engine = make_engine(max_num_batched_tokens=32)
    short, long = random_prompts([6, 150], seed=7)
    params = SamplingParams(max_tokens=30, temperature=0, early_exit=False, ignore_eos=True)
    engine.add_request("short", short, params)
    engine.step()
    engine.add_request("long", long, params)
    steps = []
    while engine.has_unfinished_requests():
        engine.step()
        steps.append((engine.last_step.num_prompt_tokens, engine.last_step.num_generation_tokens))
    chunked = [s for s in steps if s[0] > 0]
    assert len(chunked) == 5 and all(prompt <= 31 for prompt, _ in chunked)
    assert all(generated >= 1 for _, generated in chunked)  # the short request kept decoding


def test_continuous_batching_admits_and_retires_each_step(make_engine):
    engine = make_engine(max_num_seqs=3)
    prompts = random_prompts([5] * 6, seed=8)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=2 + i, temperature=0, ignore_eos=True))
    emitted = []
    while engine.has_unfinished_requests():
        engine.step()
        emitted.append(engine.last_step.num_generation_tokens)
        assert engine.last_step.num_running <= 3
    # 27 tokens over 3 rows: a finished request's row is taken by a waiting one at the very next step
    assert sum(emitted) == 27 and emitted[:7] == [3] * 7 and len(emitted) <= 11
