"""The official openai client, sync and async, against a real `offramp serve`."""
import httpx
import openai
import pytest

from tests.api.helpers import metric_values

PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "what is the capital of france"}]
GREEDY = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True, "return_exit_layers": True,
                                                          "return_token_ids": True})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def async_client(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_completions_stream_equals_non_stream(client):
    result = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY)
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    [choice] = result.choices
    assert choice.finish_reason == "length"
    assert len(choice.exit_layers) == len(choice.token_ids) == 12  # extensions arrive as extra fields
    assert result.usage.completion_tokens == 12 and result.usage.total_tokens == result.usage.prompt_tokens + 12
    assert result.usage.exit["tokens_exited_early"] == sum(k < 6 for k in choice.exit_layers)

    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert sum((c.choices[0].exit_layers for c in chunks if c.choices), []) == choice.exit_layers
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == result.usage.prompt_tokens


def test_completions_n3_stream_routes_by_index(client):
    body = dict(model="tiny", prompt=PROMPT, n=3, max_tokens=8, temperature=0.8, seed=11,
                extra_body={"ignore_eos": True})
    result = client.completions.create(**body)
    texts = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(stream=True, **body):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {c.index: c.text for c in result.choices}


def test_early_exit_off_is_full_depth(client):
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                       extra_body={"early_exit": False, "return_exit_layers": True,
                                                   "ignore_eos": True})
    assert result.choices[0].exit_layers == [6] * 10
    assert result.usage.exit["tokens_exited_early"] == 0


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, extra_body={"exit_epsilon": 0.5})
    assert err.value.status_code == 400 and err.value.body["param"] == "exit_epsilon"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=PROMPT, logprobs=21)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt=PROMPT)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices[0].text is not None


async def test_async_chat_stream_equals_non_stream(async_client):
    body = dict(model="tiny", messages=MESSAGES, **GREEDY)
    result = await async_client.chat.completions.create(**body)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    [choice] = result.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    stream = await async_client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body)
    content, token_ids, usage = "", [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            token_ids += getattr(c, "token_ids", None) or []
    assert content == choice.message.content
    assert token_ids == choice.token_ids
    assert usage.completion_tokens == result.usage.completion_tokens == 12
    assert usage.prompt_tokens == result.usage.prompt_tokens


async def test_async_completions_concurrently(async_client):
    import asyncio

    results = await asyncio.gather(*[async_client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        for _ in range(8)])
    assert len({r.choices[0].text for r in results}) == 1  # greedy: batching changes nothing


def test_sync_chat_and_models(client, server):
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    assert result.usage.completion_tokens <= 4
    [model] = client.models.list().data
    assert model.id == "tiny"
    text = httpx.get(server.url + "/metrics").text
    generated = metric_values(text, "offramp_generation_tokens_total")['{model_name="tiny"}']
    assert generated > 0
    assert sum(metric_values(text, "offramp_exit_tokens_total").values()) == generated
