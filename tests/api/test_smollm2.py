"""The HTTP layer on the real default model (slow: loads SmolLM2-135M)."""
import httpx
import pytest

from server.api.app import ServerState, build_app
from server.api.engine_client import start_engine
from server.engine.config import EngineConfig
from server.model.fetch import DEFAULT_MODEL
from tests.api.helpers import sse_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_state(smollm2_path):
    engine, info, metrics = start_engine(EngineConfig(model=str(smollm2_path), heads=None, device="cpu"),
                                         DEFAULT_MODEL, process_metrics=False)
    state = ServerState()
    state.set_engine(engine, info, metrics)
    yield state
    engine.shutdown()


async def test_chat_answers_and_stream_matches(smollm2_state):
    transport = httpx.ASGITransport(app=build_app(smollm2_state))
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0, "return_exit_layers": True}
    async with httpx.AsyncClient(transport=transport, base_url="http://offramp", timeout=120) as client:
        result = (await client.post("/v1/chat/completions", json=body)).json()
        choice = result["choices"][0]
        assert "Paris" in choice["message"]["content"]
        assert choice["exit_layers"] == [30] * result["usage"]["completion_tokens"]
        streamed = await client.post("/v1/chat/completions", json=body | {"stream": True})
        events = sse_events(streamed.text)[:-1]
        content = "".join(event["choices"][0]["delta"].get("content", "") for event in events)
        assert content == choice["message"]["content"]
