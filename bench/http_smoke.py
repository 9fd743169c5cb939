"""Throughput of `offramp serve` over HTTP: requests/s and output tokens/s at several
concurrencies, early exit on and off in the same run (alternating rounds, so drift in a
shared machine's load hits both alike).

    python -m bench.http_smoke --model smollm2-135m                  # starts a server on a free port
    python -m bench.http_smoke --url http://127.0.0.1:8000           # or measures a running one

Every request streams (to time the first token) with ignore_eos and temperature 0, so each
produces exactly --max-tokens tokens; counts come from the server's usage, not from the client.
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from server.model.fetch import DEFAULT_MODEL

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a lighthouse.",
    "What is the capital of France, and what is it known for?",
    "List three uses of a paper clip.",
    "def fibonacci(n):",
    "Summarise the plot of Romeo and Juliet.",
    "The three primary colours are",
    "Translate 'good morning' into Spanish and French.",
]


@dataclass
class Result:
    seconds: float = 0.0
    requests: int = 0
    output_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    layers: list[float] = field(default_factory=list)  # usage.exit.mean_layers per request
    saved: list[float] = field(default_factory=list)  # usage.exit.compute_saved per request


async def one_request(client, body: dict, result: Result) -> None:
    start = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and event["choices"]:
                first = time.perf_counter() - start
            if event.get("usage"):
                usage = event["usage"]
    result.latency.append(time.perf_counter() - start)
    result.ttft.append(first or 0.0)
    result.requests += 1
    result.output_tokens += usage["completion_tokens"]
    if usage.get("exit"):
        result.layers.append(usage["exit"]["mean_layers"])
        result.saved.append(usage["exit"]["compute_saved"])


async def run_batch(url: str, concurrency: int, num_requests: int, max_tokens: int, early_exit: bool,
                    epsilon: float | None, result: Result, offset: int = 0) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        async def task(i: int):
            body = {"prompt": PROMPTS[(offset + i) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                    "early_exit": early_exit}
            if epsilon is not None and early_exit:
                body["exit_epsilon"] = epsilon
            async with semaphore:
                await one_request(client, body, result)

        start = time.perf_counter()
        await asyncio.gather(*[task(i) for i in range(num_requests)])
        result.seconds += time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", args.model, "--device", args.device, "--max-num-seqs", str(max(args.concurrency)),
           "--log-level", "warning"]
    if args.heads:
        cmd += ["--heads", args.heads]
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"offramp serve exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("offramp serve did not become healthy in 600 s")


def describe(url: str) -> str:
    card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    exits = card.get("exit_layers") or []
    eps = card.get("default_exit_epsilon")
    return f"model {card['id']}, exit layers {exits or 'none'}, default epsilon {eps}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server; otherwise one is started")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--heads", default=None, help="passed to offramp serve (default: its own default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the started server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per (concurrency, mode); at least concurrency per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of early exit off/on")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=None, help="exit_epsilon for the early-exit runs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        threads = f", server threads {args.threads}" if args.threads and not args.url else ""
        print(f"# {describe(url)}; {args.requests} requests x {args.max_tokens} tokens per cell; "
              f"{os.cpu_count()} CPUs visible{threads}", flush=True)
        asyncio.run(run_batch(url, 1, 2, 4, True, None, Result()))  # warm-up
        rows = []
        for concurrency in args.concurrency:
            results = {False: Result(), True: Result()}
            per_round = max(1, args.requests // args.rounds, concurrency)  # every slot busy at least once
            for r in range(args.rounds):
                for early_exit in (False, True):
                    asyncio.run(run_batch(url, concurrency, per_round, args.max_tokens, early_exit, args.epsilon,
                                          results[early_exit], offset=r * per_round))
            for early_exit, res in results.items():
                rows.append({
                    "concurrency": concurrency, "early_exit": early_exit, "requests": res.requests,
                    "seconds": res.seconds, "requests_per_s": res.requests / res.seconds,
                    "output_tokens_per_s": res.output_tokens / res.seconds,
                    "ttft_p50_s": statistics.median(res.ttft), "latency_p50_s": statistics.median(res.latency),
                    "mean_layers": statistics.fmean(res.layers) if res.layers else None,
                    "compute_saved": statistics.fmean(res.saved) if res.saved else None,
                })
        print(f"{'conc':>4} {'early exit':>10} {'req':>4} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} "
              f"{'lat p50':>8} {'layers':>6} {'saved':>6}")
        for row in rows:
            layers = f"{row['mean_layers']:.2f}" if row["mean_layers"] is not None else "-"
            saved = f"{row['compute_saved']:.3f}" if row["compute_saved"] is not None else "-"
            print(f"{row['concurrency']:>4} {'on' if row['early_exit'] else 'off':>10} {row['requests']:>4} "
                  f"{row['requests_per_s']:>7.2f} {row['output_tokens_per_s']:>9.1f} {row['ttft_p50_s']:>8.3f}s "
                  f"{row['latency_p50_s']:>7.2f}s {layers:>6} {saved:>6}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
