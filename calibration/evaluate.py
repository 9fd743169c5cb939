"""Evaluate a calibrated head set, per epsilon, on prompts (and text) kept out of fitting and calibration.

- teacher-forced: the full model's greedy replies; at each decode position, where the head set
  would exit (thresholds and gate cuts as calibrated) and whether that head's top-1 equals the
  full model's; compute per token priced like the calibration (calibrate.execution).
- on-policy: greedy early-exit generation through the serving engine; then the full model is
  teacher-forced on that output, and an exited token agrees when it equals the full model's top-1
  on the same prefix. Compute saved is the engine's own accounting (every head evaluation, KV
  fill and layer it ran, against the same tokens at full depth).
- perplexity on text: the next token's log-probability from the distribution that would produce
  it (the exit head's where a token exits, else the full model's) against full depth.
"""
import json
import math

import numpy as np
import torch

from calibration.calibrate import execution, head_features, head_readout, report
from calibration.thresholds import clopper_pearson_lower
from calibration.data import Sample, batches, chat_ids, generate_replies
from server.engine.exit_policies import get_policy
from server.model.llama import ContiguousKVCache


@torch.no_grad()
def full_top1(model, samples: list[Sample], batch_tokens: int = 2048) -> list[np.ndarray]:
    """Per sample, the full model's top-1 at each counted position (teacher-forced)."""
    device = model.lm_head.weight.device
    out: list[np.ndarray | None] = [None] * len(samples)
    for group, ids, mask, counted in batches(samples, batch_tokens):
        logits = model.forward(ids.to(device), mask.to(device))
        top1 = logits.argmax(-1).cpu()
        for row, i in enumerate(group):
            out[i] = top1[row, counted[row]].numpy()
    return out


def on_policy(loaded, heads, prompts: list[str], epsilon: float, *, max_tokens: int, batch: int = 32,
              cache=None, reference=None) -> dict:
    """Greedy early-exit generation through the engine at epsilon, checked against the full model
    (or against `reference`, the original of a depth-tuned model)."""
    samples = generate_replies(loaded, prompts, max_tokens=max_tokens, batch=batch, cache=cache, heads=heads,
                               epsilon=epsilon)
    labels = full_top1(reference or loaded.model, samples)
    num_layers = loaded.config.num_hidden_layers
    exit_layer, skipped, agree, category = [], [], [], []
    for sample, top1 in zip(samples, labels):
        reply = sample.reply_ids
        # decode row at counted position p produced reply token p - start + 1
        exit_layer += sample.exit_layers[1:len(reply)]
        skipped += sample.lm_head_skipped[1:len(reply)]
        agree += [int(t) == int(f) for t, f in zip(reply[1:], top1)]
        category += [sample.category] * (len(reply) - 1)
    exit_layer, agree = np.asarray(exit_layer, dtype=int), np.asarray(agree, dtype=bool)
    skipped = np.asarray(skipped, dtype=bool)  # never ran the full LM head (left at any exit head, L's included)
    exited = (exit_layer < num_layers) | skipped
    spent = sum(s.decode_flops[0] for s in samples)
    full = sum(s.decode_flops[1] for s in samples)
    per_head = {}
    for layer in heads.layers:
        at = exit_layer == layer if layer < num_layers else skipped & (exit_layer == num_layers)
        per_head[str(layer)] = {"exit_share": float(at.mean()) if len(at) else 0.0, "n_exited": int(at.sum()),
                                "agreement": float(agree[at].mean()) if at.any() else None}
    return {"num_tokens": int(len(exit_layer)), "exit_share": float(exited.mean()) if len(exited) else 0.0,
            "n_exited": int(exited.sum()), "agreement": float(agree[exited].mean()) if exited.any() else None,
            "agreement_interval": agreement_interval(int(agree[exited].sum()), int(exited.sum())),
            "agreement_all_tokens": float(agree.mean()) if len(agree) else None, "heads": per_head,
            "categories": by_category(np.asarray(category), exited, agree),
            "saved_fraction": 1 - spent / full if full else 0.0, "samples": samples}


def agreement_interval(agreed: int, n: int, level: float = 0.95) -> list[float] | None:
    """Two-sided Clopper-Pearson interval of an agreement rate (exact binomial), None without exits."""
    if n == 0:
        return None
    tail = (1 - level) / 2
    low = float(clopper_pearson_lower(agreed, n, tail)) if agreed else 0.0
    high = 1 - float(clopper_pearson_lower(n - agreed, n, tail)) if agreed < n else 1.0
    return [low, high]


def by_category(category: np.ndarray, exited: np.ndarray, agree: np.ndarray) -> dict[str, dict]:
    """Per prompt category: tokens, exit share, and the agreement of its exited tokens with an interval,
    so that a category the calibration set under-represents shows before users see it."""
    out = {}
    for name in sorted(set(category.tolist())):
        at = category == name
        n, agreed = int((exited & at).sum()), int((agree & exited & at).sum())
        out[name or "unknown"] = {"num_tokens": int(at.sum()), "exit_share": float(exited[at].mean()),
                                  "n_exited": n, "agreement": agreed / n if n else None,
                                  "agreement_interval": agreement_interval(agreed, n)}
    return out


@torch.no_grad()
def gated_on_policy(loaded, heads, prompts: list[str], epsilon: float, cost_model, *, max_tokens: int,
                    reference=None) -> dict:
    """The gated plan, greedy, one sequence at a time with a contiguous cache (an independent check
    of what the engine runs when `ExitHeadSet.uses_gates`): at each active head the gate runs
    first, the head only where the gate passes, and a row exits where its margin reaches the
    threshold (KV of the skipped layers filled from its exit hidden state, as the engine does).
    Then the full model (or `reference`) is teacher-forced on the output, as in `on_policy`.
    Margin policy only."""
    if heads.policy != "margin":
        raise ValueError(f"the gated on-policy check runs the margin policy, not {heads.policy!r}")
    model, tokenizer = loaded.model, loaded.tokenizer
    device, num_layers = model.lm_head.weight.device, model.num_layers
    thresholds, cuts = heads.thresholds(epsilon, gated=True), heads.gate_cuts(epsilon)
    active = [k for k in heads.layers if math.isfinite(thresholds[k])]
    head_cost = dict(zip(heads.layers, heads.evaluation_flops(cost_model)))
    samples, exit_layer, spent, full = [], [], 0.0, 0.0
    for prompt in prompts:
        prompt_ids = chat_ids(tokenizer, prompt)
        cache = ContiguousKVCache(model.config, len(prompt_ids) + max_tokens, device, model.lm_head.weight.dtype)
        positions = torch.arange(len(prompt_ids), device=device)
        hidden = model.run_layers(model.embed(torch.tensor(prompt_ids, device=device)), positions, 0, num_layers,
                                  cache.at(positions))
        reply = [int(model.final_logits(hidden[-1:])[0].argmax())]
        while len(reply) < max_tokens and reply[-1] not in tokenizer.eos_token_ids:
            position = torch.tensor([len(prompt_ids) + len(reply) - 1], device=device)
            cache.at(position)
            hidden, done, depth, head_flops, gates_run = model.embed(torch.tensor(reply[-1:], device=device)), 0, None, 0.0, 0
            for k in active:
                hidden = model.run_layers(hidden, position, done, k, cache)
                done = k
                head = heads.head(k)
                if math.isfinite(cuts[k]):
                    gates_run += 1
                    if float(head.gate_score(hidden)[0]) < cuts[k]:
                        continue
                head_flops += head_cost[k]
                read = head_readout(head, hidden, model.lm_head.weight, torch.zeros(1, dtype=torch.long, device=device))
                if float(read["margin"][0]) >= thresholds[k]:
                    for deeper in range(k, num_layers):
                        cache.write(deeper, *model.layer_kv(deeper, hidden, position))
                    depth, token = k, int(read["token"][0])
                    break
            if depth is None:  # no head answered: the rest of the layers and the LM head
                hidden = model.run_layers(hidden, position, done, num_layers, cache)
                token = int(model.final_logits(hidden)[0].argmax())
            reply.append(token)
            exit_layer.append(num_layers if depth is None else depth)
            context = int(position[0]) + 1
            spent += float(cost_model.token_flops(exit_layer[-1], context_len=context, gates_evaluated=gates_run,
                                                  head_flops=head_flops, full_head=depth is None))
            full += float(cost_model.full_depth_flops(context))
        samples.append(Sample(prompt_ids + reply, len(prompt_ids)))
    agree = np.asarray([int(t) == int(f) for s, top1 in zip(samples, full_top1(reference or model, samples))
                        for t, f in zip(s.reply_ids[1:], top1)], dtype=bool)
    exit_layer = np.asarray(exit_layer, dtype=int)
    exited = exit_layer < num_layers
    per_head = {str(k): {"exit_share": float((exit_layer == k).mean()) if len(exit_layer) else 0.0,
                         "n_exited": int((exit_layer == k).sum()),
                         "agreement": float(agree[exit_layer == k].mean()) if (exit_layer == k).any() else None}
                for k in heads.layers}
    return {"num_tokens": int(len(exit_layer)), "exit_share": float(exited.mean()) if len(exited) else 0.0,
            "n_exited": int(exited.sum()), "agreement": float(agree[exited].mean()) if exited.any() else None,
            "heads": per_head, "saved_fraction": 1 - spent / full if full else 0.0}


def kept_head_statistics(heads, hf, epsilon, gated=False):
    """(kept head indices, their stats, thresholds, gate cuts) of the head set's plain or gated
    plan at epsilon, on features hf."""
    thresholds = heads.thresholds(epsilon, gated)
    cuts = heads.gate_cuts(epsilon) if gated else {k: -math.inf for k in heads.layers}
    kept = [i for i, k in enumerate(heads.layers) if math.isfinite(thresholds[k])]
    stats = get_policy(heads.policy, heads.policy_params).statistic(hf.features.subset(kept)) if kept else None
    return kept, stats, [thresholds[heads.layers[i]] for i in kept], [cuts[heads.layers[i]] for i in kept]


def teacher_forced(heads, hf, cost_model, epsilon, gated=False) -> dict:
    kept, stats, thresholds, cuts = kept_head_statistics(heads, hf, epsilon, gated)
    all_stats = np.zeros_like(hf.correct, dtype=float)
    if kept:
        all_stats[kept] = stats
    full_thresholds, full_cuts = [math.inf] * len(heads.layers), [-math.inf] * len(heads.layers)
    for i, t, c in zip(kept, thresholds, cuts):
        full_thresholds[i], full_cuts[i] = t, c
    return report(all_stats, hf.correct, hf.gate, heads.layers, full_thresholds, full_cuts, cost_model, hf.context,
                  head_costs=heads.evaluation_flops(cost_model), category=hf.category)


def perplexity(heads, hf, cost_model, epsilon) -> dict:
    """Perplexity of the early-exit predictions (plain plan) and of full depth, teacher-forced on text."""
    kept, stats, thresholds, cuts = kept_head_statistics(heads, hf, epsilon)
    logprob_full = hf.next_logprob[-1]
    if kept:
        costs = heads.evaluation_flops(cost_model)
        run = execution(stats, thresholds, hf.gate[kept], cuts, [heads.layers[i] for i in kept], cost_model, hf.context,
                        [costs[i] for i in kept])
        choices = np.vstack([hf.next_logprob[kept], logprob_full[None]])  # [len(kept) + 1, N]
        logprob = choices[run["exit_index"], np.arange(len(logprob_full))]
        exit_share = float((run["exit_index"] < len(kept)).mean())
    else:
        logprob, exit_share = logprob_full, 0.0
    return {"num_tokens": int(len(logprob)), "exit_share": exit_share,
            "perplexity_early_exit": float(np.exp(-logprob.mean())), "perplexity_full": float(np.exp(-logprob_full.mean()))}


def evaluate(loaded, heads, prompts: list[str], texts: list[Sample], cost_model, *, max_tokens: int = 128,
             batch: int = 32, cache_dir=None, progress=None, original=None) -> dict:
    """original: for a depth-tuned `loaded`, the original model: its greedy replies are the
    teacher-forced text and its top-1 the label everywhere, so agreement is with the original."""
    cosines = heads.policy == "saturation"
    labeller = original.model if original is not None else None
    replies = generate_replies(original or loaded, prompts, max_tokens=max_tokens, batch=batch,
                               cache=cache_dir / "eval_full_depth.jsonl" if cache_dir else None)
    hf = head_features(loaded.model, heads, replies, cosines=cosines, reference=labeller)
    hf_text = head_features(loaded.model, heads, texts, cosines=cosines) if texts else None
    results = {"model": loaded.name, "agreement_with": "original model" if original is not None else "model",
               "num_prompts": len(prompts), "max_tokens": max_tokens, "policy": heads.policy,
               "layers": heads.layers, "epsilons": {}}
    for eps in heads.epsilons():
        entry = {"active_layers": heads.active_layers(eps), "teacher_forced": teacher_forced(heads, hf, cost_model, eps)}
        if heads.calibration_entry(eps).get("gated"):
            entry["gated_teacher_forced"] = teacher_forced(heads, hf, cost_model, eps, gated=True)
        if entry["active_layers"]:
            live = on_policy(loaded, heads, prompts, eps, max_tokens=max_tokens, batch=batch,
                             cache=cache_dir / "eval_on_policy.jsonl" if cache_dir else None, reference=labeller)
            live.pop("samples")
            entry["on_policy"] = live
        else:
            entry["on_policy"] = {"exit_share": 0.0, "agreement": None, "saved_fraction": 0.0, "heads": {},
                                  "note": "no active exits at this epsilon: every token runs at full depth"}
        gated_layers = [k for k, t in heads.thresholds(eps, gated=True).items() if math.isfinite(t)]
        if heads.calibration_entry(eps).get("gated") and gated_layers:
            entry["gated_on_policy"] = gated_on_policy(loaded, heads, prompts, eps, cost_model, max_tokens=max_tokens,
                                                       reference=labeller)
        if hf_text is not None:
            entry["perplexity"] = perplexity(heads, hf_text, cost_model, eps)
        results["epsilons"][f"{eps:g}"] = entry
        if progress is not None:
            progress(f"{eps:g}", entry)
    return results


def table(results: dict) -> str:
    """Markdown table: one row per epsilon and head, then the totals."""
    lines = ["| eps | layer | kept | TF exit share | TF agreement | on-policy exit share | on-policy agreement |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for eps, entry in results["epsilons"].items():
        tf, live = entry["teacher_forced"], entry["on_policy"]
        for head in tf["heads"]:
            lh = live["heads"].get(str(head["layer"]), {})
            lines.append(f"| {eps} | {head['layer']} | {'yes' if head['kept'] else 'no'} | {fmt(head.get('exit_rate'))} "
                         f"| {fmt(head.get('agreement'))} | {fmt(lh.get('exit_share'))} | {fmt(lh.get('agreement'))} |")
        lines.append(f"| {eps} | all | | {fmt(tf['exit_fraction'])} | {fmt(tf['agreement'])} "
                     f"| {fmt(live['exit_share'])} | {fmt(live['agreement'])} |")
    lines += ["", "| eps | saved (teacher-forced) | saved (on-policy, engine accounting) | gated plan, teacher-forced: "
              "exit share / agreement / saved | gated plan, on-policy: exit share / agreement / saved "
              "| ppl early exit | ppl full |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for eps, entry in results["epsilons"].items():
        ppl = entry.get("perplexity", {})
        gated = [entry.get("gated_teacher_forced"), entry.get("gated_on_policy")]
        gated_text = [f"{g.get('exit_fraction', g.get('exit_share')):.3f} / {fmt(g['agreement'])} / "
                      f"{g['saved_fraction']:+.3f}" if g else "-" for g in gated]
        lines.append(f"| {eps} | {entry['teacher_forced']['saved_fraction']:+.3f} | {entry['on_policy']['saved_fraction']:+.3f} "
                     f"| {gated_text[0]} | {gated_text[1]} | {fmt(ppl.get('perplexity_early_exit'))} "
                     f"| {fmt(ppl.get('perplexity_full'))} |")
    return "\n".join(lines)


def write(results: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
