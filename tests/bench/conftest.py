"""The tiny random model for the benchmark tools' tests; test_serve.py starts its own `offramp serve` on it."""
import pytest
import torch

from server.model.loader import load_model
from tests.tiny_model import write_tiny_heads, write_tiny_model

QUESTIONS = ["what is the capital of france", "the quick brown fox", "hello world code", "red green blue sky",
             "one two three four", "good day and good night"]


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """(model folder, heads folder): 6 layers, exits at 2 and 4, eps 0.9 (both heads) and 0.99 (default)."""
    torch.set_num_threads(1)
    model_dir = write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    loaded = load_model(str(model_dir))
    heads_dir = write_tiny_heads(tmp_path_factory.mktemp("heads"), loaded.model, loaded.fingerprint)
    return model_dir, heads_dir


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """A Vicuna-style JSONL of QUESTIONS (one question in `turns` per line)."""
    import json

    path = tmp_path_factory.mktemp("prompts") / "questions.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "turns": [q]}) + "\n" for i, q in enumerate(QUESTIONS)))
    return path
