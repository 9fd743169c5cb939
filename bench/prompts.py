"""Benchmark prompts: questions from a JSONL file, the same for the HTTP, quality and peer benchmarks.

A line is a JSON object with `turns` (Vicuna / MT-Bench style; the first turn is the question),
`prompt` or `text`, or a bare JSON string. Every tool sends a question as one user message in
the model's chat template, so the three benchmarks see the same tokens.
"""
import json
import random
from itertools import cycle, islice
from pathlib import Path


def read_prompts(path, num_prompts: int | None = None) -> list[str]:
    """The file's questions in order; more than the file holds repeats it from the start."""
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        questions.append(_question(record, f"{path}:{number}"))
    if not questions:
        raise ValueError(f"{path}: no prompts")
    return list(islice(cycle(questions), num_prompts or len(questions)))


def _question(record, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("turns"), list) and record["turns"]:
            return str(record["turns"][0])
        for key in ("prompt", "text"):
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f"{where}: expected a string or an object with turns, prompt or text")


def random_token_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """vLLM's random dataset without a tokenizer: num_prompts lists of input_len ids in [0, vocab_size)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def chat_prompt_ids(tokenizer, questions: list[str]) -> list[list[int]]:
    """Each question as one user turn in the chat template, with the assistant's turn opened."""
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
            for q in questions]
