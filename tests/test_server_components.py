"""Micro-batcher, adapted-user cache and model registry, each with real functions and files."""

import asyncio
import json
import logging
import os
import threading
import time

import pytest

from metarec_server.batcher import (
    BatcherClosedError,
    BatcherConfig,
    DeadlineExpiredError,
    MicroBatcher,
    QueueFullError,
)
from metarec_server.cache import AdaptedUserCache, CacheKey, interactions_digest
from metarec_server.registry import ModelRegistry, scan_versions


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# ---------------------------------------------------------------------------- batcher
class Recorder:
    """A real batch function: squares numbers, records batch sizes and worker threads."""

    def __init__(self, delay=0.0):
        self.batches = []
        self.threads = set()
        self.delay = delay

    def __call__(self, key, items):
        self.batches.append((key, list(items)))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        return [x * x for x in items]


def test_concurrent_requests_form_batches_bounded_by_max_batch_size():
    rec = Recorder(delay=0.01)

    async def main():
        batcher = MicroBatcher(rec, BatcherConfig(max_batch_size=8, max_delay_s=0.005, max_queue=100))
        results = await asyncio.gather(*(batcher.submit("k", i) for i in range(40)))
        await batcher.aclose()
        assert batcher.submitted == batcher.items == 40
        return results

    results = run(main())
    assert results == [i * i for i in range(40)]
    sizes = [len(items) for _, items in rec.batches]
    assert sum(sizes) == 40 and max(sizes) == 8
    assert len(sizes) <= 6  # batched, not one call per request


def test_zero_delay_sends_a_lone_item_at_once_and_batches_under_load():
    """With max_delay_s=0 (the default) nothing waits for company: the first item goes
    alone, and the items arriving while the worker is busy form the next batches."""
    rec = Recorder(delay=0.02)

    async def main():
        batcher = MicroBatcher(rec, BatcherConfig(max_batch_size=8, max_queue=100))
        assert batcher.config.max_delay_s == 0
        start = time.perf_counter()
        await batcher.submit("k", 1)
        lone = time.perf_counter() - start
        first = asyncio.ensure_future(batcher.submit("k", 2))
        await asyncio.sleep(0.005)  # the worker is now busy with item 2
        rest = await asyncio.gather(*(batcher.submit("k", i) for i in range(3, 15)))
        await first
        await batcher.aclose()
        return lone, rest

    lone, rest = run(main())
    assert rest == [i * i for i in range(3, 15)]
    # The work itself and no batching wait (the margin allows for a busy machine's thread
    # scheduling); the batch sizes below show that it went alone.
    assert lone < 0.02 + 0.2
    sizes = [len(items) for _, items in rec.batches]
    assert sizes[:2] == [1, 1] and max(sizes[2:]) == 8 and sum(sizes) == 14


def test_requests_that_arrive_together_form_one_batch():
    """Handlers made ready by the same loop iteration all queue before the idle worker is
    woken: the first of them does not leave alone."""
    rec = Recorder()

    async def main():
        batcher = MicroBatcher(rec, BatcherConfig(max_batch_size=8, max_delay_s=0))
        out = await asyncio.gather(*(batcher.submit("k", i) for i in range(5)))
        await batcher.aclose()
        return out

    assert run(main()) == [i * i for i in range(5)]
    assert [items for _, items in rec.batches] == [[0, 1, 2, 3, 4]]


def test_batch_function_runs_off_the_event_loop_thread():
    rec = Recorder()

    async def main():
        batcher = MicroBatcher(rec, BatcherConfig(max_delay_s=0))
        await batcher.submit("k", 3)
        await batcher.aclose()
        return threading.get_ident()

    loop_thread = run(main())
    assert rec.threads and loop_thread not in rec.threads


def test_lone_request_waits_at_most_about_max_delay():
    rec = Recorder()

    async def main():
        batcher = MicroBatcher(rec, BatcherConfig(max_batch_size=64, max_delay_s=0.02))
        start = time.perf_counter()
        await batcher.submit("k", 2)
        elapsed = time.perf_counter() - start
        await batcher.aclose()
        return elapsed

    assert 0.015 <= run(main()) < 0.5


def test_items_with_different_keys_never_share_a_call():
    rec = Recorder()

    async def main():
        batcher = MicroBatcher(rec, BatcherConfig(max_batch_size=16, max_delay_s=0.01))
        out = await asyncio.gather(*(batcher.submit(i % 3, i) for i in range(12)))
        await batcher.aclose()
        return out

    assert run(main()) == [i * i for i in range(12)]
    for key, items in rec.batches:
        assert {i % 3 for i in items} == {key}


def test_full_queue_is_refused_with_queue_full_error():
    rec = Recorder(delay=0.05)

    async def main():
        batcher = MicroBatcher(rec, BatcherConfig(max_batch_size=1, max_delay_s=0, max_queue=3))
        tasks = [asyncio.ensure_future(batcher.submit("k", i)) for i in range(10)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.aclose()
        # Refused items were never accepted.
        assert batcher.submitted == batcher.items == sum(not isinstance(o, Exception) for o in outcomes)
        return outcomes

    outcomes = run(main())
    refused = [o for o in outcomes if isinstance(o, QueueFullError)]
    served = [o for o in outcomes if not isinstance(o, Exception)]
    assert refused and served
    assert len(refused) + len(served) == 10


def test_expired_items_are_dropped_unprocessed():
    rec = Recorder(delay=0.1)

    async def main():
        batcher = MicroBatcher(rec, BatcherConfig(max_batch_size=1, max_delay_s=0))
        first = asyncio.ensure_future(batcher.submit("k", 1))
        await asyncio.sleep(0.01)  # the first item is now being processed for 0.1 s
        late = batcher.submit("k", 2, deadline=time.monotonic() + 0.02)
        with pytest.raises(DeadlineExpiredError):
            await late
        assert await first == 1
        await batcher.aclose()

    run(main())
    assert [items for _, items in rec.batches] == [[1]]


def test_one_bad_item_fails_alone():
    def process(key, items):
        if any(i == 13 for i in items):
            raise ValueError("unlucky item")
        return [i + 1 for i in items]

    async def main():
        batcher = MicroBatcher(process, BatcherConfig(max_batch_size=8, max_delay_s=0.01))
        out = await asyncio.gather(*(batcher.submit("k", i) for i in (11, 12, 13, 14)), return_exceptions=True)
        await batcher.aclose()
        return out

    out = run(main())
    assert out[:2] == [12, 13] and out[3] == 15
    assert isinstance(out[2], ValueError)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_fails_its_callers_instead_of_leaving_them_waiting():
    def process(key, items):
        raise SystemExit("worker killed")  # not an Exception: it ends the worker thread

    async def main():
        batcher = MicroBatcher(process, BatcherConfig(max_batch_size=4, max_delay_s=0))
        out = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit("k", i) for i in range(3)), return_exceptions=True), 5)
        with pytest.raises(BatcherClosedError):
            await batcher.submit("k", 9)
        await asyncio.wait_for(batcher.aclose(), 5)
        batcher._thread.join(5)  # its SystemExit is reported within this test
        return out

    out = run(main())
    assert all(isinstance(o, BatcherClosedError) for o in out)


def test_close_finishes_queued_work_then_refuses_new_work():
    rec = Recorder(delay=0.01)

    async def main():
        batcher = MicroBatcher(rec, BatcherConfig(max_batch_size=2, max_delay_s=0.001))
        pending = [asyncio.ensure_future(batcher.submit("k", i)) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.aclose()
        assert [p.result() for p in pending] == [i * i for i in range(6)]
        with pytest.raises(BatcherClosedError):
            await batcher.submit("k", 1)

    run(main())


def test_submit_from_a_second_event_loop_is_refused_and_the_first_keeps_working():
    batcher = MicroBatcher(Recorder(), BatcherConfig(max_delay_s=0))
    assert run(batcher.submit("k", 3)) == 9  # binds the batcher to this loop
    with pytest.raises(RuntimeError, match="second event loop"):
        run(batcher.submit("k", 4))  # run() starts a new loop
    assert batcher.queued == 0 and batcher.submitted == 1  # nothing was queued


def test_batcher_config_rejects_nonsense():
    with pytest.raises(ValueError):
        BatcherConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatcherConfig(max_queue=0)
    with pytest.raises(ValueError):
        BatcherConfig(max_delay_s=-1)


# ---------------------------------------------------------------------------- cache
def test_lru_evicts_the_least_recently_used():
    cache = AdaptedUserCache(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2 and cache.hits == 3 and cache.misses == 1


def test_zero_entries_disables_the_cache():
    cache = AdaptedUserCache(max_entries=0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


def test_digest_depends_on_every_input():
    rows = [("1", 4.0, 100), ("2", 3.0, None)]
    base = interactions_digest(rows, {"age": 30})
    assert base == interactions_digest(list(rows), {"age": 30})
    assert base != interactions_digest(rows[::-1], {"age": 30})  # order
    assert base != interactions_digest([("1", 4.000001, 100), rows[1]], {"age": 30})  # rating bits
    assert base != interactions_digest([("1", 4.0, 101), rows[1]], {"age": 30})  # timestamp
    assert base != interactions_digest([("1", 4.0, 100), ("2", 3.0, 0)], {"age": 30})  # None vs 0
    assert base != interactions_digest(rows, {"age": 31})  # features
    assert base != interactions_digest(rows)
    # Length prefixes: ids "12"+"3" must not collide with "1"+"23".
    assert interactions_digest([("12", 1.0, None), ("3", 1.0, None)]) != interactions_digest(
        [("1", 1.0, None), ("23", 1.0, None)]
    )


def test_drop_model_evicts_only_other_versions_of_that_model():
    cache = AdaptedUserCache()
    d = interactions_digest([("1", 1.0, None)])
    cache.put(CacheKey("u", d, "m", 1), "old")
    cache.put(CacheKey("u", d, "m", 2), "new")
    cache.put(CacheKey("u", d, "other", 1), "other")
    assert cache.drop_model("m", keep_version=2) == 1
    assert cache.get(CacheKey("u", d, "m", 1)) is None
    assert cache.get(CacheKey("u", d, "m", 2)) == "new"
    assert cache.get(CacheKey("u", d, "other", 1)) == "other"


# ---------------------------------------------------------------------------- registry
def json_loader(folder):
    """A real loader: a version is a JSON file; anything else is a broken version."""
    with open(folder / "model.keras") as f:
        return json.load(f)


def positive_check(model):
    if model.get("weight", 0) <= 0:
        raise ValueError("test prediction is not positive")


def publish(model_dir, version, content):
    """Write a version the recommended way: into a hidden folder, then rename."""
    tmp = model_dir / f".tmp-{version}"
    tmp.mkdir(parents=True)
    (tmp / "model.keras").write_text(content)
    os.rename(tmp, model_dir / str(version))


def test_serves_the_newest_version(tmp_path):
    publish(tmp_path, 1, json.dumps({"weight": 1}))
    publish(tmp_path, 10, json.dumps({"weight": 10}))
    publish(tmp_path, 2, json.dumps({"weight": 2}))
    (tmp_path / "notes").mkdir()  # not a version
    registry = ModelRegistry("m", tmp_path, json_loader, positive_check)
    assert registry.poll() is True
    assert registry.current.version == 10 and registry.current.model == {"weight": 10}
    assert registry.poll() is False  # nothing newer
    assert sorted(scan_versions(tmp_path)) == [1, 2, 10]


def test_corrupt_version_is_refused_and_the_current_one_keeps_serving(tmp_path, caplog):
    publish(tmp_path, 1, json.dumps({"weight": 1}))
    registry = ModelRegistry("m", tmp_path, json_loader, positive_check)
    registry.poll()
    publish(tmp_path, 2, "{not json")
    publish(tmp_path, 3, json.dumps({"weight": -3}))  # loads but fails the test prediction
    with caplog.at_level(logging.ERROR, logger="metarec_server.registry"):
        assert registry.poll() is False
    assert registry.current.version == 1
    assert [r.version for r in registry.refused] == [2, 3]
    assert "test prediction is not positive" in registry.refused[1].reason
    messages = [r.getMessage() for r in caplog.records]
    assert any("refused version 3" in m and "still serving version 1" in m for m in messages)
    assert any("refused version 2" in m for m in messages)
    # Refused versions are not reloaded while their files are unchanged ...
    loads = []
    registry._loader = lambda folder: loads.append(folder) or json_loader(folder)
    assert registry.poll() is False and loads == []
    # ... and are retried once they change (e.g. a copy that was still in progress).
    (tmp_path / "3" / "model.keras").write_text(json.dumps({"weight": 33}))
    assert registry.poll() is True
    assert registry.current.version == 3 and registry.current.model == {"weight": 33}
    assert [r.version for r in registry.refused] == [2]


def test_falls_back_to_an_older_good_version_newer_than_the_current(tmp_path):
    publish(tmp_path, 1, json.dumps({"weight": 1}))
    registry = ModelRegistry("m", tmp_path, json_loader, positive_check)
    registry.poll()
    publish(tmp_path, 2, json.dumps({"weight": 2}))
    publish(tmp_path, 3, "garbage")
    assert registry.poll() is True
    assert registry.current.version == 2


def test_watcher_swaps_in_new_versions_and_calls_the_hook(tmp_path):
    publish(tmp_path, 1, json.dumps({"weight": 1}))
    swapped = []
    registry = ModelRegistry("m", tmp_path, json_loader, positive_check, poll_interval_s=0.02, on_swap=swapped.append)
    registry.start()
    try:
        deadline = time.monotonic() + 10
        while registry.current is None and time.monotonic() < deadline:
            time.sleep(0.01)
        publish(tmp_path, 2, json.dumps({"weight": 2}))
        while registry.current.version != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert registry.current.version == 2
    finally:
        registry.stop(timeout=5)
    assert [s.version for s in swapped] == [1, 2]


def test_swap_is_atomic_for_readers(tmp_path):
    """Readers always see a complete (version, model) pair, never a mix."""
    publish(tmp_path, 1, json.dumps({"weight": 1}))
    registry = ModelRegistry("m", tmp_path, json_loader, positive_check)
    registry.poll()
    mismatches = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            served = registry.current
            if served.model["weight"] != served.version:
                mismatches.append(served)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for v in range(2, 30):
        publish(tmp_path, v, json.dumps({"weight": v}))
        registry.poll()
    stop.set()
    for t in threads:
        t.join()
    assert registry.current.version == 29 and not mismatches


def test_missing_folder_means_no_version(tmp_path):
    registry = ModelRegistry("m", tmp_path / "absent", json_loader)
    assert registry.poll() is False and registry.current is None and registry.has_polled
