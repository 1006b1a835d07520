"""Dynamic batching: concurrent requests merged into one model call.

Generation on a CPU or a GPU costs about the same for one prompt as for a few dozen, so a server
that runs each request alone wastes most of its throughput under load. Requests wait at most
`max_latency_s` for others to join, and a batch never grows past `max_batch_size` items (one
request's items are never split). The model runs on one worker thread: batches never overlap.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    items: Sequence[T]
    future: asyncio.Future[list[R]] = field(repr=False)


class MicroBatcher(Generic[T, R]):
    """`await submit(items)` returns `fn(items)`; with `enabled`, concurrent submits share one `fn` call."""

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        max_batch_size: int = 32,
        max_latency_s: float = 0.01,
        enabled: bool = True,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.enabled = enabled
        self.batch_sizes: deque[int] = deque(maxlen=4096)  # items per recent model call (metrics, tests)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._queue: asyncio.Queue[_Pending[T, R]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._carried: _Pending[T, R] | None = None  # the request that did not fit the last batch

    async def submit(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if not self.enabled:
            return await loop.run_in_executor(self._executor, self._call, list(items))
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve())
        pending: _Pending[T, R] = _Pending(items, loop.create_future())
        await self._queue.put(pending)
        return await pending.future

    async def run_exclusive(self, fn: Callable[[], R]) -> R:
        """Run `fn` on the model's thread, between batches (for calls that are not batched)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _call(self, items: list[T]) -> list[R]:
        self.batch_sizes.append(len(items))
        results = self.fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return results

    async def _collect(self, first: _Pending[T, R]) -> list[_Pending[T, R]]:
        """`first` and whatever joins within the latency budget, up to the batch size."""
        assert self._queue is not None
        batch, size = [first], len(first.items)
        deadline = time.monotonic() + self.max_latency_s
        while size < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                nxt = self._queue.get_nowait()
            if size + len(nxt.items) > self.max_batch_size:
                self._carried = nxt  # too big to join: it opens the next batch, keeping FIFO order
                break
            batch.append(nxt)
            size += len(nxt.items)
        return batch

    async def _serve(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first, self._carried = self._carried or await self._queue.get(), None
            batch = await self._collect(first)
            items = [item for pending in batch for item in pending.items]
            try:
                results = await loop.run_in_executor(self._executor, self._call, items)
            except Exception as exc:  # every waiter learns of the failure; the worker lives on
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            start = 0
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_result(results[start : start + len(pending.items)])
                start += len(pending.items)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
