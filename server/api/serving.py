"""What both OpenAI endpoints share: request checks, the translation into SamplingParams,
tokenizing off the event loop, usage, stream pieces and error translation. Running prompts through
the engine (admission, aborts on disconnect) is EngineClient's, in engine_client.py.

Nothing slow runs on the event loop: chat templates render and texts tokenize on worker threads,
and a text that cannot fit max_model_len is refused by its size before it is tokenized.
"""
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from server.api.admission import Admission
from server.api.engine_client import EngineClient, ModelInfo
from server.api.errors import APIError, bad_request
from server.api.limits import RequestLimits
from server.api.protocol import ExitUsage, SamplingFields, Usage
from server.engine.async_engine import EngineStopped
from server.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams, SamplingParamsError
from server.engine.sequence import PromptError, check_prompt
from server.model.exit_heads import match_epsilon

log = logging.getLogger(__name__)

STREAM_DONE = "data: [DONE]\n\n"


@dataclass
class ChoiceCursor:
    """How much of one choice a stream has sent so far."""
    num_chars: int = 0
    num_tokens: int = 0
    finished: bool = False


@dataclass
class ChoiceDelta:
    text: str
    token_ids: list[int]
    exit_layers: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: str | int | None


def advance(cursor: ChoiceCursor, output: CompletionOutput) -> ChoiceDelta | None:
    """What `output` (cumulative) adds to what was sent; None when nothing new."""
    if cursor.finished:
        return None
    text = output.text[cursor.num_chars:]
    start = cursor.num_tokens
    if not text and len(output.token_ids) == start and not output.finished:
        return None
    cursor.num_chars = len(output.text)
    cursor.num_tokens = len(output.token_ids)
    cursor.finished = output.finished
    logprobs = output.logprobs[start:] if output.logprobs is not None else None
    return ChoiceDelta(text, output.token_ids[start:], output.exit_layers[start:], logprobs, output.finish_reason,
                       output.stop_reason)


def sse(payload) -> str:
    """One server-sent event carrying a pydantic model."""
    return f"data: {payload.model_dump_json()}\n\n"


class OpenAIServing(EngineClient):
    def __init__(self, engine, info: ModelInfo, admission: Admission | None = None,
                 limits: RequestLimits | None = None):
        super().__init__(engine, admission)
        self.info = info
        self.tokenizer = info.tokenizer
        self.limits = limits or RequestLimits()

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.info.name:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise APIError(404, f"The model `{shown}` does not exist; this server serves `{self.info.name}`.",
                           param="model", code="model_not_found")

    def check_num_prompts(self, num_prompts: int) -> None:
        if num_prompts > self.limits.max_prompts:
            raise bad_request(f"the request has {num_prompts} prompts; at most {self.limits.max_prompts} per "
                              "request (--max-prompts-per-request)", "prompt")

    def check_text_length(self, text: str, param: str) -> None:
        """Refuse, without tokenizing it, a text too long for max_model_len however it tokenizes."""
        limit = self.info.max_prompt_bytes
        if limit is None:
            return
        # UTF-8 takes a byte or more per character: a text with too many characters is not even encoded
        size = len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            num_tokens = -(-size // self.info.max_token_bytes)
            raise bad_request(f"{param} has at least {size} bytes, so at least {num_tokens} tokens, and max_model_len "
                              f"is {self.info.max_model_len}", param)

    async def encode(self, texts: list[str], param: str, add_special_tokens: bool) -> list[list[int]]:
        """Token ids of each text, on a worker thread: the backend's encode_batch releases the GIL, so the
        event loop keeps answering while a long text tokenizes."""
        for text in texts:
            self.check_text_length(text, param)
        try:
            encodings = await asyncio.to_thread(self.tokenizer.backend.encode_batch, texts,
                                                add_special_tokens=add_special_tokens)
        except Exception as err:  # the tokenizer refused this input (it handles every valid string)
            raise bad_request(f"{param} cannot be tokenized: {err}", param) from None
        return [encoding.ids for encoding in encodings]

    def check_prompt(self, ids: list[int], param: str = "prompt") -> list[int]:
        """The engine's own prompt check (sequence.check_prompt), as a 400 naming `param`."""
        try:
            check_prompt(ids, self.info.vocab_size, self.info.max_model_len)
        except PromptError as err:
            raise bad_request(str(err), param) from None
        return ids

    def sampling_params(self, request: SamplingFields, prompt_len: int, max_tokens: int | None,
                        logprobs: int | None) -> SamplingParams:
        if request.stream_options is not None and not request.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(request, name):
                raise bad_request(f"{name} is not supported (only 0)", name)
        room = self.info.max_model_len - prompt_len
        if max_tokens is not None and max_tokens > room:
            raise bad_request(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
                              f"({self.info.max_model_len})", "max_tokens")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        self.check_stop(stop, request.stop_token_ids or [])
        self.check_epsilon(request.exit_epsilon)
        top_k = request.top_k if request.top_k is not None else 0
        try:
            return SamplingParams(
                max_tokens=room if max_tokens is None else max_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=min(top_k, self.info.vocab_size),
                seed=request.seed,
                stop=stop,
                stop_token_ids=list(request.stop_token_ids or []),
                ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens,
                n=request.n,
                logprobs=logprobs,
                early_exit=request.early_exit,
                exit_epsilon=request.exit_epsilon,
            )
        except SamplingParamsError as err:
            raise bad_request(str(err), err.param) from None

    def check_stop(self, stop: list[str], stop_token_ids: list[int]) -> None:
        """Stops are matched after every token of the request, so their number and length are bounded."""
        limits = self.limits
        if len(stop) > limits.max_stop:
            raise bad_request(f"stop has {len(stop)} strings; at most {limits.max_stop}", "stop")
        if any(len(s) > limits.max_stop_chars for s in stop):
            raise bad_request(f"a stop string has more than {limits.max_stop_chars} characters", "stop")
        if len(stop_token_ids) > limits.max_stop_token_ids:
            raise bad_request(f"stop_token_ids has {len(stop_token_ids)} entries; at most "
                              f"{limits.max_stop_token_ids}", "stop_token_ids")
        bad = next((t for t in stop_token_ids if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            raise bad_request(f"stop token id {bad} is out of vocabulary", "stop_token_ids")

    def check_admissible(self, prompt_lens: list[int], params: list[SamplingParams]) -> None:
        """400 for a request larger than any the server takes, 429 (Retry-After) while too many wait."""
        num_tokens = sum((n + p.max_tokens) * p.n for n, p in zip(prompt_lens, params))
        if num_tokens > self.limits.max_request_tokens:
            num_seqs = sum(p.n for p in params)
            raise bad_request(f"the request needs {num_tokens} tokens (prompt + max_tokens over its {num_seqs} "
                              f"sequences); at most {self.limits.max_request_tokens} per request "
                              "(--max-request-tokens)", "max_tokens")
        self.admission.check(len(prompt_lens))

    def check_epsilon(self, eps: float | None) -> None:
        if eps is None:
            return
        if not self.info.epsilons:
            raise bad_request("exit_epsilon is not available: this server runs without exit heads", "exit_epsilon")
        if match_epsilon(eps, self.info.epsilons) is None:
            available = ", ".join(f"{e:g}" for e in self.info.epsilons)
            raise bad_request(f"exit_epsilon {eps:g} is not calibrated; available: {available}", "exit_epsilon")

    def internal_error(self, err: Exception, request_id: str) -> APIError:
        """An engine or server error as an APIError; unexpected ones are logged with the request id."""
        if isinstance(err, APIError):
            return err
        if isinstance(err, SamplingParamsError):
            return bad_request(str(err), err.param)
        if isinstance(err, EngineStopped):  # cut off by a shutdown: no fault, and a retry elsewhere may pass
            return APIError(503, f"{err}; request id {request_id}", code="unavailable")
        log.error("%s: internal error: %s", request_id, err, exc_info=err)
        return APIError(500, f"internal error ({type(err).__name__}: {err}); request id {request_id}",
                        code="internal_error")

    def usage(self, prompt_lens: list[int], outputs: list[RequestOutput]) -> Usage:
        completions = [c for out in outputs for c in out.outputs]
        num_generated = sum(len(c.token_ids) for c in completions)
        layers = [k for c in completions for k in c.exit_layers]
        flops = sum(out.decode_flops for out in outputs)
        full = sum(out.decode_flops_full_depth for out in outputs)
        exit_usage = ExitUsage(tokens_exited_early=sum(out.num_tokens_exited_early for out in outputs),
                               tokens_skipped_lm_head=sum(out.num_tokens_lm_head_skipped for out in outputs),
                               mean_layers=sum(layers) / len(layers) if layers else 0.0,
                               compute_saved=1.0 - flops / full if full > 0 else 0.0)
        return Usage(prompt_tokens=sum(prompt_lens), completion_tokens=num_generated,
                     total_tokens=sum(prompt_lens) + num_generated, exit=exit_usage)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def top_alternatives(self, entry: TokenLogprob) -> list[tuple[int, float]]:
        """The chosen token and the top alternatives, best first, without duplicates."""
        top = dict(entry.top)
        top.setdefault(entry.token_id, entry.logprob)
        return sorted(top.items(), key=lambda item: -item[1])


def request_ids(request_id: str, num_prompts: int) -> list[str]:
    return [request_id] if num_prompts == 1 else [f"{request_id}-{i}" for i in range(num_prompts)]


async def stream_with_errors(events: AsyncIterator[str], on_error: Callable[[Exception], APIError]):
    """Pass `events` through; an error after the stream started becomes a data: error event. Always ends
    with [DONE]."""
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield event
        except Exception as err:
            yield sse(on_error(err).body())
    yield STREAM_DONE
