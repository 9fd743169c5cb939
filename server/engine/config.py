"""Engine settings: one dataclass that checks itself, plus the memory-size parser the CLI uses."""
import re
from dataclasses import dataclass

import torch

from server.model.fetch import DEFAULT_MODEL
from server.model.quantize import QUANTIZATIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_MEMORY = 1 << 30  # default pool on CPU, before the max_num_seqs * max_model_len cap


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    """Model alias, GGUF file or Hugging Face folder (anything server.model.loader.load_model takes)."""
    heads: str | None = "auto"
    """Exit-head folder; "auto" = the heads shipped for this model if there are any; None = no early exit."""
    tune: str | None = None
    """A folder written by `offramp tune`: its delta is merged into the model at load, and with heads
    "auto" its own head set (calibrated against the original model) is used."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""
    dtype: str = "auto"
    """"auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16"."""
    quantization: str = "none"
    """Weights in memory: "none", "int8" or "int4" (CPU only; server/model/quantize.py); "auto" = int4 on
    CPU, none on CUDA. The default stays "none": the shipped exit heads are calibrated on the float model,
    and thresholds calibrated there do not carry over to int4 logits unchecked (BENCHMARKS.md)."""
    max_num_seqs: int = 64
    """Sequences running at once (decode rows of one step)."""
    max_num_batched_tokens: int = 1024
    """Tokens computed in one step: one per decode row plus prefill chunks."""
    max_model_len: int | None = None
    """Prompt plus generated tokens of one sequence; None = the model's max_position_embeddings."""
    kv_cache_memory: int | None = None
    """Bytes for the KV pool; None = gpu_memory_utilization of free GPU memory, or 1 GiB on CPU."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU memory left free after loading that the KV pool may take (CUDA only)."""
    block_size: int = 16
    """Tokens per KV block."""
    gate_whole_batch: bool = False
    """With a gated plan, ask a head in a step only when every decode row reaching it passes its gate.
    For full-vocabulary heads at a few rows a head costs the reading of the LM head whatever the row
    count, so asking for part of the batch costs time and saves none (BENCHMARKS.md); but a request's
    exits then depend on what else is in the batch. False (the default): each row decides alone."""
    seed: int = 0
    """Seeds torch's generator, from which requests without a seed draw theirs."""

    def __post_init__(self):
        checks = [
            (self.max_num_seqs >= 1, "max_num_seqs must be at least 1"),
            (self.max_num_batched_tokens >= self.max_num_seqs,
             "max_num_batched_tokens must be at least max_num_seqs (every running sequence decodes each step)"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be at least 2"),
            (self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory must be positive"),
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization must be in (0, 1]"),
            (self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
             "block_size must be a power of two"),
            (self.dtype == "auto" or self.dtype in DTYPES, f"dtype must be auto or one of {', '.join(DTYPES)}"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             "device must be auto, cpu, cuda or cuda:N"),
            (self.quantization == "auto" or self.quantization in QUANTIZATIONS,
             f"quantization must be auto or one of {', '.join(QUANTIZATIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for but CUDA is not available")
        if self.quantization not in ("auto", "none") and self.torch_device.type != "cpu":
            raise ValueError(f"quantization {self.quantization} runs on the CPU only")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def resolved_quantization(self) -> str:
        if self.quantization == "auto":
            return "int4" if self.torch_device.type == "cpu" else "none"
        return self.quantization

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


def parse_memory(text: str) -> int:
    """'4GiB', '512MB', '1.5G' or a plain byte count -> bytes (K/M/G are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise ValueError(f"cannot read {text!r} as a memory size (examples: 4GiB, 512MiB, 1000000)")
    scale = 1024 ** ("kmgt".find(match.group(2).lower()) + 1) if match.group(2) else 1
    return int(float(match.group(1)) * scale)
