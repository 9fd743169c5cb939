"""What the engine hands back: cumulative state of each request, one object per update."""
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # alternative token id -> logprob
    rank: int | None = None  # the token's rank in its distribution (1 = most likely); set for prompt tokens


@dataclass
class CompletionOutput:
    index: int  # choice index within the request (n > 1)
    text: str  # detokenised generated text so far, stop string excluded
    token_ids: list[int]
    exit_layers: list[int]  # per generated token: the layer it left at (num_hidden_layers = full depth)
    # per generated token: True where it never ran the full LM head (it left at an exit head; at the head
    # after the last layer its exit layer is num_hidden_layers, as at full depth, and only this tells them apart)
    lm_head_skipped: list[bool] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (None first), when asked for
    num_tokens_exited_early: int = 0  # over all choices: tokens that left before the last layer
    num_tokens_lm_head_skipped: int = 0  # tokens answered by an exit head (at any layer, the last included)
    decode_flops: float = 0.0  # FLOPs spent producing the generated tokens (heads and KV fill included)
    decode_flops_full_depth: float = 0.0  # the same tokens at full depth

    @property
    def compute_saved(self) -> float:
        if self.decode_flops_full_depth <= 0:
            return 0.0
        return 1.0 - self.decode_flops / self.decode_flops_full_depth
