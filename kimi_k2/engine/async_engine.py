"""AsyncLLMEngine: an LLMEngine stepped by a background thread, streaming CompletionDeltas to asyncio consumers.

Only the step thread touches the LLMEngine. Submissions and aborts are validated at once on the caller's side,
queued, and applied between two steps, so the event loop never waits for a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from kimi_k2.engine.llm_engine import LLMEngine
from kimi_k2.engine.params import CompletionDelta, SamplingParams


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop = loop
        self.queue: asyncio.Queue[CompletionDelta | BaseException] = asyncio.Queue()
        self.unfinished = n  # samples the consumer has not seen finish
        self.open = n  # samples the step thread has not finished

    def put(self, item: CompletionDelta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the consumer's event loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.cond = threading.Condition()  # guards ops, streams, stopping
        self.ops: deque[Callable[[], None]] = deque()
        self.streams: dict[str, _Stream] = {}
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

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[CompletionDelta]:
        """Deltas of every sample as they are produced; closing or cancelling the iterator aborts the request."""
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        self.engine.check_request(prompt_ids, params)
        self.start()
        stream = _Stream(asyncio.get_running_loop(), params.n)
        with self.cond:
            request_id = request_id if request_id is not None else f"areq-{next(self._ids)}"
            if request_id in self.streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.streams[request_id] = stream
            self.ops.append(lambda rid=request_id: self._add(prompt_ids, params, rid, stream))
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

    def _add(self, prompt_ids: list[int], params: SamplingParams, request_id: str, stream: _Stream) -> None:
        try:
            self.engine.add_request(prompt_ids, params, request_id)
        except ValueError as e:  # e.g. the id is still held by an aborted request of the same name
            with self.cond:
                self.streams.pop(request_id, None)
            stream.put(e)

    def abort(self, request_id: str) -> bool:
        """Abort a request; its pages are freed before the next step. False if it is unknown or already done."""
        with self.cond:
            return self._abort_locked(request_id)

    def _abort_locked(self, request_id: str) -> bool:
        if self.streams.pop(request_id, None) is None:
            return False
        self.ops.append(lambda: self.engine.abort(request_id))
        self.cond.notify_all()
        return True

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or self.ops or self.engine.has_unfinished() or self.draining)
                ops, self.ops = self.ops, deque()
            for op in ops:
                op()
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
                    if stream is not None:
                        stream.put(d)
                        stream.open -= d.finished
                        if not stream.open:
                            del self.streams[d.request_id]
