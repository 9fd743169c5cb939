"""A hostile client: every malformed, oversized or pathological request gets a 4xx in OpenAI's error
shape, fast, and the server keeps serving. The cases are the probe's, and more of the same kinds."""
import asyncio
import gzip
import json
import threading

import pytest

from server.api.limits import RequestLimits
from tests.api.helpers import assert_error
from tests.api.test_errors import still_serving

CHAT = [{"role": "user", "content": "hi"}]
MiB = 1 << 20

WRONG_TYPES = [
    ("model", 123), ("temperature", "hot"), ("temperature", [1]), ("top_p", {}), ("top_k", "x"), ("top_k", 1.5),
    ("seed", "s"), ("n", 2.5), ("stop", 5), ("stop", [1, 2]), ("stop", {"a": 1}), ("stop_token_ids", "x"),
    ("stop_token_ids", [1.5]), ("ignore_eos", "maybe"), ("stream", "x"), ("stream_options", 5), ("user", 5),
    ("frequency_penalty", "x"), ("early_exit", 5), ("exit_epsilon", "x"), ("return_exit_layers", []),
    ("max_tokens", "x"), ("logprobs", "x"), ("echo", "x"), ("min_tokens", "x"), ("prompt", None), ("prompt", 5),
    ("prompt", {"a": 1}), ("prompt", True), ("prompt", [1, "a"]), ("prompt", ["a", 1]), ("prompt", [[[1]]]),
]
HUGE_OR_NEGATIVE = [
    ("max_tokens", -1), ("max_tokens", 10 ** 30), ("n", 10 ** 30), ("n", -1), ("n", 17), ("logprobs", 10 ** 30),
    ("top_k", -10 ** 30), ("seed", 10 ** 30), ("seed", -5), ("temperature", 1e308), ("min_tokens", 10 ** 30),
    ("prompt", [-1]), ("prompt", [10 ** 30]), ("stop", ["x"] * 5000), ("stop", ["x" * 100_000]),
    ("stop_token_ids", [1] * 5000), ("prompt", ["hi"] * 300), ("prompt", [[5, 6]] * 300),
]
BAD_MESSAGES = [
    "hi", [1], [{}], [{"role": 1, "content": "hi"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [5]}],
]
# raw bodies: (body, what the message says)
RAW = [
    (b'{"prompt": "hi", "temperature": NaN}', "NaN"),
    (b'{"prompt": "hi", "top_p": Infinity}', "Infinity"),
    (b'{"prompt": "hi", "exit_epsilon": -Infinity}', "Infinity"),
    (b'{"prompt": "hi", "max_tokens": 1e400}', "finite"),
    (b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "digits"),
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
    (b'{"prompt": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}", "nested"),
    (b'{"prompt": "hi", "tools": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}", "nested"),
    (b'{"prompt": [' + b"1," * 300_000 + b"1]}", "items"),
    (b'{"prompt": "hi"} trailing', "Extra data"),
    (b'{"prompt": "hi",}', "malformed"),
    (b"", "malformed"),
    (b'{"prompt": "\xff\xfe"}', "utf-8"),
]


@pytest.mark.parametrize("field, value", WRONG_TYPES, ids=lambda v: repr(v)[:30])
async def test_a_wrong_type_names_its_field(client, field, value):
    body = {"prompt": "hi", field: value}
    error = assert_error(await client.post("/v1/completions", json=body), 400, field)
    assert field in error["message"]


@pytest.mark.parametrize("field, value", HUGE_OR_NEGATIVE, ids=lambda v: repr(v)[:30])
async def test_huge_and_negative_values_get_400(client, field, value):
    assert_error(await client.post("/v1/completions", json={"prompt": "hi", field: value}), 400, field)


@pytest.mark.parametrize("messages", BAD_MESSAGES, ids=lambda v: json.dumps(v)[:40])
async def test_malformed_messages_get_400_with_the_path(client, messages):
    error = assert_error(await client.post("/v1/chat/completions", json={"messages": messages}), 400, "messages")
    assert error["message"].startswith("messages")


async def test_an_unknown_content_part_says_which_and_what(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}]
    error = assert_error(await client.post("/v1/chat/completions", json={"messages": messages}), 400, "messages")
    assert error["message"].startswith("messages[0].content[1].type") and "input_audio" in error["message"]


@pytest.mark.parametrize("body, says", RAW, ids=lambda v: repr(v)[:30])
async def test_malformed_json_gets_400(client, body, says):
    response = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert says.lower() in assert_error(response, 400)["message"].lower()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udc00"]}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\udbff"]}', "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi", "name": "\\udfff"}]}', "messages"),
])
async def test_a_lone_surrogate_is_a_400_naming_the_field(client, path, body, param):
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert "surrogate" in assert_error(response, 400, param)["message"]


async def test_an_escaped_surrogate_pair_is_text(client):
    body = b'{"prompt": "a\\ud83d\\ude00", "max_tokens": 1}'  # the emoji as ensure_ascii clients send it
    response = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("headers, content, status", [
    ({"content-type": "text/plain"}, b'{"prompt": "hi"}', 400),
    ({"content-type": "application/x-www-form-urlencoded"}, b"prompt=hi", 400),
    ({"content-type": "application/json", "content-encoding": "gzip"}, gzip.compress(b'{"prompt": "hi"}'), 415),
    ({"content-type": "application/json", "content-encoding": "br"}, b'{"prompt": "hi"}', 415),
])
async def test_wrong_content_type_or_encoding(client, headers, content, status):
    assert_error(await client.post("/v1/completions", content=content, headers=headers), status)
    await still_serving(client)


async def test_a_long_unknown_model_name_is_not_echoed_whole(client):
    error = assert_error(await client.post("/v1/completions", json={"prompt": "hi", "model": "m" * 100_000}), 404)
    assert len(error["message"]) < 300


async def test_a_body_over_the_limit_is_413_before_it_is_read(client, state):
    state.limits = RequestLimits(max_body_bytes=MiB)
    body = json.dumps({"prompt": "a" * (2 * MiB)}).encode()
    error = assert_error(await client.post("/v1/completions", content=body,
                                           headers={"content-type": "application/json"}), 413)
    assert "--max-body-size" in error["message"]

    async def chunks():  # no Content-Length: counted while it arrives
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    assert_error(await client.post("/v1/completions", content=chunks(),
                                   headers={"content-type": "application/json"}), 413)
    await still_serving(client)


async def test_a_body_that_never_ends_gets_408(client, state):
    state.limits = RequestLimits(body_timeout=0.5)

    async def stalls():
        yield b'{"prompt": "hi"'
        await asyncio.sleep(30)
        yield b"}"

    error = assert_error(await client.post("/v1/completions", content=stalls(),
                                           headers={"content-type": "application/json"}), 408)
    assert "0.5 s" in error["message"]


async def test_more_prompts_than_may_ever_wait_is_400_not_429(client, state):
    state.admission.max_waiting = 8
    error = assert_error(await client.post("/v1/completions", json={"prompt": ["hi"] * 9, "max_tokens": 1}), 400,
                         "prompt")
    assert "--max-waiting" in error["message"]
    state.admission.num_waiting = 8  # while 8 wait, a request that fits later is told to retry
    response = await client.post("/v1/completions", json={"prompt": ["hi"] * 2, "max_tokens": 1})
    assert_error(response, 429)
    assert response.headers["retry-after"] == "1"
    state.admission.num_waiting = 0
    assert (await client.post("/v1/completions", json={"prompt": ["hi"] * 8, "max_tokens": 1})).status_code == 200


async def test_a_request_over_the_token_budget_states_the_limit(client, state):
    state.completion.limits = RequestLimits(max_request_tokens=100)
    error = assert_error(await client.post("/v1/completions", json={"prompt": ["hi"] * 4, "max_tokens": 30}), 400)
    assert "at most 100" in error["message"] and "--max-request-tokens" in error["message"]
    assert (await client.post("/v1/completions", json={"prompt": ["hi"] * 4, "max_tokens": 20})).status_code == 200


async def test_a_prompt_too_long_for_any_tokenization_is_never_tokenized(client, engine, monkeypatch):
    calls = []
    monkeypatch.setattr(engine.tokenizer, "backend", Spy(engine.tokenizer.backend, calls))
    for path, body, param in [("/v1/completions", {"prompt": "hello world " * 100_000}, "prompt"),
                              ("/v1/completions", {"prompt": ["hi", "x" * 1_000_000]}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 1_000_000}]},
                               "messages")]:
        error = assert_error(await client.post(path, json=body), 400, param)
        assert "max_model_len is 512" in error["message"]
    assert calls == []
    await still_serving(client)
    assert calls  # the spy forwards a prompt that fits


class Spy:
    """The tokenizer backend, with encode_batch calls recorded."""

    def __init__(self, backend, calls):
        self.backend, self.calls = backend, calls

    def encode_batch(self, *args, **kwargs):
        self.calls.append(args)
        return self.backend.encode_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


async def test_tokenizing_never_blocks_health(client, engine, monkeypatch):
    """Tokenization runs on a worker thread: while one is stuck, /health answers."""
    backend = engine.tokenizer.backend
    started, release = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    class Stuck(Spy):
        def encode_batch(self, *args, **kwargs):
            loop.call_soon_threadsafe(started.set)
            release.wait(60)  # blocks this thread only, as the real encode_batch, which releases the GIL
            return backend.encode_batch(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "backend", Stuck(backend, []))
    stuck = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1}))
    await asyncio.wait_for(started.wait(), 60)
    health = await client.get("/health")
    assert health.status_code == 200 and not stuck.done()
    release.set()
    assert (await stuck).status_code == 200

