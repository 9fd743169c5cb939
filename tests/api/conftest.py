"""In-process fixtures: the real engine on the tiny random model, an app around it per test, and an
httpx client speaking ASGI to that app (no sockets)."""
import time

import httpx
import pytest

from server.api.app import ServerState, build_app
from server.api.engine_client import start_engine
from server.engine.config import EngineConfig
from server.metrics import Metrics

MODEL = "tiny"


@pytest.fixture(scope="session")
def engine_and_info(tiny_folders):
    model_dir, heads_dir = tiny_folders
    config = EngineConfig(model=str(model_dir), heads=str(heads_dir), device="cpu", max_num_seqs=16,
                          max_num_batched_tokens=256)
    engine, info, _ = start_engine(config, MODEL, process_metrics=False)
    yield engine, info
    engine.shutdown()


@pytest.fixture
def engine(engine_and_info):
    return engine_and_info[0]


@pytest.fixture
def state(engine_and_info):
    """A fresh server around the shared engine, with its own metrics registry. The engine is drained
    first: a request an earlier test gave up on may still be finishing, and its tokens must not be
    counted by this test's metrics."""
    engine, info = engine_and_info
    deadline = time.monotonic() + 30
    while (engine.engine.has_unfinished_requests() or engine._inbox) and time.monotonic() < deadline:
        time.sleep(0.01)
    state = ServerState()
    metrics = Metrics(info.name, info.exit_layers, info.num_hidden_layers, process_metrics=False)
    engine.observer = metrics
    state.set_engine(engine, info, metrics)
    return state


@pytest.fixture
async def client(state):
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://offramp", timeout=30) as client:
        yield client

