"""Fixtures for engine tests: the tiny random model from tests/tiny_model.py with exit heads, and
an engine factory. fp32 on CPU."""
import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.model.exit_heads import ExitHeadSet
from server.model.loader import load_model
from tests.tiny_model import write_tiny_heads, write_tiny_model


@pytest.fixture(scope="session", params=["none", "int4"])
def tiny(request, tmp_path_factory):
    """LoadedModel of the tiny random Llama (6 layers, exits at 2 and 4): float weights, then int4 ones
    (server/model/quantize.py, the CPU default), so that every engine test runs on both."""
    torch.set_num_threads(1)
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    return load_model(str(folder), quantization=request.param)


@pytest.fixture(scope="session")
def tiny_heads(tiny, tmp_path_factory):
    """Synthetic thresholds: eps 0.9 exits often at layer 2 or 4, eps 0.99 (default) only at 4."""
    folder = write_tiny_heads(tmp_path_factory.mktemp("heads"), tiny.model, tiny.fingerprint)
    return ExitHeadSet.load(folder, config=tiny.config, fingerprint=tiny.fingerprint)


@pytest.fixture
def make_engine(tiny, tiny_heads):
    def make(heads=True, **overrides) -> LLMEngine:
        config = EngineConfig(**{"model": "tiny", "max_num_seqs": 32, "max_num_batched_tokens": 256, **overrides})
        return LLMEngine(tiny.model, tiny.tokenizer, config, tiny_heads if heads else None)
    return make
