"""Clients that give up, SIGTERM during a stream, and start-up failures, against real processes."""
import asyncio
import json
import signal
import subprocess
import sys

import httpx

from tests.e2e.conftest import REPO, eventually, gauges, idle, is_idle
from tests.polling import wait_until


def refuses_connections(server) -> bool:
    try:
        httpx.get(server.url + "/health", timeout=1)
    except httpx.TransportError:
        return True
    return False


async def test_clients_that_give_up_leave_nothing_behind(server):
    """100 clients hang up, half waiting for a whole completion, half reading a stream, while their
    requests run or wait (64 run at once): all 100 are aborted, nothing is left, and a fresh request
    is served at once. They hang up once the server holds all 100: a fixed client timeout (this test
    had 0.5 s) expires, on a loaded machine, before the requests are even sent, and then the server
    has nothing to abort."""
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 400, "ignore_eos": True}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client, \
            httpx.AsyncClient(base_url=server.url, timeout=30) as monitor:
        await eventually(lambda: idle(monitor), "the server to be idle")
        before = await gauges(monitor)

        async def read_stream():
            async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
                async for _ in response.aiter_bytes():
                    pass

        requests = [asyncio.create_task(client.post("/v1/completions", json=body) if i % 2 else read_stream())
                    for i in range(100)]

        async def holds_all() -> bool:
            values = await gauges(monitor)
            return values["num_requests_running"] + values["num_requests_waiting"] == 100

        await eventually(holds_all, "the server to hold all 100 requests")
        assert not any(r.done() for r in requests)  # 400 tokens each take far longer
        for request in requests:
            request.cancel()  # the client hangs up: httpx closes the connection
        await asyncio.gather(*requests, return_exceptions=True)

        async def all_aborted():
            values = await gauges(monitor)
            return values if values["abort"] - before["abort"] == 100 and is_idle(values) else None

        values = await eventually(all_aborted, "100 aborts counted and the gauges back to 0")
        assert values["length"] == before["length"]  # none ran to its end for nobody
        assert (await monitor.get("/health")).status_code == 200
        fresh = await monitor.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8})
        assert fresh.status_code == 200 and fresh.json()["choices"][0]["finish_reason"] == "length"


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
