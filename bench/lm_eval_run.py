"""lm-evaluation-harness against `offramp serve`, offline, on the repo's local tasks.

    python -m bench.lm_eval_run --model smollm2-135m --out lm-eval-out/     # starts a server
    python -m bench.lm_eval_run --url http://127.0.0.1:8000 --model smollm2-135m   # or uses one

Runs the lm_eval command line (`--model local-completions`, tasks from bench/lm_eval_tasks/) once at
full depth (both tasks), then offramp_qa (generate_until) with early exit at each calibrated epsilon
the server lists. Reports each task's score, each epsilon's agreement with the full-depth answers,
and checks every log-likelihood lm-eval got (offramp_cloze) against the model's own teacher-forced
log-likelihood of the same tokens, computed here without the server.

lm-eval needs the model's tokenizer to split context from continuation; it loads it with
transformers from a folder written here from Offramp's own tokenizer (tokenizer.json and
tokenizer_config.json), so no hub is involved. Tasks build their data locally (task_data.py).
"""
import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from server.model.fetch import DEFAULT_MODEL

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
LOGLIKELIHOOD_TASK, GENERATE_TASK = "offramp_cloze", "offramp_qa"
# Per continuation token: the server (paged attention, logsumexp) and the direct forward (dense
# attention, log_softmax) are both fp32; on SmolLM2 they differ by at most 3e-5 per token, and an
# fp64 forward puts each within 4e-5 of the exact value. A sum of n tokens gets n times this.
LOGLIKELIHOOD_ATOL_PER_TOKEN = 1e-4
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_hf_tokenizer(tokenizer, folder: Path) -> Path:
    """A folder transformers.AutoTokenizer loads offline: Offramp's tokenizer as tokenizer.json, and
    its special tokens in tokenizer_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = tokenizer.backend
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    spelled = lambda token_id: None if token_id is None else backend.id_to_token(token_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": spelled(tokenizer.eos_token_ids[0]),
              "bos_token": spelled(tokenizer.bos_token_id), "pad_token": spelled(tokenizer.pad_token_id),
              "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def lm_eval_command(url: str, tokenizer_dir: Path, model_name: str, tasks: list[str], out: Path,
                    gen_kwargs: str | None = None, limit: int | None = None) -> list[str]:
    model_args = (f"base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tokenizer_dir},"
                  f"model={model_name}")
    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "local-completions", "--model_args", model_args,
           "--include_path", str(TASKS_DIR), "--tasks", ",".join(tasks), "--log_samples", "--output_path", str(out)]
    if gen_kwargs:
        cmd += ["--gen_kwargs", gen_kwargs]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def read_run(out: Path, tasks: list[str]) -> tuple[dict, dict[str, list[dict]]]:
    """(results[task] metrics, samples[task] in doc order) of the lm_eval run written under `out`."""
    results = json.loads(Path(sorted(glob.glob(str(out / "*" / "results_*.json")))[-1]).read_text())["results"]
    samples = {}
    for task in tasks:
        path = sorted(glob.glob(str(out / "*" / f"samples_{task}_*.jsonl")))[-1]
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        samples[task] = sorted(rows, key=lambda row: row["doc_id"])
    return results, samples


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) request into token ids (TemplateLM._encode_pair):
    trailing spaces move to the continuation, and the continuation is what the whole adds to the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = encode(context + continuation), encode(context)
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def direct_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """(sum of log P(continuation token | everything before it), whether each was the argmax) under the
    full model, teacher-forced in one dense forward."""
    ids = context_ids + continuation_ids
    logprobs = model(torch.tensor([ids]))[0].float().log_softmax(-1)  # [T, V]; row p predicts token p + 1
    rows = torch.arange(len(context_ids) - 1, len(ids) - 1)
    targets = torch.tensor(continuation_ids)
    total = float(logprobs[rows, targets].double().sum())
    return total, bool((logprobs[rows].argmax(-1) == targets).all())


def check_loglikelihoods(model, encode, samples: list[dict]) -> dict:
    """Every (context, continuation) lm-eval scored: its log-likelihood and is_greedy from the server
    against the direct computation."""
    diffs, per_token, greedy_same = [], [], 0
    for sample in samples:
        for argument, response in zip(sample["arguments"].values(), sample["resps"]):
            served, served_greedy = float(response[0][0]), response[0][1] == "True"
            context_ids, continuation_ids = encode_pair(encode, argument["arg_0"], argument["arg_1"])
            direct, direct_greedy = direct_loglikelihood(model, context_ids, continuation_ids)
            diffs.append(abs(served - direct))
            per_token.append(diffs[-1] / len(continuation_ids))
            greedy_same += served_greedy == direct_greedy
    count = len(diffs)
    return {"requests": count, "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / count,
            "max_abs_diff_per_token": max(per_token), "tolerance_per_token": LOGLIKELIHOOD_ATOL_PER_TOKEN,
            "within_tolerance": max(per_token) <= LOGLIKELIHOOD_ATOL_PER_TOKEN, "is_greedy_agrees": greedy_same / count}


def agreement(full: list[dict], early: list[dict]) -> float:
    """Share of documents whose answer equals the full-depth answer, character for character."""
    return sum(a["filtered_resps"] == b["filtered_resps"] for a, b in zip(full, early)) / len(full)


def exit_token_counts(url: str) -> dict[int, float]:
    """Generated tokens so far by the layer they left at, from the server's offramp_exit_tokens series."""
    counts = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("offramp_exit_tokens_total{"):
            labels, value = line.rsplit(" ", 1)
            layer = labels.split('exit_layer="', 1)[1].split('"', 1)[0]
            counts[int(layer)] = counts.get(int(layer), 0.0) + float(value)
    return counts


def lm_head_skipped_tokens(url: str) -> float:
    """Generated tokens so far that the head after the last layer let go (offramp_lm_head_skipped_tokens)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("offramp_lm_head_skipped_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def share_exited_early(before: dict[int, float], after: dict[int, float], num_layers: int,
                       skipped: float = 0.0) -> float | None:
    """Share of the generated tokens between two readings that left early: before the last layer, or
    at the head after it (`skipped` of them, counted at layer L by offramp_exit_tokens)."""
    tokens = {layer: after[layer] - before.get(layer, 0.0) for layer in after}
    total = sum(tokens.values())
    return (sum(n for layer, n in tokens.items() if layer < num_layers) + skipped) / total if total else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", args.model, "--device", args.device, "--served-model-name", args.served_name,
           "--log-level", "warning"] + (["--heads", args.heads] if args.heads else [])
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"offramp serve exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("offramp serve did not become healthy in 600 s")


def run_lm_eval(cmd: list[str], out: Path, tasks: list[str], threads: int | None) -> tuple[dict, dict, float]:
    print("$", " ".join(cmd), file=sys.stderr)
    env = os.environ | OFFLINE_ENV | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return *read_run(out, tasks), time.perf_counter() - start


def benchmark(args, url: str) -> dict:
    from server.model.loader import load_model

    loaded = load_model(args.model, device="cpu", dtype=torch.float32)
    out = Path(args.out)
    tokenizer_dir = write_hf_tokenizer(loaded.tokenizer, out / "tokenizer")
    card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    name = card["id"]
    both = [LOGLIKELIHOOD_TASK, GENERATE_TASK]
    results, samples, seconds = run_lm_eval(lm_eval_command(url, tokenizer_dir, name, both, out / "full",
                                                            "early_exit=False", args.limit),
                                            out / "full", both, args.threads)
    encode = lambda text: loaded.tokenizer.encode(text)  # what lm-eval's HF tokenizer gives: add_special_tokens=False
    report = {"model": name, "full_depth": {"results": results, "seconds": seconds},
              "loglikelihood_check": check_loglikelihoods(loaded.model, encode, samples[LOGLIKELIHOOD_TASK]),
              "early_exit": {}}
    for eps in card.get("exit_epsilons") or []:
        run_out = out / f"eps-{eps:g}"
        cmd = lm_eval_command(url, tokenizer_dir, name, [GENERATE_TASK], run_out,
                              f"early_exit=True,exit_epsilon={eps:g}", args.limit)
        before, skipped_before = exit_token_counts(url), lm_head_skipped_tokens(url)
        eps_results, eps_samples, eps_seconds = run_lm_eval(cmd, run_out, [GENERATE_TASK], args.threads)
        skipped = lm_head_skipped_tokens(url) - skipped_before
        report["early_exit"][f"{eps:g}"] = {
            "exact_match": eps_results[GENERATE_TASK]["exact_match,none"], "seconds": eps_seconds,
            "agreement_with_full_depth": agreement(samples[GENERATE_TASK], eps_samples[GENERATE_TASK]),
            "tokens_exited_early": share_exited_early(before, exit_token_counts(url), loaded.config.num_hidden_layers,
                                                      skipped)}
    return report


def format_report(report: dict) -> str:
    full = report["full_depth"]["results"]
    check = report["loglikelihood_check"]
    lines = [f"model {report['model']}",
             f"{LOGLIKELIHOOD_TASK}: acc {full[LOGLIKELIHOOD_TASK]['acc,none']:.3f}, "
             f"acc_norm {full[LOGLIKELIHOOD_TASK]['acc_norm,none']:.3f}",
             f"log-likelihoods vs direct teacher-forced ({check['requests']} requests): max |diff| "
             f"{check['max_abs_diff']:.2e}, mean {check['mean_abs_diff']:.2e}, max per token "
             f"{check['max_abs_diff_per_token']:.2e} (tolerance {check['tolerance_per_token']:g} per token: "
             f"{'within' if check['within_tolerance'] else 'OUTSIDE'}); "
             f"is_greedy agrees {check['is_greedy_agrees']:.3f}",
             "", "| run | offramp_qa exact_match | agreement with full depth | tokens exited early |",
             "| --- | ---: | ---: | ---: |",
             f"| full depth | {full[GENERATE_TASK]['exact_match,none']:.3f} | 1.000 | 0 |"]
    for eps, row in report["early_exit"].items():
        exited = "n/a" if row["tokens_exited_early"] is None else f"{row['tokens_exited_early']:.1%}"
        lines.append(f"| early exit, eps {eps} | {row['exact_match']:.3f} | {row['agreement_with_full_depth']:.3f} "
                     f"| {exited} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server; otherwise one is started")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the served model, loaded here for the direct check")
    parser.add_argument("--heads", default=None, help="passed to offramp serve (default: its own default)")
    parser.add_argument("--served-name", default="offramp-model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (lm_eval --limit)")
    parser.add_argument("--out", default="lm-eval-out")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        report = benchmark(args, url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["loglikelihood_check"]["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
