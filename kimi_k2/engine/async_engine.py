"""AsyncLLMEngine: an LLMEngine stepped by a background thread, streaming CompletionDeltas to asyncio consumers.

Only the step thread touches the LLMEngine. Submissions and aborts are validated at once on the caller's side,
queued, and applied between two steps, so the event loop never waits for a forward pass. A queued operation that
fails fails only its own request. Admission is bounded (`max_waiting`: requests not yet generating), and a request
may carry a deadline: past it, it is aborted (its pages freed) and its consumer gets RequestTimeoutError.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from kimi_k2.engine.llm_engine import LLMEngine
from kimi_k2.engine.params import CompletionDelta, SamplingParams

log = logging.getLogger("kimi_k2.engine")
T = TypeVar("T")


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting to start; try again later."""


class RequestFailedError(RuntimeError):
    """The engine ended this request with an error (e.g. its output constraint broke); other requests go on."""


class RequestTimeoutError(TimeoutError):
    def __init__(self, message: str, completion_tokens: int):
        super().__init__(message)
        self.completion_tokens = completion_tokens


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, deadline: float | None):
        self.loop = loop
        self.queue: asyncio.Queue[CompletionDelta | BaseException] = asyncio.Queue()
        self.unfinished = n  # samples the consumer has not seen finish
        self.open = n  # samples the step thread has not finished
        self.waiting = True  # no delta produced yet
        self.deadline = deadline
        self.completion_tokens = 0

    def put(self, item: CompletionDelta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the consumer's event loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None):
        """`max_waiting`: at most this many submitted requests may wait for their first token (None: no bound);
        `generate` raises EngineOverloadedError beyond it."""
        self.engine = engine
        self.max_waiting = max_waiting
        self.cond = threading.Condition()  # guards ops, streams, deadlines, stopping
        self.ops: deque[tuple[str, Callable[[], None]]] = deque()  # (request id, operation)
        self.streams: dict[str, _Stream] = {}
        self.deadlines: list[tuple[float, str]] = []  # heap of (monotonic deadline, request id)
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.draining = False
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def start(self) -> None:
        with self.cond:
            if self.thread is not None and self.thread.is_alive():
                return
            self.stopping = self.draining = False
            self.thread = threading.Thread(target=self._loop, name="kimi-k2-engine", daemon=True)
            self.thread.start()

    def shutdown(self, drain: bool = True) -> None:
        """Stop the step thread; `drain` lets submitted requests finish first, otherwise they are aborted."""
        with self.cond:
            if not drain:
                for request_id in list(self.streams):
                    self._abort_locked(request_id)
            self.draining, self.stopping = drain, not drain
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    @property
    def num_waiting(self) -> int:
        """Submitted requests that have not produced a token yet."""
        with self.cond:
            return sum(s.waiting for s in self.streams.values())

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, deadline: float | None = None) -> AsyncIterator[CompletionDelta]:
        """Deltas of every sample as they are produced; closing or cancelling the iterator aborts the request.
        `deadline` (time.monotonic() value): past it the request is aborted and RequestTimeoutError raised."""
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        self.engine.check_request(prompt_ids, params)
        self.start()
        stream = _Stream(asyncio.get_running_loop(), params.n, deadline)
        with self.cond:
            request_id = request_id if request_id is not None else f"areq-{next(self._ids)}"
            if request_id in self.streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            waiting = sum(s.waiting for s in self.streams.values())
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise EngineOverloadedError(f"{waiting} requests are already waiting to start (the limit is "
                                            f"{self.max_waiting}); try again later")
            self.streams[request_id] = stream
            if deadline is not None:
                if len(self.deadlines) > 2 * len(self.streams) + 64:  # drop the entries of finished requests
                    self.deadlines = [x for x in self.deadlines if x[1] in self.streams]
                    heapq.heapify(self.deadlines)
                heapq.heappush(self.deadlines, (deadline, request_id))
            self.ops.append((request_id, lambda rid=request_id: self.engine.add_request(prompt_ids, params, rid)))
            self.cond.notify_all()
        try:
            while stream.unfinished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.unfinished -= 1
                yield item
        finally:
            if stream.unfinished:
                self.abort(request_id)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """fn(engine) run on the step thread between two steps (never beside a forward pass), its result awaited."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(result)  # type: ignore[arg-type]

        def op() -> None:
            try:
                result, error = fn(self.engine), None
            except Exception as e:
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(settle, result, error)

        self.start()
        with self.cond:
            self.ops.append(("call", op))
            self.cond.notify_all()
        return await done

    def abort(self, request_id: str) -> bool:
        """Abort a request; its pages are freed before the next step. False if it is unknown or already done."""
        with self.cond:
            return self._abort_locked(request_id)

    def _abort_locked(self, request_id: str) -> bool:
        if self.streams.pop(request_id, None) is None:
            return False
        self.ops.append((request_id, lambda: self.engine.abort(request_id)))
        self.cond.notify_all()
        return True

    def _expire_locked(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self.deadlines)
            stream = self.streams.get(request_id)
            if stream is not None and stream.deadline is not None and stream.deadline <= now:
                n = stream.completion_tokens
                stream.put(RequestTimeoutError(f"request {request_id!r} reached its time limit after {n} generated "
                                               "tokens", n))
                self._abort_locked(request_id)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or self.ops or self.engine.has_unfinished() or self.draining)
                self._expire_locked()
                ops, self.ops = self.ops, deque()
            for request_id, op in ops:
                try:
                    op()
                except Exception as e:  # e.g. a constraint that cannot start: only this request fails
                    log.warning("request %s: a queued operation failed: %s", request_id, e)
                    with self.cond:
                        stream = self.streams.pop(request_id, None)
                        if stream is not None:
                            stream.put(e if isinstance(e, ValueError) else RequestFailedError(
                                f"the engine could not start this request: {e}"))
            with self.cond:
                if self.stopping or (self.draining and not self.engine.has_unfinished() and not self.ops):
                    return
            try:
                deltas = self.engine.step()
            except Exception as e:  # the model failed: every consumer gets the error and the thread stops
                with self.cond:
                    for request_id, stream in self.streams.items():
                        stream.put(e)
                        self.engine.abort(request_id)
                    self.streams.clear()
                    self.engine.pending.clear()
                return
            with self.cond:
                for d in deltas:
                    stream = self.streams.get(d.request_id)
                    if stream is None:
                        continue
                    if d.error is not None:
                        stream.put(RequestFailedError(d.error))
                        del self.streams[d.request_id]
                        continue
                    stream.waiting = False
                    stream.completion_tokens = max(stream.completion_tokens, d.completion_tokens)
                    stream.put(d)
                    stream.open -= d.finished
                    if not stream.open:
                        del self.streams[d.request_id]
