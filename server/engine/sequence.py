"""Requests and the sequences they fork into, with everything the engine tracks per sequence."""
import math
import time
from enum import Enum

import torch

from server.engine.outputs import CompletionOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"  # holds KV blocks; prefilling in chunks or decoding one token per step
    FINISHED = "finished"


class Sequence:
    """One choice of a request: prompt + generated tokens and their KV blocks.

    KV holds tokens [0, num_computed_tokens). A decoding sequence has every token but the last
    computed; the step that computes the last one produces the next.
    """

    def __init__(self, seq_id: int, request: "Request", index: int, thresholds: list[float],
                 gate_cuts: list[float] | None = None):
        params = request.params
        self.seq_id = seq_id
        self.request = request
        self.index = index  # choice index within the request
        self.token_ids = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.thresholds = thresholds  # per head of the set, in layer order; inf = never exit there
        self.gate_cuts = gate_cuts or [-math.inf] * len(thresholds)  # per head: ask it only if gate >= cut
        self.exit_layers: list[int] = []  # per generated token
        self.lm_head_skipped: list[bool] = []  # per generated token: never ran the full LM head
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.generator = torch.Generator().manual_seed(
            params.seed + index if params.seed is not None else int(torch.randint(0, 2**62, ())))
        # incremental detokenisation: text = decode(output ids); visible_len chars of it may be shown
        self.text = ""
        self.visible_len = 0
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens
        self.num_exited_early = 0  # tokens that left before the last layer
        self.num_lm_head_skipped = 0  # tokens whose answer came from an exit head: the full LM head never ran
        self.decode_flops = 0.0
        self.decode_flops_full_depth = 0.0
        self.last_token_time: float | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prefill_target(self) -> int:
        """Tokens to compute before this sequence decodes: the prompt (whose last token gives the
        first output), or, after a preemption, everything but the last generated token."""
        return self.num_tokens - 1 if self.num_output_tokens else self.num_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def input_exit_layer(self, position: int, num_layers: int) -> int:
        """Depth to which the token at `position` is recomputed: prompt tokens run the full depth;
        a generated token runs to where its successor was produced (exit_layers[i + 1])."""
        output_index = position - self.num_prompt_tokens
        return num_layers if output_index < 0 else self.exit_layers[output_index + 1]

    def suppressed_token_ids(self, eos_token_ids: list[int]) -> list[int]:
        """Tokens that may not be produced yet (EOS and stop ids before min_tokens)."""
        params = self.params
        if self.num_output_tokens >= params.min_tokens:
            return []
        return list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))

    def next_row_seed(self) -> int:
        """A fresh 62-bit seed for this step's Gumbel noise, from the sequence's own generator."""
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.text[:self.visible_len], token_ids=self.output_token_ids,
            exit_layers=list(self.exit_layers), lm_head_skipped=list(self.lm_head_skipped), logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)


class PromptError(ValueError):
    """A prompt no sequence can be made of; the message says why in one line."""


def check_prompt(prompt_token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """The one check of a prompt's token ids, shared by the engine and the HTTP layer."""
    if not prompt_token_ids:
        raise PromptError("the prompt is empty")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise PromptError(f"token id {bad} is out of vocabulary (0..{vocab_size - 1})")
    if len(prompt_token_ids) >= max_model_len:
        raise PromptError(f"the prompt has {len(prompt_token_ids)} tokens, and max_model_len is {max_model_len}: "
                          "no room to generate")


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        # per prompt token, filled by prefill (server/engine/prompt_logprobs.py); the first has no context
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.seqs: list[Sequence] = []

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    @property
    def finish_reason(self) -> str | None:
        reasons = [seq.finish_reason for seq in self.seqs]
        return None if None in reasons else ("abort" if "abort" in reasons else reasons[0])
