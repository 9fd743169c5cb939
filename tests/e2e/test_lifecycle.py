"""Clients that give up, SIGTERM during a stream, and start-up failures, against real processes."""
import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx

from tests.api.helpers import metric_values
from tests.e2e.conftest import REPO
from tests.polling import wait_until

LABEL = '{model_name="tiny"}'


def refuses_connections(server) -> bool:
    try:
        httpx.get(server.url + "/health", timeout=1)
    except httpx.TransportError:
        return True
    return False


def scrape(server) -> str:
    return httpx.get(server.url + "/metrics", timeout=5).text


async def test_clients_that_give_up_leave_nothing_behind(server):
    before = metric_values(scrape(server), "offramp_request_success_total")
    abort_label = '{finished_reason="abort",model_name="tiny"}'
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 400, "ignore_eos": True}

    async def read_stream(client):
        async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
            async for _ in response.aiter_bytes():
                pass

    async def give_up(client, i: int) -> bool:
        """Half wait for a whole completion, half read a stream; all hang up after 0.5 s."""
        try:
            await asyncio.wait_for(client.post("/v1/completions", json=body) if i % 2 else read_stream(client), 0.5)
        except TimeoutError:
            return True
        return False

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, limits=limits) as client:
        gave_up = await asyncio.gather(*[give_up(client, i) for i in range(100)])
    assert sum(gave_up) == 100  # 400 tokens each take far longer than 0.5 s

    deadline = time.monotonic() + 5.0
    while True:  # aborts are applied by the engine loop between steps: give it a moment
        text = scrape(server)
        if metric_values(text, "offramp_request_success_total")[abort_label] - before[abort_label] == 100 \
                or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert metric_values(text, "offramp_request_success_total")[abort_label] - before[abort_label] == 100
    assert metric_values(text, "offramp_kv_cache_usage_ratio")[LABEL] == 0.0
    assert metric_values(text, "offramp_num_requests_running")[LABEL] == 0.0
    assert metric_values(text, "offramp_num_requests_waiting")[LABEL] == 0.0
    assert httpx.get(server.url + "/health").status_code == 200
    start = time.monotonic()
    fresh = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=10)
    assert fresh.status_code == 200 and time.monotonic() - start < 2.0


def test_sigterm_during_a_stream_finishes_it_then_exits_0(start_server):
    server = start_server("--served-model-name", "tiny-b", "--api-key", "sesame", heads="none")
    headers = {"Authorization": "Bearer sesame"}
    assert httpx.get(server.url + "/v1/models", headers=headers).json()["data"][0]["exit_layers"] == []
    refused = httpx.post(server.url + "/v1/completions", headers=headers,
                         json={"prompt": "hi", "exit_epsilon": 0.9})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "exit_epsilon"

    body = {"model": "tiny-b", "prompt": "hello world", "max_tokens": 200, "ignore_eos": True, "stream": True,
            "return_exit_layers": True}
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                break
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: refuses_connections(server), "the server to stop accepting connections after SIGTERM")
        events += [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert server.proc.wait(30) == 0
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(len(c["choices"][0]["exit_layers"]) for c in chunks) == 200
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_model_that_cannot_load_exits_1_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tmp_path / "missing"),
                           "--port", "0", "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"offramp serve: error: {tmp_path / 'missing'}: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
