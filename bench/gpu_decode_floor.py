"""Each decode step's time against its memory-bandwidth floor, at large Llama shapes with random weights.

For each shape (Llama-3.2-1B, Llama-3-8B; bf16, random weights, logit-lens exit heads at L/4, L/2
and 3L/4), each batch size and each synthetic exit mix, B sequences with random P-token prompts
decode through LLMEngine, and every decode step is timed with CUDA events. The mixes are stated,
not learned: each exit layer k has its own epsilon whose thresholds are 0 at k (margin >= 0: always
exit) and +inf elsewhere, and full-depth rows run with early exit off, so "50% L/2, 50% full" means
exactly half the rows leave at L/2 at every step. Batch 1 runs the pure mixes only.

A step's floor is the bytes it cannot avoid reading or writing, over the copy bandwidth measured in
the same run (read + written bytes per second of a large device-to-device copy, best of 10):
  weights   every layer some row runs, read once; the LM head (and head norm) once per exit layer
            where some row was asked, and once more if some row reached the end; for layers past
            some row's exit, the input norm and k/v projections that fill its K/V
  KV        each row reads its own context's K and V at every layer it runs (context = prompt +
            tokens so far), and writes one token's K/V at every layer
  embedding one row of the table per token
Activations are left out (at most a few MB). The measured step includes everything the engine does
(scheduling, bookkeeping, the exit decision's host sync), so step / floor is the whole overhead.

    python -m bench.gpu_decode_floor --output gpu_floor.json          # on a CUDA machine
    python -m bench.gpu_decode_floor --shapes tiny --device cpu --steps 4 --batch-sizes 1 4
"""
import argparse
import json
import math
import statistics
import time
from contextlib import contextmanager

import torch

SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                       rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096),
}
# name -> {fraction of L (1.0 = full depth): share of rows}
MIXES = {
    "full": {1.0: 1.0},
    "all L/4": {0.25: 1.0},
    "all L/2": {0.5: 1.0},
    "all 3L/4": {0.75: 1.0},
    "50% L/2, 50% full": {0.5: 0.5, 1.0: 0.5},
    "25% each of L/4, L/2, 3L/4, full": {0.25: 0.25, 0.5: 0.25, 0.75: 0.25, 1.0: 0.25},
}
HEAD_FRACTIONS = (0.25, 0.5, 0.75)


def exit_layer(fraction: float, num_layers: int) -> int:
    return num_layers if fraction >= 1.0 else max(1, round(fraction * num_layers))


def build(shape: str, device: torch.device, dtype: torch.dtype):
    """(model, heads, tokenizer, config) with random weights; heads carry one epsilon per exit layer."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models

    from server.model.config import ModelConfig
    from server.model.exit_head import AdapterSpec
    from server.model.exit_heads import ExitHeadSet
    from server.model.llama import LlamaForCausalLM
    from server.model.tokenizer import Tokenizer

    config = ModelConfig(**SHAPES[shape], eos_token_id=[SHAPES[shape]["vocab_size"] - 1])
    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.eval()
    layers = sorted({exit_layer(f, config.num_hidden_layers) for f in HEAD_FRACTIONS})
    heads = ExitHeadSet.create(model, layers, AdapterSpec("norm"), {"name": shape, "fingerprint": "random"})
    entries = {epsilon_for(k): {"thresholds": {j: (0.0 if j == k else math.inf) for j in layers}} for k in layers}
    heads.set_calibration("margin", entries, default_epsilon=epsilon_for(layers[0]), synthetic=True)
    heads = heads.to(device).eval()
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(BackendTokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token_ids=config.eos_token_id)
    return model, heads, tokenizer, config


def epsilon_for(layer: int) -> float:
    """The synthetic epsilon label that means "always exit at `layer`"."""
    return layer / 1000


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def layer_weight_bytes(config, element: int) -> int:
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return (d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d) * element


def step_bytes(config, exit_layers: list[int], asked_layers: set[int], context_len: int, element: int,
               head_norm_element: int = 4) -> dict:
    """Bytes one decode step must move: rows leave at exit_layers (L = full depth), heads were asked at
    asked_layers, every row attends over context_len keys (itself included)."""
    num_layers, d, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    kv_token_layer = 2 * config.num_key_value_heads * config.head_dim * element  # one token's K+V at one layer
    lm_head = vocab * d * element
    weights = max(exit_layers) * layer_weight_bytes(config, element)
    weights += len(asked_layers) * (lm_head + d * head_norm_element)
    weights += (d * element + lm_head) if num_layers in exit_layers else 0
    exited = [k for k in exit_layers if k < num_layers]
    if exited:  # layers [min exit, L) fill K/V for exited rows: input norm + k and v projections
        fill = d * element + 2 * d * config.num_key_value_heads * config.head_dim * element
        weights += (num_layers - min(exited)) * fill
    kv_read = sum(exit_layers) * context_len * kv_token_layer
    kv_write = len(exit_layers) * num_layers * kv_token_layer
    embedding = len(exit_layers) * d * element
    return {"weights": weights, "kv_read": kv_read, "kv_write": kv_write, "embedding": embedding,
            "total": weights + kv_read + kv_write + embedding}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second moved (read + written) by a device-to-device copy; best of `repeats`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        with Timer(device) as timer:
            dst.copy_(src)
        best = min(best, timer.seconds)
    return 2 * nbytes / best


class Timer:
    """CUDA events on a GPU (device time between the two marks), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def rows_for(mix: dict[float, float], batch: int, num_layers: int) -> list[int] | None:
    """Per row, its exit layer; None when the mix cannot be split over `batch` rows exactly."""
    counts = {exit_layer(f, num_layers): share * batch for f, share in mix.items()}
    if any(abs(c - round(c)) > 1e-9 for c in counts.values()):
        return None
    return [k for k, c in counts.items() for _ in range(round(c))]


def run_mix(engine, rows: list[int], prompt_len: int, steps: int, device, element: int, config, rng) -> list[dict]:
    """Decode `steps` + 2 tokens for len(rows) sequences; per decode step after the first: time and floor bytes."""
    from server.engine.sampling_params import SamplingParams

    num_layers = config.num_hidden_layers
    for i, k in enumerate(rows):
        params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True, early_exit=k < num_layers,
                                exit_epsilon=epsilon_for(k) if k < num_layers else None)
        prompt = torch.randint(0, config.vocab_size - 1, (prompt_len,), generator=rng).tolist()
        engine.add_request(f"floor-{time.monotonic_ns()}-{i}", prompt, params)
    records, decode_index = [], 0
    while engine.has_unfinished_requests():
        with Timer(device) as timer:
            engine.step()
        stats = engine.last_step
        if stats.num_prompt_tokens or stats.num_generation_tokens != len(rows):
            continue
        decode_index += 1
        if decode_index == 1:  # the first decode step of a batch warms up its shapes
            continue
        context = prompt_len + decode_index  # the prompt, the first token, and one per earlier decode step
        moved = step_bytes(config, stats.exit_layers, {k for k, _ in stats.exit_margins}, context, element)
        records.append({"seconds": timer.seconds, "bytes": moved, "exit_layers": sorted(set(stats.exit_layers)),
                        "rows": len(stats.exit_layers)})
    return records


def measure_shape(shape: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine

    model, heads, tokenizer, config = build(shape, device, dtype)
    element = torch.empty((), dtype=dtype).element_size()
    max_batch = max(args.batch_sizes)
    max_len = args.prompt_len + args.steps + 8
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element
    kv_cache_memory = int(1.2 * max_batch * (max_len + 16) * kv_bytes)
    engine_config = EngineConfig(model=shape, heads=None, device=str(device), dtype=str(dtype).removeprefix("torch."),
                                 # every prompt of a batch in one prefill step, so all rows decode in lockstep
                                 max_num_seqs=max_batch, max_num_batched_tokens=max_batch * (args.prompt_len + 1),
                                 max_model_len=max_len, kv_cache_memory=kv_cache_memory)
    engine = LLMEngine(model, tokenizer, engine_config, heads)
    rng = torch.Generator().manual_seed(0)
    weights_gb = sum(p.numel() for p in model.parameters()) * element / 1e9
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    run_mix(engine, [config.num_hidden_layers], args.prompt_len, 2, device, element, config, rng)  # warm-up
    results = []
    for batch in args.batch_sizes:
        for name, mix in MIXES.items():
            rows = rows_for(mix, batch, config.num_hidden_layers)
            if rows is None or (batch == 1 and len(mix) > 1):
                continue
            records = run_mix(engine, rows, args.prompt_len, args.steps, device, element, config, rng)
            step_s = statistics.median(r["seconds"] for r in records)
            floor_bytes = statistics.median(r["bytes"]["total"] for r in records)
            results.append({
                "batch": batch, "mix": name, "exit_layers": sorted(set(rows)), "steps": len(records),
                "step_ms": 1e3 * step_s, "floor_ms": 1e3 * floor_bytes / bandwidth,
                "step_over_floor": step_s / (floor_bytes / bandwidth), "floor_mb": floor_bytes / 1e6,
                "weights_mb": statistics.median(r["bytes"]["weights"] for r in records) / 1e6,
                "kv_read_mb": statistics.median(r["bytes"]["kv_read"] for r in records) / 1e6,
                "achieved_gb_s": floor_bytes / step_s / 1e9, "decode_tok_s": batch / step_s,
                "per_step_ms": [(1e3 * r["seconds"], 1e3 * r["bytes"]["total"] / bandwidth) for r in records]})
            print(format_row(shape, results[-1]), flush=True)
    bandwidth_after = copy_bandwidth(device, args.copy_bytes)
    del engine, model, heads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"shape": shape, "config": SHAPES[shape], "weights_gb": weights_gb, "copy_gb_s": bandwidth / 1e9,
            "copy_gb_s_after": bandwidth_after / 1e9, "results": results}


def format_row(shape: str, r: dict) -> str:
    return (f"{shape:<14}{r['batch']:>4}  {r['mix']:<34}{r['step_ms']:>9.3f}{r['floor_ms']:>9.3f}"
            f"{r['step_over_floor']:>8.2f}{r['achieved_gb_s']:>9.0f}{r['decode_tok_s']:>10.0f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3-8b"], choices=list(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per (batch, mix)")
    parser.add_argument("--copy-bytes", type=int, default=None, help="copy size for the bandwidth (default 2 GiB "
                        "on CUDA, 256 MiB on CPU)")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    args.copy_bytes = args.copy_bytes or (2 << 30 if device.type == "cuda" else 256 << 20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, {args.dtype}, prompt {args.prompt_len} tokens, {args.steps} timed decode steps per row")
    print(f"{'shape':<14}{'B':>4}  {'exit mix':<34}{'step ms':>9}{'floor ms':>9}{'ratio':>8}{'GB/s':>9}{'tok/s':>10}")
    report = {"device": name, "dtype": args.dtype, "prompt_len": args.prompt_len, "steps": args.steps,
              "torch": torch.__version__, "shapes": []}
    for shape in args.shapes:
        report["shapes"].append(measure_shape(shape, args, device, dtype))
        s = report["shapes"][-1]
        print(f"{shape}: {s['weights_gb']:.2f} GB of weights, copy bandwidth {s['copy_gb_s']:.0f} GB/s "
              f"(after: {s['copy_gb_s_after']:.0f} GB/s)", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
