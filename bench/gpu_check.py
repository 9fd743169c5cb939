"""Everything that can only be checked on a GPU, in one run, ending in one short table (bench/gpu_check.sh).

  kernel   the fused Triton exit kernel against its torch reference (same tokens and exit flags, margins
           within 1e-3 in bf16 on random inputs: the two sum the projection in different orders), full
           vocabulary and shortlist, then its bandwidth against a device-to-device copy
  engine   bench.gpu_decode_floor: full-depth and early-exit decode steps at batch 1 / 16 / 64 against
           the bytes-read floor (Llama-3.2-1B shape, random weights)
  server   `offramp serve` started on a free port, answered through the openai client

The server serves --model if given, else the default SmolLM2 GGUF if the cache holds it, else a folder
written here with random weights at SmolLM2-135M's shape (the GPU machine cannot download; its 98 MB
exceed what a run carries). On a machine where the package is not installed (no entry points), the
serve command is registered directly.

--dry-run runs the same three steps on the CPU at tiny sizes (the kernel under TRITON_INTERPRET=1,
which the shell wrapper sets; the decode floor at the tiny shape; the server on a tiny random model),
so the tests keep the script working where no GPU is lent. Timings from a dry run mean nothing.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROW_COUNTS = (1, 16, 64)
# of bench.gpu_decode_floor's exit mixes, the rows the table shows (batch 1 runs the pure mixes only)
TABLE_MIXES = ("full", "all L/2", "50% L/2, 50% full")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# SmolLM2-135M's layers; the vocabulary is the byte-level tokenizer's own
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)
# the serve command without the package's entry points (python -c; argv[1:] are serve's arguments)
SERVE_DIRECTLY = ("import argparse, logging, sys\n"
                  "from server.api import serve\n"
                  "parser = argparse.ArgumentParser(prog='offramp')\n"
                  "serve.register(parser.add_subparsers(dest='command'))\n"
                  "args = parser.parse_args(['serve', *sys.argv[1:]])\n"
                  "logging.basicConfig(level=args.log_level.upper())\n"
                  "sys.exit(args.func(args) or 0)")


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
            if r["mix"] in TABLE_MIXES:
                rows.append({"check": f"decode {shape['shape']} B={r['batch']} {r['mix']}", "ok": True,
                             "detail": f"step {r['step_ms']:.2f} ms, floor {r['floor_ms']:.2f} ms "
                                       f"({r['step_over_floor']:.1f}x), {r['decode_tok_s']:.0f} tok/s"})
    return rows


def write_random_model(folder: Path, shape: dict) -> Path:
    """A Hugging Face folder: random weights (std 0.02) at `shape`, a byte-level tokenizer without merges
    (256 bytes and 3 ChatML specials) and a ChatML template. Its replies are noise, but it is served by
    exactly the code that serves a real model."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from server.model.config import ModelConfig
    from server.model.llama import LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    config = ModelConfig(**shape, vocab_size=len(vocab), max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2])
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight" and "rotary" not in k}
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def served_model(model: str | None, dry_run: bool, tmp: str) -> tuple[str, str]:
    """(what to serve, how to name it in the table)."""
    from server.model.fetch import ALIASES, DEFAULT_MODEL, offramp_home

    if model is not None:
        return model, Path(model).name
    cached = offramp_home() / "models" / DEFAULT_MODEL / ALIASES[DEFAULT_MODEL].filename
    if not dry_run and cached.is_file():
        return DEFAULT_MODEL, DEFAULT_MODEL
    shape = TINY_SHAPE if dry_run else SMOLLM2_SHAPE
    folder = write_random_model(Path(tmp) / ("random-tiny" if dry_run else "random-smollm2-shape"), shape)
    return str(folder), f"random weights, {shape['num_hidden_layers']} layers of {shape['hidden_size']}"


def serve_command(port: int, model: str, device: torch.device, dry_run: bool) -> list[str]:
    from server.cli import command_modules

    arguments = ["--model", model, "--port", str(port), "--host", "127.0.0.1", "--device", str(device),
                 "--heads", "none" if dry_run else "auto"]
    if command_modules():
        return [sys.executable, "-m", "server.cli", "serve", *arguments]
    return [sys.executable, "-c", SERVE_DIRECTLY, *arguments]


def check_server(model: str | None, device: torch.device, dry_run: bool) -> list[dict]:
    try:
        import openai
    except ImportError:
        return [{"check": "server + openai client", "ok": False,
                 "detail": "openai is not installed here (bench/gpu_check.sh --wheels DIR installs it)"}]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        model, name = served_model(model, dry_run, tmp)
        server = subprocess.Popen(serve_command(port, model, device, dry_run), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            return [ask_server(openai, port, server, name)]
        finally:
            server.terminate()
            server.wait(timeout=30)


def ask_server(openai, port: int, server: subprocess.Popen, name: str) -> dict:
    check = f"server + openai client ({name})"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    deadline = time.monotonic() + 300
    while True:
        try:
            client.models.list()
            break
        except (openai.APIConnectionError, openai.InternalServerError):  # not up yet, or 503 while loading
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                lines = server.stderr.read().strip().splitlines()
                return {"check": check, "ok": False,
                        "detail": f"the server did not start: {lines[-1] if lines else 'no output'}"}
            time.sleep(0.5)
    start = time.monotonic()
    reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    seconds = time.monotonic() - start
    ok = reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    return {"check": check, "ok": ok, "detail": f"{reply.usage.completion_tokens} tokens in {seconds:.2f} s: "
                                                f"{reply.choices[0].message.content[:40]!r}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--model", default=None,
                        help="served model (default: smollm2-135m if cached, else random weights written here)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on the CPU")
    rows = check_kernel(device, args.dry_run) + check_engine(device, args.dry_run)
    rows += check_server(args.model, device, args.dry_run)
    width = max(len(r["check"]) for r in rows)
    print(f"{'check':<{width}}  ok    detail")
    for r in rows:
        print(f"{r['check']:<{width}}  {'yes' if r['ok'] else 'NO ':<4}  {r['detail']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
