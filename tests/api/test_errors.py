"""Every invalid request gets its status and OpenAI's error shape, and the server keeps serving."""
import logging

import httpx
import pytest

from server.api.app import ServerState, build_app
from server.api.engine_client import start_engine
from server.engine.config import EngineConfig
from tests.api.helpers import assert_error, sse_events

BAD_COMPLETIONS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [100000]}, "prompt"),
    ({"prompt": [[5, 6], [-1]]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "max_tokens": 600}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10 ** 20}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 1000}, "n"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "temperature": 1e9}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": -5}, "top_k"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "seed": 2 ** 70}, "seed"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"prompt": "hi", "stop_token_ids": [100000]}, "stop_token_ids"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "exit_epsilon": 0.5}, "exit_epsilon"),
    ({"prompt": "hi", "echo": True, "logprobs": 1, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
]

BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "exit_epsilon": 2.0}, "exit_epsilon"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": False, "stream_options": {}}, "stream_options"),
]


async def still_serving(client):
    response = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("body, param", BAD_COMPLETIONS)
async def test_bad_completion_requests_get_400(client, body, param):
    assert_error(await client.post("/v1/completions", json=body), 400, param)
    if param != "stream_options":  # refused before the stream starts: a status, not an event
        assert_error(await client.post("/v1/completions", json=body | {"stream": True}), 400, param)
    await still_serving(client)


@pytest.mark.parametrize("body, param", BAD_CHATS)
async def test_bad_chat_requests_get_400(client, body, param):
    assert_error(await client.post("/v1/chat/completions", json=body), 400, param)
    await still_serving(client)


async def test_unknown_epsilon_lists_the_calibrated_ones(client):
    error = assert_error(await client.post("/v1/completions", json={"prompt": "hi", "exit_epsilon": 0.5}), 400)
    assert "0.9, 0.99" in error["message"]


async def test_malformed_body_and_wrong_content_type(client):
    for content, content_type in [(b'{"prompt": "hi"', "application/json"), (b'["hi"]', "application/json"),
                                  (b"\xff\xfe", "application/json"), (b'{"prompt": "hi"}', "text/plain"),
                                  (b'{"prompt": "hi"}', None)]:
        headers = {"content-type": content_type} if content_type else {}
        assert_error(await client.post("/v1/completions", content=content, headers=headers), 400)
    await still_serving(client)


async def test_unknown_model_route_and_method(client):
    error = assert_error(await client.post("/v1/completions", json={"prompt": "hi", "model": "gpt-5"}), 404, "model")
    assert error["code"] == "model_not_found"
    assert_error(await client.post("/v1/chat/completions", json={"model": "x", "messages": [
        {"role": "user", "content": "hi"}]}), 404, "model")
    assert_error(await client.get("/v1/embeddings"), 404)
    assert_error(await client.get("/v1/completions"), 405)
    ok = await client.post("/v1/completions", json={"prompt": "hi", "model": "tiny", "max_tokens": 1})
    assert ok.status_code == 200


async def test_api_key_guards_v1_but_not_health_or_metrics(state):
    state.api_key = "sesame"
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://offramp") as client:
        body = {"prompt": "hi", "max_tokens": 1}
        assert_error(await client.post("/v1/completions", json=body), 401)
        assert_error(await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(await client.get("/v1/models"), 401)
        ok = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_full_waiting_queue_gets_429_with_retry_after(client, state):
    state.admission.max_waiting = 2
    state.admission.num_waiting = 2  # two requests waiting for their first token
    for stream in (False, True):
        response = await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
        assert_error(response, 429)
        assert response.headers["retry-after"] == "1"
    state.admission.num_waiting = 1
    await still_serving(client)
    assert state.admission.num_waiting == 1  # the served request took its place and gave it back


async def test_internal_error_is_500_and_logged_with_the_request_id(client, engine, monkeypatch, caplog):
    async def broken(prompt_token_ids, params, request_id):
        raise RuntimeError("kaboom")
        yield

    monkeypatch.setattr(engine, "generate", broken)
    with caplog.at_level(logging.ERROR):
        error = assert_error(await client.post("/v1/completions", json={"prompt": "hi"}), 500)
    assert "kaboom" in error["message"] and "cmpl-" in error["message"]
    request_id = error["message"].split("request id ")[1]
    assert any(request_id in record.getMessage() for record in caplog.records)
    monkeypatch.undo()
    await still_serving(client)


async def test_error_after_the_stream_started_is_an_event_then_done(client, engine, monkeypatch):
    real_generate = engine.generate

    async def fails_midway(prompt_token_ids, params, request_id):
        async for output in real_generate(prompt_token_ids, params, request_id):
            yield output
            raise RuntimeError("lost the GPU")

    monkeypatch.setattr(engine, "generate", fails_midway)
    response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stream": True})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[0]["choices"][0]["text"] is not None
    assert "lost the GPU" in events[-2]["error"]["message"] and events[-2]["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]"


async def test_health_is_503_while_loading():
    transport = httpx.ASGITransport(app=build_app(ServerState()))
    async with httpx.AsyncClient(transport=transport, base_url="http://offramp") as client:
        response = await client.get("/health")
        assert response.status_code == 503 and "loading" in response.json()["reason"]
        assert_error(await client.post("/v1/completions", json={"prompt": "hi"}), 503)
        assert (await client.get("/metrics")).status_code == 200


async def test_fatal_engine_error_turns_health_to_503(tiny_folders, monkeypatch):
    model_dir, heads_dir = tiny_folders
    engine, info, metrics = start_engine(EngineConfig(model=str(model_dir), heads=str(heads_dir), device="cpu"),
                                         process_metrics=False)
    state = ServerState()
    state.set_engine(engine, info, metrics)

    def step_fails():
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(engine.engine, "step", step_fails)
    try:
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://offramp") as client:
            assert (await client.get("/health")).status_code == 200
            error = assert_error(await client.post("/v1/completions", json={"prompt": "hi"}), 500)
            assert "illegal memory access" in error["message"]
            health = await client.get("/health")
            assert health.status_code == 503 and "stopped" in health.json()["reason"]
            assert_error(await client.post("/v1/completions", json={"prompt": "hi"}), 503)
    finally:
        engine.shutdown()
