"""`offramp tune`: depth-tune a model and its exit heads (calibration/tune.py), resumably.

Data is streamed: the model's own replies to prompt files (calibration/data.py: generated once at
full depth with the engine, cached in OUT/replies.jsonl) and text files read block by block, interleaved document by
document, cut into rows of at most --seq-len tokens. Every --checkpoint-every steps the trainable
state, the optimiser and the data position go to OUT/checkpoint.pt; running the same command
again resumes from there. At the end OUT holds delta.json + delta.safetensors (LoRA or full
weights; none for --method heads) and heads/, whose exits.json names the tuned fingerprint.
"""
import copy
import json
import logging
import random
from itertools import islice
from pathlib import Path

from server.errors import UsageError
from server.model.fetch import DEFAULT_MODEL

log = logging.getLogger(__name__)
PROMPTS_DIR = Path(__file__).parent / "prompts"


def register(subparsers):
    p = subparsers.add_parser("tune", help="train the backbone with the exit heads so more tokens can leave early")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--heads", default=None, help="head set to start from (else fresh heads at --layers)")
    p.add_argument("--layers", default=None, help="exit layers, comma-separated (default: those of --heads)")
    p.add_argument("--head-kind", default="norm", help="kind of fresh heads: norm, linear or mlp")
    p.add_argument("--head-rank", type=int, default=0, help="adapter rank of fresh heads (linear: 0 = full d x d)")
    p.add_argument("--method", default="lora:16", help="lora:RANK, full, or heads (backbone frozen)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 * rank)")
    p.add_argument("--weights", default="uniform", help="exit loss weights: uniform, calm or asym:ALPHA")
    p.add_argument("--layer-dropout", type=float, default=0.0, help="skip probability of the last layer")
    p.add_argument("--dropout-curve", default="linear", help="how skip probability rises with depth: linear or exp")
    p.add_argument("--anchor", default="kl:1.0", help="kl:BETA (targets = the original model) or none")
    p.add_argument("--prompts", action="append", default=None,
                   help="prompt file, one per line (repeatable; default: the shipped training prompts)")
    p.add_argument("--text", action="append", default=[], help="text file to stream (repeatable)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (non-padding)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="rows per step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--warmup-tokens", type=int, default=20_000)
    p.add_argument("--reply-tokens", type=int, default=256, help="longest generated reply")
    p.add_argument("--reply-temperature", type=float, default=0.7)
    p.add_argument("--calib-prompts", default=str(PROMPTS_DIR / "calib.txt"),
                   help="prompts whose greedy replies calibrate the tuned heads' thresholds against the original "
                        "model (none = leave the heads uncalibrated)")
    p.add_argument("--calib-reply-tokens", type=int, default=128)
    p.add_argument("--epsilons", default="0.9,0.95,0.99", help="agreement levels to calibrate, comma-separated")
    p.add_argument("--delta", type=float, default=None, help="Learn-then-Test risk level (default: empirical)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, help="output folder (also holds the checkpoint)")
    p.set_defaults(func=run_tune)


def text_documents(path, tokenizer, block_chars: int):
    """Token ids of successive blocks of about block_chars characters, cut at line ends."""
    with open(path, encoding="utf-8", errors="replace") as f:
        block = []
        size = 0
        for line in f:
            block.append(line)
            size += len(line)
            if size >= block_chars:
                yield tokenizer.encode("".join(block))
                block, size = [], 0
        if block:
            yield tokenizer.encode("".join(block))


def documents(replies: list[list[int]], texts: list[str], tokenizer, block_chars: int, seed: int):
    """Endless, deterministic stream of documents: the sources in turn, each one restarting when done
    (replies reshuffled every pass)."""
    def reply_pass(epoch):
        order = list(range(len(replies)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        return (replies[i] for i in order)

    makers = ([reply_pass] if replies else []) + [lambda epoch, t=t: text_documents(t, tokenizer, block_chars)
                                                  for t in texts]
    if not makers:
        raise UsageError("no training data: give --prompts and/or --text")
    epochs = [0] * len(makers)
    streams = [make(0) for make in makers]
    while True:
        for i, make in enumerate(makers):
            doc = next(streams[i], None)
            if doc is None:
                epochs[i] += 1
                streams[i] = make(epochs[i])
                doc = next(streams[i], None)
            if doc:
                yield doc


def batches(docs, seq_len: int, batch_size: int):
    """(input_ids [B, T], attention_mask [B, T]) with each row one document piece, right-padded."""
    import torch

    rows = []
    for doc in docs:
        for start in range(0, len(doc), seq_len):
            piece = doc[start:start + seq_len]
            if len(piece) >= 2:
                rows.append(piece)
            if len(rows) == batch_size:
                width = max(len(r) for r in rows)
                ids = torch.zeros(batch_size, width, dtype=torch.long)
                mask = torch.zeros(batch_size, width, dtype=torch.long)
                for i, r in enumerate(rows):
                    ids[i, :len(r)] = torch.tensor(r)
                    mask[i, :len(r)] = 1
                yield ids, mask
                rows = []


def initial_heads(loaded, heads_dir, layers, head_kind, head_rank=0):
    from server.model.exit_head import AdapterSpec
    from server.model.exit_heads import ExitHeadSet

    base = {"name": loaded.name, "fingerprint": loaded.fingerprint}
    start = None
    if heads_dir is not None:
        start = ExitHeadSet.load(heads_dir, config=loaded.config, fingerprint=loaded.fingerprint)
        spec = AdapterSpec(start.meta["head_kind"], start.meta.get("adapter_rank", 0))
        layers = layers or start.layers
    else:
        spec = AdapterSpec(head_kind, head_rank)
    if not layers:
        raise UsageError("give --layers, --heads, or both")
    heads = ExitHeadSet.create(loaded.model, layers, spec, base)
    for k in heads.layers:
        if start is not None and k in start.layers:
            heads.head(k).load_state_dict(start.head(k).state_dict())
    return heads.to(loaded.model.lm_head.weight.device)


def run_tune(args):
    import torch
    from tqdm import tqdm

    from calibration.data import generate_replies, read_prompts
    from calibration.tune import Tuner, TuneConfig
    from server.model.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    out = Path(args.out)
    layers = [int(k) for k in args.layers.split(",")] if args.layers else None
    prompt_files = args.prompts if args.prompts is not None else [str(PROMPTS_DIR / "train.txt")]
    config = TuneConfig(layers=layers or [], method=args.method, lora_alpha=args.lora_alpha, weights=args.weights,
                        layer_dropout=args.layer_dropout, dropout_curve=args.dropout_curve, anchor=args.anchor,
                        tokens=args.tokens, lr=args.lr, head_lr=args.head_lr, warmup_tokens=args.warmup_tokens,
                        seed=args.seed, extra={"seq_len": args.seq_len, "batch_size": args.batch_size,
                                               "prompts": [Path(p).name for p in prompt_files],
                                               "text": [Path(t).name for t in args.text]})
    loaded = load_model(args.model, device=device)
    heads = initial_heads(loaded, args.heads, layers, args.head_kind, args.head_rank)
    config.layers = heads.layers
    base = {"name": loaded.name, "fingerprint": loaded.fingerprint}
    prompts = [p for path in prompt_files for p in read_prompts(path)]
    replies = [s.token_ids for s in generate_replies(
        loaded, prompts, max_tokens=args.reply_tokens, temperature=args.reply_temperature, seed=args.seed,
        cache=out / "replies.jsonl")] if prompts else []
    calib = None
    if args.calib_prompts != "none":
        calib = generate_replies(loaded, read_prompts(args.calib_prompts), max_tokens=args.calib_reply_tokens,
                                 cache=out / "replies.jsonl")
    teacher = copy.deepcopy(loaded.model).eval().requires_grad_(False) if config.method_kind == "full" else None
    tuner = Tuner(loaded.model, heads, config, teacher)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file() and not args.restart:
        state = torch.load(checkpoint, map_location=tuner.device, weights_only=False)
        saved = {k: v for k, v in state["config"].items() if k != "tokens"}
        if saved != {k: v for k, v in config.to_dict().items() if k != "tokens"}:
            raise UsageError(f"{checkpoint} was made with other settings; use the same ones, or --restart")
        tuner.load_state_dict(state)
        log.info("resumed from %s at %d tokens (step %d)", checkpoint, tuner.tokens_seen, tuner.steps)
    stream = batches(documents(replies, args.text, loaded.tokenizer, 4 * args.seq_len, args.seed),
                     args.seq_len, args.batch_size)
    stream = islice(stream, tuner.batches_seen, None)  # the data position of the checkpoint
    progress = tqdm(total=config.tokens, initial=tuner.tokens_seen, unit="tok", mininterval=2.0)
    with (out / "log.jsonl").open("a") as log_file:
        for input_ids, attention_mask in stream:
            if tuner.tokens_seen >= config.tokens:
                break
            terms, agreement = tuner.train_step(input_ids, attention_mask)
            progress.update(int(attention_mask.sum()))
            progress.set_postfix({name: f"{value:.3f}" for name, value in terms.items()}
                                 | {f"agree{k}": f"{a:.2f}" for k, a in agreement.items()})
            log_file.write(json.dumps({"step": tuner.steps, "tokens": tuner.tokens_seen, **terms,
                                       "agreement": {str(k): a for k, a in agreement.items()}}) + "\n")
            if tuner.steps % args.checkpoint_every == 0:
                save_checkpoint(tuner, checkpoint)
                save_outputs(out, tuner, base)
                log_file.flush()
    progress.close()
    save_checkpoint(tuner, checkpoint)
    if calib is not None:
        calibrate(tuner, calib, [float(e) for e in args.epsilons.split(",")], args.delta)
    save_outputs(out, tuner, base)
    print(f"tuned {tuner.tokens_seen} tokens in {tuner.steps} steps: {out}")


def calibrate(tuner, sequences, epsilons, delta) -> None:
    """Thresholds of the tuned heads, agreement counted against the original model."""
    from calibration.tune import calibrate_heads, exit_features
    from server.model.costs import CostModel

    heads, meta = tuner.heads.eval(), tuner.heads.meta
    tuner.model.eval()
    margins, correct = exit_features(tuner.model, heads, sequences, tuner.reference_logits)
    costs = CostModel.from_config(tuner.model.config, head_kind=meta["head_kind"], adapter_rank=meta["adapter_rank"])
    default = 0.95 if 0.95 in epsilons else max(epsilons)
    reports = calibrate_heads(heads, margins, correct, costs, epsilons, delta, default_epsilon=default)
    for eps, report in reports.items():
        exits = ", ".join(f"L{h['layer']} {h.get('exit_rate', 0):.1%}" for h in report["heads"] if h["kept"])
        print(f"eps {eps:g}: {report['exit_fraction']:.1%} of {report['num_tokens']} calibration tokens leave early "
              f"({exits or 'no head kept'}), {report['saved_fraction']:.1%} of decode compute saved")


def save_checkpoint(tuner, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(tuner.state_dict(), tmp)
    tmp.replace(path)  # atomic: a run killed while saving keeps the previous checkpoint


def save_outputs(out: Path, tuner, base: dict) -> None:
    """delta.json + delta.safetensors (unless the backbone was frozen) and heads/ tied to the result."""
    from calibration.lora import TARGETS, save_delta

    config = tuner.config
    recipe = {k: v for k, v in config.to_dict().items() if k not in ("extra",)} | config.extra
    recipe["tokens_trained"] = tuner.tokens_seen
    heads = tuner.heads
    if config.method_kind == "heads":
        fingerprint, tune_meta = base["fingerprint"], {"recipe": recipe}
    else:
        manifest = save_delta(out, tuner.backbone_state(), {
            "kind": config.method_kind, "base_model": base, "rank": config.rank, "alpha": config.lora_alpha,
            "targets": list(TARGETS) if config.method_kind == "lora" else None, "recipe": recipe})
        fingerprint = manifest["tuned_fingerprint"]
        tune_meta = {"delta_dir": "..", "original_fingerprint": base["fingerprint"], "recipe": recipe}
    heads.meta["base_model"]["fingerprint"] = fingerprint
    heads.meta["tune"] = tune_meta
    heads.save(out / "heads")
