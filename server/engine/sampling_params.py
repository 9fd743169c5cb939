"""Per-request generation controls, checked once when the request is made."""
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_N = 16


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None = until max_model_len
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # matched on detokenised text; never emitted
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stops are suppressed before this many tokens
    n: int = 1
    logprobs: int | None = None  # top alternatives to return per token (0 = only the chosen)
    prompt_logprobs: int | None = None  # per prompt token: its logprob and this many top alternatives
    early_exit: bool = True
    exit_epsilon: float | None = None  # None = the head set's default

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (0.0 <= self.temperature <= 100.0, "temperature", "must be between 0 and 100"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "must be -1, 0 (off) or a positive number"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens"),
            (1 <= self.n <= MAX_N, "n", f"must be between 1 and {MAX_N}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be between 0 and {MAX_LOGPROBS}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
             f"must be between 0 and {MAX_LOGPROBS}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed", "must be a non-negative 64-bit integer"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise SamplingParamsError(name, f"{name} {message}")


class SamplingParamsError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
