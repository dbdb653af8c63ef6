"""The engine in a thread of its own, and the asyncio interface the routes use.

The engine is not thread-safe and a forward pass takes milliseconds to seconds, so one
dedicated thread owns it: it drains an inbox of add/abort commands, runs a step, and hands
the outputs to the event loop with `call_soon_threadsafe`. The event loop never waits on
the model; the engine never waits on a client.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from thrifty.engine.outputs import RequestOutput
from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import ThriftyError
from thrifty.server.metrics import ServerMetrics

logger = logging.getLogger("thrifty.server")

Prompt = str | list[int]


class QueueFullError(ThriftyError):
    """More requests are in flight than the server accepts; the client should retry later (429)."""


class ServerDrainingError(ThriftyError):
    """The server is shutting down and takes no new requests (503)."""


class EngineError(ThriftyError):
    """The engine failed while running a request; the request cannot complete (500)."""


class Engine(Protocol):
    """What the server needs of `thrifty.engine.engine.LLMEngine`."""

    config: Any  # .max_num_seqs, .chat_template
    tokenizer: Any
    max_model_len: int

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams,
                    arrival_time: float | None = None) -> None: ...
    def abort_request(self, request_id: str) -> bool: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished_requests(self) -> bool: ...
    def stats(self) -> dict[str, int]: ...


@dataclass
class _Add:
    stream: GenerationStream
    prompts: Sequence[Prompt]
    params: SamplingParams
    arrival_time: float


@dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()


class GenerationStream:
    """Outputs of one API request: one engine request per prompt, yielded as (prompt index, output).

    Iteration ends once every prompt's request has finished. Call `abort()` when the consumer
    stops early (client gone, error): it frees the engine's KV blocks at once; after a normal
    finish it does nothing.
    """

    def __init__(self, client: AsyncEngine, request_id: str, num_prompts: int) -> None:
        self._client = client
        self.request_ids = [request_id] if num_prompts == 1 else [f"{request_id}-{i}" for i in range(num_prompts)]
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        self._unfinished = set(range(num_prompts))
        self._closed = False
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._unfinished:
            self._close()
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._unfinished.clear()  # the engine thread has already dropped the requests
            self._close()
            raise item
        index, output = item
        if output.finished:
            self._unfinished.discard(index)
        return index, output

    def abort(self) -> None:
        if self._unfinished:
            self._client._send(_Abort([self.request_ids[i] for i in sorted(self._unfinished)]))
            self._unfinished.clear()
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client._release()

    # Called on the event loop by the engine thread (through call_soon_threadsafe).
    def _put(self, item: tuple[int, RequestOutput] | BaseException) -> None:
        if not self._closed:
            self._queue.put_nowait(item)

    def _resolve(self, error: BaseException | None) -> None:
        if error is not None:
            self._unfinished.clear()  # nothing of it stayed in the engine
        if not self.accepted.done():
            if error is None:
                self.accepted.set_result(None)
            else:
                self.accepted.set_exception(error)


class AsyncEngine:
    """Runs an engine in a background thread; `generate` is the one way in.

    `max_queue`: how many requests may wait beyond the `max_num_seqs` the engine runs at once
    before new ones are refused with QueueFullError; None for no limit.
    """

    def __init__(self, engine: Engine, max_queue: int | None = None, metrics: ServerMetrics | None = None) -> None:
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.max_in_flight = None if max_queue is None else engine.config.max_num_seqs + max_queue
        self.draining = False
        self._in_flight = 0
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, tuple[GenerationStream, int]] = {}  # owned by the engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.metrics.update_engine_stats(engine.stats())

    # -- what the routes see ------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                         chat_template=self.engine.config.chat_template)

    async def generate(self, request_id: str, prompts: Sequence[Prompt], params: SamplingParams) -> GenerationStream:
        """Queue the prompts (all or none) and return their stream once the engine accepted them.

        Raises what `LLMEngine.add_request` raises for bad input, QueueFullError, ServerDrainingError.
        """
        if self.draining:
            raise ServerDrainingError("the server is shutting down and accepts no new requests")
        if not self.is_running:
            raise EngineError("the engine thread is not running; restart the server")
        if self.max_in_flight is not None and self._in_flight >= self.max_in_flight:
            self.metrics.rejected.labels("queue_full").inc()
            raise QueueFullError(f"the server has {self._in_flight} requests in flight, its limit; retry shortly "
                                 "(or start it with a larger --max-queue)")
        stream = GenerationStream(self, request_id, len(prompts))
        self._in_flight += 1
        self._send(_Add(stream, list(prompts), params, time.monotonic()))
        try:
            await stream.accepted
        except BaseException:  # refused, or the client left while the engine was busy
            stream.abort()
            raise
        return stream

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="thrifty-engine", daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Refuse new requests from now on; the ones in flight carry on."""
        self.draining = True

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight; False if `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._in_flight:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; requests still running end with EngineError."""
        if self._thread is not None:
            self._send(_STOP)
            self._thread.join(timeout)
            self._thread = None

    # -- event-loop side helpers ------------------------------------------------------------

    def _send(self, command: Any) -> None:
        self._inbox.put(command)

    def _release(self) -> None:
        self._in_flight -= 1

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._handle_commands(block=not self.engine.has_unfinished_requests()):
                    break
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
            except Exception as error:  # a bug in the engine: fail what is running, keep serving
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(EngineError(f"the engine failed: {type(error).__name__}: {error}"))
            self.metrics.update_engine_stats(self.engine.stats())
        stopped = EngineError("the server shut down before the request finished")
        self._fail_all(stopped)
        while True:  # adds that arrived after the stop command are refused, not left hanging
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                self._to_loop(command.stream._resolve, stopped)

    def _handle_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one if `block`); False once told to stop."""
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command is _STOP:
                return False
            if isinstance(command, _Add):
                self._add(command)
            else:
                self._abort(command.request_ids)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, command: _Add) -> None:
        stream, added = command.stream, []
        try:
            for index, (request_id, prompt) in enumerate(zip(stream.request_ids, command.prompts, strict=True)):
                self.engine.add_request(request_id, prompt, command.params, arrival_time=command.arrival_time)
                self._streams[request_id] = (stream, index)
                added.append(request_id)
        except Exception as error:
            for request_id in added:  # all or nothing
                self.engine.abort_request(request_id)
                del self._streams[request_id]
            self._to_loop(stream._resolve, error)
            return
        self._to_loop(stream._resolve, None)

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._streams.pop(request_id, None) is not None and self.engine.abort_request(request_id):
                self.metrics.observe_abort(request_id)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batch = []
        for output in outputs:
            target = self._streams.get(output.request_id)
            self.metrics.observe(output, now)
            if target is None:
                continue  # aborted while this step ran
            if output.finished:
                del self._streams[output.request_id]
            stream, index = target
            batch.append((stream, (index, output)))
        if batch:
            self._to_loop(_deliver, batch)

    def _fail_all(self, error: EngineError) -> None:
        for request_id, (stream, _) in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the engine is already broken; the stream must still hear of it
                logger.exception("aborting request %s failed", request_id)
            self._to_loop(stream._put, error)
        self._streams.clear()

    def _to_loop(self, callback: Any, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass


def _deliver(batch: list[tuple[GenerationStream, tuple[int, RequestOutput]]]) -> None:
    for stream, item in batch:
        stream._put(item)
