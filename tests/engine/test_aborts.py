"""An abort frees its sequences and KV blocks before the next engine step, whether the request is
waiting, prefilling or decoding, and costs nothing when it lands before its request was added."""
import asyncio
import time

from server.engine.async_engine import AsyncLLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import SequenceStatus
from tests.engine.helpers import random_prompts
from tests.polling import until

LONG = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)


async def test_aborts_land_within_one_step_in_every_state(make_engine):
    # two sequences run at once, prompts prefill 31 tokens a step: a third request waits, a long one prefills
    engine = make_engine(max_num_seqs=2, max_num_batched_tokens=32)
    scheduled: list[set[str]] = []  # per step: the request ids it ran
    schedule = engine.scheduler.schedule

    def recorded_schedule():
        batch = schedule()
        scheduled.append({s.request.request_id for s in batch.decode_seqs + batch.prefill_seqs})
        time.sleep(0.05)  # slow steps, so that the long prompt is still prefilling when the aborts come
        return batch

    engine.scheduler.schedule = recorded_schedule
    async_engine = AsyncLLMEngine(engine)
    try:
        decoding, prefilling, waiting, bystander = random_prompts([5, 480, 5, 5], seed=3)
        streams = [asyncio.create_task(collect(async_engine, decoding, "decoding"))]
        await until(lambda: seq_of(engine, "decoding") and seq_of(engine, "decoding").num_output_tokens >= 2,
                    "a request decoding")
        streams += [asyncio.create_task(collect(async_engine, prompt, name))
                    for prompt, name in [(prefilling, "prefilling"), (waiting, "waiting")]]
        kept = asyncio.create_task(collect(async_engine, bystander, "bystander"))  # runs on after the aborts
        await until(lambda: seq_of(engine, "waiting") and seq_of(engine, "waiting").status == SequenceStatus.WAITING
                    and 0 < seq_of(engine, "prefilling").num_computed_tokens < 400, "one prefilling, one waiting")

        steps_before = len(scheduled)
        for name in ("decoding", "prefilling", "waiting"):
            async_engine.abort_request(name)
        finals = await asyncio.wait_for(asyncio.gather(*streams), 60)

        assert [f.outputs[0].finish_reason for f in finals] == ["abort"] * 3
        await until(lambda: seq_of(engine, "bystander").num_output_tokens >= 3, "the other request to run on")
        # the step under way when the aborts came may still run them; the one after never does
        assert len(scheduled) > steps_before + 2
        assert all(not ran & {"decoding", "prefilling", "waiting"} for ran in scheduled[steps_before + 1:])
        assert set(engine.requests) == {"bystander"}
        async_engine.abort_request("bystander")
        await asyncio.wait_for(kept, 60)
        await until(lambda: not engine.has_unfinished_requests(), "the engine to drop the last request")
        assert engine.block_manager.num_used_blocks == 0 and not engine.scheduler.num_unfinished
    finally:
        async_engine.shutdown()


async def test_an_abort_before_its_add_is_a_no_op_and_later_adds_run(make_engine):
    async_engine = AsyncLLMEngine(make_engine())
    try:
        async_engine.abort_request("never-added")
        final = await asyncio.wait_for(collect(async_engine, [5, 6, 7], "after", SamplingParams(max_tokens=3)), 60)
        assert final.outputs[0].finish_reason == "length"
        assert async_engine.engine.block_manager.num_used_blocks == 0
    finally:
        async_engine.shutdown()


def seq_of(engine, request_id: str):
    request = engine.requests.get(request_id)
    return request.seqs[0] if request is not None else None


async def collect(async_engine, prompt, request_id, params=LONG):
    final = None
    async for final in async_engine.generate(prompt, params, request_id):
        pass
    return final
