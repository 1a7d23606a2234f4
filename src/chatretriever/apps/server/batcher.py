"""A small dynamic batcher: requests that arrive together are processed in one model call.

Each request handler `await`s `submit(item)`. One collector task per batcher takes the first waiting
item, waits at most `max_wait_ms` for more (never when `max_batch` items are already there), and
hands the batch to `process` on a worker thread, so the event loop never runs model work. While
that batch is computed, new items queue up and form the next one: under load, batches fill
without any waiting. `max_batch=1` is one request per forward (the baseline of the load benchmark).

When `process` raises on a batch, each of its items is processed again alone (on the same worker
call): one bad item, e.g. a session the model refuses, fails only the request that sent it, not
the requests that happened to share its forward.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherBusyError(RuntimeError):
    """More items wait than the batcher accepts (the server answers 503)."""


@dataclass(frozen=True)
class _Failed:
    """What processing one item raised (a result may itself be an exception object)."""

    error: BaseException


@dataclass
class BatcherStats:
    """Counters since start: model calls made and items processed."""

    batches: int = 0
    items: int = 0
    largest: int = 0


class DynamicBatcher(Generic[T, R]):
    """Groups concurrently submitted items into calls of `process(items) -> results`.

    Args:
        process: Maps a list of items to one result per item, in order. Runs on `executor`.
        executor: Where `process` runs; one shared single-thread executor serialises model work.
        max_batch: Most items per call (1: no batching).
        max_wait_ms: How long the first item of a batch waits for company.
        max_queue: Most items waiting at once; beyond it `submit` raises BatcherBusyError.
        name: For log lines.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        executor: Executor,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.process = process
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.name = name
        self.stats = BatcherStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    def _ensure_started(self) -> asyncio.Queue:
        """Start the collector on the running loop (again, if a test client made a new loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._collect(self._queue), name=self.name)
        assert self._queue is not None
        return self._queue

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Submit several items (one request's inputs); returns their results in order."""
        queue = self._ensure_started()
        if queue.qsize() + len(items) > self.max_queue:
            raise BatcherBusyError(f"{self.name}: {queue.qsize()} items already waiting")
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future: asyncio.Future = loop.create_future()
            queue.put_nowait((item, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def submit(self, item: T) -> R:
        """Submit one item; returns its result once its batch has been processed."""
        (result,) = await self.submit_many([item])
        return result

    async def _gather_batch(self, queue: asyncio.Queue) -> list[tuple[T, asyncio.Future]]:
        """The first waiting item plus whatever arrives within max_wait (up to max_batch)."""
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _collect(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, f) for item, f in await self._gather_batch(queue) if not f.done()]
            if not batch:  # every waiting client went away
                continue
            items = [item for item, _ in batch]
            try:
                outcomes = await loop.run_in_executor(self.executor, self._outcomes, items)
            except Exception as e:  # the executor refused: all fail, the collector goes on
                outcomes = [_Failed(e)] * len(items)
            self._record(len(items))
            for (_, f), outcome in zip(batch, outcomes, strict=True):
                if f.done():
                    continue
                if isinstance(outcome, _Failed):
                    f.set_exception(outcome.error)
                else:
                    f.set_result(outcome)

    def _outcomes(self, items: list[T]) -> list[R | _Failed]:
        """`process(items)`, on the worker thread; when it raises, each item alone.

        Args:
            items: The batch.

        Returns:
            Per item, its result or `_Failed` with what processing it raised.
        """
        try:
            return list(self._process_checked(items))
        except Exception as e:
            if len(items) == 1:
                return [_Failed(e)]
            logger.warning(
                "%s: a batch of %d failed (%s: %s); processing its items one by one",
                *(self.name, len(items), type(e).__name__, e),
            )
        outcomes: list[R | _Failed] = []
        for item in items:
            try:
                outcomes.append(self._process_checked([item])[0])
            except Exception as e:  # this item's own failure: only its request gets it
                outcomes.append(_Failed(e))
        return outcomes

    def _process_checked(self, items: list[T]) -> list[R]:
        """`process(items)` as a list, one result per item (else RuntimeError)."""
        results = list(self.process(items))
        if len(results) != len(items):
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)}")
        return results

    def _record(self, n: int) -> None:
        self.stats.batches += 1
        self.stats.items += n
        self.stats.largest = max(self.stats.largest, n)
        logger.debug("%s: batch of %d", self.name, n)

    async def stop(self) -> None:
        """Cancel the collector; requests still waiting get a cancelled error."""
        task, queue = self._task, self._queue
        self._task = self._queue = self._loop = None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, RuntimeError):
                pass
        while queue is not None and not queue.empty():
            _, f = queue.get_nowait()
            if not f.done():
                f.cancel()

    def snapshot(self) -> dict[str, Any]:
        """The counters as a dict (for /healthz and the benchmark)."""
        return {"batches": self.stats.batches, "items": self.stats.items}
