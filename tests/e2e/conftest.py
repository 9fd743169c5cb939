"""A real `offramp serve` subprocess on a free port, serving the tiny random model."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import metric_values
from tests.polling import DEADLINE_SECONDS


REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--device", "cpu", *args],
                                     cwd=REPO, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 90.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"offramp serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"offramp serve not healthy after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


async def eventually(probe, what: str, timeout: float = DEADLINE_SECONDS, interval: float = 0.05):
    """Await probe() until it returns something truthy; return that, or fail after timeout seconds."""
    end = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def gauges(client: httpx.AsyncClient) -> dict[str, float]:
    """The scheduler's gauges and the finished-request counters of a server, from /metrics."""
    text = (await client.get("/metrics")).text
    values = {name: sum(metric_values(text, f"offramp_{name}").values())
              for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio")}
    for label, value in metric_values(text, "offramp_request_success_total").items():
        values[label.split('finished_reason="')[1].split('"')[0]] = value
    return values


def is_idle(values: dict[str, float]) -> bool:
    return values["num_requests_running"] == values["num_requests_waiting"] == values["kv_cache_usage_ratio"] == 0


async def idle(client: httpx.AsyncClient) -> dict[str, float] | None:
    """The gauges and counters if nothing runs, waits or holds a KV block, else None."""
    values = await gauges(client)
    return values if is_idle(values) else None


@pytest.fixture(scope="session")
def start_server(tiny_folders, tmp_path_factory):
    """start_server(*extra_args) -> a healthy ServerProcess on the tiny model; all stopped at the end."""
    model_dir, heads_dir = tiny_folders
    started = []

    def start(*args: str, heads: str | None = None) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server") / "serve.log"
        server = ServerProcess(["--model", str(model_dir), "--heads", heads or str(heads_dir), *args], log_path)
        started.append(server)
        return server.wait_ready()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The shared server: tiny model with its exit heads, served as "tiny"."""
    return start_server("--served-model-name", "tiny")
