"""Numbers the engine reports after each step and each finished request (server/metrics.py turns
them into Prometheus series; the engine knows nothing of Prometheus)."""
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class StepStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # used blocks / all blocks
    num_preemptions: int = 0  # in this step
    num_prompt_tokens: int = 0  # prompt tokens computed in this step (prefill chunks)
    num_generation_tokens: int = 0  # tokens emitted in this step (first tokens included)
    step_seconds: float = 0.0
    deepest_layer: int = 0  # deepest layer a decode row reached in this step; 0 = no decode
    exit_layers: list[int] = field(default_factory=list)  # one per emitted token (first tokens: full depth)
    exit_margins: list[tuple[int, float]] = field(default_factory=list)  # (exit layer, margin) per head evaluation
    num_lm_head_skipped: int = 0  # tokens of this step answered by an exit head, so the full LM head never ran
    decode_flops: float = 0.0
    decode_flops_full_depth: float = 0.0
    time_to_first_tokens: list[float] = field(default_factory=list)  # seconds, for requests whose first token came now
    inter_token_latencies: list[float] = field(default_factory=list)
    forward_seconds: float = 0.0  # of step_seconds, the time inside the model, the exit kernel and the sampler


@dataclass
class FinishedRequestStats:
    finish_reason: str
    e2e_latency: float
    queue_time: float  # arrival -> first scheduled
    num_prompt_tokens: int
    num_generation_tokens: int


class StatsObserver(Protocol):
    def record_step(self, stats: StepStats) -> None: ...

    def record_finished(self, stats: FinishedRequestStats) -> None: ...
