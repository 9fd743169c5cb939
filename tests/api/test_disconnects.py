"""Clients that hang up: a request whose client left before generation never reaches the engine, one
that leaves while its prompts are being handed over is not added after its abort, and one that
leaves mid-generation is aborted at once."""
import asyncio

import pytest

from server.api.errors import APIError
from server.api.protocol import CompletionRequest
from tests.polling import until

LONG = dict(prompt=["hello world", "the quick brown fox"], max_tokens=400, ignore_eos=True)


class HungUp:
    """The ASGI request of a client: `gone_at_check` hung up before generation; otherwise it hangs up
    the moment anything listens for it."""

    def __init__(self, gone_at_check: bool):
        self.gone_at_check = gone_at_check

    async def is_disconnected(self) -> bool:
        return self.gone_at_check

    async def receive(self):
        return {"type": "http.disconnect"}


class Listening:
    """A client that stays until told to leave."""

    def __init__(self):
        self.left = asyncio.Event()

    async def is_disconnected(self) -> bool:
        return self.left.is_set()

    async def receive(self):
        await self.left.wait()
        return {"type": "http.disconnect"}


def added_requests(engine, monkeypatch) -> list[str]:
    added = []
    generate = engine.generate

    def recording(prompt, params, request_id):
        added.append(request_id)
        return generate(prompt, params, request_id)

    monkeypatch.setattr(engine, "generate", recording)
    return added


@pytest.mark.parametrize("gone_at_check", [True, False])
async def test_a_client_gone_before_its_prompts_reach_the_engine_costs_nothing(state, engine, monkeypatch,
                                                                                gone_at_check):
    added = added_requests(engine, monkeypatch)
    with pytest.raises(APIError) as refused:
        await asyncio.wait_for(state.completion.create_completion(CompletionRequest(**LONG), HungUp(gone_at_check)),
                               60)
    assert refused.value.status == 499
    assert added == []  # not added and then aborted: never added
    assert not engine.engine.has_unfinished_requests()


async def test_a_client_leaving_mid_generation_is_aborted_at_once(state, engine):
    client = Listening()
    task = asyncio.create_task(state.completion.create_completion(CompletionRequest(**LONG), client))
    await until(lambda: len(engine.engine.requests) == 2 and all(
        r.seqs[0].num_output_tokens for r in engine.engine.requests.values()), "both prompts decoding")
    client.left.set()
    response = await asyncio.wait_for(task, 60)
    assert [c.finish_reason for c in response.choices] == ["abort", "abort"]
    assert all(len(c.text) < 400 for c in response.choices)
    await until(lambda: engine.engine.block_manager.num_used_blocks == 0, "the aborted prompts' blocks freed")
