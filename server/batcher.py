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
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
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
        on_batch: ``on_batch(size, queue_seconds)``, called in the worker thread as each
            batch call starts, with how long each of its items waited (metrics).

    The queue belongs to the worker thread: ``submit`` appends under a lock, and an idle
    worker is woken by a loop callback that runs after every handler ready in the same loop
    iteration (so requests that arrived together share a batch). The worker forms batches
    itself and hands each batch's results back to the event loop in one callback: there is
    no collector task and no executor future between a request and its batch.
    """

    def __init__(
        self,
        process: Callable[[K, list[T]], Sequence[R | BaseException]],
        config: BatcherConfig | None = None,
        name: str = "batcher",
        on_batch: Callable[[int, list[float]], None] | None = None,
    ) -> None:
        self._process = process
        self._on_batch = on_batch
        self.config = config or BatcherConfig()
        self.name = name
        self._pending: deque[_Pending] = deque()
        self._lock = threading.Condition()  # guards _pending, _closed and _idle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future | None = None
        self._closed = False
        self._idle = True  # the worker waits for work (it is not running a batch)
        self._wake_scheduled = False
        # Counters for status pages, tests and the benchmark: items accepted by submit(),
        # batch calls made, and items those calls processed.
        self.submitted = 0
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
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._closed:
                raise BatcherClosedError(f"{self.name} is shut down")
            if len(self._pending) >= self.config.max_queue:
                raise QueueFullError(
                    f"{self.name}: {len(self._pending)} requests queued (max_queue={self.config.max_queue})"
                )
            self._ensure_started(loop)
            self._pending.append(_Pending(key, item, future, time.monotonic(), deadline))
            self.submitted += 1
            # An idle worker is woken once the loop has run every handler that is ready now:
            # requests that arrived together then form one batch, instead of the first one
            # leaving alone while the others are still being validated. A busy worker looks
            # at the queue when its batch ends.
            if self._idle and not self._wake_scheduled:
                self._wake_scheduled = True
                loop.call_soon(self._wake)
        return await future

    def _wake(self) -> None:
        with self._lock:
            self._wake_scheduled = False
            self._lock.notify()

    def _ensure_started(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is None:
            self._loop = loop
            self._stopped = loop.create_future()
            self._thread = threading.Thread(target=self._work, name=f"metarec-{self.name}", daemon=True)
            self._thread.start()
        elif loop is not self._loop:
            raise RuntimeError(f"{self.name}: submit() from a second event loop")

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        batch: list[_Pending] = []
        try:
            while True:
                batch = self._next_batch() or []
                if not batch:
                    return
                for key, group in _group_by_key(batch):
                    self._report_batch(group)
                    results = self._run_group(key, [p.item for p in group])
                    self.batches += 1
                    self.items += len(group)
                    self._to_loop(_deliver, list(zip(group, results)))
        finally:
            # Normally nothing is left here; if the worker died, nobody may wait forever
            # (items already answered are skipped by _deliver).
            with self._lock:
                self._closed = True
                left = [(p, BatcherClosedError(f"{self.name} stopped")) for p in [*batch, *self._pending]]
                self._pending.clear()
            if left:
                self._to_loop(_deliver, left)
            self._to_loop(_resolve, self._stopped, None)

    def _report_batch(self, group: list[_Pending]) -> None:
        if self._on_batch is None:
            return
        now = time.monotonic()
        try:
            self._on_batch(len(group), [now - p.enqueued for p in group])
        except Exception:  # noqa: BLE001 - metrics must never fail a batch
            log.exception("%s: on_batch hook failed", self.name)

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for work, let a batch fill for up to ``max_delay_s``, and take it; ``None``
        once closed with nothing left."""
        config = self.config
        with self._lock:
            while True:
                self._idle = True
                # A scheduled wake means the loop is still queuing requests that arrived
                # together (see submit): take them all at once.
                while (not self._pending or self._wake_scheduled) and not self._closed:
                    self._lock.wait()
                if not self._pending:
                    return None  # closed and drained
                # Wait for the batch to fill, but never longer than the oldest item's budget.
                while len(self._pending) < config.max_batch_size and not self._closed:
                    remaining = self._pending[0].enqueued + config.max_delay_s - time.monotonic()
                    if remaining <= 0:
                        break
                    self._lock.wait(remaining)
                self._idle = False
                batch, expired = self._take_batch()
                if expired:
                    self._to_loop(_deliver, [(p, DeadlineExpiredError("deadline passed while queued"))
                                             for p in expired])
                if batch:
                    return batch

    def _take_batch(self) -> tuple[list[_Pending], list[_Pending]]:
        """Pop up to ``max_batch_size`` live items, and the expired ones met on the way."""
        now = time.monotonic()
        batch: list[_Pending] = []
        expired: list[_Pending] = []
        while self._pending and len(batch) < self.config.max_batch_size:
            pending = self._pending.popleft()
            if pending.future.done():  # the caller gave up (cancelled)
                continue
            if pending.deadline is not None and now >= pending.deadline:
                expired.append(pending)
                continue
            batch.append(pending)
        return batch, expired

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

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
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._stopped is not None:
            # Resolved by the worker's last callback, after every result it delivered.
            await self._stopped


def _deliver(outcomes: list[tuple[_Pending, Any]]) -> None:
    """Event loop: hand each item's result (or exception) to its caller, if still waiting."""
    for pending, result in outcomes:
        if pending.future.done():  # the caller gave up (cancelled / deadline)
            continue
        if isinstance(result, BaseException):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _group_by_key(batch: list[_Pending]) -> list[tuple[Hashable, list[_Pending]]]:
    groups: dict[Hashable, list[_Pending]] = {}
    for pending in batch:
        groups.setdefault(pending.key, []).append(pending)
    return list(groups.items())
