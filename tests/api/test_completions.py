"""/v1/completions on the real engine (tiny model), in process."""
import asyncio

import pytest

from server.model.generate import generate
from tests.api.helpers import sse_events

PROMPT = "the quick brown fox"


async def complete(client, **body):
    response = await client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


async def stream(client, **body):
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "stream": True, **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


async def test_greedy_stream_equals_non_stream_and_usage_is_exact(client, engine):
    body = dict(max_tokens=12, temperature=0, ignore_eos=True, return_exit_layers=True, return_token_ids=True)
    result = await complete(client, **body)
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    choice = result["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert len(choice["token_ids"]) == 12 and len(choice["exit_layers"]) == 12
    assert choice["text"] == engine.tokenizer.decode(choice["token_ids"])
    prompt_ids = engine.tokenizer.encode(PROMPT, add_special_tokens=True)
    assert result["usage"]["prompt_tokens"] == len(prompt_ids)
    assert result["usage"]["completion_tokens"] == 12
    assert result["usage"]["total_tokens"] == len(prompt_ids) + 12

    events = await stream(client, **body, stream_options={"include_usage": True})
    chunks, usage_event = events[:-1], events[-1]
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == choice["token_ids"]
    assert sum((c["choices"][0]["exit_layers"] for c in chunks), []) == choice["exit_layers"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_event["choices"] == [] and usage_event["usage"] == result["usage"]


async def test_stream_without_usage_option_has_no_usage_event(client):
    events = await stream(client, max_tokens=3, temperature=0)
    assert all(e["choices"] and "usage" not in e for e in events)
    assert "exit_layers" not in events[0]["choices"][0] and "token_ids" not in events[0]["choices"][0]


async def test_early_exit_off_equals_full_depth_reference(client, engine):
    prompt_ids = engine.tokenizer.encode(PROMPT, add_special_tokens=True)
    reference = generate(engine.engine.model, prompt_ids, 16, temperature=0.0)  # full depth, no EOS
    result = await complete(client, prompt=prompt_ids, max_tokens=16, temperature=0, ignore_eos=True,
                            early_exit=False, return_exit_layers=True, return_token_ids=True)
    choice = result["choices"][0]
    assert choice["token_ids"] == reference.token_ids
    assert choice["exit_layers"] == [6] * 16
    assert result["usage"]["exit"] == {"tokens_exited_early": 0, "tokens_skipped_lm_head": 0, "mean_layers": 6.0,
                                       "compute_saved": pytest.approx(0.0, abs=1e-9)}


async def test_exit_layers_and_exit_usage_with_early_exit(client):
    result = await complete(client, max_tokens=24, temperature=0, ignore_eos=True, exit_epsilon=0.9,
                            return_exit_layers=True)
    layers = result["choices"][0]["exit_layers"]
    assert len(layers) == 24 and set(layers) <= {2, 4, 6}
    assert layers[0] == 6  # the first token comes from the prefill, at full depth
    exit_usage = result["usage"]["exit"]
    assert exit_usage["tokens_exited_early"] == sum(k < 6 for k in layers) > 0
    assert exit_usage["mean_layers"] == pytest.approx(sum(layers) / len(layers))
    assert 0.0 < exit_usage["compute_saved"] < 1.0


async def test_n3_stream_routes_by_index(client):
    body = dict(n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    result = await complete(client, **body)
    events = await stream(client, **body, stream_options={"include_usage": True})
    texts, finishes = {0: "", 1: "", 2: ""}, {}
    for event in events[:-1]:
        [choice] = event["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            assert choice["index"] not in finishes
            finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert texts == {c["index"]: c["text"] for c in result["choices"]}
    assert events[-1]["usage"]["completion_tokens"] == 30


async def test_several_prompts_strings_and_token_ids(client, engine):
    prompts = ["hello world", "the cat sat on the mat"]
    as_ids = [engine.tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    by_text = await complete(client, prompt=prompts, n=2, max_tokens=6, temperature=0, ignore_eos=True)
    by_ids = await complete(client, prompt=as_ids, n=2, max_tokens=6, temperature=0, ignore_eos=True)
    assert [c["index"] for c in by_text["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in by_text["choices"]] == [c["text"] for c in by_ids["choices"]]
    single = await complete(client, prompt=prompts[1], max_tokens=6, temperature=0, ignore_eos=True)
    assert by_text["choices"][2]["text"] == single["choices"][0]["text"]
    assert by_text["usage"]["prompt_tokens"] == sum(len(ids) for ids in as_ids)
    assert by_text["usage"]["completion_tokens"] == 4 * 6


async def test_logprobs_and_echo(client):
    result = await complete(client, max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)
    choice = result["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][0] == 0
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert lp <= 0.0 and token in top and 1 <= len(top) <= 4
        assert top[token] == pytest.approx(max(top.values()))  # greedy picks the most likely

    echoed = await complete(client, max_tokens=5, temperature=0, ignore_eos=True, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + choice["text"]
    events = await stream(client, max_tokens=5, temperature=0, ignore_eos=True, echo=True)
    assert "".join(e["choices"][0]["text"] for e in events) == PROMPT + choice["text"]


async def test_stop_string_ends_the_text_before_it(client):
    full = (await complete(client, max_tokens=12, temperature=0, ignore_eos=True))["choices"][0]["text"]
    stop = full[3:6]
    assert stop.strip(), full
    result = await complete(client, max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    choice = result["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == full[:full.index(stop)]
    events = await stream(client, max_tokens=12, temperature=0, ignore_eos=True, stop=stop)
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]


async def test_models_version_and_health(client):
    models = (await client.get("/v1/models")).json()
    [card] = models["data"]
    assert card["id"] == "tiny" and card["exit_layers"] == [2, 4]
    assert card["exit_epsilons"] == [0.9, 0.99] and card["default_exit_epsilon"] == 0.99
    assert (await client.get("/version")).json()["version"]
    health = await client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


async def test_a_stream_closed_early_frees_its_kv_at_once(state, engine):
    from server.api.protocol import CompletionRequest

    request = CompletionRequest(prompt=PROMPT, max_tokens=400, ignore_eos=True, stream=True, n=2)
    events = await state.completion.create_completion(request)
    assert (await anext(events)).startswith("data: ")
    assert engine.engine.block_manager.num_used_blocks > 0
    await events.aclose()  # what Starlette does when the client is gone
    for _ in range(100):
        if engine.engine.block_manager.num_used_blocks == 0 and not engine.engine.requests:
            break
        await asyncio.sleep(0.01)
    assert engine.engine.block_manager.num_used_blocks == 0 and not engine.engine.requests
    assert state.admission.num_waiting == 0
