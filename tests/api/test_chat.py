"""/v1/chat/completions on the real engine (tiny model), in process."""
from tests.api.helpers import sse_events

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the capital of france"}]


async def chat(client, **body):
    response = await client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    assert response.status_code == 200, response.text
    return response


async def test_chat_uses_the_template_and_stream_equals_non_stream(client, engine):
    body = dict(max_tokens=10, temperature=0, ignore_eos=True, return_exit_layers=True, return_token_ids=True)
    result = (await chat(client, **body)).json()
    assert result["object"] == "chat.completion" and result["id"].startswith("chatcmpl-")
    [choice] = result["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert len(choice["token_ids"]) == len(choice["exit_layers"]) == 10
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    assert result["usage"]["prompt_tokens"] == len(prompt)
    assert result["usage"]["completion_tokens"] == 10

    response = await chat(client, **body, stream=True, stream_options={"include_usage": True})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks, usage_event = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == choice["message"]["content"]
    assert sum((c["choices"][0].get("token_ids", []) for c in chunks), []) == choice["token_ids"]
    assert sum((c["choices"][0].get("exit_layers", []) for c in chunks), []) == choice["exit_layers"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_event["choices"] == [] and usage_event["usage"] == result["usage"]


async def test_max_completion_tokens_wins_and_content_parts(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    response = await client.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 9, "max_completion_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    plain = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3, "temperature": 0,
        "ignore_eos": True})
    assert plain.json()["choices"][0]["message"] == response.json()["choices"][0]["message"]


async def test_chat_logprobs_and_n(client):
    result = (await chat(client, max_tokens=4, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=2)).json()
    content = result["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["token"] == entry["token"]

    response = await chat(client, n=3, max_tokens=5, temperature=1.0, seed=3, ignore_eos=True, stream=True)
    events = sse_events(response.text)[:-1]
    roles = [e["choices"][0]["index"] for e in events if e["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    finished = [e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]
