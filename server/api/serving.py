"""What both OpenAI endpoints share: the served model's facts, request checks, the translation
into SamplingParams, running prompts through the engine, usage, and aborting on disconnect.

The engine is reached only through `generate`, `abort_request` and the facts in `ModelInfo`, so
the routes never know whether it runs on a thread of this process or somewhere else.
"""
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.api.admission import Admission
from server.api.errors import APIError, bad_request
from server.api.protocol import ExitUsage, SamplingFields, Usage
from server.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams, SamplingParamsError
from server.engine.sequence import PromptError, check_prompt
from server.model.exit_heads import match_epsilon

log = logging.getLogger(__name__)

STREAM_DONE = "data: [DONE]\n\n"


@dataclass
class ModelInfo:
    """The facts about the served model that the HTTP layer needs."""
    name: str  # the served model name, checked against each request's `model`
    tokenizer: object  # server.model.tokenizer.Tokenizer
    vocab_size: int
    num_hidden_layers: int
    max_model_len: int
    exit_layers: list[int] = field(default_factory=list)
    epsilons: list[float] = field(default_factory=list)  # calibrated exit_epsilon values
    default_epsilon: float | None = None


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


class OpenAIServing:
    def __init__(self, engine, info: ModelInfo, admission: Admission | None = None):
        self.engine = engine
        self.info = info
        self.tokenizer = info.tokenizer
        self.admission = admission or Admission()

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.info.name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.info.name}`.",
                           param="model", code="model_not_found")

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
        bad = next((t for t in request.stop_token_ids or [] if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            raise bad_request(f"stop token id {bad} is out of vocabulary", "stop_token_ids")
        self.check_epsilon(request.exit_epsilon)
        top_k = request.top_k if request.top_k is not None else 0
        try:
            return SamplingParams(
                max_tokens=room if max_tokens is None else max_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=min(top_k, self.info.vocab_size),
                seed=request.seed,
                stop=[request.stop] if isinstance(request.stop, str) else list(request.stop or []),
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

    def check_epsilon(self, eps: float | None) -> None:
        if eps is None:
            return
        if not self.info.epsilons:
            raise bad_request("exit_epsilon is not available: this server runs without exit heads", "exit_epsilon")
        if match_epsilon(eps, self.info.epsilons) is None:
            available = ", ".join(f"{e:g}" for e in self.info.epsilons)
            raise bad_request(f"exit_epsilon {eps:g} is not calibrated; available: {available}", "exit_epsilon")

    async def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                       request_ids: list[str]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run every prompt concurrently; yield (prompt index, cumulative output) as they come."""
        ticket = self.admission.admit(len(prompts))
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int):
            try:
                async for output in self.engine.generate(prompts[i], params[i], request_ids[i]):
                    ticket.release(i)
                    queue.put_nowait((i, output))
                queue.put_nowait((i, None))
            except ValueError as err:  # the engine refused the request
                queue.put_nowait((i, bad_request(str(err))))
            except Exception as err:
                queue.put_nowait((i, err))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
        unfinished = set(range(len(prompts)))
        try:
            while unfinished:
                i, item = await queue.get()
                if item is None:
                    unfinished.discard(i)
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:  # on error, cancellation or a consumer that stopped reading: free the engine's KV now
            ticket.release_all()
            self.abort([request_ids[i] for i in unfinished])
            for task in tasks:
                task.cancel()

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort_request(request_id)

    @contextlib.asynccontextmanager
    async def run(self, prompts: list[list[int]], params: list[SamplingParams], request_ids: list[str],
                  raw_request):
        """`generate` as a block: a client that hangs up, an error, or leaving the block early aborts
        whatever is unfinished, at once."""
        async with self.abort_on_disconnect(raw_request, request_ids), \
                contextlib.aclosing(self.generate(prompts, params, request_ids)) as outputs:
            yield outputs

    @contextlib.asynccontextmanager
    async def abort_on_disconnect(self, raw_request, request_ids: list[str]):
        """While inside, a client that hangs up aborts its engine requests at once (frees their KV)."""
        if raw_request is None:
            yield
            return

        async def watch():
            while (await raw_request.receive())["type"] != "http.disconnect":
                pass
            log.info("%s: client disconnected, aborting", request_ids[0])
            self.abort(request_ids)

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()

    def internal_error(self, err: Exception, request_id: str) -> APIError:
        """An engine or server error as an APIError; unexpected ones are logged with the request id."""
        if isinstance(err, APIError):
            return err
        if isinstance(err, SamplingParamsError):
            return bad_request(str(err), err.param)
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
