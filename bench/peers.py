"""Offramp against transformers.generate: one machine, one model, one prompt set, one run.

Runs (greedy, EOS ignored: every sequence generates exactly --max-tokens tokens):
  hf b1            transformers.generate, one prompt at a time (--batch1-prompts of them)
  hf bN            transformers.generate on --batch-size prompts at once, left-padded
  offramp full     LLMEngine with early exit off, one request at a time (b1) and N at once (bN)
  offramp eps=E    LLMEngine with early exit at each --epsilon, b1 and bN
Each round runs every configuration once, in the same order (A, B, C, A, B, C, ...), so drift in
a shared machine's load hits all alike; medians over --rounds rounds are reported, and ratios are
medians of the per-round ratios.
  output tok/s  generated tokens / wall time, prefill included
  decode tok/s  tokens after each sequence's first / the time from its first token to its last
  ms/token      mean decode step: how long a sequence waits for each next token
transformers runs Offramp's own weights, copied into transformers.LlamaForCausalLM.

    python -m bench.peers --prompts ../shared/data/vicuna_bench_question.jsonl --epsilon 0.95 --threads 2
"""
import argparse
import json
import os
import statistics
import time

import torch

from bench.prompts import chat_prompt_ids, read_prompts
from server.model.fetch import DEFAULT_MODEL


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


def configurations(args, hf, engine, prompts, pad_id):
    """(name, batch, callable) of every run, in the order each round runs them."""
    from server.engine.sampling_params import SamplingParams

    batch1, batched = prompts[:args.batch1_prompts], prompts[:args.batch_size]
    n = args.max_tokens

    def engine_run(early_exit, eps):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, early_exit=early_exit,
                                exit_epsilon=eps)
        return lambda ps: run_engine(engine, ps, params)

    offramp = [("offramp full", engine_run(False, None))]
    offramp += [(f"offramp eps={eps:g}", engine_run(True, eps)) for eps in args.epsilon or []]
    runs = []
    if hf is not None:
        runs.append(("hf", 1, lambda: one_at_a_time(lambda ps: run_hf(hf, ps, n, pad_id), batch1)))
    runs += [(name, 1, lambda f=f: one_at_a_time(f, batch1)) for name, f in offramp]
    if hf is not None:
        runs.append(("hf", len(batched), lambda: run_hf(hf, batched, n, pad_id)))
    runs += [(name, len(batched), lambda f=f: f(batched)) for name, f in offramp]
    return runs


def ratio(rounds_a: list[dict], rounds_b: list[dict], key: str) -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(rounds_a, rounds_b))


def benchmark(args) -> dict:
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine, load_heads
    from server.model.loader import load_model

    questions = read_prompts(args.prompts, max(args.batch_size, args.batch1_prompts))
    config = EngineConfig(model=args.model, heads=args.heads, device=args.device, dtype=args.dtype,
                          max_num_seqs=args.batch_size, max_num_batched_tokens=max(1024, args.batch_size))
    loaded = load_model(args.model, device=config.torch_device, dtype=config.torch_dtype)
    heads = load_heads(args.heads, loaded) if args.epsilon else None
    engine = LLMEngine(loaded.model, loaded.tokenizer, config, heads)
    prompts = chat_prompt_ids(loaded.tokenizer, questions)
    pad_id = loaded.tokenizer.eos_token_ids[0]
    hf = build_hf_model(loaded) if not args.skip_hf else None
    runs = configurations(args, hf, engine, prompts, pad_id)

    warm = argparse.Namespace(**{**vars(args), "max_tokens": 2})
    for _, _, run in configurations(warm, hf, engine, prompts[:2], pad_id):
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
    ratios = {}
    for batch in sorted({t["batch"] for t in table.values()}):
        full = results[f"offramp full b{batch}"]
        for key in results:
            if key.endswith(f" b{batch}") and key.startswith("offramp eps="):
                ratios[f"{key} / offramp full b{batch}"] = {
                    "decode_tok_s": ratio(results[key], full, "decode_tok_s"),
                    "output_tok_s": ratio(results[key], full, "output_tok_s")}
        for hf_key in ("hf b1", f"hf b{batch}") if hf is not None else ():
            ratios.setdefault(f"offramp full b{batch} / {hf_key}", {
                "decode_tok_s": ratio(full, results[hf_key], "decode_tok_s"),
                "output_tok_s": ratio(full, results[hf_key], "output_tok_s")})
    return {"model": loaded.name, "device": str(config.torch_device), "dtype": str(config.torch_dtype),
            "threads": torch.get_num_threads(), "heads": args.heads if heads is not None else None,
            "synthetic_heads": bool(heads is not None and (heads.meta.get("calibration") or {}).get("synthetic")),
            "max_tokens": args.max_tokens, "batch1_prompts": len(prompts[:args.batch1_prompts]),
            "batch_size": len(prompts[:args.batch_size]), "rounds": args.rounds, "load_average": load,
            "results": table, "ratios": ratios, "per_round": results}


def format_report(report: dict) -> str:
    lines = [f"{report['model']} on {report['device']} ({report['dtype']}, {report['threads']} threads), "
             f"{report['max_tokens']} tokens per sequence, medians of {report['rounds']} rounds, "
             f"load average {report['load_average'][0][0]:.2f} -> {report['load_average'][-1][0]:.2f}",
             f"{'run':<24}{'output tok/s':>13}{'decode tok/s':>13}{'ms/token':>10}{'exited':>8}{'saved':>7}"]
    for key, row in report["results"].items():
        exited = f"{row['exited_early_share']:.2f}" if "exited_early_share" in row else "-"
        saved = f"{row['compute_saved']:.2f}" if "compute_saved" in row else "-"
        lines.append(f"{key:<24}{row['output_tok_s']:>13.1f}{row['decode_tok_s']:>13.1f}{row['ms_per_token']:>10.2f}"
                     f"{exited:>8}{saved:>7}")
    for name, r in report["ratios"].items():
        lines.append(f"{name}: decode {r['decode_tok_s']:.2f}x, output {r['output_tok_s']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--heads", default="auto", help="exit-head folder, or auto (the shipped heads)")
    parser.add_argument("--prompts", required=True, help="JSONL of questions (turns[0], prompt or text per line)")
    parser.add_argument("--epsilon", type=float, nargs="*", default=[0.95], help="early-exit runs (none: skip)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch1-prompts", type=int, default=4, help="prompts of the one-at-a-time runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-hf", action="store_true", help="leave transformers out")
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
