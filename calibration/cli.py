"""`offramp fit-heads`, `offramp calibrate` and `offramp eval`: the offline life of an exit-head set.

fit-heads  frozen model, heads only: the model's own replies to prompt files (batched sampling
           through the engine) plus text files -> one forward caches the hidden states at the exit
           layers and the final top-K -> heads trained on the cache -> gate probes -> OUT.
calibrate  per epsilon: head subset, thresholds and gate cuts on calibration prompts (disjoint from
           the fitting prompts), then the on-policy check, tightened until it holds -> exits.json.
eval       teacher-forced and on-policy agreement, exit shares, compute saved, perplexity -> a
           table and JSON.
Every intermediate (replies, state shards) is cached under --cache so a killed run resumes.
"""
import json
import logging
import math
from pathlib import Path

import torch

from server.errors import UsageError
from server.model.fetch import DEFAULT_MODEL

log = logging.getLogger(__name__)
PROMPTS_DIR = Path(__file__).parent / "prompts"


def register(subparsers):
    fit = subparsers.add_parser("fit-heads", help="train exit heads on the frozen model")
    _common(fit)
    fit.add_argument("--layers", default="10,15,20,25", help="exit layers, comma-separated")
    fit.add_argument("--head-kind", default="linear", help="norm, linear or mlp")
    fit.add_argument("--head-rank", type=int, default=64, help="linear: rank (0 = full d x d); mlp: hidden width")
    fit.add_argument("--loss", default="kl", help="kl (KL(final || head)) or ce-entropy:LAMBDA")
    fit.add_argument("--prompts", action="append", default=None,
                     help="prompt file (repeatable; default: the shipped calibration/prompts/fit.jsonl)")
    fit.add_argument("--text", action="append", default=[], help="text file (repeatable)")
    fit.add_argument("--tokens", type=int, default=60_000, help="fitting positions, replies first, then text")
    fit.add_argument("--samples-per-prompt", type=int, default=2)
    fit.add_argument("--temperature", type=float, default=0.7, help="reply sampling temperature")
    fit.add_argument("--steps", type=int, default=300)
    fit.add_argument("--batch-size", type=int, default=256)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--top-k", type=int, default=32, help="final-distribution tokens kept as KL targets")
    fit.add_argument("--hard-negatives", type=int, default=0,
                     help="positions scanned every 50 steps for the heads' own top tokens, added to the shortlist")
    fit.add_argument("--no-gate", dest="gate", action="store_false", help="fit no gate probes")
    fit.add_argument("--shortlist", type=int, default=0,
                     help="K: shortlist heads reading the K tokens the model most often predicts (0 = whole vocabulary)")
    fit.add_argument("--shortlist-layers", default=None, help="which exit layers get the shortlist (default: all)")
    fit.add_argument("--text-weight", type=float, default=0.25,
                     help="weight of text positions against reply positions when ranking the shortlist")
    fit.add_argument("--mass-components", type=int, default=256, help="pieces of each shortlist head's mass estimator")
    fit.add_argument("--mass-quantile", type=float, default=0.9,
                     help="pinball quantile of the mass estimator's fit (> 0.5 leans high: fewer exits, fewer errors)")
    fit.add_argument("--mass-steps", type=int, default=3000)
    fit.add_argument("--mass-positions", type=int, default=120_000, help="positions the estimators are fitted on")
    fit.add_argument("--out", required=True)
    fit.set_defaults(func=run_fit)

    cal = subparsers.add_parser("calibrate", help="choose heads, thresholds and gates per epsilon")
    _common(cal)
    cal.add_argument("--heads", required=True, help="head-set folder (written in place)")
    cal.add_argument("--prompts", action="append", default=None,
                     help="prompt file (repeatable; default: the shipped calibration/prompts/calib.jsonl)")
    cal.add_argument("--epsilon", default="0.9,0.95,0.99", help="target agreements, comma-separated")
    cal.add_argument("--delta", type=float, default=None, help="Learn-then-Test failure probability (off if absent)")
    cal.add_argument("--policy", default="margin", help="margin, maxprob, entropy, monotonic or saturation")
    cal.add_argument("--no-gate", dest="gate", action="store_false", help="ignore the head set's gates")
    cal.add_argument("--min-exits", type=int, default=30)
    cal.add_argument("--on-policy-rounds", type=int, default=2, help="tightening rounds after the on-policy check")
    cal.add_argument("--on-policy-prompts", type=int, default=64, help="calibration prompts used for the check")
    cal.add_argument("--out", default=None, help="write here instead of in place")
    cal.set_defaults(func=run_calibrate)

    ev = subparsers.add_parser("eval", help="agreement, exit shares and compute saved per epsilon")
    _common(ev)
    ev.add_argument("--heads", default=None, help="calibrated head set (default with --tune: the tune's own)")
    ev.add_argument("--tune", default=None, help="folder written by 'offramp tune': evaluate the tuned model's "
                    "early exit against the ORIGINAL model's full-depth predictions")
    ev.add_argument("--prompts", action="append", required=True, help="prompt file (.txt lines or .jsonl turns[0])")
    ev.add_argument("--text", action="append", default=[], help="text file for the perplexity check")
    ev.add_argument("--text-tokens", type=int, default=8192)
    ev.add_argument("--json", default=None, help="write the results here")
    ev.set_defaults(func=run_eval)


def _common(p):
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-tokens", type=int, default=128, help="longest generated reply")
    p.add_argument("--batch", type=int, default=32, help="sequences generated at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache", default=None,
                   help="folder for replies and states (default: OUT/cache for fit-heads, HEADS/cache for calibrate)")
    p.add_argument("--prompt-stride", type=int, default=1,
                   help="use every N-th prompt of the prompt files (a smaller run with the same category mix)")


def _setup(args):
    from server.model.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    return load_model(args.model, device=device)


def _prompts(paths, stride: int = 1):
    from calibration.data import read_prompts

    if stride < 1:
        raise UsageError(f"--prompt-stride must be >= 1, got {stride}")
    prompts = [p for path in paths for p in read_prompts(path)][::stride]
    if not prompts:
        raise UsageError(f"no prompts in {', '.join(map(str, paths))}")
    return prompts


def _layers(text: str) -> list[int]:
    try:
        return sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise UsageError(f"--layers takes comma-separated integers, got {text!r}") from None


def run_fit(args):
    from tqdm import tqdm

    from calibration.data import data_hash, file_hash, generate_replies, text_samples
    from calibration.fit import FitConfig, StateCache, collect_states, fit_gates, fit_heads
    from server.model.exit_head import AdapterSpec

    config = FitConfig(loss=args.loss, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       refresh_rows=args.hard_negatives)
    spec = AdapterSpec(args.head_kind, args.head_rank)
    loaded = _setup(args)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "cache"
    prompt_files = args.prompts if args.prompts is not None else [str(PROMPTS_DIR / "fit.jsonl")]
    layers = _layers(args.layers)
    samples = generate_replies(loaded, _prompts(prompt_files, args.prompt_stride), max_tokens=args.max_tokens,
                               temperature=args.temperature, seed=args.seed,
                               samples_per_prompt=args.samples_per_prompt, batch=args.batch,
                               cache=cache / "fit_replies.jsonl") if prompt_files else []
    reply_tokens = sum(len(s.counted) for s in samples)
    for path in args.text:  # each text file gets an equal share of what the replies left
        budget = (args.tokens - reply_tokens) // len(args.text)
        if budget > 0:
            samples += text_samples(path, loaded.tokenizer, max_tokens=budget)
    states_path = cache / f"states-{data_hash(samples)}-{'-'.join(map(str, layers))}.pt"
    if states_path.is_file():
        states = StateCache.load(states_path)
    else:
        with tqdm(total=sum(len(s.counted) for s in samples), unit="tok", desc="frozen forward") as bar:
            states = collect_states(loaded.model, samples, layers, top_k=args.top_k,
                                    shard_dir=states_path.with_suffix(""), progress=bar)
        states.save(states_path)
    log.info("fitting on %d positions (%d from replies)", len(states), reply_tokens)
    heads = _create_heads(args, loaded, layers, spec, states, data_hash(samples))
    with tqdm(total=config.steps, unit="step", desc="fit heads") as bar:
        history = fit_heads(heads, loaded.model.lm_head.weight, states, config, progress=bar)
    mass_error = _fit_mass(args, loaded, heads, states) if args.shortlist else None
    gate_error = fit_gates(heads, loaded.model.lm_head.weight, states, seed=args.seed) if args.gate else None
    heads.meta["fit"] = {
        "loss": args.loss, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "top_k": args.top_k, "hard_negatives": args.hard_negatives, "positions": len(states), "reply_positions": reply_tokens,
        "prompts": {Path(p).name: file_hash(p) for p in prompt_files}, "text": {Path(t).name: file_hash(t) for t in args.text},
        "samples_per_prompt": args.samples_per_prompt, "prompt_stride": args.prompt_stride, "temperature": args.temperature, "max_tokens": args.max_tokens,
        "data_hash": data_hash(samples), "final_loss": history[-1]["loss"] if history else None,
        "gate_mean_abs_error": gate_error, "mass_error_held_out": mass_error}
    heads.save(out, torch.float16)
    (out / "fit_history.json").write_text(json.dumps(history) + "\n")
    print(f"fitted heads at layers {','.join(map(str, layers))} on {len(states)} positions: {out}")


def _create_heads(args, loaded, layers, spec, states, states_hash: str):
    """Fresh heads; with --shortlist, the K tokens the full model most often predicts on the fitting
    positions (replies, and text at --text-weight) for the shortlist layers, recorded in exits.json."""
    from calibration.shortlist import coverage, rank_tokens
    from server.model.exit_heads import ExitHeadSet

    base = {"name": loaded.name, "fingerprint": loaded.fingerprint}
    if not args.shortlist:
        heads = ExitHeadSet.create(loaded.model, layers, spec, base)
        return heads.to(loaded.model.lm_head.weight.device)
    if not 1 <= args.shortlist < loaded.config.vocab_size:
        raise UsageError(f"--shortlist must be in 1..{loaded.config.vocab_size - 1}")
    is_reply = states.is_reply if states.is_reply is not None else torch.ones(len(states), dtype=torch.bool)
    top1 = states.top_ids[:, 0]
    order = rank_tokens(top1, is_reply, loaded.config.vocab_size, args.text_weight)
    meta = {"ranking": "frequency of the full model's top-1 on the fitting positions",
            "reply_positions": int(is_reply.sum()), "text_positions": int((~is_reply).sum()),
            "text_weight": args.text_weight, "data": {"fit_positions": states_hash},
            "coverage_on_fit_positions": coverage(order, top1, [1024, 2048, 4096, 8192, args.shortlist])}
    shortlist_layers = _layers(args.shortlist_layers) if args.shortlist_layers else layers
    heads = ExitHeadSet.create(loaded.model, layers, spec, base, shortlist=order[:args.shortlist],
                               shortlist_layers=shortlist_layers, mass_components=args.mass_components,
                               shortlist_meta=meta)
    return heads.to(loaded.model.lm_head.weight.device).bind(loaded.model.lm_head.weight)


def _fit_mass(args, loaded, heads, states) -> dict:
    """Fit every shortlist head's mass estimator to the exact unlisted log-mass at --mass-positions
    cached positions (90%), and report its error on the other 10%."""
    from tqdm import tqdm

    from calibration.shortlist import MassFitConfig, fit_mass_estimator, mass_error, unlisted_log_mass

    weight = loaded.model.lm_head.weight.detach()
    generator = torch.Generator().manual_seed(args.seed)
    rows = torch.randperm(len(states), generator=generator)[:args.mass_positions]
    held = max(1, len(rows) // 10)
    config = MassFitConfig(components=args.mass_components, steps=args.mass_steps, quantile=args.mass_quantile,
                           seed=args.seed)
    errors = {}
    for head in heads.heads.values():
        if not head.has_shortlist:
            continue
        with torch.no_grad():
            hidden = states.hidden[rows, states.layers.index(head.layer)].to(weight.device).float()
            y = head.normed(hidden, weight.dtype)
        target = unlisted_log_mass(y, weight, head.shortlist_ids)
        with tqdm(total=config.steps, unit="step", desc=f"mass estimator {head.layer}") as bar:
            fit_mass_estimator(head, weight, y[held:], target[held:], config, progress=bar)
        errors[str(head.layer)] = mass_error(head, y[:held], target[:held])
        log.info("layer %d mass estimator, held out: %s", head.layer, errors[str(head.layer)])
    heads.meta["shortlist"]["mass_estimator"].update(quantile=config.quantile, steps=config.steps,
                                                     positions=len(rows) - held)
    return errors


def run_calibrate(args):
    from tqdm import tqdm

    from calibration.calibrate import calibrate, head_features, metadata
    from calibration.data import data_hash, file_hash, generate_replies
    from calibration.evaluate import gated_on_policy, on_policy
    from server.engine.exit_policies import POLICIES
    from server.model.costs import CostModel
    from server.model.exit_heads import ExitHeadSet

    if args.policy not in POLICIES:
        raise UsageError(f"unknown --policy {args.policy!r}; expected one of {', '.join(POLICIES)}")
    epsilons = _epsilons(args.epsilon)
    loaded = _setup(args)
    heads = ExitHeadSet.load(args.heads, config=loaded.config, fingerprint=loaded.fingerprint,
                             lm_head=loaded.model.lm_head.weight)
    heads.to(loaded.model.lm_head.weight.device).eval()
    out = Path(args.out or args.heads)
    cache = Path(args.cache) if args.cache else Path(args.heads) / "cache"  # beside the fitted set, not the output
    prompt_files = args.prompts if args.prompts is not None else [str(PROMPTS_DIR / "calib.jsonl")]
    prompts = _prompts(prompt_files, args.prompt_stride)
    fit_prompts = set(heads.meta.get("fit", {}).get("prompts", {}).values())
    overlap = fit_prompts & {file_hash(p) for p in prompt_files}
    if overlap:
        raise UsageError("the calibration prompts are the fitting prompts; calibrate on data kept out of fitting")
    samples = generate_replies(loaded, prompts, max_tokens=args.max_tokens, batch=args.batch,
                               cache=cache / "calib_replies.jsonl")
    with tqdm(total=sum(len(s.counted) for s in samples), unit="tok", desc="head features") as bar:
        hf = head_features(loaded.model, heads, samples, cosines=args.policy == "saturation", progress=bar)
    cost_model = CostModel.from_config(loaded.config, head_kind=heads.meta["head_kind"],
                                       adapter_rank=heads.meta.get("adapter_rank", 0))
    options = dict(policy=args.policy, delta=args.delta, gates=args.gate, min_exits=args.min_exits)
    working = {eps: eps for eps in epsilons}
    entries = calibrate(heads, hf, cost_model, epsilons, working=working, **options)
    check = prompts[:args.on_policy_prompts]
    pending = list(epsilons)
    for round_index in range(args.on_policy_rounds + 1):
        heads.set_calibration(args.policy, entries, default_epsilon=_default(epsilons))
        short = {}
        for eps in pending:
            if heads.active_layers(eps):
                result = on_policy(loaded, heads, check, eps, max_tokens=args.max_tokens, batch=args.batch,
                                   cache=cache / "calib_on_policy.jsonl")
                result.pop("samples")
            else:
                result = {"exit_share": 0.0, "agreement": None, "note": "no active exits"}
            entries[eps]["on_policy"] = result
            results = [result]
            gated = entries[eps].get("gated")
            if gated and any(math.isfinite(t) for t in gated["thresholds"].values()):
                gated["on_policy"] = gated_on_policy(loaded, heads, check, eps, cost_model, max_tokens=args.max_tokens)
                results.append(gated["on_policy"])
            for plan, live in zip(("plain", "gated"), results):
                log.info("eps %g (working %g), %s plan: on-policy agreement %s over %s exits", eps, working[eps],
                         plan, live["agreement"], live.get("n_exited", 0))
                if live["agreement"] is not None and live["agreement"] < eps:
                    short[eps] = max(short.get(eps, 0.0), eps - live["agreement"])
        if not short or round_index == args.on_policy_rounds:
            break
        for eps, gap in short.items():
            working[eps] = min(working[eps] + gap, 0.999)
        pending = list(short)
        tightened = calibrate(heads, hf, cost_model, list(short), working=working, **options)
        entries.update(tightened)
    for eps in epsilons:  # a check that still fails after the last round switches that plan off
        for plan in (entries[eps], entries[eps].get("gated") or {}):
            live = plan.get("on_policy", {})
            if live.get("agreement") is not None and live["agreement"] < eps:
                plan["thresholds"] = {k: math.inf for k in heads.layers}
                plan["note"] = "switched off: on-policy agreement stayed below epsilon after tightening"
    heads.set_calibration(args.policy, entries, default_epsilon=_default(epsilons), **metadata(
        delta=args.delta, policy=args.policy, policy_params=get_params(args.policy), num_tokens=int(hf.correct.shape[1]),
        num_prompts=len(prompts), data_hashes={
            "calibration_replies": data_hash(samples), **{Path(p).name: file_hash(p) for p in prompt_files}},
        extra={"gates": bool(args.gate and heads.has_gates), "prompt_stride": args.prompt_stride, "on_policy_prompts": len(check),
               "cost_model": {"head_flops": cost_model.head_flops, "gate_flops": cost_model.gate_flops,
                              "layer_flops_at_context": cost_model.layer_flops(), "kv_fill_flops": cost_model.kv_fill_flops}}))
    heads.save(out)
    for eps in epsilons:
        tf = entries[eps]["teacher_forced"]
        live = entries[eps].get("on_policy", {})
        print(f"eps {eps:g}: active {heads.active_layers(eps) or 'none'}, exit {tf['exit_fraction']:.3f}, "
              f"agreement {tf['agreement']}, saved {tf['saved_fraction']:+.3f} (teacher-forced); "
              f"on-policy agreement {live.get('agreement')}")
    print(f"calibrated: {out / 'exits.json'}")


def get_params(policy: str) -> dict:
    from server.engine.exit_policies import get_policy

    return get_policy(policy).params()


def _epsilons(text: str) -> list[float]:
    try:
        values = sorted({float(e) for e in text.split(",") if e.strip()})
    except ValueError:
        raise UsageError(f"--epsilon takes comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < e < 1 for e in values):
        raise UsageError("every --epsilon must be in (0, 1)")
    return values


def _default(epsilons: list[float]) -> float:
    return 0.95 if any(math.isclose(e, 0.95) for e in epsilons) else epsilons[len(epsilons) // 2]


def run_eval(args):
    from calibration.data import text_samples
    from calibration.evaluate import evaluate, table, write
    from server.model.costs import CostModel
    from server.model.exit_heads import ExitHeadSet

    original = None
    loaded = _setup(args)
    heads_dir = args.heads
    if args.tune is not None:
        from server.model.tune_delta import apply_tune
        from server.model.loader import load_model

        original = load_model(args.model, device=loaded.model.lm_head.weight.device)
        tuned_heads = apply_tune(loaded, args.tune)
        heads_dir = heads_dir or tuned_heads
    if heads_dir is None:
        raise UsageError("give --heads (or --tune, whose heads are used)")
    heads = ExitHeadSet.load(heads_dir, config=loaded.config, fingerprint=loaded.fingerprint,
                             lm_head=loaded.model.lm_head.weight)
    heads.to(loaded.model.lm_head.weight.device).eval()
    if not heads.epsilons():
        raise UsageError(f"{heads_dir}: the head set is not calibrated; run offramp calibrate first")
    cache = Path(args.cache) if args.cache else None
    texts = [s for path in args.text for s in text_samples(path, loaded.tokenizer, max_tokens=args.text_tokens)]
    cost_model = CostModel.from_config(loaded.config, head_kind=heads.meta["head_kind"],
                                       adapter_rank=heads.meta.get("adapter_rank", 0))
    results = evaluate(loaded, heads, _prompts(args.prompts, args.prompt_stride), texts, cost_model, max_tokens=args.max_tokens,
                       batch=args.batch, cache_dir=cache,
                       progress=lambda eps, entry: log.info("eps %s done", eps), original=original)
    print(table(results))
    if args.json:
        write(results, args.json)
