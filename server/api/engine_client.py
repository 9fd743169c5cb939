"""The server's side of the engine: starting it, what the server learns from it (the model's facts
in ModelInfo, the metrics observer, the start-up log, one line per fact), and EngineClient, which
hands one HTTP request's prompts to it.

The engine is reached only through `generate`, `abort_request` and the facts in ModelInfo, so the
routes never know whether it runs on a thread of this process or somewhere else.
"""
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from server.api.admission import Admission
from server.api.errors import bad_request, client_gone
from server.engine.async_engine import AsyncLLMEngine
from server.engine.config import EngineConfig
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.metrics import Metrics
from server.model.fetch import ALIASES

log = logging.getLogger("offramp.serve")


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
    max_token_bytes: int | None = None  # bytes of the longest token: a text of B bytes has >= B / this tokens

    @property
    def max_prompt_bytes(self) -> int | None:
        """Longest text that might still fit max_model_len tokens; a longer one is refused untokenized."""
        return self.max_model_len * self.max_token_bytes if self.max_token_bytes else None


def longest_token_bytes(tokenizer) -> int:
    """Bytes of the longest vocabulary entry, as spelled in the vocabulary: a byte-level BPE spells
    each byte as one or two, SentencePiece a space as three, so no token's text is longer. With a
    normalizer (which may shrink text, e.g. stripping accents) the bound gets four times the room."""
    backend = tokenizer.backend
    longest = max(len(token.encode("utf-8")) for token in backend.get_vocab(with_added_tokens=True))
    return longest * (4 if backend.normalizer is not None else 1)


def default_model_name(spec: str) -> str:
    """An alias names itself; a folder or a .gguf file is named by its last path part (without .gguf)."""
    if spec in ALIASES:
        return spec
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else path.name


def model_info(engine: AsyncLLMEngine, name: str) -> ModelInfo:
    heads = engine.heads
    return ModelInfo(name=name, tokenizer=engine.tokenizer, vocab_size=engine.model_config.vocab_size,
                     num_hidden_layers=engine.model_config.num_hidden_layers, max_model_len=engine.max_model_len,
                     exit_layers=list(heads.layers) if heads is not None else [], epsilons=engine.epsilons,
                     default_epsilon=engine.default_epsilon, max_token_bytes=longest_token_bytes(engine.tokenizer))


def scheduler_state(engine: AsyncLLMEngine) -> tuple[int, int, float]:
    """(running, waiting, KV usage) now. Steps report these too, but an idle engine takes no steps, so
    a scrape after the last request left must not show that request's blocks."""
    return engine.scheduler_state()


def start_engine(config: EngineConfig, served_model_name: str | None = None,
                 process_metrics: bool = True) -> tuple[AsyncLLMEngine, ModelInfo, Metrics]:
    """Load the model (the loader shows a progress bar while fetching), start the engine loop and
    attach the metrics observer."""
    log.info("loading model %s", config.model)
    engine = AsyncLLMEngine.from_config(config)
    info = model_info(engine, served_model_name or default_model_name(config.model))
    metrics = Metrics(info.name, info.exit_layers, info.num_hidden_layers, process_metrics=process_metrics)
    engine.observer = metrics
    log_facts(config, info, engine)
    return engine, info, metrics


def log_facts(config: EngineConfig, info: ModelInfo, engine: AsyncLLMEngine) -> None:
    dtype = str(config.torch_dtype).removeprefix("torch.")
    source = f" ({config.model})" if config.model != info.name else ""
    log.info("model: %s%s, %d layers, vocabulary %d", info.name, source, info.num_hidden_layers, info.vocab_size)
    log.info("device: %s", config.torch_device)
    log.info("dtype: %s", dtype)
    if info.exit_layers:
        log.info("exit layers: %s (full depth: %d)", ", ".join(map(str, info.exit_layers)), info.num_hidden_layers)
        default = f"{info.default_epsilon:g}" if info.default_epsilon is not None else "none"
        log.info("exit epsilons: %s (default %s)", ", ".join(f"{e:g}" for e in info.epsilons) or "none", default)
    else:
        log.info("exit layers: none (no exit heads: every token at full depth)")
    log.info("KV cache capacity: %d tokens", engine.kv_capacity_tokens)
    log.info("max model length: %d tokens; max running sequences: %d", info.max_model_len, config.max_num_seqs)


class EngineClient:
    """One HTTP request's prompts through the engine: concurrently, counted by admission, and aborted
    the moment the client hangs up or the caller stops reading."""

    def __init__(self, engine, admission: Admission | None = None):
        self.engine = engine
        self.admission = admission or Admission()

    async def generate(self, prompts: list[list[int]], params: list[SamplingParams], request_ids: list[str],
                       gone: asyncio.Event | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run every prompt concurrently; yield (prompt index, cumulative output) as they come. Once `gone`
        is set (the client hung up, and its aborts are sent) no prompt is handed to the engine any more:
        one added after its abort would run to the end for nobody."""
        ticket = self.admission.admit(len(prompts))
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int):
            if gone is not None and gone.is_set():  # checked and added with no await between: no race
                queue.put_nowait((i, client_gone()))
                return
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
        whatever is unfinished, at once. A client already gone (it gave up while the request queued
        in the server) costs the engine nothing."""
        if raw_request is not None and await raw_request.is_disconnected():
            log.debug("%s: client gone before generation, dropped", request_ids[0])
            raise client_gone()
        async with self.abort_on_disconnect(raw_request, request_ids) as gone, \
                contextlib.aclosing(self.generate(prompts, params, request_ids, gone)) as outputs:
            yield outputs

    @contextlib.asynccontextmanager
    async def abort_on_disconnect(self, raw_request, request_ids: list[str]):
        """While inside, a client that hangs up aborts its engine requests at once (frees their KV) and
        sets the event this yields."""
        gone = asyncio.Event()
        if raw_request is None:
            yield gone
            return

        async def watch():
            while (await raw_request.receive())["type"] != "http.disconnect":
                pass
            gone.set()
            log.info("%s: client disconnected, aborting", request_ids[0])
            self.abort(request_ids)

        watcher = asyncio.create_task(watch())
        try:
            yield gone
        finally:
            watcher.cancel()
