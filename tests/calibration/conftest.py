"""Fixtures of the calibration tests: the tiny random Llama's folder, one torch thread."""
import pytest
import torch

from tests.tiny_model import write_tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matmuls on a shared machine: more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")
