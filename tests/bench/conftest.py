"""Prompts for the benchmark tools' tests. The tiny model is tests/conftest.py's `tiny_folders`;
test_serve.py starts its own `offramp serve` on it."""
import pytest

QUESTIONS = ["what is the capital of france", "the quick brown fox", "hello world code", "red green blue sky",
             "one two three four", "good day and good night"]


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """A Vicuna-style JSONL of QUESTIONS (one question in `turns` per line)."""
    import json

    path = tmp_path_factory.mktemp("prompts") / "questions.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "turns": [q]}) + "\n" for i, q in enumerate(QUESTIONS)))
    return path
