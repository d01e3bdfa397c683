"""Micro-batching of concurrent requests into one model call.

Adapting 32 users in one vectorised call costs far less than 32 single-user calls, so
concurrent requests are collected into batches:

* a batch is dispatched when it holds ``max_batch_size`` items, or when its oldest item has
  waited ``max_delay_s`` (so a lone request waits at most that long);
* while one batch runs, new requests queue up and form the next batch: under load batches
  grow by themselves without any extra waiting;
* at most ``max_queue`` items may wait; beyond that :class:`QueueFullError` (the service turns
  it into ``RESOURCE_EXHAUSTED``) so overload is refused fast instead of piling up latency.

The batch function runs in one dedicated worker thread, never on the event loop: the model
maths is already parallel inside (TensorFlow / XLA thread pools), and a single in-flight batch
is what lets the next one fill up. Items are grouped by a key (e.g. the model version) so one
call never mixes models. If a batch call raises, its items are retried one by one so that a
single bad request fails alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(Exception):
    """The batcher's queue is full: the caller should back off (RESOURCE_EXHAUSTED)."""


class BatcherClosedError(Exception):
    """The batcher is shutting down and takes no new work (UNAVAILABLE)."""


class DeadlineExpiredError(Exception):
    """The item's deadline passed while it was queued; it was not processed."""


@dataclasses.dataclass(frozen=True)
class BatcherConfig:
    """Micro-batching limits.

    Args:
        max_batch_size: most items in one call of the batch function.
        max_delay_s: longest time the oldest queued item waits for a batch to fill while
            the worker is idle. The default 0 sends a lone request at once; under load,
            batches still fill while the worker runs the previous one.
        max_queue: most items waiting (not counting the batch being processed).
    """

    max_batch_size: int = 64
    max_delay_s: float = 0.0
    max_queue: int = 1024

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {self.max_delay_s}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")


@dataclasses.dataclass
class _Pending:
    key: Hashable
    item: Any
    future: asyncio.Future
    enqueued: float
    deadline: float | None


class MicroBatcher(Generic[K, T, R]):
    """Collects items submitted from coroutines and processes them in batches.

    Args:
        process: ``process(key, items) -> results``, one result per item in order; a result
            that is an exception instance is raised to that item's caller. Runs in the
            worker thread.
        config: batching limits.
        name: used for the worker thread's name and log lines.
    """

    def __init__(
        self,
        process: Callable[[K, list[T]], Sequence[R | BaseException]],
        config: BatcherConfig | None = None,
        name: str = "batcher",
    ) -> None:
        self._process = process
        self.config = config or BatcherConfig()
        self.name = name
        self._pending: deque[_Pending] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"metarec-{name}")
        self._wakeup: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        # Counters for status pages and the benchmark.
        self.batches = 0
        self.items = 0

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return len(self._pending)

    async def submit(self, key: K, item: T, deadline: float | None = None) -> R:
        """Queue ``item`` under ``key`` and wait for its result.

        ``deadline`` is a ``time.monotonic()`` instant after which the item is dropped
        unprocessed (:class:`DeadlineExpiredError`). Cancelling the awaiting coroutine drops
        the item if its batch has not started yet.
        """
        if self._closed:
            raise BatcherClosedError(f"{self.name} is shut down")
        if len(self._pending) >= self.config.max_queue:
            raise QueueFullError(
                f"{self.name}: {len(self._pending)} requests queued (max_queue={self.config.max_queue})"
            )
        loop = asyncio.get_running_loop()
        self._ensure_started(loop)
        future = loop.create_future()
        self._pending.append(_Pending(key, item, future, time.monotonic(), deadline))
        self._wakeup.set()
        if len(self._pending) >= self.config.max_batch_size:
            self._full.set()
        return await future

    def _ensure_started(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._full = asyncio.Event()
            self._task = loop.create_task(self._collect(), name=f"{self.name}-collector")

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closed:
                    return
                # Same thread as submit(): nothing can be appended between check and clear.
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for the batch to fill, but never longer than the oldest item's budget.
            waited = time.monotonic() - self._pending[0].enqueued
            remaining = self.config.max_delay_s - waited
            if remaining > 0 and len(self._pending) < self.config.max_batch_size and not self._closed:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
            batch = self._take_batch()
            self._full.clear()
            for key, group in _group_by_key(batch):
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._run_group, key, [p.item for p in group]
                    )
                except Exception as error:  # noqa: BLE001 - never leave a caller hanging
                    results = [error] * len(group)
                self.batches += 1
                self.items += len(group)
                for pending, result in zip(group, results):
                    if pending.future.done():  # the caller gave up (cancelled / deadline)
                        continue
                    if isinstance(result, BaseException):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)

    def _take_batch(self) -> list[_Pending]:
        """Pop up to ``max_batch_size`` live items; expired ones are failed on the spot."""
        now = time.monotonic()
        batch: list[_Pending] = []
        while self._pending and len(batch) < self.config.max_batch_size:
            pending = self._pending.popleft()
            if pending.future.done():
                continue
            if pending.deadline is not None and now >= pending.deadline:
                pending.future.set_exception(DeadlineExpiredError("deadline passed while queued"))
                continue
            batch.append(pending)
        return batch

    def _run_group(self, key: K, items: list[T]) -> list[R | BaseException]:
        """Worker thread: one batch call, or item by item if the batch call fails."""
        try:
            results = list(self._process(key, items))
            if len(results) != len(items):
                raise RuntimeError(
                    f"{self.name}: batch function returned {len(results)} results for {len(items)} items"
                )
            return results
        except Exception as batch_error:  # noqa: BLE001 - isolate the bad item below
            if len(items) == 1:
                return [batch_error]
            log.warning("%s: batch of %d failed (%s); retrying one by one", self.name, len(items), batch_error)
        results: list[R | BaseException] = []
        for item in items:
            try:
                (result,) = self._process(key, [item])
                results.append(result)
            except Exception as error:  # noqa: BLE001 - reported to that item's caller
                results.append(error)
        return results

    async def aclose(self) -> None:
        """Stop taking work, finish everything already queued, then stop the worker."""
        self._closed = True
        if self._task is not None:
            self._wakeup.set()
            self._full.set()
            await self._task
        self._executor.shutdown(wait=True)


def _group_by_key(batch: list[_Pending]) -> list[tuple[Hashable, list[_Pending]]]:
    groups: dict[Hashable, list[_Pending]] = {}
    for pending in batch:
        groups.setdefault(pending.key, []).append(pending)
    return list(groups.items())
