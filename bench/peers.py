"""Offramp against transformers.generate and llama.cpp: one machine, one model, one prompt set, one run.

Runs (greedy, EOS ignored: every sequence generates exactly --max-tokens tokens):
  hf b1            transformers.generate, one prompt at a time (--batch1-prompts of them)
  hf bN            transformers.generate on --batch-size prompts at once, left-padded
  llama.cpp b1     llama-cpp-python (when installed and the model is a GGUF): the same token ids, the
                   same threads, its low-level loop (eval, argmax of the last logits), one prompt at a time
  offramp full     LLMEngine with early exit off, one request at a time (b1) and N at once (bN)
  offramp eps=E    LLMEngine with early exit at each --epsilon, b1 and bN
  offramp Q ...    the same with weights quantized as Q, for each of --quantization other than none
Each round runs every configuration once, in the same order (A, B, C, A, B, C, ...), so drift in
a shared machine's load hits all alike; medians over --rounds rounds are reported, and ratios are
medians of the per-round ratios.
  output tok/s  generated tokens / wall time, prefill included
  decode tok/s  tokens after each sequence's first / the time from its first token to its last
  ms/token      mean decode step: how long a sequence waits for each next token
transformers runs Offramp's own float weights, copied into transformers.LlamaForCausalLM. Resident
memory (bench/memory.py) is measured for each Offramp quantization and for llama.cpp in a fresh process
each: after load, after start, and under the bN requests (llama.cpp: under its b1 runs).

    python -m bench.peers --prompts ../shared/data/vicuna_bench_question.jsonl --epsilon 0.95 --threads 1 \
        --quantization none,int4
"""
import argparse
import importlib
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench import memory
from bench.prompts import chat_prompt_ids, read_prompts
from server.model.fetch import DEFAULT_MODEL
from server.model.quantize import QUANTIZATIONS


def build_hf_model(loaded):
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**loaded.config.to_hf())).eval()
    model.load_state_dict(loaded.model.state_dict(), strict=False)
    model.generation_config.pad_token_id = loaded.tokenizer.eos_token_ids[0]
    return model.to(loaded.model.lm_head.weight.device, loaded.model.lm_head.weight.dtype)


class StepTimer:
    """A transformers logits processor that only notes when each new token's logits are ready."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> dict:
    """One transformers.generate call over `prompts` (left-padded when several)."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    timer = StepTimer(device)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False, logits_processor=LogitsProcessorList([timer]))
    wall = time.perf_counter() - start
    generated = out.shape[1] - width
    return {"wall_s": wall, "tokens": generated * len(prompts), "decode_s": timer.times[-1] - timer.times[0],
            "decode_tokens": (generated - 1) * len(prompts), "decode_steps": generated - 1}


def run_engine(engine, prompts: list[list[int]], params) -> dict:
    """All prompts arrive at once; decode time is the sum of steps without prefill."""
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"peers-{time.monotonic_ns()}-{i}", prompt, params)
    finished = []
    decode_s, decode_tokens, decode_steps = 0.0, 0, 0
    while engine.has_unfinished_requests():
        finished += [out for out in engine.step() if out.finished]
        step = engine.last_step
        if step.num_prompt_tokens == 0 and step.num_generation_tokens:
            decode_s += step.step_seconds
            decode_tokens += step.num_generation_tokens
            decode_steps += 1
    wall = time.perf_counter() - start
    layers = [k for out in finished for k in out.outputs[0].exit_layers[1:]]  # decode tokens
    full = sum(out.decode_flops_full_depth for out in finished)
    return {"wall_s": wall, "tokens": sum(len(out.outputs[0].token_ids) for out in finished),
            "decode_s": decode_s, "decode_tokens": decode_tokens, "decode_steps": decode_steps,
            "exited_early_share": sum(k < engine.num_layers for k in layers) / len(layers) if layers else 0.0,
            "compute_saved": 1 - sum(out.decode_flops for out in finished) / full if full else 0.0}


def open_llama_cpp(llama_cpp, path: str | Path, threads: int, n_ctx: int):
    """A llama_cpp.Llama on `path` with `threads` for prefill and decode, logits of the last token only."""
    return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                           logits_all=False, verbose=False)


def last_logits(llm) -> np.ndarray:
    """[V] logits of the last token the context evaluated (with logits_all off llama-cpp-python keeps no
    copy in llm.scores, so they are read from the context)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def run_llama_cpp(llm, prompts: list[list[int]], max_tokens: int) -> dict:
    """One prompt after another: a fresh context state, the prompt's ids evaluated in one call, then one
    token at a time, greedy, EOS ignored. decode_s runs from the first token's logits to the last's."""
    wall_s = decode_s = 0.0
    token_ids = []
    for prompt in prompts:
        start = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        generated = [int(last_logits(llm).argmax())]
        first = time.perf_counter()
        while len(generated) < max_tokens:
            llm.eval(generated[-1:])
            generated.append(int(last_logits(llm).argmax()))
        end = time.perf_counter()
        wall_s, decode_s = wall_s + end - start, decode_s + end - first
        token_ids.append(generated)
    steps = sum(len(t) - 1 for t in token_ids)
    return {"wall_s": wall_s, "tokens": sum(map(len, token_ids)), "decode_s": decode_s, "decode_tokens": steps,
            "decode_steps": steps, "token_ids": token_ids}


def llama_cpp_prompt_ids(path: str | Path, questions: list[str]) -> list[list[int]]:
    """The chat prompts as Offramp's tokenizer (read from the GGUF itself) encodes them: both sides are fed
    the same ids, whatever llama.cpp's own template or tokenizer would do."""
    from server.model.gguf_reader import GGUFFile, read_config, read_tokenizer

    f = GGUFFile(Path(path))
    return chat_prompt_ids(read_tokenizer(f, read_config(f)), questions)


def find_llama_cpp(args, path: Path):
    """(the llama_cpp module, None), or (None, why llama.cpp is left out)."""
    if args.skip_llama_cpp:
        return None, "--skip-llama-cpp"
    if path.suffix != ".gguf":
        return None, f"the model is not a GGUF file ({path.name}); llama.cpp reads GGUF only"
    if args.device != "cpu":
        return None, "compared on the CPU only"
    try:
        return importlib.import_module("llama_cpp"), None
    except ImportError:
        return None, "llama_cpp (llama-cpp-python) is not installed"


def one_at_a_time(run, prompts: list[list[int]]) -> dict:
    """Batch 1: `run` on each prompt in turn, figures added up."""
    parts = [run([p]) for p in prompts]
    total = {k: sum(part[k] for part in parts) for k in ("wall_s", "tokens", "decode_s", "decode_tokens",
                                                         "decode_steps")}
    for key in ("exited_early_share", "compute_saved"):
        if key in parts[0]:
            total[key] = statistics.fmean(part[key] for part in parts)
    return total


def rates(m: dict) -> dict:
    return m | {"output_tok_s": m["tokens"] / m["wall_s"], "decode_tok_s": m["decode_tokens"] / m["decode_s"],
                "ms_per_token": 1e3 * m["decode_s"] / m["decode_steps"]}


def configurations(args, hf, engines: dict, llm, prompts, pad_id):
    """(name, batch, callable) of every run, in the order each round runs them. engines: label ("offramp",
    "offramp int4") -> LLMEngine; llm: a llama_cpp.Llama or None."""
    from server.engine.sampling_params import SamplingParams

    batch1, batched = prompts[:args.batch1_prompts], prompts[:args.batch_size]
    n = args.max_tokens

    def engine_run(engine, early_exit, eps):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, early_exit=early_exit,
                                exit_epsilon=eps)
        return lambda ps: run_engine(engine, ps, params)

    offramp = []
    for label, engine in engines.items():
        offramp.append((f"{label} full", engine_run(engine, False, None)))
        offramp += [(f"{label} eps={eps:g}", engine_run(engine, True, eps)) for eps in args.epsilon or []]
    runs = []
    if hf is not None:
        runs.append(("hf", 1, lambda: one_at_a_time(lambda ps: run_hf(hf, ps, n, pad_id), batch1)))
    if llm is not None:
        runs.append(("llama.cpp", 1, lambda: one_at_a_time(lambda ps: run_llama_cpp(llm, ps, n), batch1)))
    runs += [(name, 1, lambda f=f: one_at_a_time(f, batch1)) for name, f in offramp]
    if hf is not None:
        runs.append(("hf", len(batched), lambda: run_hf(hf, batched, n, pad_id)))
    runs += [(name, len(batched), lambda f=f: f(batched)) for name, f in offramp]
    return runs


def ratio(rounds_a: list[dict], rounds_b: list[dict], key: str) -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(rounds_a, rounds_b))


def ratios_of(results: dict[str, list[dict]], labels: list[str]) -> dict:
    """At each batch size: each early-exit run / its own full-depth run; each quantization at full depth /
    float at full depth; and Offramp's runs / the peers' (transformers at b1 and bN: full depth only;
    llama.cpp, which runs b1 only: every Offramp run)."""
    pairs = []
    for batch in sorted({int(key.split(" b")[-1]) for key in results}):
        fulls = [f"{label} full b{batch}" for label in labels]
        exits = [key for label in labels for key in results
                 if key.startswith(f"{label} eps=") and key.endswith(f" b{batch}")]
        pairs += [(key, key.split(" eps=")[0] + f" full b{batch}") for key in exits]
        if "offramp" in labels:
            pairs += [(full, f"offramp full b{batch}") for full in fulls if full != f"offramp full b{batch}"]
        pairs += [(full, peer) for peer in ("hf b1", f"hf b{batch}") if peer in results for full in fulls]
        if "llama.cpp b1" in results:
            pairs += [(key, "llama.cpp b1") for key in fulls + exits]
    return {f"{a} / {b}": {stat: ratio(results[a], results[b], stat) for stat in ("decode_tok_s", "output_tok_s")}
            for a, b in dict.fromkeys(pairs)}


def measure_memory(args, labels: dict[str, str], gguf: Path | None) -> dict:
    """Resident memory of each configuration, each in a fresh process (bench/memory.py)."""
    absolute = lambda spec: str(Path(spec).resolve()) if Path(spec).exists() else spec  # it runs in the repo
    common = ["--prompts", absolute(args.prompts), "--max-tokens", str(args.max_tokens), "--threads",
              str(torch.get_num_threads())]
    report = {}
    for label, quantization in labels.items():
        report[label] = memory.measure(common + [
            "--model", absolute(args.model), "--quantization", quantization, "--device", args.device,
            "--dtype", args.dtype, "--heads", args.heads if args.epsilon else "none",
            "--batch-size", str(args.batch_size)])
    if gguf is not None:
        report["llama.cpp"] = memory.measure(common + ["--llama-cpp", str(gguf.resolve()), "--batch-size",
                                                       str(args.batch1_prompts)])
    return report


def benchmark(args) -> dict:
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine, load_heads
    from server.model.loader import load_model

    questions = read_prompts(args.prompts, max(args.batch_size, args.batch1_prompts))
    engines, loaded = {}, {}
    for quantization in args.quantization:
        config = EngineConfig(model=args.model, heads=args.heads, device=args.device, dtype=args.dtype,
                              quantization=quantization, max_num_seqs=args.batch_size,
                              max_num_batched_tokens=max(1024, args.batch_size))
        label = "offramp" if quantization == "none" else f"offramp {quantization}"
        loaded[label] = load_model(args.model, device=config.torch_device, dtype=config.torch_dtype,
                                   quantization=quantization)
        heads = load_heads(args.heads, loaded[label]) if args.epsilon else None
        engines[label] = LLMEngine(loaded[label].model, loaded[label].tokenizer, config, heads)
    first = next(iter(loaded.values()))
    prompts = chat_prompt_ids(first.tokenizer, questions)
    pad_id = first.tokenizer.eos_token_ids[0]
    hf = None
    if not args.skip_hf:  # transformers runs the float weights, copied: a float load made for it goes after
        hf = build_hf_model(loaded.get("offramp") or load_model(args.model, device=config.torch_device,
                                                                dtype=config.torch_dtype))
    llama_cpp, llama_cpp_missing = find_llama_cpp(args, first.path)
    llm = None
    if llama_cpp is not None:
        llm = open_llama_cpp(llama_cpp, first.path, torch.get_num_threads(),
                             max(map(len, prompts)) + args.max_tokens + 1)
    labels = {label: q for label, q in zip(engines, args.quantization)}
    rss = {} if args.skip_memory else measure_memory(args, labels, first.path if llm is not None else None)
    runs = configurations(args, hf, engines, llm, prompts, pad_id)

    warm = argparse.Namespace(**{**vars(args), "max_tokens": 2})
    for _, _, run in configurations(warm, hf, engines, llm, prompts[:2], pad_id):
        run()
    results: dict[str, list[dict]] = {f"{name} b{batch}": [] for name, batch, _ in runs}
    load = [os.getloadavg()]
    for r in range(args.rounds):
        for name, batch, run in runs:
            results[f"{name} b{batch}"].append(rates(run()))
            print(f"round {r + 1}/{args.rounds} {name} b{batch}: "
                  f"{results[f'{name} b{batch}'][-1]['decode_tok_s']:.1f} decode tok/s", flush=True)
        load.append(os.getloadavg())
    table = {}
    for key, rounds in results.items():
        table[key] = {stat: statistics.median(r[stat] for r in rounds)
                      for stat in ("output_tok_s", "decode_tok_s", "ms_per_token")}
        table[key]["batch"] = int(key.split(" b")[-1])
        table[key] |= {k: statistics.median(r[k] for r in rounds) for k in ("exited_early_share", "compute_saved")
                       if k in rounds[0]}
        table[key]["tokens_per_round"] = rounds[0]["tokens"]
    heads = [engine.heads for engine in engines.values() if engine.heads is not None]
    return {"model": first.name, "device": str(config.torch_device), "dtype": str(config.torch_dtype),
            "threads": torch.get_num_threads(), "quantizations": list(args.quantization),
            "heads": args.heads if heads else None,
            "synthetic_heads": any(bool((h.meta.get("calibration") or {}).get("synthetic")) for h in heads),
            "llama_cpp": {"version": getattr(llama_cpp, "__version__", None), "path": str(first.path)}
            if llm is not None else {"skipped": llama_cpp_missing},
            "max_tokens": args.max_tokens, "batch1_prompts": len(prompts[:args.batch1_prompts]),
            "batch_size": len(prompts[:args.batch_size]), "rounds": args.rounds, "load_average": load,
            "memory": rss, "results": table, "ratios": ratios_of(results, list(engines)), "per_round": results}


def format_report(report: dict) -> str:
    lines = [f"{report['model']} on {report['device']} ({report['dtype']}, {report['threads']} threads), "
             f"{report['max_tokens']} tokens per sequence, medians of {report['rounds']} rounds, "
             f"load average {report['load_average'][0][0]:.2f} -> {report['load_average'][-1][0]:.2f}"]
    if "skipped" in report["llama_cpp"]:
        lines.append(f"llama.cpp left out: {report['llama_cpp']['skipped']}")
    else:
        lines.append(f"llama.cpp: llama-cpp-python {report['llama_cpp']['version']} on {report['llama_cpp']['path']}")
    width = max([24] + [len(key) + 2 for key in report["results"]])
    lines.append(f"{'run':<{width}}{'output tok/s':>13}{'decode tok/s':>13}{'ms/token':>10}{'exited':>8}{'saved':>7}")
    for key, row in report["results"].items():
        exited = f"{row['exited_early_share']:.2f}" if "exited_early_share" in row else "-"
        saved = f"{row['compute_saved']:.2f}" if "compute_saved" in row else "-"
        lines.append(f"{key:<{width}}{row['output_tok_s']:>13.1f}{row['decode_tok_s']:>13.1f}"
                     f"{row['ms_per_token']:>10.2f}{exited:>8}{saved:>7}")
    for name, r in report["ratios"].items():
        lines.append(f"{name}: decode {r['decode_tok_s']:.2f}x, output {r['output_tok_s']:.2f}x")
    if report["memory"]:
        lines.append(f"resident memory, MB, a fresh process each ({report['batch_size']} requests under load):")
        lines.append(f"{'':<{width}}{'after load':>11}{'after start':>12}{'under load':>11}{'peak':>8}")
        for label, m in report["memory"].items():
            if "error" in m:
                lines.append(f"{label:<{width}}not measured: {m['error']}")
            else:
                lines.append(f"{label:<{width}}{m['rss_after_load_mb']:>11.0f}{m['rss_after_start_mb']:>12.0f}"
                             f"{m['rss_under_load_mb']:>11.0f}{m['peak_rss_mb']:>8.0f}")
    return "\n".join(lines)


def quantizations(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUANTIZATIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(QUANTIZATIONS)}")
    return list(dict.fromkeys(names))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--heads", default="auto", help="exit-head folder, or auto (the shipped heads)")
    parser.add_argument("--prompts", required=True, help="JSONL of questions (turns[0], prompt or text per line)")
    parser.add_argument("--epsilon", type=float, nargs="*", default=[0.95], help="early-exit runs (none: skip)")
    parser.add_argument("--quantization", type=quantizations, default=["none"],
                        help="Offramp's weights, one configuration each: e.g. none,int4")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch1-prompts", type=int, default=4, help="prompts of the one-at-a-time runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch and of llama.cpp")
    parser.add_argument("--skip-hf", action="store_true", help="leave transformers out")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="leave llama.cpp out even if installed")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure resident memory")
    parser.add_argument("--output", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = benchmark(args)
    print(format_report(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
