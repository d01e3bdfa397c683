"""A friendly Python client for the metarec gRPC server (``metarec serve``).

    from metarec.client import Client

    with Client("127.0.0.1:8500") as client:
        recs = client.recommend({"m1": 5, "m7": 2, "m9": 4}, k=10)
        print(recs.to_frame())
        client.log_interactions("u42", [("m3", 4.0)])

Interactions may be a pandas DataFrame (``item_id``, ``rating``, optional ``timestamp``), a
``{item_id: rating}`` dict, or a list of ``(item_id, rating[, timestamp])`` tuples or of dicts
with those keys. Item ids may be ints or strings; results come back with the catalogue's own
id type (ints when the model was trained on integer ids). Server errors raise
``grpc.RpcError`` with the status code and a message saying what was wrong.

Retries: calls that fail with ``UNAVAILABLE`` (the server restarting, still loading its model,
or draining for shutdown) are retried by gRPC itself, up to ``retry_attempts`` attempts in all
with exponential backoff (0.1 s, 0.2 s, 0.4 s, ... at most 2 s, randomised), within the
call's deadline. Recommend, Score and GetModelStatus change nothing on the server, and every
``log_interactions`` call carries a request id, so a retried log call stores its rows once.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import json
import math
import numbers
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from metarec.api.v1 import recommender_pb2 as pb
from metarec.api.v1 import recommender_pb2_grpc as pb_grpc

__all__ = ["Client", "Recommendation", "Scores", "retry_service_config"]

_SERVICE = pb.DESCRIPTOR.services_by_name["RecommenderService"].full_name
#: Calls that may be sent again: they change nothing, or (LogInteractions) carry a request id.
RETRIED_METHODS = ("Recommend", "Score", "GetModelStatus", "LogInteractions")
#: gRPC refuses retry policies of more than 5 attempts.
MAX_RETRY_ATTEMPTS = 5


def retry_service_config(attempts: int) -> str:
    """The gRPC service config (JSON) that retries ``UNAVAILABLE`` calls of the service.

    Args:
        attempts: attempts per call in all, 2 to :data:`MAX_RETRY_ATTEMPTS`.

    Returns:
        The JSON text for the channel option ``grpc.service_config``.
    """
    policy = {
        "maxAttempts": int(attempts),
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": _SERVICE, "method": method} for method in RETRIED_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """Top-k items, best first, and the model version that produced them."""

    item_ids: list
    scores: np.ndarray
    model_name: str
    model_version: int

    def to_frame(self):
        """``DataFrame`` with columns ``item_id`` and ``score``."""
        import pandas as pd

        return pd.DataFrame({"item_id": self.item_ids, "score": self.scores})

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclasses.dataclass(frozen=True)
class Scores:
    """One score per item (a rating, or a probability for implicit feedback)."""

    item_ids: list
    scores: np.ndarray
    model_name: str
    model_version: int

    def to_series(self):
        """``Series`` of scores indexed by item id."""
        import pandas as pd

        return pd.Series(self.scores, index=pd.Index(self.item_ids, name="item_id"), name="score")


class Client:
    """Blocking client of one metarec server; thread-safe, reuse one per process.

    Args:
        address: ``host:port``.
        token: bearer token when the server requires one.
        tls_root_cert: PEM bytes or a path to the CA / self-signed certificate that signed
            the server's certificate; enables TLS. ``tls=True`` without it trusts the
            system's roots.
        timeout: default deadline of each call in seconds (``None``: no deadline).
        server_name: the name to check the server certificate against, when it differs
            from the host in ``address``.
        connections: TCP connections to open; calls take turns over them. A server run with
            ``metarec serve --workers N`` spreads connections (not calls) over its worker
            processes, so a busy client should open a few per worker.
        retry_attempts: attempts per call when the server answers ``UNAVAILABLE`` (see the
            module docstring), 1 to 5; 1 turns retries off.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_root_cert: bytes | str | Path | None = None,
        timeout: float | None = 30.0,
        tls: bool | None = None,
        server_name: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        connections: int = 1,
        retry_attempts: int = 4,
    ) -> None:
        if not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections must be an integer >= 1, got {connections!r}")
        if not isinstance(retry_attempts, int) or not 1 <= retry_attempts <= MAX_RETRY_ATTEMPTS:
            raise ValueError(
                f"retry_attempts must be an integer in 1..{MAX_RETRY_ATTEMPTS} (1: no retries), got {retry_attempts!r}"
            )
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if retry_attempts > 1:
            options.append(("grpc.service_config", retry_service_config(retry_attempts)))
        else:
            options.append(("grpc.enable_retries", 0))
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if connections > 1:
            # Without a channel-local pool, channels to one address share one connection.
            options.append(("grpc.use_local_subchannel_pool", 1))
        use_tls = tls if tls is not None else tls_root_cert is not None
        credentials = None
        if use_tls:
            root = tls_root_cert
            if root is not None and not isinstance(root, bytes):
                root = Path(root).read_bytes()
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
        self._channels = [
            grpc.secure_channel(address, credentials, options) if use_tls else grpc.insecure_channel(address, options)
            for _ in range(connections)
        ]
        self._stubs = [pb_grpc.RecommenderServiceStub(channel) for channel in self._channels]
        self._turn = itertools.count()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout
        self._id_types: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    @property
    def _stub(self) -> pb_grpc.RecommenderServiceStub:
        # next() on itertools.count is atomic under the GIL: safe from many threads.
        return self._stubs[next(self._turn) % len(self._stubs)]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until every connection is up (raises ``grpc.FutureTimeoutError``)."""
        deadline = time.monotonic() + timeout
        for channel in self._channels:
            grpc.channel_ready_future(channel).result(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ calls
    def recommend(
        self,
        interactions: Any = None,
        *,
        k: int = 10,
        candidates: Iterable[Any] | None = None,
        user_id: Any = None,
        user_features: Mapping[str, Any] | None = None,
        exclude_seen: bool = True,
        model: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Recommendation:
        """Top ``k`` items for a user adapted to ``interactions``.

        With no ``interactions``, the server uses those logged for ``user_id``. ``candidates``
        restricts the ranking (default: the whole catalogue).
        """
        request = pb.RecommendRequest(
            model=_model_spec(model, version),
            user=_user(user_id, user_features, interactions),
            candidate_item_ids=_ids(candidates),
            k=int(k),
            include_seen=not exclude_seen,
        )
        reply = self._stub.Recommend(request, timeout=self._timeout(timeout), metadata=self._metadata)
        return Recommendation(
            self._typed_ids(reply.item_ids, reply.model),
            np.asarray(reply.scores, np.float32),
            reply.model.name,
            reply.model.version,
        )

    def score(
        self,
        interactions: Any = None,
        candidates: Iterable[Any] | None = None,
        *,
        user_id: Any = None,
        user_features: Mapping[str, Any] | None = None,
        model: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Scores:
        """Score every candidate (default: the whole catalogue) for the adapted user."""
        request = pb.ScoreRequest(
            model=_model_spec(model, version),
            user=_user(user_id, user_features, interactions),
            candidate_item_ids=_ids(candidates),
        )
        reply = self._stub.Score(request, timeout=self._timeout(timeout), metadata=self._metadata)
        return Scores(
            self._typed_ids(reply.item_ids, reply.model),
            np.asarray(reply.scores, np.float32),
            reply.model.name,
            reply.model.version,
        )

    def log_interactions(
        self,
        user_id: Any,
        interactions: Any,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> int:
        """Store interactions durably; returns the number of rows committed.

        Args:
            user_id: whose interactions.
            interactions: any shape the module docstring lists.
            timeout: this call's deadline in seconds (default: the client's).
            request_id: the call's idempotency key (default: a new random UUID). A call
                that fails with ``DEADLINE_EXCEEDED`` or ``UNAVAILABLE`` may still have been
                stored; sending it again with the same ``request_id`` stores nothing new and
                returns the first call's count.

        Returns:
            The number of rows committed (by this call, or by the first call with its id).
        """
        request = pb.LogInteractionsRequest(
            user_id=str(user_id),
            interactions=_interactions(interactions),
            request_id=uuid.uuid4().hex if request_id is None else str(request_id),
        )
        reply = self._stub.LogInteractions(request, timeout=self._timeout(timeout), metadata=self._metadata)
        return int(reply.stored)

    def model_status(self, name: str | None = None, timeout: float | None = None) -> list[dict]:
        """One dict per served model: name, state, version, feedback, rating range, ..."""
        reply = self._stub.GetModelStatus(
            pb.GetModelStatusRequest(name=name or ""), timeout=self._timeout(timeout), metadata=self._metadata
        )
        out = []
        for m in reply.models:
            out.append(
                {
                    "name": m.name,
                    "state": pb.ModelStatus.State.Name(m.state),
                    "version": m.version,
                    "loaded_at": m.loaded_at,
                    "feedback": m.feedback,
                    "rating_range": (m.rating_min, m.rating_max) if m.feedback == "explicit" else None,
                    "num_items": m.num_items,
                    "item_id_type": m.item_id_type,
                    "user_features": list(m.user_features),
                    "refused": [{"version": r.version, "reason": r.reason} for r in m.refused],
                }
            )
        return out

    # ------------------------------------------------------------------ helpers
    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _typed_ids(self, ids: Sequence[str], served: pb.ServedModel) -> list:
        """String ids from the wire → the catalogue's id type (one status call per version)."""
        key = (served.name, served.version)
        with self._lock:
            id_type = self._id_types.get(key)
        if id_type is None:
            status = self.model_status(served.name)
            id_type = status[0]["item_id_type"] if status and status[0]["version"] == served.version else "string"
            with self._lock:
                self._id_types[key] = id_type
        if id_type == "int":
            return [int(i) for i in ids]
        return list(ids)


# ---------------------------------------------------------------------- conversions
def _model_spec(name: str | None, version: int | None) -> pb.ModelSpec:
    return pb.ModelSpec(name=name or "", version=int(version or 0))


def _id(value: Any) -> str:
    """Wire form of an id: ints in canonical decimal form (``np.int64(7)`` and ``7.0`` → ``"7"``)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"ids must be ints or strings, got {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _ids(values: Iterable[Any] | None) -> list[str]:
    if values is None:
        return []
    return [_id(v) for v in values]


def _timestamp(value: Any) -> int | None:
    """Seconds since the epoch from ints, floats, datetimes or pandas Timestamps."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):  # pandas.Timestamp is a datetime too
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return int(value.timestamp())
    if isinstance(value, np.datetime64):
        if np.isnat(value):
            return None
        return int(value.astype("datetime64[s]").astype(np.int64))
    number = float(value)
    if math.isnan(number):
        return None
    return int(number)


def _interaction(item_id: Any, rating: Any, timestamp: Any = None) -> pb.Interaction:
    message = pb.Interaction(item_id=_id(item_id), rating=float(rating))
    ts = _timestamp(timestamp)
    if ts is not None:
        message.timestamp = ts
    return message


def _interactions(data: Any) -> list[pb.Interaction]:
    """Accepted shapes: DataFrame, {item: rating}, [(item, rating[, ts])], [{item_id, rating[, timestamp]}]."""
    if data is None:
        return []
    if hasattr(data, "columns") and hasattr(data, "itertuples"):  # a pandas DataFrame
        missing = {"item_id", "rating"} - set(data.columns)
        if missing:
            raise ValueError(f"interactions frame lacks columns {sorted(missing)}")
        times = data["timestamp"].tolist() if "timestamp" in data.columns else [None] * len(data)
        return [_interaction(i, r, t) for i, r, t in zip(data["item_id"].tolist(), data["rating"].tolist(), times)]
    if isinstance(data, Mapping):
        return [_interaction(item, rating) for item, rating in data.items()]
    out = []
    for row in data:
        if isinstance(row, Mapping):
            out.append(_interaction(row["item_id"], row["rating"], row.get("timestamp")))
        else:
            out.append(_interaction(*row))
    return out


def _feature(value: Any) -> pb.FeatureValue:
    if isinstance(value, str):
        return pb.FeatureValue(string_value=value)
    if isinstance(value, (bool, np.bool_)):
        return pb.FeatureValue(string_value=str(bool(value)))
    if isinstance(value, numbers.Integral):
        return pb.FeatureValue(int_value=int(value))
    if isinstance(value, numbers.Real):
        return pb.FeatureValue(number_value=float(value))
    if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
        return pb.FeatureValue(string_list=pb.StringList(values=[str(v) for v in value]))
    raise TypeError(f"unsupported user feature value {value!r}")


def _user(user_id: Any, features: Mapping[str, Any] | None, interactions: Any) -> pb.UserContext:
    return pb.UserContext(
        user_id="" if user_id is None else str(user_id),
        features={name: _feature(v) for name, v in (features or {}).items() if v is not None},
        interactions=_interactions(interactions),
    )
