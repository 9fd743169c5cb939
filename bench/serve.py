"""`offramp bench serve`: drive a running server's OpenAI API with streaming requests; report what
vLLM's `bench serve` reports, plus the early-exit figures the server returns with each response.

Per request, measured by the client:
  TTFT  sending the request -> the first chunk that carries a generated token
  ITL   gaps between successive chunks that carry tokens (one gap per chunk, as vLLM counts them)
  TPOT  (E2EL - TTFT) / (output tokens - 1), requests with more than one token only
  E2EL  sending the request -> the end of the stream
Output tokens are the server's usage.completion_tokens (the streamed token ids are counted too, as a
check). Exit figures: every generated token's exit layer (return_exit_layers) gives the share per
layer; compute saved is usage.exit.compute_saved averaged over requests, weighted by decode tokens.

One mode (one epsilon, or the server's default) runs as vLLM does: every request through a
--concurrency limit, started at --request-rate. Several modes (--epsilon with several values,
--compare-full-depth) run in waves of --concurrency requests over the same prompts, interleaved wave
by wave (A B, B A, A B, ...): a batch never mixes modes, load drift on a shared machine hits every
mode alike, and no mode always goes first. A mode's duration is the sum of its waves.
"""
import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from bench.prompts import random_token_prompts, read_prompts

FULL_DEPTH = "full_depth"


@dataclass(frozen=True)
class Mode:
    early_exit: bool
    epsilon: float | None = None  # None = the server's default

    @property
    def label(self) -> str:
        if not self.early_exit:
            return FULL_DEPTH
        return f"eps={self.epsilon:g}" if self.epsilon is not None else "early_exit"


@dataclass
class BenchSettings:
    base_url: str
    prompts: list  # questions (str) or token-id lists
    modes: list[Mode]
    max_tokens: int = 64
    concurrency: int | None = None  # None = no limit
    request_rate: float = math.inf  # requests/s, Poisson arrivals; inf = all at once
    endpoint: str = "chat"  # chat | completions (token-id prompts always go to completions)
    temperature: float = 0.0
    ignore_eos: bool = True
    model: str | None = None
    api_key: str | None = None
    seed: int = 0
    timeout: float = 600.0
    warmup: bool = True
    progress: bool | None = None  # None = only on a terminal


@dataclass
class RequestResult:
    prompt_index: int
    mode: str
    success: bool = False
    error: str | None = None
    start: float = 0.0  # seconds after the run began
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0  # usage.completion_tokens
    streamed_tokens: int = 0  # token ids that arrived in the stream
    exit_layers: list[int] = field(default_factory=list)  # one per streamed token
    tokens_exited_early: int = 0  # left before the last layer
    tokens_skipped_lm_head: int = 0  # never ran the full LM head (any exit, the one after the last layer included)
    compute_saved: float = 0.0

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def request_body(settings: BenchSettings, prompt, mode: Mode, max_tokens: int) -> tuple[str, dict]:
    body = {"max_tokens": max_tokens, "temperature": settings.temperature, "ignore_eos": settings.ignore_eos,
            "stream": True, "stream_options": {"include_usage": True}, "return_exit_layers": True,
            "return_token_ids": True, "early_exit": mode.early_exit}
    if mode.early_exit and mode.epsilon is not None:
        body["exit_epsilon"] = mode.epsilon
    if settings.model:
        body["model"] = settings.model
    if isinstance(prompt, str) and settings.endpoint == "chat":
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", body | {"prompt": prompt}


async def send(client: httpx.AsyncClient, path: str, body: dict, result: RequestResult, origin: float) -> None:
    """One streaming request; fills `result` (error set instead of success on any failure)."""
    start = last = time.perf_counter()
    result.start = start - origin
    usage = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"].get("message", str(event["error"]))
                    return
                now = time.perf_counter()
                for choice in event.get("choices") or []:
                    ids = choice.get("token_ids") or []
                    if not ids:
                        continue
                    if result.streamed_tokens == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.streamed_tokens += len(ids)
                    result.exit_layers += choice.get("exit_layers") or []
                usage = event.get("usage") or usage
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"
        return
    result.e2el = time.perf_counter() - start
    if usage is None:
        result.error = "the stream ended without usage"
        return
    result.prompt_tokens = usage["prompt_tokens"]
    result.output_tokens = usage["completion_tokens"]
    exit_usage = usage.get("exit") or {}
    result.tokens_exited_early = exit_usage.get("tokens_exited_early", 0)
    result.tokens_skipped_lm_head = exit_usage.get("tokens_skipped_lm_head", 0)
    result.compute_saved = exit_usage.get("compute_saved", 0.0)
    result.success = True


async def run_requests(client, settings: BenchSettings, jobs: list[tuple[int, Mode]], concurrency: int | None,
                       request_rate: float, rng: random.Random, progress, origin: float
                       ) -> tuple[list[RequestResult], float]:
    """Send jobs (prompt index, mode) at most `concurrency` at a time, arrivals at `request_rate`;
    returns the results in job order and the wall time from the first send to the last reply."""
    semaphore = asyncio.Semaphore(concurrency) if concurrency else None
    results = [RequestResult(i, mode.label) for i, mode in jobs]
    start = time.perf_counter()

    async def one(result: RequestResult, mode: Mode):
        path, body = request_body(settings, settings.prompts[result.prompt_index], mode, settings.max_tokens)
        if semaphore is None:
            await send(client, path, body, result, origin)
        else:
            async with semaphore:
                await send(client, path, body, result, origin)
        progress.update(1)

    tasks = []
    for result, (_, mode) in zip(results, jobs):
        tasks.append(asyncio.create_task(one(result, mode)))
        if math.isfinite(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))
    await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


async def benchmark(settings: BenchSettings) -> dict:
    """Run the benchmark; the JSON-ready report (summary per mode, ratios, every request)."""
    from tqdm import tqdm

    if len(settings.modes) > 1 and math.isfinite(settings.request_rate):
        raise ValueError("several modes run in waves of --concurrency requests; a --request-rate would mix "
                         "them in one batch, so give --concurrency instead")
    num_prompts = len(settings.prompts)
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    width = settings.concurrency or num_prompts
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    async with httpx.AsyncClient(base_url=settings.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(settings.timeout, connect=30)) as client:
        card = await server_card(client)
        if settings.warmup:
            await warm_up(client, settings)
        load_before = os.getloadavg()
        rng = random.Random(settings.seed)
        results: dict[str, list[RequestResult]] = {m.label: [] for m in settings.modes}
        durations = dict.fromkeys(results, 0.0)
        origin = time.perf_counter()
        with tqdm(total=num_prompts * len(settings.modes), desc="requests", unit="req", file=sys.stderr,
                  disable=None if settings.progress is None else not settings.progress) as progress:
            if len(settings.modes) == 1:
                mode = settings.modes[0]
                done, seconds = await run_requests(client, settings, [(i, mode) for i in range(num_prompts)],
                                                   settings.concurrency, settings.request_rate, rng, progress, origin)
                results[mode.label], durations[mode.label] = done, seconds
            else:
                for number, first in enumerate(range(0, num_prompts, width)):
                    wave = range(first, min(first + width, num_prompts))
                    for mode in settings.modes if number % 2 == 0 else settings.modes[::-1]:
                        done, seconds = await run_requests(client, settings, [(i, mode) for i in wave], None,
                                                           math.inf, rng, progress, origin)
                        results[mode.label] += done
                        durations[mode.label] += seconds
        load_after = os.getloadavg()
    runs = {label: summarize(results[label], durations[label]) for label in results}
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "base_url": settings.base_url, "server": card,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("prompts", "api_key", "modes")}
                    | {"num_prompts": num_prompts, "modes": [m.label for m in settings.modes],
                       "request_rate": None if math.isinf(settings.request_rate) else settings.request_rate},
        "load_average": {"before": load_before, "after": load_after},
        "runs": runs,
    }
    if FULL_DEPTH in runs and len(runs) > 1:
        report["speedup_vs_full_depth"] = {label: speedups(run, runs[FULL_DEPTH])
                                           for label, run in runs.items() if label != FULL_DEPTH}
    report["requests"] = {label: [asdict(r) for r in rs] for label, rs in results.items()}
    return report


async def server_card(client) -> dict:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise RuntimeError(f"GET /v1/models answered {response.status_code}: {response.text[:300]}")
    return response.json()["data"][0]


async def warm_up(client, settings: BenchSettings) -> None:
    """One short request per mode, not counted; a mode the server refuses stops the run here."""
    for mode in settings.modes:
        path, body = request_body(settings, settings.prompts[0], mode, min(4, settings.max_tokens))
        result = RequestResult(0, mode.label)
        await send(client, path, body, result, origin=time.perf_counter())
        if not result.success:
            raise RuntimeError(f"warm-up request ({mode.label}) failed: {result.error}")


def distribution(values_s: list[float], name: str) -> dict:
    """vLLM's mean/median/std/p99 of one latency, in ms, plus min and max."""
    ms = np.asarray(values_s, dtype=float) * 1e3
    if ms.size == 0:
        return {f"{stat}_{name}_ms": None for stat in ("mean", "median", "std", "p99", "min", "max")}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(ms.std()), f"p99_{name}_ms": float(np.percentile(ms, 99)),
            f"min_{name}_ms": float(ms.min()), f"max_{name}_ms": float(ms.max())}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    layers = Counter(k for r in ok for k in r.exit_layers)
    num_layered = sum(layers.values())
    decode_tokens = [max(r.output_tokens - 1, 0) for r in ok]
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error}),
        "duration_s": duration, "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "total_streamed_tokens": sum(r.streamed_tokens for r in ok),
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
    }
    summary |= distribution([r.ttft for r in ok], "ttft")
    summary |= distribution([r.tpot for r in ok if r.tpot is not None], "tpot")
    summary |= distribution([gap for r in ok for gap in r.itl], "itl")
    summary |= distribution([r.e2el for r in ok], "e2el")
    summary |= {
        "exit_layer_shares": {str(k): n / num_layered for k, n in sorted(layers.items())},
        "exited_early_share": sum(r.tokens_exited_early for r in ok) / output_tokens if output_tokens else 0.0,
        "skipped_lm_head_share": sum(r.tokens_skipped_lm_head for r in ok) / output_tokens if output_tokens else 0.0,
        "mean_exit_layer": sum(k * n for k, n in layers.items()) / num_layered if num_layered else None,
        "compute_saved": (sum(r.compute_saved * n for r, n in zip(ok, decode_tokens)) / sum(decode_tokens)
                          if sum(decode_tokens) else 0.0),
    }
    return summary


def speedups(run: dict, full: dict) -> dict:
    """How many times better a mode is than full depth (> 1 = faster)."""
    def ratio(numerator, denominator):
        return numerator / denominator if numerator is not None and denominator else None

    return {"output_throughput": ratio(run["output_throughput"], full["output_throughput"]),
            "request_throughput": ratio(run["request_throughput"], full["request_throughput"]),
            "median_tpot": ratio(full["median_tpot_ms"], run["median_tpot_ms"]),
            "median_itl": ratio(full["median_itl_ms"], run["median_itl_ms"]),
            "median_ttft": ratio(full["median_ttft_ms"], run["median_ttft_ms"]),
            "median_e2el": ratio(full["median_e2el_ms"], run["median_e2el_ms"])}


def table_rows() -> list[tuple[str, str, str]]:
    """(printed name, summary key, format) of the printed table."""
    rows = [("Successful requests", "completed", "d"), ("Failed requests", "failed", "d"),
            ("Benchmark duration (s)", "duration_s", ".2f"), ("Total input tokens", "total_input_tokens", "d"),
            ("Total generated tokens", "total_output_tokens", "d"),
            ("Request throughput (req/s)", "request_throughput", ".2f"),
            ("Output token throughput (tok/s)", "output_throughput", ".2f"),
            ("Total token throughput (tok/s)", "total_token_throughput", ".2f")]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        rows += [(f"{stat.capitalize()} {label} (ms)", f"{stat}_{name}_ms", ".2f")
                 for stat in ("mean", "median", "p99")]
    return rows + [("Tokens exited early (share)", "exited_early_share", ".3f"),
                   ("Tokens that skipped the LM head (share)", "skipped_lm_head_share", ".3f"),
                   ("Mean exit layer", "mean_exit_layer", ".2f"), ("Compute saved", "compute_saved", ".3f")]


def format_report(report: dict) -> str:
    runs = report["runs"]
    labels = list(runs)
    card = report["server"]
    lines = [f"model {card['id']}, exit layers {card.get('exit_layers') or 'none'}, "
             f"{report['settings']['num_prompts']} prompts x {report['settings']['max_tokens']} tokens, "
             f"concurrency {report['settings']['concurrency'] or 'unlimited'}, "
             f"request rate {report['settings']['request_rate'] or 'inf'}, "
             f"load average {report['load_average']['before'][0]:.2f}"]
    lines.append(f"{'':<34}" + "".join(f"{label:>14}" for label in labels))

    def cell(value, spec):
        return f"{'-':>14}" if value is None else f"{value:>14{spec}}"

    for name, key, spec in table_rows():
        lines.append(f"{name:<34}" + "".join(cell(runs[label][key], spec) for label in labels))
    all_layers = sorted({int(k) for run in runs.values() for k in run["exit_layer_shares"]})
    for layer in all_layers:
        lines.append(f"{f'Share exiting at layer {layer}':<34}"
                     + "".join(cell(runs[label]["exit_layer_shares"].get(str(layer), 0.0), ".3f") for label in labels))
    for label, ratios in report.get("speedup_vs_full_depth", {}).items():
        shown = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if v is not None)
        lines.append(f"{label} vs {FULL_DEPTH}: {shown}")
    return "\n".join(lines)


def settings_from_args(args) -> BenchSettings:
    from server.errors import UsageError

    if args.num_prompts is not None and args.num_prompts < 1:
        raise UsageError("--num-prompts must be at least 1")
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if args.request_rate <= 0:
        raise UsageError("--request-rate must be positive (inf = all at once)")
    if args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if args.prompts:
        prompts = read_prompts(args.prompts, args.num_prompts)
    else:
        prompts = random_token_prompts(args.num_prompts or 16, args.random_input_len, args.random_vocab_size,
                                       args.seed)
    epsilons = args.epsilon or [None]
    modes = [Mode(True, eps) for eps in epsilons] + ([Mode(False)] if args.compare_full_depth else [])
    return BenchSettings(base_url=args.base_url.rstrip("/"), prompts=prompts, modes=modes,
                         max_tokens=args.max_tokens, concurrency=args.concurrency, request_rate=args.request_rate,
                         endpoint=args.endpoint, temperature=args.temperature, ignore_eos=args.ignore_eos,
                         model=args.model, api_key=args.api_key, seed=args.seed, timeout=args.timeout)


def add_arguments(p) -> None:
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="JSONL of questions (turns[0], prompt or text per line)")
    source.add_argument("--random-input-len", type=int, help="random token-id prompts of this many tokens")
    p.add_argument("--random-vocab-size", type=int, default=256,
                   help="random prompts draw ids below this (256: present in any byte-level vocabulary)")
    p.add_argument("--num-prompts", type=int, default=None, help="default: the whole file, or 16 random prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf)")
    p.add_argument("--epsilon", type=float, nargs="+", default=None,
                   help="exit_epsilon values, each a mode (default: the server's default)")
    p.add_argument("--compare-full-depth", action="store_true",
                   help="also send every prompt at full depth, interleaved, and print the ratios")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="where questions go (random token prompts always go to completions)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --max-tokens per request (default on)")
    p.add_argument("--model", default=None, help="model name to send (default: none, the served one)")
    p.add_argument("--api-key", default=os.environ.get("OFFRAMP_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--output", help="write the report (summaries, ratios, every request) as JSON here")


def run(args) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the table
    settings = settings_from_args(args)
    report = asyncio.run(benchmark(settings))
    print(format_report(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(run["failed"] == 0 for run in report["runs"].values()) else 1
