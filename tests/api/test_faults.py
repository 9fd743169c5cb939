"""A fault inside the engine loop: every request in flight (decoding, streaming, still waiting) gets a
500 or a stream error, /health turns 503, new requests get 503, and nothing hangs. A shutdown ends
what still runs with 503."""
import asyncio

import httpx
import pytest

from server.api.app import ServerState, build_app
from server.api.engine_client import start_engine
from server.engine.config import EngineConfig
from tests.api.helpers import assert_error, sse_events
from tests.polling import until

LONG = {"prompt": "hello world", "max_tokens": 400, "ignore_eos": True}


@pytest.fixture
async def two_slot_server(tiny_folders):
    """An engine of its own (it will be broken) that runs two sequences at once, so a third waits."""
    model_dir, heads_dir = tiny_folders
    config = EngineConfig(model=str(model_dir), heads=str(heads_dir), device="cpu", max_num_seqs=2,
                          max_num_batched_tokens=64)
    engine, info, metrics = start_engine(config, "tiny", process_metrics=False)
    state = ServerState()
    state.set_engine(engine, info, metrics)
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://offramp", timeout=60) as client:
        yield engine, client
    engine.shutdown()


async def test_a_step_that_raises_fails_every_request_in_flight(two_slot_server, monkeypatch):
    engine, client = two_slot_server
    decoding = asyncio.create_task(client.post("/v1/completions", json=LONG))
    streaming = asyncio.create_task(client.post("/v1/completions", json=LONG | {"stream": True}))
    scheduler = engine.engine.scheduler
    await until(lambda: len(scheduler.running) == 2 and all(s.num_output_tokens for s in scheduler.running),
                "two requests decoding")
    waiting = asyncio.create_task(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "ignore_eos": True}))
    await until(lambda: len(scheduler.waiting) == 1, "a third request waiting")

    def step_fails():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.engine, "step", step_fails)
    decoded, streamed, waited = await asyncio.wait_for(asyncio.gather(decoding, streaming, waiting), 60)

    for response in (decoded, waited):
        error = assert_error(response, 500)
        assert "illegal memory access" in error["message"] and "request id" in error["message"]
    assert streamed.status_code == 200  # the status went out with the first token
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
    assert "illegal memory access" in events[-2]["error"]["message"]
    health = await client.get("/health")
    assert health.status_code == 503 and "illegal memory access" in health.json()["reason"]
    assert_error(await client.post("/v1/completions", json={"prompt": "hi"}), 503)


async def test_shutdown_ends_open_streams(two_slot_server):
    engine, client = two_slot_server
    request = asyncio.create_task(client.post("/v1/completions", json=LONG))
    await until(lambda: engine.engine.scheduler.running, "a request running")
    engine.shutdown()
    error = assert_error(await asyncio.wait_for(request, 60), 503)
    assert "shut down" in error["message"]


async def test_a_fault_outside_the_serving_code_is_a_500_in_openai_shape(state, monkeypatch, caplog):
    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(state, "ready", broken)
    transport = httpx.ASGITransport(app=build_app(state), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://offramp") as client:
        error = assert_error(await client.post("/v1/completions", json={"prompt": "hi"}), 500)
    error_id = error["message"].split("error id ")[1]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert any(error_id in r.getMessage() and "a bug" in r.getMessage() for r in caplog.records)
