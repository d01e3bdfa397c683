"""The ``metarec.v1.RecommenderService`` handlers.

Each handler validates on the event loop (cheap), then hands work to a thread: model maths to
the micro-batcher's worker, SQLite to the I/O pool. Failures map to precise status codes:

==========================  ===================================================================
``INVALID_ARGUMENT``        bad or empty values, unknown items, limits exceeded (validation)
``NOT_FOUND``               unknown model name, or a model version that is not being served
``UNAVAILABLE``             no version loaded yet, the server is draining for shutdown, or the
                            interaction log's database cannot be reached
``ALREADY_EXISTS``          a LogInteractions request id reused for other interactions
``RESOURCE_EXHAUSTED``      the micro-batch queue is full (also gRPC's own message-size limit)
``DEADLINE_EXCEEDED``       the deadline passed before the work started or finished
``INTERNAL``                the model produced a non-finite score for the request (never sent
                            with OK), or anything unexpected (logged with its traceback)
==========================  ===================================================================

A request body that is not a valid message of the method's request type is answered
``INVALID_ARGUMENT`` by the service itself: :func:`add_service` registers the handlers with a
deserializer that hands the handler a :class:`CorruptRequest` instead of raising (gRPC would
answer ``UNKNOWN`` with the decoder's exception name).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from metarec.api.v1 import recommender_pb2 as pb
from metarec.api.v1 import recommender_pb2_grpc as pb_grpc
from metarec.interaction_log import InteractionStore, RequestIdConflictError
from metarec_server.batcher import (
    BatcherClosedError,
    BatcherConfig,
    DeadlineExpiredError,
    MicroBatcher,
    QueueFullError,
)
from metarec_server.cache import AdaptedUserCache, CacheKey, interactions_digest
from metarec_server.inference import RECOMMEND, SCORE, Job, Result, candidate_bucket, run_batch
from metarec_server.metrics import ServerMetrics
from metarec_server.registry import ModelRegistry, ServedVersion
from metarec_server.validation import (
    Limits,
    RequestError,
    check_id,
    check_rating,
    check_timestamp,
    invalid,
    no_interactions,
    parse_candidates,
    parse_interactions,
    parse_k,
    parse_user_features,
    usable_logged,
)

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecommenderService"].full_name

#: Each method's request and response types.
METHODS = {
    "Recommend": (pb.RecommendRequest, pb.RecommendResponse),
    "Score": (pb.ScoreRequest, pb.ScoreResponse),
    "LogInteractions": (pb.LogInteractionsRequest, pb.LogInteractionsResponse),
    "GetModelStatus": (pb.GetModelStatusRequest, pb.GetModelStatusResponse),
}


class CorruptRequest:
    """What a handler receives for a request body that does not decode as its message type."""

    def __init__(self, message_type: type, size: int) -> None:
        self.message_type = message_type
        self.size = size

    def error(self) -> RequestError:
        return invalid(f"the request body ({self.size} bytes) is not a valid "
                       f"{self.message_type.DESCRIPTOR.full_name} message")


def _deserializer(message_type: type):
    def deserialize(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError, or a bad nested value
            return CorruptRequest(message_type, len(data))

    return deserialize


def add_service(service: RecommenderService, server: grpc.aio.Server) -> None:
    """Register ``service`` on ``server`` (the generated ``add_RecommenderServiceServicer_to_server``
    with a deserializer that never raises: corrupt bodies become ``INVALID_ARGUMENT``).

    Args:
        service: the service whose four handlers answer.
        server: a ``grpc.aio`` server, not started yet.
    """
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=_deserializer(request_type),
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type) in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class RecommenderService(pb_grpc.RecommenderServiceServicer):
    """Serves the models of ``registries`` (name → registry) and the interaction log.

    Args:
        registries: model name → its registry.
        default_model: the name requests without a model name use.
        interaction_log: the store ``LogInteractions`` writes to (SQLite or PostgreSQL).
        cache: adapted users (default: a new cache).
        batching: micro-batching limits.
        limits: per-request limits.
        metrics: where calls, batches and log writes are counted (default: new collectors
            in a private registry).
        tracer: a ``metarec_server.tracing.RpcTracer`` to trace every call (default: none).
    """

    def __init__(
        self,
        registries: Mapping[str, ModelRegistry],
        default_model: str,
        interaction_log: InteractionStore,
        cache: AdaptedUserCache | None = None,
        batching: BatcherConfig | None = None,
        limits: Limits | None = None,
        metrics: ServerMetrics | None = None,
        tracer: Any = None,
    ) -> None:
        if default_model not in registries:
            raise ValueError(f"default model {default_model!r} is not among {sorted(registries)}")
        self.registries = dict(registries)
        self.default_model = default_model
        self.log = interaction_log
        self.cache = cache if cache is not None else AdaptedUserCache()
        self.limits = limits or Limits()
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.tracer = tracer
        self.batcher: MicroBatcher = MicroBatcher(
            self._process_batch, batching, name="adapt", on_batch=self.metrics.observe_batch
        )
        # SQLite reads and commits block on disk: a small pool keeps them off the event loop.
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="metarec-io")
        self.draining = False

    # ------------------------------------------------------------------ lifecycle
    async def aclose(self) -> None:
        """Finish queued model work and log writes, then release the threads."""
        self.draining = True
        await self.batcher.aclose()
        self._io.shutdown(wait=True)

    # ------------------------------------------------------------------ handlers
    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext):
        return await self._guard(context, "Recommend", _unless_corrupt(request, self._recommend(request, context)))

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext):
        return await self._guard(context, "Score", _unless_corrupt(request, self._score(request, context)))

    async def LogInteractions(self, request: pb.LogInteractionsRequest, context: grpc.aio.ServicerContext):
        return await self._guard(context, "LogInteractions", _unless_corrupt(request, self._log_interactions(request)))

    async def GetModelStatus(self, request: pb.GetModelStatusRequest, context: grpc.aio.ServicerContext):
        return await self._guard(context, "GetModelStatus", _unless_corrupt(request, self._model_status(request)))

    async def _guard(self, context: grpc.aio.ServicerContext, method: str, work):
        """Run a handler body, turn failures into status codes, count the call (and trace it)."""
        if self.tracer is None:
            return await self._answer(context, method, work, None)
        with self.tracer.rpc(method, context.invocation_metadata()) as outcome:
            return await self._answer(context, method, work, outcome)

    async def _answer(self, context: grpc.aio.ServicerContext, method: str, work, outcome):
        started = time.perf_counter()
        code = grpc.StatusCode.CANCELLED  # unless an answer is reached
        try:
            reply, code, message = await self._outcome(method, work)
        finally:
            # Counted before the answer leaves: grpc.aio's abort sends the status at once, so a
            # client that scrapes right after its failed call must already see it counted.
            self.metrics.observe_request(method, code.name, time.perf_counter() - started)
            if outcome is not None:
                outcome.code = code
        if code is grpc.StatusCode.OK:
            return reply
        await context.abort(code, message)

    async def _outcome(self, method: str, work) -> tuple[Any, grpc.StatusCode, str]:
        """``(reply, OK, "")``, or ``(None, code, message)`` for a failure."""
        if self.draining:
            work.close()
            return None, grpc.StatusCode.UNAVAILABLE, "server is shutting down"
        try:
            return await work, grpc.StatusCode.OK, ""
        except RequestError as error:
            return None, error.code, error.message
        except QueueFullError as error:
            return None, grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {error}"
        except BatcherClosedError:
            return None, grpc.StatusCode.UNAVAILABLE, "server is shutting down"
        except DeadlineExpiredError as error:
            return None, grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
        except RequestIdConflictError as error:
            return None, grpc.StatusCode.ALREADY_EXISTS, str(error)
        except ConnectionError as error:  # a shared interaction log's database is away
            log.warning("%s: %s", method, error)
            return None, grpc.StatusCode.UNAVAILABLE, str(error)
        except ValueError as error:
            # The SDK raises ValueError only for inputs it cannot use; validation should have
            # caught them first, but the caller still deserves the reason, not INTERNAL. The
            # traceback is logged: it tells a gap in validation from a client's mistake.
            log.warning("%s: ValueError past request validation, answered INVALID_ARGUMENT: %s", method, error,
                        exc_info=True)
            return None, grpc.StatusCode.INVALID_ARGUMENT, str(error)
        except Exception:  # noqa: BLE001 - last resort: log it, do not leak internals
            log.exception("unexpected error in %s", method)
            return None, grpc.StatusCode.INTERNAL, "internal error (see the server log)"

    # ------------------------------------------------------------------ model requests
    async def _recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:
        served = self._resolve(request.model)
        k = parse_k(request.k, self.limits)
        job = await self._job(served, RECOMMEND, request.user, request.candidate_item_ids, k, not request.include_seen)
        result = await self._run(served, job, context)
        return pb.RecommendResponse(
            item_ids=served.model.catalog.strings(result.item_idx),
            scores=result.scores.tolist(),
            model=pb.ServedModel(name=served.name, version=served.version),
        )

    async def _score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        served = self._resolve(request.model)
        job = await self._job(served, SCORE, request.user, request.candidate_item_ids, 0, False)
        result = await self._run(served, job, context)
        item_ids = (
            list(request.candidate_item_ids)
            if request.candidate_item_ids
            else served.model.catalog.strings(result.item_idx)
        )
        return pb.ScoreResponse(
            item_ids=item_ids,
            scores=result.scores.tolist(),
            model=pb.ServedModel(name=served.name, version=served.version),
        )

    def _resolve(self, spec: pb.ModelSpec) -> ServedVersion:
        name = spec.name or self.default_model
        registry = self.registries.get(name)
        if registry is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"unknown model {name!r} (served: {', '.join(sorted(self.registries))})"
            )
        served = registry.current
        if served is None:
            state = "still loading" if not registry.has_polled else "has no loadable version"
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model {name!r} {state}")
        if spec.version and spec.version != served.version:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} version {spec.version} is not served (serving version {served.version})",
            )
        return served

    async def _job(self, served: ServedVersion, mode: str, user: pb.UserContext, candidate_ids, k: int, exclude_seen: bool) -> Job:
        model, limits = served.model, self.limits
        if user.user_id:
            check_id(user.user_id, "user.user_id", limits)
        features = parse_user_features(user.features, model, limits)
        candidates = parse_candidates(candidate_ids, model, limits)
        if user.interactions:
            interactions = parse_interactions(user.interactions, model, limits)
        elif user.user_id:
            rows = await asyncio.get_running_loop().run_in_executor(
                self._io, self.log.user_interactions, user.user_id, limits.max_interactions
            )
            interactions = usable_logged([(r.item_id, r.rating, r.timestamp) for r in rows], model)
            if interactions is None:
                # Nothing usable logged yet: the meta-learned start answers, as for a
                # request with neither interactions nor a user id.
                interactions = no_interactions()
        else:
            interactions = no_interactions()
        key = CacheKey(user.user_id, interactions_digest(interactions.rows, features), served.name, served.version)
        return Job(
            mode=mode,
            support_idx=interactions.item_idx,
            ratings=interactions.ratings,
            timestamps=interactions.timestamps,
            user_features=features,
            candidates=candidates,
            k=k,
            exclude_seen=exclude_seen,
            cache_key=key,
        )

    async def _run(self, served: ServedVersion, job: Job, context) -> Result:
        remaining = context.time_remaining()
        deadline = None
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExpiredError("deadline passed before the request was queued")
            deadline = time.monotonic() + remaining
        key = (served.name, served.version, candidate_bucket(job))
        result = await self.batcher.submit(key, (served, job), deadline=deadline)
        if not result.finite:
            log.error("model %r version %d produced non-finite scores for a request; answered INTERNAL",
                      served.name, served.version)
            raise RequestError(grpc.StatusCode.INTERNAL,
                               f"model {served.name!r} version {served.version} produced non-finite scores "
                               f"for this request (see the server log)")
        return result

    def _process_batch(self, key, items: list[tuple[ServedVersion, Job]]) -> list[Result]:
        """Batcher worker thread: every item of a key shares one model version."""
        served = items[0][0]
        return run_batch(served.model, [job for _, job in items], self.cache)

    # ------------------------------------------------------------------ log and status
    async def _log_interactions(self, request: pb.LogInteractionsRequest) -> pb.LogInteractionsResponse:
        limits = self.limits
        check_id(request.user_id, "user_id", limits)
        if not request.interactions:
            raise invalid("interactions must be non-empty")
        if len(request.interactions) > limits.max_log_rows:
            raise invalid(f"{len(request.interactions)} interactions (max {limits.max_log_rows})")
        # Ratings are checked against the default model when one is loaded; without a model
        # only finiteness can be checked, and logging must not depend on a model being up.
        model = self.registries[self.default_model].current
        rows = []
        for i, m in enumerate(request.interactions):
            where = f"interactions[{i}]"
            check_id(m.item_id, f"{where}.item_id", limits)
            check_rating(m.rating, model.model if model else None, where)
            rows.append((m.item_id, float(m.rating), check_timestamp(m, where)))
        request_id = check_id(request.request_id, "request_id", limits) if request.request_id else None
        # The reply is built only after write() returns, i.e. after the COMMIT.
        written = await asyncio.get_running_loop().run_in_executor(
            self._io, functools.partial(self.log.write, request.user_id, rows, request_id=request_id)
        )
        self.metrics.log_written(written.stored, written.replayed)
        return pb.LogInteractionsResponse(stored=written.stored, replayed=written.replayed)

    async def _model_status(self, request: pb.GetModelStatusRequest) -> pb.GetModelStatusResponse:
        if request.name:
            if request.name not in self.registries:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
            names = [request.name]
        else:
            names = sorted(self.registries)
        return pb.GetModelStatusResponse(models=[model_status(self.registries[n]) for n in names])


async def _unless_corrupt(request: Any, work):
    """``work``, or ``INVALID_ARGUMENT`` for a :class:`CorruptRequest` (``work`` never runs)."""
    if isinstance(request, CorruptRequest):
        work.close()
        raise request.error()
    return await work


def model_status(registry: ModelRegistry) -> pb.ModelStatus:
    """The API view of one registry."""
    status = pb.ModelStatus(
        name=registry.name,
        refused=[pb.RefusedVersion(version=r.version, reason=r.reason) for r in registry.refused],
    )
    served = registry.current
    if served is None:
        status.state = pb.ModelStatus.LOADING if not registry.has_polled else pb.ModelStatus.UNAVAILABLE
        return status
    model: Any = served.model
    status.state = pb.ModelStatus.AVAILABLE
    status.version = served.version
    status.loaded_at = served.loaded_at
    status.feedback = model.feedback
    if model.rating_range is not None:
        status.rating_min, status.rating_max = model.rating_range
    status.num_items = len(model.catalog)
    status.item_id_type = model.catalog.id_type
    status.user_features.extend(sorted(model.user_features))
    return status

