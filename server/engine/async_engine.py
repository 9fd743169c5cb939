"""AsyncLLMEngine: the engine loop on its own thread, streams of outputs for asyncio callers.

Callers put requests and aborts into a thread-safe inbox; the loop thread drains it between steps,
runs `LLMEngine.step()`, and hands each RequestOutput to the asyncio queue of its request on the
caller's own event loop (`loop.call_soon_threadsafe`). The engine itself is touched only by the
loop thread. An abort takes effect before the next step, wherever the request is: in the inbox,
waiting, prefilling or decoding. If a step raises, the engine is marked errored, every open stream
gets the error, and check_health() raises from then on; a stream opened from then on fails at once.
"""
import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.stats import StatsObserver

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; the server should report unhealthy and restart."""


class EngineStopped(EngineDeadError):
    """The engine was shut down while the request was still running."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, start: bool = True):
        self.engine = engine
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inbox: list[tuple] = []  # ("add", request_id, prompt_token_ids, params) | ("abort", request_id)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="offramp-engine", daemon=True)
        if start:
            self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, observer: StatsObserver | None = None) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_config(config, observer))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def heads(self):
        return self.engine.heads

    @property
    def epsilons(self) -> list[float]:
        return self.engine.heads.epsilons() if self.engine.heads is not None else []

    @property
    def default_epsilon(self) -> float | None:
        return self.engine.heads.default_epsilon if self.engine.heads is not None else None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self.engine.kv_capacity_tokens

    def scheduler_state(self) -> tuple[int, int, float]:
        """(running, waiting, KV usage), read from another thread: counts of lists the loop thread
        owns, each read atomically, so at worst a step stale."""
        return self.engine.scheduler_state()

    @property
    def observer(self) -> StatsObserver | None:
        return self.engine.observer

    @observer.setter
    def observer(self, observer: StatsObserver | None) -> None:
        self.engine.observer = observer

    @property
    def errored(self) -> bool:
        return self._error is not None

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._error!r}") from self._error
        if self._stopped or not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request until it finishes. Raises ValueError for a request the
        engine cannot take (empty or too long prompt, uncalibrated exit_epsilon, duplicate id).
        Leaving the iteration early (a client gone) aborts the request."""
        self.engine.validate(prompt_token_ids, params)  # pure checks: safe from any thread
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:  # under the lock that _fail takes: either this sees the error or _fail sees this stream
            self.check_health()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(("add", request_id, list(prompt_token_ids), params))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, (ValueError, EngineStopped)):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop stopped: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort_request(request_id)

    async def abort(self, request_id: str) -> None:
        self.abort_request(request_id)

    def abort_request(self, request_id: str) -> None:
        """Thread-safe, non-blocking abort; the stream (if still read) ends with finish_reason "abort"."""
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._fail(EngineStopped("the engine was shut down"), errored=False)  # nobody waits forever

    def _run(self) -> None:
        engine = self.engine
        while not self._stopped:
            self._wakeup.clear()
            with self._lock:
                inbox, self._inbox = self._inbox, []
            try:
                for op in inbox:
                    self._apply(*op)
                if not engine.has_unfinished_requests():
                    self._wakeup.wait()
                    continue
                for output in engine.step():
                    self._deliver(output)
            except Exception as error:  # noqa: BLE001 - any failure kills the loop and is reported
                log.exception("engine loop failed")
                self._fail(error)
                return

    def _apply(self, op: str, request_id: str, *args) -> None:
        if op == "abort":
            if (output := self.engine.abort_request(request_id)) is not None:
                self._deliver(output)
            return
        try:
            self.engine.add_request(request_id, *args)
        except ValueError as error:  # refused after all (a race on the request id): tell that caller only
            with self._lock:
                stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream[0].call_soon_threadsafe(stream[1].put_nowait, error)

    def _deliver(self, output: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.pop(output.request_id, None) if output.finished else \
                self._streams.get(output.request_id)
        if stream is not None:
            loop, queue = stream
            try:
                loop.call_soon_threadsafe(queue.put_nowait, output)
            except RuntimeError:  # the caller's event loop is closed; nobody is listening
                pass

    def _fail(self, error: BaseException, errored: bool = True) -> None:
        with self._lock:
            if errored:
                self._error = error
            streams, self._streams = list(self._streams.values()), {}
        for loop, queue in streams:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            except RuntimeError:
                pass
