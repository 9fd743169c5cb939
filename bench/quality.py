"""`offramp bench quality`: how often early exit emits what the full model would, on its own outputs.

For each epsilon: greedy generation through the engine with early exit (all prompts in one batch),
then the full model runs teacher-forced over prompt + that output. A token agrees when it is the
full model's argmax given the same prefix: on-policy agreement, the quantity epsilon promises.
Per epsilon also: the position of the first token that differs from the greedy full-depth
generation, the share of generated tokens per exit layer, and compute saved (the engine's own FLOP
accounting: 1 - decode FLOPs / the same tokens at full depth). The full-depth generation gets the
same treatment as the reference point (agreement 1 up to numerics, nothing saved).
Writes the report as JSON and a plot of agreement against compute saved, one point per epsilon.
"""
import json
import statistics
import time
from collections import Counter

import torch

from bench.prompts import chat_prompt_ids, read_prompts


@torch.inference_mode()
def teacher_forced_argmax(model, prompts: list[list[int]], outputs: list[list[int]],
                          batch_size: int = 4) -> list[list[int]]:
    """Per sequence, the full model's argmax at each generated position given prompt + output[:i]."""
    device = model.lm_head.weight.device
    choices = []
    for first in range(0, len(prompts), batch_size):
        rows = [p + o[:-1] for p, o in zip(prompts[first:first + batch_size], outputs[first:first + batch_size])]
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):  # right padding
            input_ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
        logits = model(input_ids.to(device), attention_mask=mask.to(device))  # [B, T, V]
        for b, (prompt, output) in enumerate(zip(prompts[first:], outputs[first:first + len(rows)])):
            start = len(prompt) - 1  # the logits at the prompt's last token choose output[0]
            choices.append(logits[b, start:start + len(output)].argmax(-1).tolist())
    return choices


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """Index of the first token that differs (a length mismatch counts at the shorter end); None if equal."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def score(label: str, epsilon: float | None, results, argmax: list[list[int]], num_layers: int,
          reference: list[list[int]] | None) -> dict:
    """The figures of one generation run; `results` are the engine's RequestOutputs in prompt order."""
    tokens = [r.outputs[0].token_ids for r in results]
    # a token the head after the last layer let go counts as exited (at layer L, without the LM head)
    layers = [[-1 if skip and k == num_layers else k for k, skip in zip(r.outputs[0].exit_layers, r.outputs[0].lm_head_skipped
                                                        or [False] * len(r.outputs[0].exit_layers))]
              for r in results]
    agree = [[t == a for t, a in zip(ts, am)] for ts, am in zip(tokens, argmax)]
    flat = [(ok, k) for oks, ks in zip(agree, layers) for ok, k in zip(oks, ks)]
    exited = [ok for ok, k in flat if k < num_layers]
    deep = [ok for ok, k in flat if k == num_layers]
    flat = [(ok, num_layers if k == -1 else k) for ok, k in flat]
    counts = Counter(k for _, k in flat)
    full = sum(r.decode_flops_full_depth for r in results)
    report = {
        "label": label, "epsilon": epsilon, "num_tokens": len(flat),
        "agreement": sum(ok for ok, _ in flat) / len(flat),
        "agreement_exited": sum(exited) / len(exited) if exited else None,
        "agreement_full_depth_tokens": sum(deep) / len(deep) if deep else None,
        "exited_early_share": len(exited) / len(flat),
        "exit_layer_shares": {str(k): n / len(flat) for k, n in sorted(counts.items())},
        "compute_saved": 1 - sum(r.decode_flops for r in results) / full if full else 0.0,
        "meets_epsilon": None if epsilon is None else sum(ok for ok, _ in flat) / len(flat) >= epsilon,
    }
    if reference is not None:
        divergence = [first_divergence(t, ref) for t, ref in zip(tokens, reference)]
        positions = [d if d is not None else len(t) for d, t in zip(divergence, tokens)]
        report["first_divergence"] = {
            "median": statistics.median(positions), "mean": statistics.fmean(positions),
            "identical_share": sum(d is None for d in divergence) / len(divergence), "per_prompt": divergence}
    report["sequences"] = [{"token_ids": t, "exit_layers": k, "full_model_argmax": a}
                           for t, k, a in zip(tokens, layers, argmax)]
    return report


def evaluate(engine, prompts: list[list[int]], epsilons: list[float], max_tokens: int,
             ignore_eos: bool = False, batch_size: int = 4) -> dict:
    """Full depth first (the reference), then each epsilon; every run greedy, all prompts in one batch."""
    from server.engine.sampling_params import SamplingParams

    model, num_layers = engine.model, engine.num_layers

    def run(label, early_exit, epsilon, reference):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos,
                                early_exit=early_exit, exit_epsilon=epsilon)
        start = time.perf_counter()
        results = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        argmax = teacher_forced_argmax(model, prompts, [r.outputs[0].token_ids for r in results], batch_size)
        return score(label, epsilon, results, argmax, num_layers, reference) | {"generate_seconds": seconds}

    full = run("full_depth", False, None, None)
    reference = [s["token_ids"] for s in full["sequences"]]
    return {"full_depth": full, "epsilons": [run(f"eps={eps:g}", True, eps, reference) for eps in epsilons]}


def plot(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, full = sorted(report["epsilons"], key=lambda p: p["compute_saved"]), report["full_depth"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot([p["compute_saved"] for p in points], [p["agreement"] for p in points], "o-", label="early exit")
    ax.plot([p["compute_saved"] for p in points], [p["epsilon"] for p in points], "_", color="tab:red",
            markersize=14, mew=2, label="target (ε)")
    for p in points:
        ax.annotate(f"ε={p['epsilon']:g}", (p["compute_saved"], p["agreement"]), textcoords="offset points",
                    xytext=(6, -12))
    ax.plot([full["compute_saved"]], [full["agreement"]], "s", color="black", label="full depth")
    ax.set_xlabel("compute saved (share of decode FLOPs)")
    ax.set_ylabel("on-policy token agreement")
    synthetic = " (synthetic thresholds, ε only a label)" if report.get("synthetic_heads") else ""
    ax.set_title(f"{report['model']}: {report['num_prompts']} prompts × {report['max_tokens']} tokens{synthetic}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_report(report: dict) -> str:
    lines = [f"{report['model']} with heads {report['heads']} on {report['device']}: {report['num_prompts']} prompts, "
             f"up to {report['max_tokens']} tokens, greedy",
             f"{'run':<12}{'tokens':>8}{'agreement':>11}{'on exited':>11}{'exited':>8}{'saved':>8}"
             f"{'1st diff':>10}{'same':>7}{'>= eps':>8}"]
    for r in [report["full_depth"], *report["epsilons"]]:
        diverge = r.get("first_divergence")
        on_exited = f"{r['agreement_exited']:.3f}" if r["agreement_exited"] is not None else "-"
        meets = "-" if r["meets_epsilon"] is None else ("yes" if r["meets_epsilon"] else "NO")
        median = f"{diverge['median']:.1f}" if diverge else "-"
        same = f"{diverge['identical_share']:.2f}" if diverge else "-"
        lines.append(f"{r['label']:<12}{r['num_tokens']:>8}{r['agreement']:>11.3f}{on_exited:>11}"
                     f"{r['exited_early_share']:>8.3f}{r['compute_saved']:>8.3f}{median:>10}{same:>7}{meets:>8}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    from server.model.fetch import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--heads", default="auto", help="exit-head folder; auto = the heads shipped for the model")
    p.add_argument("--prompts", required=True, help="JSONL of questions (turns[0], prompt or text per line)")
    p.add_argument("--num-prompts", type=int, default=None, help="default: the whole file")
    p.add_argument("--epsilon", type=float, nargs="+", default=None, help="default: every calibrated epsilon")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", default="quality.json", help="the report, JSON")
    p.add_argument("--plot", default=None, help="the plot, PNG (default: --output with .png)")


def run(args) -> int:
    from server.errors import UsageError
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine, load_heads
    from server.model.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    questions = read_prompts(args.prompts, args.num_prompts)
    config = EngineConfig(model=args.model, heads=args.heads, device=args.device, dtype=args.dtype,
                          max_num_seqs=len(questions), max_num_batched_tokens=max(1024, len(questions)),
                          gate_whole_batch=False)  # each sequence decides as it would alone, batch-invariant
    loaded = load_model(args.model, device=config.torch_device, dtype=config.torch_dtype)
    heads = load_heads(args.heads, loaded)
    if heads is None:
        raise UsageError(f"no exit heads for {loaded.name}: give --heads DIR")
    epsilons = args.epsilon or heads.epsilons()
    unknown = [e for e in epsilons if not any(abs(e - c) < 1e-9 for c in heads.epsilons())]
    if unknown:
        raise UsageError(f"epsilon {unknown[0]:g} is not calibrated; available: "
                         f"{', '.join(f'{e:g}' for e in heads.epsilons())}")
    engine = LLMEngine(loaded.model, loaded.tokenizer, config, heads)
    prompts = chat_prompt_ids(loaded.tokenizer, questions)
    synthetic = bool((heads.meta.get("calibration") or {}).get("synthetic"))
    report = {"model": loaded.name, "heads": args.heads, "synthetic_heads": synthetic,
              "device": str(config.torch_device), "dtype": str(config.torch_dtype).removeprefix("torch."),
              "num_prompts": len(prompts), "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
              "prompts": args.prompts}
    report |= evaluate(engine, prompts, epsilons, args.max_tokens, args.ignore_eos)
    print(format_report(report))
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    plot_path = args.plot or str(args.output).removesuffix(".json") + ".png"
    plot(report, plot_path)
    print(f"wrote {args.output} and {plot_path}")
    return 0
