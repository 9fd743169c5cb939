"""Engine throughput: concurrent requests through LLMEngine vs transformers.generate one at a time,
early exit on vs off, and the engine's own overhead per step.

All requests arrive at once and generate exactly --max-tokens tokens (EOS ignored), greedy.
- output tok/s: all generated tokens over the wall time from arrival to the last token (prefill included).
- decode tok/s: tokens of steps without prefill over those steps' time.
- GFLOP/token: the engine's per-token accounting (layers run, heads evaluated, KV fill, attention).
- overhead: share of a full-batch decode step spent outside model, exit-kernel and sampler calls
  (scheduling, metadata, early-exit bookkeeping, detokenisation, outputs).
Exit heads: --heads PATH (calibrated), or --heads synthetic: logit-lens heads at --synthetic-layers
with thresholds set, from the prompts' own margins, so that about --synthetic-exit-rate of tokens
would exit at each head; numbers with synthetic heads say so.

    python -m bench.engine_throughput --threads 2                      # CPU, 16 x 128
    python -m bench.engine_throughput --device cuda --batch-sizes 1 16 64 --baseline-requests 2
"""
import argparse
import json
import statistics
import time
from contextlib import contextmanager

import torch

from server.model.fetch import DEFAULT_MODEL

QUESTIONS = [
    "Write a short story about a lighthouse keeper.", "Explain how a rainbow forms.",
    "Give me three tips for learning a new language.", "What is the difference between a virus and a bacterium?",
    "Describe the water cycle for a ten-year-old.", "Write a poem about autumn leaves.",
    "How do I make a cup of green tea?", "Summarise the plot of Romeo and Juliet.",
    "Why do cats purr?", "List the planets of the solar system with one fact each.",
    "What are the benefits of regular exercise?", "Explain what a neural network is.",
    "Write a friendly email inviting a colleague to lunch.", "How does a bicycle stay upright?",
    "Describe a busy market in the morning.", "What should I pack for a weekend hike?",
]


def build_hf_model(loaded):
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**loaded.config.to_hf())).eval()
    model.load_state_dict(loaded.model.state_dict(), strict=False)
    model.generation_config.pad_token_id = loaded.tokenizer.eos_token_ids[0]
    return model.to(loaded.model.lm_head.weight.device, loaded.model.lm_head.weight.dtype)


@torch.inference_mode()
def hf_tokens_per_second(hf_model, prompts, max_tokens) -> float:
    device = next(hf_model.parameters()).device
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        start = time.perf_counter()
        out = hf_model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        _sync(device)
        seconds += time.perf_counter() - start
        tokens += out.shape[1] - ids.shape[1]
    return tokens / seconds


@torch.inference_mode()
def synthetic_heads(loaded, prompts, layers, exit_rate):
    """Logit-lens heads; thresholds = the (1 - exit_rate) quantile of each head's margin over the prompts."""
    from server.model.exit_head import AdapterSpec
    from server.model.exit_heads import ExitHeadSet

    model = loaded.model
    base = {"name": loaded.name, "fingerprint": loaded.fingerprint}
    heads = ExitHeadSet.create(model, layers, AdapterSpec("norm"), base)
    heads = heads.to(model.lm_head.weight.device)
    margins = {k: [] for k in layers}
    for prompt in prompts:
        _, states = model(torch.tensor([prompt], device=model.lm_head.weight.device), output_hidden_states=True)
        for k in layers:
            probs = heads.head(k).logits(states[k][0], model.lm_head.weight).float().softmax(-1).topk(2).values
            margins[k].append((probs[:, 0] - probs[:, 1]).cpu())
    thresholds = {k: float(torch.quantile(torch.cat(m), 1 - exit_rate)) for k, m in margins.items()}
    heads.set_calibration("margin", {0.9: {"thresholds": thresholds}}, default_epsilon=0.9, synthetic=True)
    return heads, thresholds


@contextmanager
def timed_calls(engine, totals: dict):
    """Accumulate the wall time of model, exit-kernel and sampler calls into totals["model"]."""
    from server.engine import early_exit, model_runner

    device = engine.model.lm_head.weight.device
    patches = [(engine.model, name) for name in ("embed", "run_layers", "layer_kv", "final_logits")]
    patches += [(early_exit, "exit_head"), (model_runner, "sample")]
    originals = [getattr(owner, name) for owner, name in patches]

    def wrap(function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            _sync(device)
            totals["model"] += time.perf_counter() - start
            return result
        return timed

    for (owner, name), original in zip(patches, originals):
        setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        for (owner, name), original in zip(patches, originals):
            if owner is engine.model:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def run_engine(engine, prompts, params, measure_overhead=False) -> dict:
    totals = {"model": 0.0}
    steps, overheads = [], []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    outputs = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        before = totals["model"]
        if measure_overhead:
            with timed_calls(engine, totals):
                results = engine.step()
        else:
            results = engine.step()
        stats = engine.last_step
        steps.append(stats)
        if measure_overhead and stats.num_prompt_tokens == 0 and stats.num_generation_tokens == len(prompts):
            overheads.append(1 - (totals["model"] - before) / stats.step_seconds)
        for output in results:
            if output.finished:
                outputs[output.request_id] = output
    wall = time.perf_counter() - start
    decode = [s for s in steps if s.num_prompt_tokens == 0]
    generated = sum(len(o.outputs[0].token_ids) for o in outputs.values())
    decode_tokens = sum(len(o.outputs[0].token_ids) - 1 for o in outputs.values())
    exit_layers = [layer for o in outputs.values() for layer in o.outputs[0].exit_layers[1:]]
    return {
        "output_tok_s": generated / wall,
        "decode_tok_s": sum(s.num_generation_tokens for s in decode) / sum(s.step_seconds for s in decode),
        "gflop_per_token": sum(o.decode_flops for o in outputs.values()) / decode_tokens / 1e9,
        "gflop_per_token_full_depth": sum(o.decode_flops_full_depth for o in outputs.values()) / decode_tokens / 1e9,
        "exited_early": sum(layer < engine.num_layers for layer in exit_layers) / len(exit_layers),
        "mean_exit_layer": statistics.mean(exit_layers),
        "overhead_share": statistics.median(overheads) if overheads else None,
        "step_ms_full_batch": 1e3 * statistics.median([s.step_seconds for s in decode
                                                       if s.num_generation_tokens == len(prompts)] or [0.0]),
    }


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine, load_heads
    from server.engine.sampling_params import SamplingParams
    from server.model.loader import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--heads", default="synthetic", help="head-set folder, auto, or synthetic")
    parser.add_argument("--synthetic-layers", type=int, nargs="+", default=[16])
    parser.add_argument("--synthetic-exit-rate", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--baseline-requests", type=int, default=4,
                        help="requests run through transformers.generate one at a time (0 = skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats; medians are reported")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = EngineConfig(model=args.model, heads=None, device=args.device, dtype=args.dtype,
                          max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=max(1024, max(args.batch_sizes)))
    loaded = load_model(args.model, device=config.torch_device, dtype=config.torch_dtype)
    tokenizer = loaded.tokenizer
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts = [tokenizer.encode(text) for text in chats]
    if args.heads == "synthetic":
        heads, thresholds = synthetic_heads(loaded, prompts, args.synthetic_layers, args.synthetic_exit_rate)
        heads_label = f"synthetic logit-lens heads at {args.synthetic_layers}, margin thresholds {thresholds}"
    else:
        heads = load_heads(args.heads, loaded)
        heads_label = f"{args.heads} (policy {heads.policy}, layers {heads.layers})"
    engine = LLMEngine(loaded.model, tokenizer, config, heads)
    results = {"model": loaded.name, "device": str(config.torch_device), "dtype": str(config.torch_dtype),
               "threads": args.threads, "max_tokens": args.max_tokens, "heads": heads_label}

    run_engine(engine, prompts[:4], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    hf = build_hf_model(loaded) if args.baseline_requests else None
    if hf is not None:
        hf_tokens_per_second(hf, prompts[:1], 8)  # warm-up
    runs, hf_rates = {}, []
    for _ in range(args.repeats):  # variants alternate, so a noisy neighbour hurts them alike
        for batch in args.batch_sizes:
            batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
            for early_exit in (False, True):
                params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True,
                                        early_exit=early_exit)
                run = run_engine(engine, batch_prompts, params)
                short = SamplingParams(**{**vars(params), "max_tokens": min(16, args.max_tokens)})
                timed = run_engine(engine, batch_prompts, short, measure_overhead=True)
                run["overhead_share"] = timed["overhead_share"]
                key = f"batch{batch}-exit-{'on' if early_exit else 'off'}"
                runs.setdefault(key, []).append(run)
                print(key, json.dumps(run), flush=True)
        if hf is not None:
            hf_rates.append(hf_tokens_per_second(hf, prompts[:args.baseline_requests], args.max_tokens))
            print("hf_generate_tok_s", hf_rates[-1], flush=True)
    results["runs"] = {key: {name: _median([run[name] for run in repeats]) for name in repeats[0]}
                       for key, repeats in runs.items()}
    if hf_rates:
        results["hf_generate_tok_s"] = statistics.median(hf_rates)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def print_table(results):
    print(f"\n{results['model']} on {results['device']} ({results['dtype']}, {results['threads']} threads), "
          f"{results['max_tokens']} new tokens per request; heads: {results['heads']}")
    hf = results.get("hf_generate_tok_s")
    print(f"{'run':<22}{'output tok/s':>13}{'decode tok/s':>13}{'vs HF':>7}{'GFLOP/tok':>10}"
          f"{'exited':>8}{'step ms':>9}{'overhead':>9}")
    for key, run in results["runs"].items():
        ratio = f"{run['output_tok_s'] / hf:.1f}x" if hf else "-"
        overhead = f"{100 * run['overhead_share']:.1f}%" if run["overhead_share"] is not None else "-"
        print(f"{key:<22}{run['output_tok_s']:>13.1f}{run['decode_tok_s']:>13.1f}{ratio:>7}"
              f"{run['gflop_per_token']:>10.3f}{100 * run['exited_early']:>7.0f}%{run['step_ms_full_batch']:>9.1f}"
              f"{overhead:>9}")
    if hf:
        print(f"{'transformers.generate':<22}{hf:>13.1f}  (one request at a time)")


if __name__ == "__main__":
    main()
