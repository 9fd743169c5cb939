"""Resident memory of one server configuration, measured in a fresh process so that nothing else loaded
by the caller counts: after the model is loaded, after the engine (and its KV pool) exists, and the
highest value seen at the end of any engine step while --batch-size requests decode together.

    python -m bench.memory --model smollm2-135m --quantization int4 --prompts questions.jsonl
    python -m bench.memory --llama-cpp model.gguf --threads 1 --prompts questions.jsonl

The second form does the same for llama.cpp (llama-cpp-python), one request at a time. Prints one JSON
object (megabytes); `measure` runs it from another program.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

MB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int | None:
    """A field of Linux's /proc/self/status in KiB (VmRSS: resident now; VmHWM: the highest so far)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def rss_bytes() -> int:
    """This process's resident set size now: psutil if installed, else /proc/self/status."""
    try:
        import psutil
    except ImportError:
        return status_kib("VmRSS") * 1024
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The highest resident set size this process has had. VmHWM where there is one: ru_maxrss (KiB on
    Linux) survives fork and exec, so in a child of a large process it reports the parent's peak."""
    hwm = status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(argv: list[str], timeout: float = 900) -> dict:
    """`python -m bench.memory argv` in a fresh process -> its report, or {"error": why} if it failed."""
    done = subprocess.run([sys.executable, "-m", "bench.memory", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def offramp_memory(args, questions: list[str]) -> dict:
    from bench.prompts import chat_prompt_ids
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine, load_heads
    from server.engine.sampling_params import SamplingParams
    from server.model.loader import load_model

    config = EngineConfig(model=args.model, heads=args.heads, device=args.device, dtype=args.dtype,
                          quantization=args.quantization, max_num_seqs=args.batch_size,
                          max_num_batched_tokens=max(1024, args.batch_size))
    loaded = load_model(args.model, device=config.torch_device, dtype=config.torch_dtype,
                        quantization=config.resolved_quantization)
    after_load = rss_bytes()
    engine = LLMEngine(loaded.model, loaded.tokenizer, config, load_heads(args.heads, loaded))
    after_start = rss_bytes()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(chat_prompt_ids(loaded.tokenizer, questions)):
        engine.add_request(f"memory-{i}", prompt, params)
    under_load = after_start
    while engine.has_unfinished_requests():
        engine.step()
        under_load = max(under_load, rss_bytes())
    return {"rss_after_load_mb": after_load / MB, "rss_after_start_mb": after_start / MB,
            "rss_under_load_mb": under_load / MB, "requests": len(questions)}


def llama_cpp_memory(args, questions: list[str]) -> dict:
    """llama.cpp keeps the GGUF mapped: its pages count once read, so the figures after a run matter."""
    import llama_cpp

    from bench.peers import llama_cpp_prompt_ids, open_llama_cpp, run_llama_cpp

    prompts = llama_cpp_prompt_ids(args.llama_cpp, questions)
    llm = open_llama_cpp(llama_cpp, args.llama_cpp, args.threads, max(map(len, prompts)) + args.max_tokens)
    after_start = rss_bytes()
    under_load = after_start
    for prompt in prompts:
        run_llama_cpp(llm, [prompt], args.max_tokens)
        under_load = max(under_load, rss_bytes())
    return {"rss_after_load_mb": after_start / MB, "rss_after_start_mb": after_start / MB,
            "rss_under_load_mb": under_load / MB, "requests": len(questions)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--llama-cpp", default=None, help="measure llama.cpp on this GGUF instead")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--heads", default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--batch-size", type=int, default=16, help="requests decoding together (Offramp)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if (args.model is None) == (args.llama_cpp is None):
        parser.error("give exactly one of --model and --llama-cpp")
    import torch

    from bench.prompts import read_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    questions = read_prompts(args.prompts, args.batch_size)
    report = llama_cpp_memory(args, questions) if args.llama_cpp else offramp_memory(args, questions)
    report["peak_rss_mb"] = peak_rss_bytes() / MB
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
