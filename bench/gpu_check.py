"""Everything that can only be checked on a GPU, in one run, ending in one short table (bench/gpu_check.sh).

  kernel   the fused Triton exit kernel against its torch reference (same tokens and exit flags, margins
           within 1e-3 in bf16 on random inputs: the two sum the projection in different orders), full
           vocabulary and shortlist, then its bandwidth against a device-to-device copy
  engine   bench.gpu_decode_floor: full-depth and early-exit decode steps at batch 1 / 16 / 64 against
           the bytes-read floor (Llama-3.2-1B shape, random weights)
  server   `offramp serve` started on a free port, answered through the openai client

--dry-run runs the same three steps on the CPU at tiny sizes (the kernel under TRITON_INTERPRET=1,
which the shell wrapper sets; the decode floor at the tiny shape; the server with --model MODEL), so the
tests keep the script working where no GPU is lent. Timings from a dry run mean nothing.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

ROW_COUNTS = (1, 16, 64)


def check_kernel(device: torch.device, dry_run: bool) -> list[dict]:
    from kernels.exit_head import exit_head_reference, exit_head_triton

    d, vocab, dtype = (64, 512, torch.float32) if dry_run else (576, 49152, torch.bfloat16)
    generator = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)
    lm_head, norm = rand(vocab, d) * 0.05, 1 + 0.1 * rand(d)
    rows_out = []
    for listed in (None, vocab // 8):
        ids = None if listed is None else torch.randperm(vocab, generator=generator)[:listed].to(device)
        weight = lm_head if ids is None else lm_head[ids].contiguous()
        other = None if ids is None else (lambda y: torch.logsumexp(y.float() @ lm_head.float().T, -1) - 1.0)
        worst_margin, mismatches, total = 0.0, 0, 0
        for rows in ROW_COUNTS:
            hidden = rand(rows, d)
            thresholds = torch.full((rows,), 0.05, device=device)
            kw = dict(eps=1e-5, token_ids=ids, other_logit=other)
            ref = exit_head_reference(hidden, norm, weight, thresholds, **kw)
            got = exit_head_triton(hidden, norm, weight, thresholds, **kw)
            mismatches += int((ref.token != got.token).sum() + (ref.exit != got.exit).sum())
            worst_margin = max(worst_margin, float((ref.margin - got.margin).abs().max()))
            total += rows
        seconds = None if dry_run else time_kernel(exit_head_triton, norm, weight, d, device, dtype, ids, other)
        moved = weight.numel() * weight.element_size()
        row = {"check": f"exit kernel, {'full vocab' if ids is None else f'shortlist {listed}'}",
               "ok": mismatches == 0 and worst_margin <= 1e-3,
               "detail": f"{total} rows, {mismatches} token/exit mismatches, max |margin diff| {worst_margin:.1e}"}
        if seconds is not None:
            copy = copy_bandwidth(device)
            row["detail"] += f"; {moved / seconds / 1e9:.0f} GB/s = {moved / seconds / copy:.0%} of copy"
        rows_out.append(row)
    return rows_out


def time_kernel(kernel, norm, weight, d, device, dtype, ids, other) -> float:
    hidden = torch.randn(16, d, device=device, dtype=dtype)
    thresholds = torch.full((16,), 0.05, device=device)
    for _ in range(3):
        kernel(hidden, norm, weight, thresholds, eps=1e-5, token_ids=ids, other_logit=other)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        kernel(hidden, norm, weight, thresholds, eps=1e-5, token_ids=ids, other_logit=other)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device) -> float:
    from bench.gpu_decode_floor import copy_bandwidth as measure

    return measure(device, 1 << 30)


def check_engine(device: torch.device, dry_run: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "floor.json")
        args = (["--shapes", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "2", "--batch-sizes", "1", "4",
                 "--prompt-len", "16"] if dry_run else
                ["--shapes", "llama-3.2-1b", "--device", str(device), "--batch-sizes", *map(str, ROW_COUNTS),
                 "--steps", "16"])
        done = subprocess.run([sys.executable, "-m", "bench.gpu_decode_floor", *args, "--output", output],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return [{"check": "engine decode vs floor", "ok": False, "detail": done.stderr.strip().splitlines()[-1]}]
        report = json.load(open(output))
    rows = []
    for shape in report["shapes"]:
        for r in shape["results"]:
            if r["mix"].startswith("full") or r["batch"] == max(x["batch"] for x in shape["results"]):
                rows.append({"check": f"decode {shape['shape']} B={r['batch']} {r['mix']}", "ok": True,
                             "detail": f"step {r['step_ms']:.2f} ms, floor {r['floor_ms']:.2f} ms "
                                       f"({r['step_over_floor']:.1f}x), {r['decode_tok_s']:.0f} tok/s"})
    return rows


def check_server(model: str, device: torch.device, dry_run: bool) -> list[dict]:
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", str(port),
               "--device", str(device)] + (["--heads", "none"] if dry_run else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except (openai.APIConnectionError, openai.InternalServerError):  # not up yet, or 503 while loading
                if server.poll() is not None or time.monotonic() > deadline:
                    return [{"check": "server + openai client", "ok": False, "detail": "the server did not start"}]
                time.sleep(0.5)
        start = time.monotonic()
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=16, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        seconds = time.monotonic() - start
        ok = reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
        return [{"check": "server + openai client", "ok": ok,
                 "detail": f"{reply.usage.completion_tokens} tokens in {seconds:.2f} s: "
                           f"{reply.choices[0].message.content[:40]!r}"}]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--model", default=None, help="served model (default: smollm2-135m; required with --dry-run)")
    args = parser.parse_args(argv)
    if args.dry_run and args.model is None:
        parser.error("--dry-run needs --model (a small local model folder)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on the CPU")
    rows = check_kernel(device, args.dry_run) + check_engine(device, args.dry_run)
    rows += check_server(args.model or "smollm2-135m", device, args.dry_run)
    width = max(len(r["check"]) for r in rows)
    print(f"{'check':<{width}}  ok    detail")
    for r in rows:
        print(f"{r['check']:<{width}}  {'yes' if r['ok'] else 'NO ':<4}  {r['detail']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
