"""Calibrate a head set: per epsilon, which heads to keep, their thresholds and gate cuts.

1. Features (`head_features`): the frozen model teacher-forced on calibration replies (its own
   greedy replies to prompts kept out of fitting); at each counted position and each head, the
   policy inputs (margin, p1, entropy, hidden cosines) and `correct` = the head's top-1 equals the
   full model's top-1 on the same prefix. A shortlist head is read as the engine reads it: over its
   listed tokens and "other"; where "other" comes first the token cannot exit there (statistic
   -inf) and it does not agree.
2. Selection (`select`): every subset of heads, calibrated from scratch (thresholds.py: sequential
   from the shallowest head, Learn-then-Test when delta is given, delta split across subsets and
   gate settings), priced with every cost counted: the layers run, the KV fill of the layers
   skipped, each gate probe run and each head evaluated. Gates: for a kept subset, each head's
   gate cut keeps a share `recall` of the rows that would exit there, and a row whose gate says
   no is not evaluated at that head (it cannot exit there); thresholds are calibrated again with
   the gates in place, so the agreement claim covers gated execution. The setting that saves the
   most wins; if none saves anything, every head is off at that epsilon.
3. On-policy check: the labels above assume every earlier token ran at full depth, but served
   tokens attend to exited tokens' filled K/V (the off-policy trap). So the chosen thresholds are
   run through the engine (greedy early exit on the calibration prompts), the full model is
   teacher-forced on that output, and while the exited tokens' agreement is below epsilon the
   selection is repeated at a stricter working epsilon (raised by the shortfall).
"""
import math
from dataclasses import dataclass
from datetime import date
from itertools import combinations

import numpy as np
import torch

from calibration.data import Sample, batches
from calibration.thresholds import assign_exits, calibrate_sequential, clopper_pearson_lower
from server.engine.exit_policies import ExitFeatures, get_policy, pairwise_cosine
from server.model.costs import CostModel

GATE_RECALLS = (1.0, 0.98, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2)  # 1.0 = no gate


@dataclass
class HeadFeatures:
    features: ExitFeatures  # policy inputs [H, N] (+ cosines)
    correct: np.ndarray  # [H, N] head top-1 == full top-1
    gate: np.ndarray  # [H, N] gate scores (1 where a head has no gate)
    head_token: np.ndarray  # [H, N] head top-1 (-1: "other" came first at a shortlist head)
    final_token: np.ndarray  # [N] full model's top-1
    next_logprob: np.ndarray  # [H + 1, N] log-probability of the data's next token: each head, then the full model
    context: np.ndarray  # [N] keys a decode row at this position attends over (position + 1)
    category: np.ndarray | None = None  # [N] the prompt category of each position ("text" for text)


def head_readout(head, hidden: torch.Tensor, lm_head_weight: torch.Tensor, next_tokens: torch.Tensor) -> dict:
    """One head on hidden [n, d]: margin, p1, entropy, top-1 and the next token's log-probability [n],
    over the whole vocabulary, or for a shortlist head over its listed tokens ∪ {other} (the engine's
    view): a position whose top-1 is "other" gets token -1 and margin/p1 -inf, entropy +inf (it cannot
    exit there under any policy), and an unlisted next token the other mass spread evenly over the
    unlisted ones (its perplexity contribution)."""
    if not head.has_shortlist:
        logq = torch.log_softmax(head.logits(hidden, lm_head_weight).float(), dim=-1)
        top2 = logq.exp().topk(2, dim=-1)
        return dict(margin=top2.values[:, 0] - top2.values[:, 1], max_prob=top2.values[:, 0],
                    entropy=-(logq.exp() * logq).sum(-1), token=top2.indices[:, 0],
                    logprob=logq.gather(1, next_tokens[:, None])[:, 0])
    logq = torch.log_softmax(head.shortlist_logits(hidden), dim=-1)  # [n, K + 1]
    num_listed = logq.shape[1] - 1
    top2 = logq.exp().topk(2, dim=-1)
    other = top2.indices[:, 0] == num_listed
    ids = head.shortlist_ids.to(hidden.device)
    column = torch.full((lm_head_weight.shape[0],), -1, dtype=torch.long, device=hidden.device)
    column[ids] = torch.arange(num_listed, device=hidden.device)
    at = column[next_tokens]
    spread = logq[:, num_listed] - math.log(max(lm_head_weight.shape[0] - num_listed, 1))
    inf = torch.full_like(top2.values[:, 0], math.inf)
    return dict(margin=torch.where(other, -inf, top2.values[:, 0] - top2.values[:, 1]),
                max_prob=torch.where(other, -inf, top2.values[:, 0]),
                entropy=torch.where(other, inf, -(logq.exp() * logq).sum(-1)),
                token=torch.where(other, -1, ids[top2.indices[:, 0].clamp(max=num_listed - 1)]),
                logprob=torch.where(at >= 0, logq.gather(1, at.clamp(min=0)[:, None])[:, 0], spread))


@torch.no_grad()
def head_features(model, heads, samples: list[Sample], *, batch_tokens: int = 2048, cosines: bool = False,
                  progress=None, reference=None) -> HeadFeatures:
    """Every head and the full model, teacher-forced on the samples' counted positions. reference:
    another model (the original, for a depth-tuned `model`) whose top-1 is the label instead."""
    device = model.lm_head.weight.device
    weight = model.lm_head.weight
    parts = []
    for group, ids, mask, counted in batches(samples, batch_tokens):
        ids, mask, where = ids.to(device), mask.to(device), counted.to(device)
        logits, hidden = model.forward(ids, mask, output_hidden_states=True)
        targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[where]  # next token of each counted position
        final = torch.log_softmax(logits[where].float(), dim=-1)
        label = final if reference is None else reference.forward(ids, mask)[where]
        rows = {"final_token": label.argmax(-1), "context": torch.nonzero(where)[:, 1] + 1}
        margin, max_prob, entropy, token, logprob, gate, states = [], [], [], [], [], [], [hidden[0][where]]
        for head in heads.heads.values():
            h = hidden[head.layer][where]
            states.append(h)
            read = head_readout(head, h, weight, targets)
            margin.append(read["margin"])
            max_prob.append(read["max_prob"])
            entropy.append(read["entropy"])
            token.append(read["token"])
            logprob.append(read["logprob"])
            gate.append(head.gate_score(h))
        logprob.append(final.gather(1, targets[:, None])[:, 0])
        part = {k: torch.stack(v).cpu().numpy() for k, v in
                dict(margin=margin, max_prob=max_prob, entropy=entropy, head_token=token, next_logprob=logprob,
                     gate=gate).items()}
        part.update({k: v.cpu().numpy() for k, v in rows.items()})
        if cosines:
            part["cosine"] = pairwise_cosine(torch.stack(states))
        part["category"] = np.concatenate([[samples[i].category] * len(samples[i].counted) for i in group])
        parts.append(part)
        if progress is not None:
            progress.update(int(where.sum()))
    cat = lambda key, axis=1: np.concatenate([p[key] for p in parts], axis=axis)
    features = ExitFeatures(heads.layers, cat("margin"), cat("max_prob"), cat("entropy"),
                            cat("cosine", 2) if cosines else None)
    head_token, final_token = cat("head_token"), cat("final_token", 0)
    return HeadFeatures(features, head_token == final_token[None], cat("gate"), head_token, final_token,
                        cat("next_logprob"), cat("context", 0), cat("category", 0))


def execution(stats, thresholds, gate_scores, gate_cuts, layers, cost_model, context, head_costs=None) -> dict:
    """Per token, where it exits and what it costs, when the heads at `layers` run in depth order:
    a head with a finite gate cut runs its gate on every row that reaches it and is evaluated only
    where gate_scores [H, N] >= the cut; a row exits where the statistic reaches the threshold.
    head_costs [H]: the FLOPs of one evaluation of each head (default: a full-vocabulary head each);
    a token that exits anywhere, the head after the last layer included, skips the full LM head.
    Returns exit_index [N] (H = ran the LM head), flops [N], heads_evaluated [N], gate_pass [H, N]."""
    cuts = np.asarray(gate_cuts, dtype=float).reshape(-1, 1)
    gate_pass = np.asarray(gate_scores) >= cuts
    stats = np.where(gate_pass, stats, -np.inf)
    num_heads, num_tokens = stats.shape
    exit_index = assign_exits(stats, thresholds) if num_heads else np.zeros(num_tokens, dtype=int)
    reached = np.arange(num_heads)[:, None] <= exit_index[None, :]  # [H, N]
    heads_evaluated = (reached & gate_pass).sum(0)
    gates_evaluated = (reached & np.isfinite(cuts)).sum(0)
    exit_layer = np.append(np.asarray(layers, dtype=int), cost_model.num_hidden_layers)[exit_index]
    per_head = np.full(num_heads, float(cost_model.head_flops)) if head_costs is None else np.asarray(head_costs, float)
    flops = cost_model.token_flops(exit_layer, context_len=context, gates_evaluated=gates_evaluated,
                                   head_flops=per_head @ (reached & gate_pass), full_head=exit_index == num_heads)
    return {"exit_index": exit_index, "flops": np.asarray(flops, dtype=float), "heads_evaluated": heads_evaluated,
            "gate_pass": gate_pass}


def select(stat_fn, correct, gate, layers, cost_model, epsilon, delta=None, *, context=None, recalls=(1.0,),
           min_exits=30, head_costs=None) -> dict:
    """Best subset of heads and gate setting at epsilon (see the module docstring). stat_fn(subset)
    -> [len(subset), N] statistics. Returns {"thresholds": [H] (inf = off), "gate_cuts": [H]
    (-inf = no gate), "recall", "saved_fraction"}."""
    num_heads, num_tokens = correct.shape
    context = np.full(num_tokens, cost_model.context_len) if context is None else context
    full = float(np.mean(cost_model.full_depth_flops(context)))
    subsets = [s for size in range(1, num_heads + 1) for s in combinations(range(num_heads), size)]
    delta_each = None if delta is None else delta / (len(subsets) * len(recalls))
    best = {"thresholds": [math.inf] * num_heads, "gate_cuts": [-math.inf] * num_heads, "recall": None,
            "subset": [], "saved_fraction": 0.0}
    for subset in subsets:
        rows = list(subset)
        stats, agree, scores = stat_fn(subset), correct[rows], gate[rows]
        plain = calibrate_sequential(stats, agree, epsilon, delta_each, min_exits=min_exits)
        if not all(math.isfinite(t) for t in plain):
            continue
        for recall in recalls:
            if recall >= 1.0:
                cuts, thresholds = np.full(len(rows), -np.inf), plain
            else:
                would_exit = stats >= np.asarray(plain)[:, None]
                cuts = np.array([np.quantile(s[w], 1 - recall) if w.any() else -np.inf
                                 for s, w in zip(scores, would_exit)])
                gated = np.where(scores >= cuts[:, None], stats, -np.inf)
                thresholds = calibrate_sequential(gated, agree, epsilon, delta_each, min_exits=min_exits)
                if not all(math.isfinite(t) for t in thresholds):
                    continue
            run = execution(stats, thresholds, scores, cuts, [layers[i] for i in rows], cost_model, context,
                            None if head_costs is None else [head_costs[i] for i in rows])
            saved = 1 - float(run["flops"].mean()) / full
            if saved > best["saved_fraction"]:
                best = {"thresholds": [math.inf] * num_heads, "gate_cuts": [-math.inf] * num_heads,
                        "recall": recall, "subset": rows, "saved_fraction": saved}
                for i, t, c in zip(rows, thresholds, cuts):
                    best["thresholds"][i], best["gate_cuts"][i] = float(t), float(c)
    best["delta_per_setting"] = delta_each
    return best


def report(stats_all, correct, gate, layers, thresholds, gate_cuts, cost_model, context, delta_head=None,
           head_costs=None, category=None) -> dict:
    """Per head and overall, with these thresholds and cuts: exits, agreement, compute per token; and
    per prompt category (category [N]) the exit share and agreement."""
    kept = [i for i, t in enumerate(thresholds) if math.isfinite(t)]
    stats, agree = stats_all[kept], correct[kept]
    run = execution(stats, [thresholds[i] for i in kept], gate[kept], [gate_cuts[i] for i in kept],
                    [layers[i] for i in kept], cost_model, context,
                    None if head_costs is None else [head_costs[i] for i in kept])
    exit_index, gate_pass, num_tokens = run["exit_index"], run["gate_pass"], correct.shape[1]
    heads = []
    for i, layer in enumerate(layers):
        entry = {"layer": int(layer), "kept": i in kept, "threshold": None, "gate_cut": None}
        if i in kept:
            j = kept.index(i)
            exited = exit_index == j
            n, agreed = int(exited.sum()), int(agree[j][exited].sum())
            entry.update(threshold=float(thresholds[i]), gate_cut=_finite(gate_cuts[i]), n_exited=n,
                         exit_rate=n / num_tokens, agreement=agreed / n if n else None,
                         head_evaluated_rate=float(((exit_index >= j) & gate_pass[j]).mean()))
            if delta_head is not None and n:
                entry["agreement_lower_bound"] = float(clopper_pearson_lower(agreed, n, delta_head))
        heads.append(entry)
    exited = exit_index < len(kept)
    agreeing = np.zeros(num_tokens, dtype=bool)
    for j in range(len(kept)):
        agreeing |= (exit_index == j) & agree[j]
    full = cost_model.full_depth_flops(context)
    out = {"heads": heads, "num_tokens": num_tokens, "exit_fraction": float(exited.mean()),
           "agreement": int(agreeing.sum()) / int(exited.sum()) if exited.any() else None,
           "heads_evaluated_per_token": float(run["heads_evaluated"].mean()),
           "flops_per_token": float(run["flops"].mean()), "full_depth_flops_per_token": float(np.mean(full)),
           "saved_fraction": 1 - float(run["flops"].mean()) / float(np.mean(full))}
    if category is not None:
        out["categories"] = {}
        for name in sorted(set(category.tolist())):
            at = category == name
            n = int((exited & at).sum())
            out["categories"][name or "unknown"] = {"num_tokens": int(at.sum()), "exit_share": float(exited[at].mean()),
                                                    "agreement": int((agreeing & at).sum()) / n if n else None}
    return out


def _finite(value):
    return float(value) if math.isfinite(value) else None


def calibrate(heads, hf: HeadFeatures, cost_model: CostModel, epsilons, *, policy: str = "margin",
              policy_params: dict | None = None, delta=None, gates: bool = True, min_exits: int = 30,
              working: dict | None = None) -> dict[float, dict]:
    """Per epsilon, the plain plan (every reached head evaluated) and, when the heads have gates,
    the gated plan; entries for ExitHeadSet.set_calibration. working: epsilon -> the stricter
    epsilon to select at (on-policy tightening)."""
    rule = get_policy(policy, policy_params)
    stat_fn = lambda subset: rule.statistic(hf.features.subset(subset))
    all_stats = stat_fn(range(len(heads.layers)))
    head_costs = heads.evaluation_flops(cost_model)
    entries = {}
    for eps in epsilons:
        target = (working or {}).get(eps, eps)
        options = dict(context=hf.context, min_exits=min_exits, head_costs=head_costs)
        plans = [select(stat_fn, hf.correct, hf.gate, heads.layers, cost_model, target, delta, recalls=(1.0,),
                        **options)]
        if gates and heads.has_gates:
            plans.append(select(stat_fn, hf.correct, hf.gate, heads.layers, cost_model, target, delta,
                                recalls=GATE_RECALLS, **options))
        stored = []
        for best in plans:
            kept = len(best["subset"]) or 1
            delta_head = None if best["delta_per_setting"] is None else best["delta_per_setting"] / kept
            full_stats = all_stats.copy()
            if best["subset"]:
                full_stats[best["subset"]] = stat_fn(best["subset"])  # stateful policies see only the kept heads
            stored.append({"thresholds": dict(zip(heads.layers, best["thresholds"])),
                           "gate_cuts": dict(zip(heads.layers, best["gate_cuts"])), "gate_recall": best["recall"],
                           "teacher_forced": report(full_stats, hf.correct, hf.gate, heads.layers, best["thresholds"],
                                                    best["gate_cuts"], cost_model, hf.context, delta_head,
                                                    head_costs, hf.category)})
        entry = {"working_epsilon": target, **stored[0]}
        del entry["gate_cuts"], entry["gate_recall"]
        if len(stored) > 1:
            entry["gated"] = stored[1]
        entries[eps] = entry
    return entries


def metadata(*, delta, policy: str, policy_params: dict | None, num_tokens: int, num_prompts: int,
             data_hashes: dict, extra: dict | None = None) -> dict:
    """The calibration-wide fields of exits.json besides the per-epsilon entries."""
    return {"policy_params": policy_params or {}, "delta": delta, "date": date.today().isoformat(),
            "calibration_tokens": num_tokens, "calibration_prompts": num_prompts, "data": data_hashes,
            **(extra or {})}
