"""AsyncLLMEngine: concurrent streams, abort, errors, shutdown."""
import asyncio

import pytest

from server.engine.async_engine import AsyncLLMEngine, EngineDeadError
from server.engine.sampling_params import SamplingParams
from tests.engine.helpers import random_prompts
from tests.polling import until

GREEDY = dict(temperature=0, ignore_eos=True, exit_epsilon=0.9)


@pytest.fixture
def async_engine(make_engine):
    engine = AsyncLLMEngine(make_engine())
    yield engine
    engine.shutdown()


async def _collect(engine, prompt, params, request_id):
    return [output async for output in engine.generate(prompt, params, request_id)]


async def test_concurrent_streams_match_the_sync_engine(async_engine, make_engine):
    prompts = random_prompts([4 + 3 * i for i in range(12)], seed=13)
    params = [SamplingParams(max_tokens=5 + i, **GREEDY) for i in range(12)]
    streams = await asyncio.gather(*(_collect(async_engine, p, s, f"r{i}") for i, (p, s) in
                                     enumerate(zip(prompts, params))))
    expected = make_engine().generate(prompts, params)
    for stream, want in zip(streams, expected):
        final = stream[-1]
        assert final.finished and not any(o.finished for o in stream[:-1])
        assert final.outputs[0].token_ids == want.outputs[0].token_ids
        assert final.outputs[0].exit_layers == want.outputs[0].exit_layers
        lengths = [len(o.outputs[0].token_ids) for o in stream]
        assert lengths == sorted(lengths) and lengths[-1] == len(want.outputs[0].token_ids)
    assert async_engine.engine.block_manager.num_used_blocks == 0


async def test_abort_ends_the_stream_and_frees_blocks(async_engine):
    prompt = random_prompts([20], seed=14)[0]
    seen = []
    async for output in async_engine.generate(prompt, SamplingParams(max_tokens=10_000, **GREEDY), "long"):
        seen.append(output)
        if len(output.outputs[0].token_ids) == 3:
            await async_engine.abort("long")
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    await until(lambda: async_engine.engine.block_manager.num_used_blocks == 0, "the aborted request's blocks freed")


async def test_leaving_the_stream_aborts(async_engine):
    prompt = random_prompts([20], seed=14)[0]
    async for output in async_engine.generate(prompt, SamplingParams(max_tokens=10_000, **GREEDY), "gone"):
        break
    await until(lambda: not async_engine.engine.has_unfinished_requests(), "the abandoned request aborted")
    assert async_engine.engine.block_manager.num_used_blocks == 0


async def test_bad_requests_raise_value_error(async_engine):
    with pytest.raises(ValueError, match="not calibrated"):
        await _collect(async_engine, [5, 6], SamplingParams(exit_epsilon=0.5), "bad")
    with pytest.raises(ValueError, match="empty"):
        await _collect(async_engine, [], SamplingParams(), "bad")
    async_engine.check_health()
    assert async_engine.epsilons == [0.9, 0.99] and async_engine.default_epsilon == 0.99
    assert async_engine.max_model_len == 512 and async_engine.kv_capacity_tokens >= 512


async def test_engine_error_is_reported(async_engine, monkeypatch):
    def broken_step():
        raise RuntimeError("boom")

    monkeypatch.setattr(async_engine.engine, "step", broken_step)
    with pytest.raises(EngineDeadError, match="boom"):
        await _collect(async_engine, [5, 6, 7], SamplingParams(max_tokens=4), "x")
    assert async_engine.errored
    with pytest.raises(EngineDeadError):
        async_engine.check_health()


async def test_many_callers_with_aborts_leave_nothing_behind(async_engine):
    prompts = random_prompts([3 + i % 17 for i in range(48)], seed=17)

    async def client(i):
        params = SamplingParams(max_tokens=4 + i % 9, temperature=0.8, seed=i, ignore_eos=True, n=1 + i % 2)
        outputs = []
        async for output in async_engine.generate(prompts[i], params, f"c{i}"):
            outputs.append(output)
            if i % 5 == 0 and len(outputs) == 2:
                break  # a client that goes away
        return outputs

    results = await asyncio.gather(*(client(i) for i in range(48)))
    for i, outputs in enumerate(results):
        if i % 5:
            assert outputs[-1].finished and all(len(o.token_ids) == 4 + i % 9 for o in outputs[-1].outputs)
    await until(lambda: not async_engine.engine.has_unfinished_requests(), "every request finished or aborted")
    assert async_engine.engine.block_manager.num_used_blocks == 0 and not async_engine.engine.scheduler.num_unfinished
