"""The model side of the server: a loaded meta-learner and the maths of one micro-batch.

:class:`ServingModel` wraps a ``metarec`` meta-learner with what request handling needs
(a string → index catalogue for validation, the user-feature specs, the rating range).
:func:`run_batch` runs in the batcher's worker thread, on the requests' validated item indices:
the users not in the adapted-user cache are adapted and scored in one compiled call
(``learner.adapt_score_indices``), the cached ones scored in one ``score_indices`` call. Then it
takes each request's top k. Nothing here runs on the event loop.

Scores are those of the SDK: a predicted rating for explicit feedback, a probability for
implicit feedback; ``Recommend`` ranks exactly like ``AdaptedUser.recommend``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from metarec.ranking import bucket, is_seen, support_bucket, top_k
from metarec_server.cache import AdaptedUserCache, CacheKey
from metarec_server.registry import model_file

log = logging.getLogger(__name__)

RECOMMEND = "recommend"
SCORE = "score"
RATING_HEAD = "rating"
RANKING_HEAD = "ranking"


class Catalog:
    """The served model's items, addressed by the string form of their raw ids.

    The API carries item ids as strings. For a catalogue of integer ids only the canonical
    decimal form is known ("42", not "042" or "42.0"), so every id has exactly one spelling.
    """

    def __init__(self, raw_ids: Sequence[Any]) -> None:
        raw = list(raw_ids)
        self.id_type = (
            "int"
            if raw and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw)
            else "string"
        )
        # Entry i is item index i + 1 (index 0 is the encoder's out-of-vocabulary row).
        self.raw_ids = np.asarray(raw, dtype=np.int64 if self.id_type == "int" else object)
        self.str_ids = np.asarray([str(v) for v in raw], dtype=object)
        self._index = {s: i + 1 for i, s in enumerate(self.str_ids)}
        self.all_indices = np.arange(1, len(raw) + 1, dtype=np.int32)

    @classmethod
    def from_encoder(cls, encoder) -> Catalog:
        return cls(list(encoder.item_ids[1:]))

    def __len__(self) -> int:
        return len(self.str_ids)

    def index(self, item_ids: Sequence[str]) -> np.ndarray:
        """int32 item indices of string ids; 0 for unknown ids."""
        # map() over dict.get runs in C: no Python frame per id (1,000 candidates per request).
        return np.fromiter(map(self._index.get, item_ids, itertools.repeat(0)), dtype=np.int32,
                           count=len(item_ids))

    def raw(self, indices: np.ndarray) -> np.ndarray:
        """Raw ids (the training data's type) of item indices >= 1."""
        return self.raw_ids[np.asarray(indices) - 1]

    def strings(self, indices: np.ndarray) -> list[str]:
        """String ids of item indices >= 1."""
        return self.str_ids[np.asarray(indices) - 1].tolist()


@dataclasses.dataclass(frozen=True)
class ServingModel:
    """A meta-learner ready to serve."""

    learner: Any
    catalog: Catalog
    feedback: str
    rating_range: tuple[float, float] | None
    user_features: dict[str, Any]  # name -> metarec FeatureSpec
    # Catalogues up to this many items are scored whole for every request, and each request's
    # candidates gathered from those scores: one compiled shape whatever the candidate count.
    whole_catalogue_up_to: int = 4096
    shapes: WarmShapes = dataclasses.field(default_factory=lambda: WarmShapes())

    @classmethod
    def from_learner(cls, learner) -> ServingModel:
        encoder = learner.encoder
        if encoder is None:
            raise ValueError("the model has no feature encoder (was it fitted on a TaskSet?)")
        schema = encoder.schema
        feedback = learner.feedback or schema.feedback
        if feedback == "implicit":
            rating_range = (0.0, 1.0)
        elif schema.rating_range is not None:
            rating_range = tuple(float(v) for v in schema.rating_range)
        else:
            rating_range = None
        return cls(
            learner=learner,
            catalog=Catalog.from_encoder(encoder),
            feedback=feedback,
            rating_range=rating_range,
            user_features={spec.name: spec for spec in schema.user_features},
        )


def load_serving_model(version_dir: Path) -> ServingModel:
    """Default loader: ``metarec.load`` of the version's ``.keras`` file in Keras safe mode."""
    import metarec  # imported lazily: Keras/TensorFlow take seconds to import

    return ServingModel.from_learner(metarec.load(model_file(Path(version_dir)), safe_mode=True))


class CallShape(NamedTuple):
    """How one batch runs: ``users_per_call`` of its users per compiled call (fewer than the
    batch: it runs as several calls), on ``user_rows`` x ``support_rows`` padded arrays."""

    users_per_call: int
    user_rows: int
    support_rows: int


# The cost of one compiled call, in users: a call of u users costs about u + CALL_OVERHEAD
# users' worth of time. Measured on the quickstart-sized model (adapt + score of 2,000 items,
# JAX, 2 CPU cores with one busy elsewhere): 2.0 ms for 1 user, 8.5 ms for 8, 24 ms for 32.
CALL_OVERHEAD = 2


class WarmShapes:
    """The padded shapes a version runs on: (user rows, support rows) of a compiled call.

    The server compiles a fixed set of shapes (batch sizes in powers of two x a few support
    lengths). A version serves as soon as the check has compiled one-user calls for some of
    them; the others then compile in the background (``pending`` until the warm-up ends).
    :meth:`plan` maps every batch onto a compiled shape: a short support pads up to a longer
    compiled support and a batch pads up to a larger compiled batch size (the padded rows are
    masked out or dropped: the same scores), or the batch runs as several calls of a smaller
    compiled size, whichever costs less. So no request waits for a compilation, as long as its
    support is no longer than the longest compiled one. With no shape compiled this way (a
    custom check), every batch runs on its own shape.
    """

    def __init__(self) -> None:
        self.pending = False
        self._ready: frozenset[tuple[int, int]] = frozenset()

    def start(self, ready: Iterable[tuple[int, int]]) -> None:
        """Warming begins with the ``ready`` (user rows, support rows) shapes compiled."""
        self._ready = frozenset(ready)
        self.pending = True

    def mark_ready(self, users: int, support: int) -> None:
        # A new set: readers on other threads see the old one or the new one.
        self._ready = self._ready | {(users, support)}

    def is_ready(self, users: int, support: int) -> bool:
        return (users, support) in self._ready

    def finish(self) -> None:
        """Every shape of the set is compiled."""
        self.pending = False

    def plan(self, n_users: int, longest_support: int) -> CallShape:
        """How a batch of ``n_users`` whose longest support holds ``longest_support``
        interactions runs: on its own padded shape when that is compiled (or when no compiled
        support is long enough), else on the cheapest compiled one (see ``CALL_OVERHEAD``)."""
        users, support = bucket(n_users), support_bucket(longest_support)
        ready = self._ready
        fits: dict[int, int] = {}  # user rows -> the shortest compiled support that holds it
        for u, s in ready:
            if s >= support:
                fits[u] = min(s, fits.get(u, s))
        if (users, support) in ready or not fits:
            return CallShape(n_users, users, support)

        def cost(u: int) -> int:  # of the whole batch, in calls of u user rows
            return -(-n_users // u) * (u + CALL_OVERHEAD)

        u = min(fits, key=lambda u: (cost(u), u))
        return CallShape(min(u, n_users), u, fits[u])


def _probe(model: ServingModel, size: int, support_size: int, num_candidates: int) -> None:
    """Test predictions through the request path (a batch of ``size`` users with
    ``support_size`` interactions: Recommend over per-user lists, Score of the catalogue, with
    some or all users cached): compiles the programs of that shape and raises when scores are
    not finite and well shaped."""
    n_items = len(model.catalog)
    low, high = model.rating_range or (0.0, 1.0)
    rating = high if model.feedback == "implicit" else (low + high) / 2
    candidates = model.catalog.all_indices[: min(num_candidates, n_items)]
    support = model.catalog.all_indices[: min(support_size, n_items)]
    ratings = np.full(len(support), rating, np.float32)
    job = Job(RECOMMEND, support, ratings, None, {}, candidates, 10, True, None)
    # Each job its own order of the candidates: concurrent requests carry different lists,
    # and equal lists would compile the shared-list kernel instead.
    jobs = [dataclasses.replace(job, candidates=np.roll(candidates, j)) for j in range(size)]
    for result in run_batch(model, jobs, None, exact_shapes=True):
        if not result.finite or not np.all(np.isfinite(result.scores)):
            raise ValueError("test prediction produced non-finite scores")
        expected = min(10, len(candidates) - len(np.intersect1d(candidates, support)))
        if len(result.item_idx) != expected:
            raise ValueError(f"test recommendation returned {len(result.item_idx)} items, not {expected}")
    whole = run_batch(model, [dataclasses.replace(job, candidates=None, mode=SCORE)] * size, None,
                      exact_shapes=True)
    if any(not r.finite or len(r.scores) != n_items or not np.all(np.isfinite(r.scores)) for r in whole):
        raise ValueError(f"test scoring of the catalogue did not return {n_items} finite scores")
    # The adapted-user cache's paths: some users cached (adapt and score the others, score the
    # cached ones), and all cached (score only).
    keyed = [dataclasses.replace(job, cache_key=CacheKey(f"probe{j}", b"", "probe", 0)) for j in range(size)]
    for cached in sorted({1, size // 2, size - 1, size} - {0}):
        cache = AdaptedUserCache(max_entries=size)
        run_batch(model, keyed[:cached], cache, exact_shapes=True)
        for result in run_batch(model, keyed, cache, exact_shapes=True):
            if not result.finite or not np.all(np.isfinite(result.scores)):
                raise ValueError("test prediction with cached users produced non-finite scores")


def check_support_sizes(backend: str | None) -> tuple[int, ...]:
    """The support sizes a server's start-up check compiles one-user calls for, per backend.

    A version serves once these are compiled (:func:`make_check`); the other shapes follow in
    the background. On TensorFlow (``backend`` "tensorflow", or None: Keras's default) the
    64-row call alone: SERVING came about 2.8 s sooner on the 2-core benchmark machine
    (median 12.0 -> 9.2 s over four interleaved pairs), and a short support runs padded to
    64 rows until its own shape is ready, with no call over 100 ms at 1 or 4 clients
    (docs/BENCHMARKS.md, start-up). On JAX 16 and 64: with 64 alone
    SERVING came no sooner, and some one- and four-client calls right after it took over 100 ms.
    """
    if backend in (None, "tensorflow"):
        return (64,)
    return (16, 64)


def make_check(
    batch_sizes: Sequence[int] = (1,),
    support_sizes: Sequence[int] = (5,),
    num_candidates: int = 1000,
    warm_up_follows: bool = False,
) -> Any:
    """A registry check: test predictions that must be finite and well shaped.

    It runs the same path as requests (adapt, score per-user candidate lists and the whole
    catalogue) for every batch size x support size given. That also compiles the kernels for
    those padded shapes before the version takes traffic: JAX compiles once per shape, so
    without it the first requests of each new shape after a swap would wait for a compile.
    With ``warm_up_follows`` (a :func:`make_warm` compiles the rest of the server's shapes
    after it), batches run on these shapes and those the warm-up adds (:class:`WarmShapes`).
    """

    def check(model: ServingModel) -> None:
        if len(model.catalog) == 0:
            raise ValueError("the model's catalogue is empty")
        for size in batch_sizes:
            for support_size in support_sizes:
                _probe(model, size, support_size, num_candidates)
        if warm_up_follows:  # from now on batches run on the shapes compiled so far
            model.shapes.start((bucket(size), support_bucket(support_size))
                               for size in batch_sizes for support_size in support_sizes)

    return check


def make_warm(
    batch_sizes: Sequence[int],
    support_sizes: Sequence[int] = (5,),
    num_candidates: int = 1000,
    low_priority: bool = True,
) -> Any:
    """A registry warm-up: compiles the programs of every batch size x support size, marking
    each shape ready for :func:`run_batch` once compiled. The registry runs it after the check:
    in the background for a server's first version (which serves meanwhile with the shapes the
    check compiled), before the swap for later ones (and for the first one too with
    ``ServerConfig.serve_after_warm_up``).

    Order: first every batch size with the longest support, in ascending order (small shapes
    compile fastest, so that batches soon run in calls of a few users rather than one; the
    largest-first order was measured and gave the first 32-client calls no relief), then the
    other supports in the same order. With ``low_priority`` the warm-up
    runs at the lowest CPU priority (:func:`lower_thread_priority` of the calling thread, for
    good: the registry's watcher thread does only background work), so that on a busy machine
    requests come first.
    """
    longest = max(support_sizes)
    sizes = sorted(set(batch_sizes))
    order = [(size, longest) for size in sizes]
    order += [(size, s) for s in sorted(set(support_sizes)) if s != longest for size in sizes]

    def warm(model: ServingModel, stop: threading.Event | None = None) -> None:
        if low_priority:
            lower_thread_priority()
        with short_gil_turns():
            for size, support_size in order:
                shape = (bucket(size), support_bucket(support_size))
                if model.shapes.is_ready(*shape):
                    continue
                if stop is not None and stop.is_set():
                    return  # shutting down: batches keep to the shapes ready so far
                started = time.monotonic()
                _probe(model, size, support_size, num_candidates)
                model.shapes.mark_ready(*shape)
                log.debug("warm-up: %d users x %d support rows compiled in %.2f s", *shape,
                          time.monotonic() - started)
        model.shapes.finish()

    return warm


_gil_lock = threading.Lock()
_gil_users = 0
_gil_interval = 0.005


@contextlib.contextmanager
def short_gil_turns(interval_s: float = 0.0005) -> Iterator[None]:
    """While inside, Python threads take turns on the GIL every ``interval_s`` (default 5 ms).

    Compiling traces Python code that holds the GIL; each time the request thread comes back
    from the compiled maths it may wait a whole turn for it. Shorter turns while a warm-up
    compiles keep those waits short. Nested and concurrent uses (several models warming) share
    it: the interval is restored when the last one leaves.
    """
    global _gil_users, _gil_interval
    with _gil_lock:
        if _gil_users == 0:
            _gil_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval_s, _gil_interval))
        _gil_users += 1
    try:
        yield
    finally:
        with _gil_lock:
            _gil_users -= 1
            if _gil_users == 0:
                sys.setswitchinterval(_gil_interval)


def lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (nice 19), where the OS allows it.

    On Linux ``setpriority`` of a thread id sets that thread's nice value only; elsewhere (or
    without permission) nothing changes.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux-like, or not permitted
        pass


@dataclasses.dataclass(frozen=True)
class Job:
    """One validated request, in item indices.

    ``candidates`` is ``None`` for the whole catalogue. ``cache_key`` is ``None`` when the
    adapted user must not be cached.
    """

    mode: str
    support_idx: np.ndarray  # int32 [n] item indices (all known)
    ratings: np.ndarray  # float32 [n]
    timestamps: np.ndarray | None  # int64 [n] or None
    user_features: dict[str, Any]
    candidates: np.ndarray | None  # int32 [c] item indices, or None
    k: int
    exclude_seen: bool
    cache_key: CacheKey | None


@dataclasses.dataclass(frozen=True)
class Result:
    item_idx: np.ndarray  # int32 item indices, ranked (recommend) or in request order (score)
    scores: np.ndarray  # float32
    finite: bool = True  # whether every candidate's score was finite (not only the top k)


def candidate_bucket(job: Job) -> int:
    """Batching key part: jobs whose candidate lists pad to the same size batch together.

    Mixing a 100-candidate request with a 50,000-candidate one would pad both to 50,000.
    ``0`` stands for the whole catalogue (a shared candidate array).
    """
    if job.candidates is None:
        return 0
    return bucket(len(job.candidates), minimum=8)


def run_batch(
    model: ServingModel, jobs: Sequence[Job], cache: AdaptedUserCache | None, exact_shapes: bool = False,
) -> list[Result]:
    """Adapt (cache misses only), score and rank a batch of jobs for one model version.

    While the version warms up, the batch runs on shapes already compiled (``model.shapes``);
    ``exact_shapes=True`` (the warm-up's own probes) runs it on its own shapes, compiling them.
    The users not cached and the cached ones each run on the batch's user rows, so the cache
    adds no compiled shape either.
    """
    if exact_shapes:
        shape = CallShape(len(jobs), bucket(len(jobs)), 0)
    else:
        shape = model.shapes.plan(len(jobs), max(len(job.support_idx) for job in jobs))
    if shape.users_per_call < len(jobs):  # warming up: run as calls of a compiled size
        n = shape.users_per_call
        return [result for start in range(0, len(jobs), n)
                for result in run_batch(model, jobs[start:start + n], cache)]
    learner, catalog = model.learner, model.catalog
    adapted: list[Any] = [None] * len(jobs)
    if cache is not None:
        for i, job in enumerate(jobs):
            if job.cache_key is not None:
                adapted[i] = cache.get(job.cache_key)
    missing = [i for i, a in enumerate(adapted) if a is None]
    cached = [i for i, a in enumerate(adapted) if a is not None]
    cand_idx = [catalog.all_indices if j.candidates is None else j.candidates for j in jobs]
    all_catalogue = all(job.candidates is None for job in jobs)
    # A small catalogue is scored whole and each job's candidates gathered from it (below).
    whole = all_catalogue or len(catalog) <= model.whole_catalogue_up_to
    # Recommend ranks by the ranking head, Score returns the rating head: the same scores
    # except for a model with a separate ranking head (metarec.models.two_tower).
    two_heads = learner.has_ranking_head()
    heads = [RANKING_HEAD if job.mode == RECOMMEND and two_heads else RATING_HEAD for job in jobs]
    head = heads[0] if len(set(heads)) == 1 else RANKING_HEAD
    scores: list[Any] = [None] * len(jobs)
    if missing:
        # The jobs hold validated item indices: adapt on them directly (no DataFrames, no
        # second lookup of the ids), and score in the same compiled call. With some users
        # cached this is the same program with fewer real users on the same padded shape.
        todo = [jobs[i] for i in missing]
        support = (
            np.concatenate([job.support_idx for job in todo]).astype(np.int32, copy=False),
            np.concatenate([job.ratings for job in todo]),
            [len(job.support_idx) for job in todo],
        )
        # Their ratings were checked by request validation (metarec.ratings): not again here.
        new, new_scores = learner.adapt_score_indices(
            *support, None if whole else [cand_idx[i] for i in missing], head=head,
            user_features=[job.user_features or None for job in todo],
            seen_items=[catalog.raw(job.support_idx) for job in todo], ratings_checked=True,
            min_support_pad=shape.support_rows, min_users_pad=shape.user_rows)
        for i, user, user_scores in zip(missing, new, new_scores):
            adapted[i], scores[i] = user, user_scores
            if cache is not None and jobs[i].cache_key is not None:
                cache.put(jobs[i].cache_key, user)
    if cached:
        users_cached = [adapted[i] for i in cached]
        again = learner.score_indices(users_cached, None if whole else [cand_idx[i] for i in cached],
                                      head=head, min_users_pad=shape.user_rows)
        for i, user_scores in zip(cached, again):
            scores[i] = user_scores

    if any(h != head for h in heads):
        # A batch mixing Score and Recommend on a two-headed model: Score's jobs get ratings.
        rated = [i for i, h in enumerate(heads) if h != head]
        again = learner.score_indices([adapted[i] for i in rated], None if whole else [cand_idx[i] for i in rated],
                                      head=RATING_HEAD, min_users_pad=shape.user_rows)
        scores = list(scores)
        for i, s in zip(rated, again):
            scores[i] = s

    results = []
    for job, idx, s in zip(jobs, cand_idx, scores):
        s = np.asarray(s, dtype=np.float32)
        if whole and job.candidates is not None:
            s = s[idx - 1]  # catalogue order: item index i is entry i - 1
        if not np.isfinite(s).all():
            # Never ranked or returned: the service answers INTERNAL (a model that cannot score
            # this request), and the other jobs of the batch are unaffected.
            results.append(Result(idx[:0], s[:0], finite=False))
        elif job.mode == SCORE:
            results.append(Result(idx, s))
        else:
            results.append(_top_k(idx, s, job))
    return results


def _top_k(idx: np.ndarray, scores: np.ndarray, job: Job) -> Result:
    """Best ``k`` candidates, ranked as ``recommend_many`` ranks (``metarec.ranking.top_k``:
    ties broken by candidate order)."""
    ranked = scores.astype(np.float64)[None]
    if job.exclude_seen and len(job.support_idx):
        ranked[0, is_seen(idx, job.support_idx)] = -np.inf
    (top,), _ = top_k(ranked, job.k)
    return Result(idx[top], scores[top])
