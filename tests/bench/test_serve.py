"""`offramp bench serve` against a real `offramp serve` on the tiny model: the figures it reports agree
with the requests it made, with each other, and with the server's own Prometheus counters."""
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.prompts import read_prompts
from bench.serve import FULL_DEPTH, BenchSettings, Mode, benchmark, format_report
from server.cli import main
from tests.api.helpers import metric_values

REPO = Path(__file__).resolve().parents[2]
NUM_LAYERS = 6
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server_url(tiny_folders, tmp_path_factory):
    model_dir, heads_dir = tiny_folders
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--model", str(model_dir), "--heads", str(heads_dir),
                             "--served-model-name", "tiny", "--max-num-seqs", "8", "--log-level", "warning"],
                            cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"offramp serve exited with {proc.returncode}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "offramp serve did not become healthy"
        time.sleep(0.1)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    log.close()


def counters(url: str) -> dict[str, float]:
    """The server's generated-token counters: total, and per exit layer."""
    text = httpx.get(url + "/metrics").text
    values = {"generation": sum(metric_values(text, "offramp_generation_tokens_total").values())}
    for labels, value in metric_values(text, "offramp_exit_tokens_total").items():
        layer = labels.split('exit_layer="')[1].split('"')[0]
        values[f"layer {layer}"] = value
    return values


def check_distribution(summary: dict, name: str, values_s: list[float]) -> None:
    """Reported stats equal numpy's over the per-request values, and sit between min and max."""
    ms = np.asarray(values_s) * 1e3
    low, high = summary[f"min_{name}_ms"], summary[f"max_{name}_ms"]
    assert low == pytest.approx(ms.min()) and high == pytest.approx(ms.max())
    for stat in ("mean", "median", "p99"):
        assert low - 1e-9 <= summary[f"{stat}_{name}_ms"] <= high + 1e-9, (name, stat)
    assert summary[f"median_{name}_ms"] == pytest.approx(float(np.median(ms)))
    assert summary[f"p99_{name}_ms"] == pytest.approx(float(np.percentile(ms, 99)))


def test_compare_full_depth_matches_requests_and_server(server_url, prompts_file):
    prompts = read_prompts(prompts_file)
    settings = BenchSettings(base_url=server_url, prompts=prompts, modes=[Mode(True, 0.9), Mode(False)],
                             max_tokens=MAX_TOKENS, concurrency=4, warmup=False, progress=False)
    before = counters(server_url)
    report = asyncio.run(benchmark(settings))
    after = counters(server_url)

    runs, requests = report["runs"], report["requests"]
    assert list(runs) == ["eps=0.9", FULL_DEPTH]
    generated = 0
    layer_counts = {}
    for label, run in runs.items():
        done = requests[label]
        assert run["completed"] == len(prompts) and run["failed"] == 0
        assert sorted(r["prompt_index"] for r in done) == list(range(len(prompts)))  # each prompt both ways
        for r in done:  # ignore_eos: exactly max_tokens each, streamed, counted and layered alike
            assert r["output_tokens"] == r["streamed_tokens"] == len(r["exit_layers"]) == MAX_TOKENS
            assert 0 < r["ttft"] <= r["e2el"] <= run["duration_s"]
            assert len(r["itl"]) <= MAX_TOKENS - 1 and sum(r["itl"]) <= r["e2el"] - r["ttft"] + 1e-6
        assert run["total_output_tokens"] == run["total_streamed_tokens"] == len(prompts) * MAX_TOKENS
        assert run["total_input_tokens"] == sum(r["prompt_tokens"] for r in done)
        assert run["output_throughput"] == pytest.approx(run["total_output_tokens"] / run["duration_s"])
        assert run["request_throughput"] == pytest.approx(len(prompts) / run["duration_s"])
        shares = run["exit_layer_shares"]
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
        for layer, share in shares.items():
            layer_counts[layer] = layer_counts.get(layer, 0) + round(share * run["total_output_tokens"])
        assert run["exited_early_share"] == pytest.approx(
            sum(s for k, s in shares.items() if int(k) < NUM_LAYERS), abs=1e-12)
        check_distribution(run, "ttft", [r["ttft"] for r in done])
        check_distribution(run, "e2el", [r["e2el"] for r in done])
        check_distribution(run, "itl", [gap for r in done for gap in r["itl"]])
        check_distribution(run, "tpot", [(r["e2el"] - r["ttft"]) / (r["output_tokens"] - 1) for r in done])
        generated += run["total_output_tokens"]

    assert runs[FULL_DEPTH]["exit_layer_shares"] == {str(NUM_LAYERS): 1.0}
    assert runs[FULL_DEPTH]["compute_saved"] == 0.0
    early = runs["eps=0.9"]
    assert early["exited_early_share"] > 0.3 and 0 < early["compute_saved"] < 1  # the tiny heads' low thresholds
    assert after["generation"] - before["generation"] == generated  # what the server counted
    for layer, count in layer_counts.items():
        assert after[f"layer {layer}"] - before.get(f"layer {layer}", 0) == count, layer
    def wave(label, first_wave):  # (first start, last end) of a mode's requests in one wave of 4
        chosen = [r for r in requests[label] if (r["prompt_index"] < 4) == first_wave]
        return min(r["start"] for r in chosen), max(r["start"] + r["e2el"] for r in chosen)

    # waves never overlap, and alternate which mode goes first: eps, full | full, eps
    assert wave("eps=0.9", True)[1] <= wave(FULL_DEPTH, True)[0]
    assert wave(FULL_DEPTH, True)[1] <= wave(FULL_DEPTH, False)[0]
    assert wave(FULL_DEPTH, False)[1] <= wave("eps=0.9", False)[0]
    speedup = report["speedup_vs_full_depth"]["eps=0.9"]
    assert speedup["output_throughput"] == pytest.approx(early["output_throughput"]
                                                         / runs[FULL_DEPTH]["output_throughput"])
    assert speedup["median_tpot"] == pytest.approx(runs[FULL_DEPTH]["median_tpot_ms"] / early["median_tpot_ms"])
    assert "Share exiting at layer 2" in format_report(report)


def test_cli_random_prompts_at_a_request_rate(server_url, tmp_path, capsys):
    output = tmp_path / "result.json"
    rc = main(["bench", "serve", "--base-url", server_url, "--random-input-len", "10", "--num-prompts", "5",
               "--max-tokens", "4", "--request-rate", "40", "--output", str(output)])
    assert rc == 0
    report = json.loads(output.read_text())
    run = report["runs"]["early_exit"]  # no --epsilon: the server's default
    assert run["completed"] == 5 and run["total_input_tokens"] == 50 and run["total_output_tokens"] == 20
    starts = [r["start"] for r in report["requests"]["early_exit"]]
    assert starts == sorted(starts) and starts[-1] > 0  # Poisson arrivals, not all at once
    assert report["settings"]["request_rate"] == 40
    assert "Output token throughput (tok/s)" in capsys.readouterr().out


def test_refusals(server_url, prompts_file):
    prompts = read_prompts(prompts_file, 2)
    uncalibrated = BenchSettings(base_url=server_url, prompts=prompts, modes=[Mode(True, 0.5)], max_tokens=2,
                                 progress=False)
    with pytest.raises(RuntimeError, match="not calibrated"):
        asyncio.run(benchmark(uncalibrated))
    mixed = BenchSettings(base_url=server_url, prompts=prompts, modes=[Mode(True, 0.9), Mode(False)],
                          request_rate=5.0, progress=False)
    with pytest.raises(ValueError, match="--concurrency"):
        asyncio.run(benchmark(mixed))
    assert math.isinf(BenchSettings(base_url="", prompts=[], modes=[]).request_rate)
