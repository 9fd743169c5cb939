"""The Grafana dashboard against a real Prometheus, and a real `offramp serve`.

Every PromQL expression of deploy/grafana/dashboards/offramp.json is evaluated through
Prometheus's HTTP API, with $__rate_interval and the template variables substituted:
- against an empty Prometheus: each must parse;
- against a Prometheus scraping `offramp serve` (deploy/prometheus.yml with its target pointed at
  the test server and 1 s scrapes instead of 5 s, to keep the test short), after mixed traffic:
  each must return a non-empty, finite result, and the early-exit and throughput panels must
  agree with what the requests reported.

The server runs the tiny random Llama of tests/tiny_model.py (6 layers) with its synthetic exit
heads at layers 2 and 4, so tokens really leave early, in milliseconds per step.

The rate window runs from the last scrape before the traffic to the first scrape after it, so
rate() x window is each counter's increase during the traffic (every series exists at zero from
server start), and the panels' ratios are exact up to Prometheus's millisecond extrapolation.
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tests.tiny_model import write_tiny_heads, write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "offramp.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
OFFRAMP = Path(sys.executable).with_name("offramp")
MODEL = "tiny"
LOW_EPSILON = 0.9  # both tiny heads on, low thresholds: many early exits (the default, 0.99, uses layer 4 only)
SCRAPE_SECONDS = 1
SHARE_TOLERANCE = 0.01  # the same counts through two paths; 0.01 = one token in a hundred
COMPUTE_SAVED_TOLERANCE = 0.03  # usage gives a ratio per request; pooled here by token count, not FLOPs
PROMPTS = [
    "what is the capital of france",
    "the quick brown fox jumps over the lazy dog",
    "red green blue sky sun moon",
]


@dataclass
class Reply:
    early_exit: bool
    usage: dict
    exit_layers: list[int]
    finish_reason: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queries(board: dict) -> list[tuple[str, str]]:
    """(panel title and refId, expr) for every target, rows' nested panels included."""
    panels = [p for top in board["panels"] for p in [top, *top.get("panels", [])]]
    return [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in panels for t in p.get("targets", [])]


def substitute(expr: str, variables: dict[str, str], rate_interval: str) -> str:
    """What Grafana sends: $__rate_interval and $name / ${name} replaced."""
    expr = expr.replace("$__rate_interval", rate_interval)
    expr = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], expr)
    assert "$" not in expr, expr
    return expr


def serve_unavailable() -> str | None:
    """Why `offramp serve` cannot run here, or None."""
    if not OFFRAMP.exists():
        return "the offramp console script is not installed"
    proc = subprocess.run([str(OFFRAMP), "serve", "--help"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return f"`offramp serve --help` fails: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Prometheus:
    """Debian's prometheus on a free loopback port, scraping `target` with deploy/prometheus.yml."""

    def __init__(self, workdir: Path, target: str):
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        interval = f"{SCRAPE_SECONDS}s"
        config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
        for job in config["scrape_configs"]:
            for static in job["static_configs"]:
                static["targets"] = [target]
        self.job = config["scrape_configs"][0]["job_name"]
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=10)
        wait_until(self.ready, 30, "Prometheus to start")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-2000:]}")
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        body = self.http.get("/api/v1/query", params=params).json()
        if body["status"] != "success":
            raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        body = self.http.get(f"/api/v1/label/{label}/values", params={"match[]": match}).json()
        assert body["status"] == "success", body
        return body["data"]

    def scrape_times(self) -> list[float]:
        """Timestamps of the target's successful scrapes in the last 10 minutes, oldest first."""
        result = self.query(f'up{{job="{self.job}"}}[10m]')
        return [float(ts) for ts, up in result[0]["values"] if up == "1"] if result else []

    def scrape_after(self, t: float, timeout: float = 15) -> float:
        return wait_until(lambda: next((ts for ts in self.scrape_times() if ts > t), None), timeout,
                          "a scrape of offramp by Prometheus")

    def close(self):
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus_factory(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (deploy/ci-deps.sh installs Debian's package)")
    started = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(tmp_path, target))
        return started[-1]

    yield start
    for prom in started:
        prom.close()


@pytest.fixture
def server(tmp_path):
    """`offramp serve` on the tiny model with its exit heads, on a free loopback port; yields its URL."""
    reason = serve_unavailable()
    if reason:
        pytest.skip(reason)
    from server.model.loader import load_model

    torch.set_num_threads(1)
    model_dir = write_tiny_model(tmp_path / "tiny-llama")
    loaded = load_model(str(model_dir))
    heads_dir = write_tiny_heads(tmp_path / "heads", loaded.model, loaded.fingerprint)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(OFFRAMP), "serve", "--model", str(model_dir), "--heads", str(heads_dir), "--served-model-name", MODEL,
             "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"offramp serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 90, "offramp serve to report healthy", interval=0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def complete(client: httpx.Client, prompt: str, early_exit: bool, max_tokens: int,
             exit_epsilon: float | None = None) -> Reply:
    response = client.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "early_exit": early_exit, "exit_epsilon": exit_epsilon, "return_exit_layers": True})
    assert response.status_code == 200, response.text
    body = response.json()
    (choice,) = body["choices"]
    return Reply(early_exit, body["usage"], choice["exit_layers"], choice["finish_reason"])


def chat_stream(client: httpx.Client, prompt: str, max_tokens: int) -> Reply:
    exit_layers, usage, finish_reason = [], None, None
    with client.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "exit_epsilon": LOW_EPSILON, "stream": True,
            "stream_options": {"include_usage": True}, "return_exit_layers": True}) as response:
        assert response.status_code == 200, response.read().decode()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk["choices"]:
                exit_layers += choice.get("exit_layers") or []
                finish_reason = choice.get("finish_reason") or finish_reason
            usage = chunk.get("usage") or usage
    assert usage is not None and finish_reason is not None, "the stream ended without usage or finish_reason"
    return Reply(True, usage, exit_layers, finish_reason)


def send_traffic(url: str) -> list[Reply]:
    """Early exit on and off, plain and streaming, four at once; and one rejected request."""
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(complete, client, PROMPTS[0], True, 24, LOW_EPSILON),
            pool.submit(complete, client, PROMPTS[1], True, 24),
            pool.submit(complete, client, PROMPTS[0], False, 16),
            pool.submit(chat_stream, client, PROMPTS[2], 24),
        ]
        rejected = client.post("/v1/completions", json={"model": MODEL, "prompt": {"not": "a prompt"}})
        assert rejected.status_code == 400, rejected.text
        return [f.result() for f in futures]


def server_counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


def by_label(result: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def test_dashboard_queries_parse(prometheus_factory):
    """Every expression is valid PromQL once Grafana's variables are substituted (empty results)."""
    prom = prometheus_factory(f"127.0.0.1:{free_port()}")
    variables = {"model_name": MODEL, "final_layer": "30", "datasource": "offramp-prometheus"}
    board = json.loads(DASHBOARD.read_text())
    errors = []
    for name, expr in queries(board):
        try:
            prom.query(substitute(expr, variables, "20s"))
        except AssertionError as err:
            errors.append(f"{name}: {err}")
    assert not errors, "\n".join(errors)
    with pytest.raises(AssertionError, match="parse error"):
        prom.query("sum(rate(offramp_prompt_tokens_total[20s])")


def test_dashboard_live(prometheus_factory, server):
    board = json.loads(DASHBOARD.read_text())
    prom = prometheus_factory(server.removeprefix("http://"))
    # The window opens on a scrape Prometheus has recorded (so it was answered) before any request.
    first = prom.scrape_after(time.time())
    model = prom.label_values("model_name", "offramp_num_requests_running")
    assert len(model) == 1, f"the Model variable's query found {model}"
    model = model[0]
    replies = send_traffic(server)
    completion_tokens = sum(r.usage["completion_tokens"] for r in replies)
    wait_until(lambda: server_counter(server, "offramp_request_success_total") == len(replies), 10,
               "the server to count every finished request")
    last = prom.scrape_after(time.time())
    window_ms = math.ceil((last - first) * 1000) + 2
    at = last + 0.001  # the window (at - window_ms, at] holds the scrapes at `first` and `last`
    generated = prom.query(f'sum(offramp_generation_tokens_total{{model_name="{model}"}} @ {last:.3f})'
                           f' - sum(offramp_generation_tokens_total{{model_name="{model}"}} @ {first:.3f})', at)
    assert float(generated[0]["value"][1]) == completion_tokens, "the window does not hold exactly the traffic"

    # The Full-depth layer variable: exit_layer values sorted numerically descending, the first.
    exit_layers = prom.label_values("exit_layer", f'offramp_exit_tokens_total{{model_name="{model}"}}')
    final_layer = max(int(k) for k in exit_layers)
    variables = {"model_name": model, "final_layer": str(final_layer), "datasource": "offramp-prometheus"}

    results, problems = {}, []
    for name, expr in queries(board):
        result = prom.query(substitute(expr, variables, f"{window_ms}ms"), at)
        values = [float(r["value"][1]) for r in result]
        if not values or not all(math.isfinite(v) for v in values):
            problems.append(f"{name}: {result}\n    {expr}")
        results[name] = result
    assert not problems, "panels without a finite value:\n" + "\n".join(problems)

    exposed = {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{server}/metrics").text.splitlines()
               if line and not line.startswith("#")}
    used = {name for _, expr in queries(board) for name in re.findall(r"\bofframp_\w+", expr)}
    assert used <= exposed, f"the dashboard uses metrics the server does not expose: {sorted(used - exposed)}"

    # Early exit: per-layer shares, the early share and compute saved against the replies.
    tokens_by_layer = Counter(layer for r in replies for layer in r.exit_layers)
    assert sum(tokens_by_layer.values()) == completion_tokens, "exit_layers must list one layer per token"
    assert set(next(r for r in replies if not r.early_exit).exit_layers) == {final_layer}
    shares = by_label(results["Tokens by exit layer [A]"], "exit_layer")
    for layer in set(tokens_by_layer) | {int(k) for k in shares}:
        expected = tokens_by_layer[layer] / completion_tokens
        assert shares.get(str(layer), 0.0) == pytest.approx(expected, abs=SHARE_TOLERANCE), f"layer {layer}"

    exited_early = sum(r.usage.get("exit", {}).get("tokens_exited_early", 0) for r in replies)
    assert exited_early > 0, "no token exited early: the early-exit panels were not exercised"
    (panel_early,) = by_label(results["Tokens exited early [A]"], "").values()
    assert panel_early == pytest.approx(exited_early / completion_tokens, abs=SHARE_TOLERANCE)

    saved = sum(r.usage["completion_tokens"] * r.usage.get("exit", {}).get("compute_saved", 0.0) for r in replies)
    (panel_saved,) = by_label(results["Compute saved [A]"], "").values()
    assert panel_saved == pytest.approx(saved / completion_tokens, abs=COMPUTE_SAVED_TOLERANCE)

    # Throughput: rate x window is the traffic's token and request counts.
    seconds = window_ms / 1000
    (prompt_rate,) = by_label(results["Token throughput [A]"], "").values()
    (generation_rate,) = by_label(results["Token throughput [B]"], "").values()
    assert prompt_rate * seconds == pytest.approx(sum(r.usage["prompt_tokens"] for r in replies), rel=0.01)
    assert generation_rate * seconds == pytest.approx(completion_tokens, rel=0.01)
    finished = by_label(results["Finished requests by reason [A]"], "finished_reason")
    for reason, count in Counter(r.finish_reason for r in replies).items():
        assert finished.get(reason, 0.0) * seconds == pytest.approx(count, abs=0.05), reason
