"""echo + logprobs and prompt_logprobs on /v1/completions: OpenAI's legacy shape field for field,
values equal to the tiny model's own teacher-forced log-softmax, and what lm-eval sends.

Tolerance 1e-4: the server and the direct forward are both fp32 on the CPU and differ only in the
attention path (paged KV vs one dense causal matmul), about 1e-6 apart; a wrong row or target would
be off by far more (>= 0.01 on this model).
"""
import httpx
import openai
import pytest
import torch

from server.api.app import build_app
from tests.api.helpers import assert_error, sse_events

PROMPT = "the quick brown fox jumps over the lazy dog"
ATOL = 1e-4


async def complete(client, **body):
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def teacher_forced(engine, ids: list[int]) -> torch.Tensor:
    """[T, V] log-softmax of the full model; row p predicts token p + 1."""
    with torch.inference_mode():
        return engine.engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)


def assert_legacy_shape(logprobs: dict, text: str, num_tokens: int, num_top: int):
    """OpenAI's Logprobs object: four parallel lists, offsets indexing into the choice's text."""
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens, offsets = logprobs["tokens"], logprobs["text_offset"]
    assert len(tokens) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(offsets) == num_tokens
    assert all(isinstance(t, str) for t in tokens) and all(isinstance(o, int) for o in offsets)
    assert "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(num_tokens)]
    for token, offset in zip(tokens, offsets):
        assert text[offset:offset + len(token)] == token
    for token, lp, top in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"]):
        if lp is None:
            assert top is None
            continue
        assert isinstance(lp, float) and lp <= 0.0
        assert token in top and top[token] >= lp and 1 <= len(top) <= num_top + 1  # > only if spelled alike
        assert all(isinstance(v, float) for v in top.values())


async def test_echo_logprobs_cover_prompt_and_completion(client, engine):
    prompt_ids = engine.tokenizer.encode(PROMPT, add_special_tokens=True)
    body = dict(max_tokens=4, ignore_eos=True, logprobs=3, early_exit=False, return_token_ids=True)
    echoed = (await complete(client, echo=True, **body))["choices"][0]
    plain = (await complete(client, **body))["choices"][0]
    assert echoed["text"] == PROMPT + plain["text"]
    logprobs = echoed["logprobs"]
    assert_legacy_shape(logprobs, echoed["text"], len(prompt_ids) + 4, 3)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    # the completion's part is exactly what the request without echo returns, offsets shifted by the prompt
    generated = {k: v[len(prompt_ids):] for k, v in logprobs.items()}
    assert generated["tokens"] == plain["logprobs"]["tokens"]
    assert generated["token_logprobs"] == plain["logprobs"]["token_logprobs"]
    assert generated["text_offset"] == [o + len(PROMPT) for o in plain["logprobs"]["text_offset"]]
    # every token (prompt and completion, at full depth here) against the direct forward
    ids = prompt_ids + echoed["token_ids"]
    expected = teacher_forced(engine, ids)
    for p in range(1, len(ids)):
        assert logprobs["token_logprobs"][p] == pytest.approx(float(expected[p - 1, ids[p]]), abs=ATOL), p
        values, tokens = expected[p - 1].topk(3)
        best = {}  # keyed by text, as the response is: of tokens spelled alike (partial UTF-8), the likelier
        for value, token in zip(values.tolist(), tokens.tolist()):
            best.setdefault(engine.tokenizer.decode([token], skip_special_tokens=False), value)
        top = logprobs["top_logprobs"][p]
        assert {text: top[text] for text in best} == pytest.approx(best, abs=ATOL)


async def test_max_tokens_zero_with_echo_returns_the_prompt_alone(client, engine):
    prompt_ids = engine.tokenizer.encode(PROMPT, add_special_tokens=True)
    result = await complete(client, echo=True, max_tokens=0, logprobs=1)
    choice = result["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert_legacy_shape(choice["logprobs"], PROMPT, len(prompt_ids), 1)
    assert result["usage"]["prompt_tokens"] == len(prompt_ids) and result["usage"]["completion_tokens"] == 0
    expected = teacher_forced(engine, prompt_ids)
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [float(expected[p - 1, prompt_ids[p]]) for p in range(1, len(prompt_ids))], abs=ATOL)
    no_logprobs = (await complete(client, echo=True, max_tokens=0))["choices"][0]
    assert no_logprobs["text"] == PROMPT and no_logprobs["logprobs"] is None
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "echo": True, "max_tokens": 0,
                                                          "logprobs": 1, "stream": True})
    events = [e for e in sse_events(response.text) if e != "[DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == PROMPT
    assert sum((e["choices"][0]["logprobs"]["token_logprobs"] for e in events), []) == \
        choice["logprobs"]["token_logprobs"]


async def test_lm_eval_scoring_request(client, engine):
    """What lm-eval's local-completions sends for loglikelihood: token-id prompts in a batch, echo,
    logprobs 1, max_tokens 1, temperature 0; it sums token_logprobs[ctxlen:-1]."""
    tokenizer = engine.tokenizer
    pairs = [("the cat sat on", " the mat"), ("hello", " world code"), ("one two", " three four five")]
    batch = [tokenizer.encode(c) + tokenizer.encode(x) for c, x in pairs]
    result = await complete(client, prompt=batch, echo=True, logprobs=1, max_tokens=1, seed=1234)
    choices = sorted(result["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    for (context, _), ids, choice in zip(pairs, batch, choices):
        ctxlen = len(tokenizer.encode(context))
        logprobs = choice["logprobs"]
        assert_legacy_shape(logprobs, choice["text"], len(ids) + 1, 1)
        expected = teacher_forced(engine, ids)
        direct = sum(float(expected[p - 1, ids[p]]) for p in range(ctxlen, len(ids)))
        assert sum(logprobs["token_logprobs"][ctxlen:-1]) == pytest.approx(direct, abs=ATOL * len(ids))
        greedy = all(lp == max(top.values()) for lp, top in
                     zip(logprobs["token_logprobs"][ctxlen:-1], logprobs["top_logprobs"][ctxlen:-1]))
        direct_greedy = all(int(expected[p - 1].argmax()) == ids[p] for p in range(ctxlen, len(ids)))
        assert greedy == direct_greedy


async def test_vllm_prompt_logprobs_field(client, engine):
    prompt_ids = engine.tokenizer.encode(PROMPT, add_special_tokens=True)
    choice = (await complete(client, max_tokens=2, prompt_logprobs=2))["choices"][0]
    assert choice["logprobs"] is None
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    expected = teacher_forced(engine, prompt_ids)
    for p in range(1, len(prompt_ids)):
        entry, target = entries[p], prompt_ids[p]
        assert str(target) in entry and 2 <= len(entry) <= 3
        for token_id, value in entry.items():
            assert set(value) == {"logprob", "rank", "decoded_token"}
            assert value["logprob"] == pytest.approx(float(expected[p - 1, int(token_id)]), abs=ATOL)
            assert value["decoded_token"] == engine.tokenizer.decode([int(token_id)], skip_special_tokens=False)
        assert entry[str(target)]["rank"] == int((expected[p - 1] > expected[p - 1, target]).sum()) + 1
        top = expected[p - 1].topk(2).indices.tolist()
        assert [entry[str(t)]["rank"] for t in top] == [1, 2]
    without = (await complete(client, max_tokens=2))["choices"][0]
    assert "prompt_logprobs" not in without


async def test_stream_and_n_choices_echo_the_prompt_once_each(client):
    body = dict(echo=True, logprobs=2, max_tokens=5, ignore_eos=True, n=2, temperature=1.0, seed=7)
    whole = await complete(client, **body)
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "stream": True, **body})
    events = [e for e in sse_events(response.text) if e != "[DONE]"]
    for index in (0, 1):
        parts = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        choice = next(c for c in whole["choices"] if c["index"] == index)
        assert choice["text"].startswith(PROMPT)
        assert "".join(p["text"] for p in parts) == choice["text"]
        streamed = {k: sum((p["logprobs"][k] for p in parts), []) for k in choice["logprobs"]}
        assert streamed == choice["logprobs"]
    first, second = (c["logprobs"] for c in sorted(whole["choices"], key=lambda c: c["index"]))
    num_prompt = len(first["tokens"]) - 5
    assert first["token_logprobs"][:num_prompt] == second["token_logprobs"][:num_prompt]


async def test_openai_client_parses_echo_logprobs(state, engine):
    prompt_ids = engine.tokenizer.encode(PROMPT, add_special_tokens=True)
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://offramp") as http:
        client = openai.AsyncOpenAI(base_url="http://offramp/v1", api_key="none", http_client=http)
        completion = await client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=2,
                                                     max_tokens=0, temperature=0,
                                                     extra_body={"prompt_logprobs": 1})
    choice = completion.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == len(prompt_ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(isinstance(lp, float) for lp in choice.logprobs.token_logprobs[1:])
    assert choice.logprobs.text_offset[0] == 0
    assert len(choice.model_extra["prompt_logprobs"]) == len(prompt_ids)


@pytest.mark.parametrize("body, param", [
    ({"echo": True, "logprobs": 21}, "logprobs"),
    ({"echo": True, "logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1, "echo": True}, "max_tokens"),
])
async def test_bad_combinations_get_a_400(client, body, param):
    response = await client.post("/v1/completions", json={"prompt": PROMPT, **body})
    error = assert_error(response, 400, param)
    assert error["type"] == "invalid_request_error"
