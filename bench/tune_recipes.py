"""Depth-tuning recipes side by side, every one judged against the ORIGINAL model.

    python -m bench.tune_recipes --model smollm2-135m --output recipes.json \
        frozen=heads:calibration/heads/smollm2-135m asym07=tune:TUNED_DIR ...

Each recipe is NAME=heads:DIR (a head set on the original model) or NAME=tune:DIR (a folder
written by `offramp tune`: its delta is merged, its heads used). Greedy replies of the original
model to the first --calib-prompts + --test-prompts prompts of calibration/prompts/calib.txt
(never used for fitting or tuning) are split in two: per recipe and epsilon, thresholds are
calibrated on the first part (sequentially, plain margin plan, every head on; and the
cost-aware subset) and measured on the second: exit share per layer, agreement of exited tokens
with the original's top-1, compute saved with every head evaluation and KV fill counted. Then
greedy early-exit generation through the engine on --on-policy-prompts of the test part, at
--on-policy-epsilon, every head on, checked against the original teacher-forced on that output
(agreement of exited tokens and of all tokens). Also: the tuned final layer's teacher-forced
top-1 agreement with the original (1.0 for a head set on the original).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from server.model.fetch import DEFAULT_MODEL

EPSILONS = (0.9, 0.95, 0.99)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.tune_recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+", help="NAME=heads:DIR or NAME=tune:DIR")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompts", default=None, help="prompt file (default: the shipped calib.txt)")
    p.add_argument("--calib-prompts", type=int, default=64)
    p.add_argument("--test-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--on-policy-prompts", type=int, default=16)
    p.add_argument("--on-policy-epsilon", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default=None, help="folder for the original's replies (reused across runs)")
    p.add_argument("--output", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    for spec in args.recipes:
        name, _, rest = spec.partition("=")
        if not name or rest.split(":", 1)[0] not in ("heads", "tune") or ":" not in rest:
            p.error(f"recipe {spec!r}: expected NAME=heads:DIR or NAME=tune:DIR")
    return args


class OriginalTop1:
    """The original model's top-1 per position of a [1, T] id tensor, cached; returned as one-hot
    logits [T, V] for calibration.tune.exit_features, which takes the argmax."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    @torch.no_grad()
    def top1(self, ids: torch.Tensor) -> torch.Tensor:
        key = tuple(ids[0].tolist())
        if key not in self.cache:
            self.cache[key] = self.model(ids)[0].argmax(-1)
        return self.cache[key]

    def __call__(self, ids):
        return torch.nn.functional.one_hot(self.top1(ids), self.model.config.vocab_size).float()


@torch.no_grad()
def final_agreement(model, samples, original: OriginalTop1) -> float:
    agree = total = 0
    for sample in samples:
        ids = torch.tensor([sample.token_ids])
        same = model(ids)[0, sample.start:-1].argmax(-1) == original.top1(ids)[sample.start:-1]
        agree, total = agree + int(same.sum()), total + len(same)
    return agree / total


@torch.no_grad()
def on_policy(loaded, heads, epsilon, prompts, max_tokens, original: OriginalTop1) -> dict:
    from calibration.data import chat_ids
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.sampling_params import SamplingParams

    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(model=loaded.name, heads=None, max_num_seqs=16),
                       heads=heads)
    prompt_ids = [chat_ids(loaded.tokenizer, p) for p in prompts]
    outputs = engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                         exit_epsilon=epsilon))
    num_layers = loaded.config.num_hidden_layers
    early = early_agree = total = total_agree = 0
    flops = full = 0.0
    for ids, out in zip(prompt_ids, outputs):
        choice = out.outputs[0]
        if not choice.token_ids:
            continue
        labels = original.top1(torch.tensor([ids + choice.token_ids]))[len(ids) - 1:-1]
        agree = labels == torch.tensor(choice.token_ids)
        exited = torch.tensor(choice.exit_layers) < num_layers
        total, total_agree = total + len(agree), total_agree + int(agree.sum())
        early, early_agree = early + int(exited.sum()), early_agree + int(agree[exited].sum())
        flops, full = flops + out.decode_flops, full + out.decode_flops_full_depth
    return {"tokens": total, "exited": early, "exit_fraction": early / max(total, 1),
            "agreement_early": early_agree / early if early else None, "agreement_all": total_agree / max(total, 1),
            "compute_saved": 1 - flops / full if full else 0.0}


def evaluate_recipe(args, kind, path, calib, test, test_prompts, original) -> dict:
    from server.model.tune_delta import apply_tune
    from calibration.thresholds import calibrate_sequential, cost_aware_select, exit_report
    from calibration.tune import exit_features
    from server.model.costs import CostModel
    from server.model.exit_heads import ExitHeadSet
    from server.model.loader import load_model

    loaded = load_model(args.model)
    heads_dir = apply_tune(loaded, path) if kind == "tune" else Path(path)
    heads = ExitHeadSet.load(heads_dir, config=loaded.config, fingerprint=loaded.fingerprint,
                             lm_head=loaded.model.lm_head.weight).eval()
    costs = CostModel.from_config(loaded.config, head_kind=heads.meta["head_kind"],
                                  adapter_rank=heads.meta.get("adapter_rank", 0))
    stats_calib, correct_calib = exit_features(loaded.model, heads, calib, original)
    stats_test, correct_test = exit_features(loaded.model, heads, test, original)
    recipe = ((heads.meta.get("tune") or {}).get("recipe")) or {}
    report = {"kind": kind, "layers": heads.layers, "tokens_trained": recipe.get("tokens_trained"),
              "recipe": recipe, "final_agreement_teacher_forced": final_agreement(loaded.model, test, original),
              "test_tokens": int(stats_test.shape[1]),
              "head_top1_agreement": {str(k): float(correct_test[i].mean()) for i, k in enumerate(heads.layers)},
              "eps": {}}
    entries = {}
    for eps in EPSILONS:
        thresholds = calibrate_sequential(stats_calib, correct_calib, eps)
        every = exit_report(stats_test, correct_test, thresholds, heads.layers, costs)
        chosen, _ = cost_aware_select(stats_calib, correct_calib, heads.layers, costs, eps)
        kept = [i for i, t in enumerate(chosen) if np.isfinite(t)]  # heads off at eps are never evaluated
        selected = exit_report(stats_test[kept], correct_test[kept], [chosen[i] for i in kept],
                               [heads.layers[i] for i in kept], costs)
        report["eps"][f"{eps:g}"] = {
            "all_heads": {"per_layer": {str(h["layer"]): {"exit_share": h["exit_rate"], "agreement": h["agreement"]}
                                        for h in every["heads"]},
                          "exit_fraction": every["exit_fraction"], "agreement": every["agreement"],
                          "saved": every["saved_fraction"]},
            "cost_aware": {"kept": [heads.layers[i] for i in kept], "exit_fraction": selected["exit_fraction"],
                           "agreement": selected["agreement"], "saved": selected["saved_fraction"]}}
        entries[eps] = {"thresholds": dict(zip(heads.layers, thresholds))}
    heads.set_calibration("margin", entries, default_epsilon=args.on_policy_epsilon)  # every head on
    report["on_policy_all_heads"] = {
        "epsilon": args.on_policy_epsilon,
        **on_policy(loaded, heads, args.on_policy_epsilon, test_prompts[:args.on_policy_prompts], args.max_tokens,
                    original)}
    return report


def main(argv=None) -> int:
    from calibration.data import PROMPTS_DIR, generate_replies, read_prompts
    from server.model.loader import load_model

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    original_model = load_model(args.model)
    original = OriginalTop1(original_model.model)
    prompts = read_prompts(args.prompts or PROMPTS_DIR / "calib.txt")
    calib_prompts = prompts[:args.calib_prompts]
    test_prompts = prompts[args.calib_prompts:args.calib_prompts + args.test_prompts]
    cache = Path(args.cache) / "original_replies.jsonl" if args.cache else None
    calib = generate_replies(original_model, calib_prompts, max_tokens=args.max_tokens, cache=cache)
    test = generate_replies(original_model, test_prompts, max_tokens=args.max_tokens, cache=cache)
    results = {}
    for spec in args.recipes:
        name, _, rest = spec.partition("=")
        kind, path = rest.split(":", 1)
        start = time.perf_counter()
        results[name] = evaluate_recipe(args, kind, path, calib, test, test_prompts, original)
        results[name]["seconds"] = time.perf_counter() - start
        print(table({name: results[name]}), flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def table(results: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = ["| recipe | tokens | final agreement | eps | exit share per layer | exited: agreement | saved, all heads "
             "| cost-aware kept / saved |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        for eps, entry in r["eps"].items():
            every, chosen = entry["all_heads"], entry["cost_aware"]
            shares = ", ".join(f"{k}: {v['exit_share']:.3f}" for k, v in every["per_layer"].items())
            lines.append(f"| {name} | {r['tokens_trained'] or '-'} | {r['final_agreement_teacher_forced']:.3f} | {eps} "
                         f"| {shares} | {fmt(every['agreement'])} | {every['saved']:+.3f} "
                         f"| {chosen['kept'] or 'none'} / {chosen['saved']:+.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
