"""Request validation: every bad input becomes a :class:`RequestError` with a precise code.

Choices (also in the API docs of ``protos/metarec/v1/recommender.proto``):

* Unknown item ids in a request's interactions or candidates are ``INVALID_ARGUMENT``: the
  encoder would silently map them to its out-of-vocabulary row, which gives a plausible but
  meaningless score, so the caller is told instead. (The catalogue is the served model's;
  ``GetModelStatus`` reports its size.)
* ``LogInteractions`` accepts unknown item ids: the log is training data for the next model,
  which may know those items. When logged interactions stand in for a request's, rows on items
  unknown to the serving model (or with ratings outside its range) are skipped.
* Unknown *categories* of user features are accepted and map to the out-of-vocabulary bucket
  (a new user may well have a new occupation); unknown feature *names* are rejected, as they are
  almost always typos. A categorical value or multi-hot token is at most ``max_id_length``
  characters long, like an id, and a multi-hot list holds at most ``max_feature_values``
  values.
* Numeric user features must be finite; values outside the range seen in training are clipped
  to it by the model's encoder (``metarec.encoding.clip_to_training_range``, the SDK's rule).
* Ratings must be finite and inside the model's rating range (explicit feedback) or exactly
  0 / 1 (implicit feedback). ``k`` must be at least 1.
* One rule for repeated items: an item may appear once in a request's interactions and once in
  its candidates; a repeat in either is ``INVALID_ARGUMENT`` (send a user's latest rating of
  an item only).

The messages for unknown ids and feature names come from ``metarec.unknown_ids``, so the
SDK's warnings and errors read the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from metarec.ratings import describe_bad_rating, first_bad_rating, ratings_valid
from metarec.unknown_ids import unknown_features_message, unknown_items_message
from metarec_server.inference import ServingModel


class RequestError(Exception):
    """A request that cannot be served; ``code`` is the gRPC status to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits; beyond them requests are ``INVALID_ARGUMENT``."""

    max_interactions: int = 1000
    max_candidates: int = 20_000
    max_k: int = 1000
    max_log_rows: int = 10_000
    max_id_length: int = 256
    max_user_features: int = 64
    max_feature_values: int = 256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be >= 1, got {getattr(self, field.name)}")


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Validated interactions of one user (item indices of the served model)."""

    item_idx: np.ndarray  # int32
    ratings: np.ndarray  # float32
    timestamps: np.ndarray | None  # int64, None when no row had one
    rows: list[tuple[str, float, int | None]]  # as sent, for the cache digest


def check_id(value: str, what: str, limits: Limits) -> str:
    """Non-empty and not longer than ``max_id_length``."""
    if not value:
        raise invalid(f"{what} must be non-empty")
    if len(value) > limits.max_id_length:
        raise invalid(f"{what} is {len(value)} characters long (max {limits.max_id_length})")
    return value


def check_feature_value(value: str, where: str, limits: Limits, max_length: int | None = None) -> None:
    """A categorical value or multi-hot token: at most ``max_id_length`` characters, like an id.

    Args:
        value: the string sent.
        where: which feature, for the message.
        limits: the server's limits.
        max_length: another cap (a delimited multi-hot string holds many tokens).

    Raises:
        RequestError: ``INVALID_ARGUMENT`` quoting the length and the value's start.
    """
    max_length = limits.max_id_length if max_length is None else max_length
    if len(value) > max_length:
        raise invalid(f"{where}: a value is {len(value)} characters long (max {max_length}), got "
                      f"{value[:40]!r}...")


def check_rating(rating: float, model: ServingModel | None, where: str) -> None:
    """Finite, and valid for the model's feedback kind when a model is given
    (``metarec.ratings``, the SDK's rule)."""
    if model is None:
        bad = first_bad_rating(np.array([rating], np.float64), "explicit", None)
    else:
        bad = first_bad_rating(np.array([rating], np.float64), model.feedback, model.rating_range)
    if bad is not None:
        raise invalid(f"{where}: {describe_bad_rating(bad, model and model.rating_range)}")


def _ratings_valid(ratings: np.ndarray, model: ServingModel) -> bool:
    """``check_rating`` of every rating at once: True when none would be refused."""
    return ratings_valid(ratings, model.feedback, model.rating_range)


def check_timestamp(message: Any, where: str) -> int | None:
    if not message.HasField("timestamp"):
        return None
    if message.timestamp < 0:
        raise invalid(f"{where}: timestamp must be >= 0, got {message.timestamp}")
    return int(message.timestamp)


def parse_interactions(messages: Sequence[Any], model: ServingModel, limits: Limits) -> Interactions:
    """Request interactions → indices; unknown items, bad ratings or too many rows are invalid."""
    if len(messages) > limits.max_interactions:
        raise invalid(f"{len(messages)} interactions (max {limits.max_interactions})")
    rows = [(m.item_id, m.rating, m.timestamp if m.HasField("timestamp") else None) for m in messages]
    # All rows checked at once; only a bad request walks them one by one, for its message.
    ids = [r[0] for r in rows]
    ratings = np.array([r[1] for r in rows], np.float64)
    if (
        not all(ids)
        or max(map(len, ids), default=0) > limits.max_id_length
        or not _ratings_valid(ratings, model)
        or any(r[2] is not None and r[2] < 0 for r in rows)
    ):
        for i, m in enumerate(messages):
            where = f"interactions[{i}]"
            check_id(m.item_id, f"{where}.item_id", limits)
            check_rating(m.rating, model, where)
            check_timestamp(m, where)
        raise AssertionError(f"the row checks accepted what the batch checks refused: {rows!r}")
    item_idx = model.catalog.index(ids)
    unknown = np.flatnonzero(item_idx == 0)
    if len(unknown):
        raise invalid(unknown_items_message("interaction", [rows[i][0] for i in unknown[:5]], len(unknown)))
    check_no_repeats(item_idx, ids, "interaction")
    return _to_interactions(item_idx, rows)


def check_no_repeats(item_idx: np.ndarray, ids: Sequence[str], what: str) -> None:
    """The one rule for repeated items, in interactions and candidates alike: each item at
    most once per list.

    Args:
        item_idx: the list's item indices.
        ids: the ids as sent (for the message).
        what: ``"interaction"`` or ``"candidate"``.

    Raises:
        RequestError: ``INVALID_ARGUMENT`` naming the first repeated id and how many repeat.
    """
    if len(item_idx) < 2:
        return
    order = np.argsort(item_idx, kind="stable")
    ordered = item_idx[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(repeats):
        first = ids[int(order[repeats[0] + 1])]
        raise invalid(f"{what} item ids contain duplicates ({len(repeats)} repeated, e.g. {first!r}): "
                      f"send each item once (for interactions, the user's latest rating)")


def usable_logged(rows: Sequence[tuple[str, float, int]], model: ServingModel) -> Interactions | None:
    """Logged interactions the model can use (known items, valid ratings), or ``None``.

    ``rows`` are oldest first. An item logged more than once counts once, with its latest
    rating (the log keeps every row; a request may not repeat an item, and neither does the
    support built from the log)."""
    item_idx = model.catalog.index([r[0] for r in rows])
    keep, seen = [], set()
    for i in reversed(range(len(rows))):
        if item_idx[i] == 0 or item_idx[i] in seen:
            continue
        try:
            check_rating(rows[i][1], model, "logged")
        except RequestError:
            continue
        seen.add(item_idx[i])
        keep.append(i)
    if not keep:
        return None
    keep.reverse()
    return _to_interactions(item_idx[keep], [rows[i] for i in keep])


def no_interactions() -> Interactions:
    """A user about whom nothing is known yet: served by the model's meta-learned start."""
    return _to_interactions(np.zeros(0, np.int32), [])


def _to_interactions(item_idx: np.ndarray, rows: list[tuple[str, float, int | None]]) -> Interactions:
    has_time = [r[2] is not None for r in rows]
    # The SDK orders nothing by time itself; a timestamp column is only passed when every row
    # has one (a partial column would be NaN for the others).
    timestamps = np.asarray([r[2] for r in rows], np.int64) if rows and all(has_time) else None
    return Interactions(
        item_idx=np.asarray(item_idx, np.int32),
        ratings=np.asarray([r[1] for r in rows], np.float32),
        timestamps=timestamps,
        rows=rows,
    )


def parse_candidates(ids: Sequence[str], model: ServingModel, limits: Limits) -> np.ndarray | None:
    """Candidate ids → indices; ``None`` (whole catalogue) when empty."""
    if not ids:
        return None
    if len(ids) > limits.max_candidates:
        raise invalid(f"{len(ids)} candidates (max {limits.max_candidates})")
    idx = model.catalog.index(ids)
    unknown = np.flatnonzero(idx == 0)
    if len(unknown):
        if any(not ids[i] for i in unknown):
            raise invalid("candidate item ids must be non-empty")
        raise invalid(unknown_items_message("candidate", [ids[i] for i in unknown[:5]], len(unknown)))
    check_no_repeats(idx, ids, "candidate")
    return idx


def parse_k(k: int, limits: Limits) -> int:
    if k < 1:
        raise invalid(f"k must be >= 1, got {k}")
    if k > limits.max_k:
        raise invalid(f"k is {k} (max {limits.max_k})")
    return int(k)


def parse_user_features(features: Any, model: ServingModel, limits: Limits) -> dict[str, Any]:
    """``map<string, FeatureValue>`` → ``{name: raw value}`` checked against the model's specs."""
    if len(features) > limits.max_user_features:
        raise invalid(f"{len(features)} user features (max {limits.max_user_features})")
    out: dict[str, Any] = {}
    for name, value in features.items():
        spec = model.user_features.get(name)
        if spec is None:
            raise invalid(unknown_features_message([name], model.user_features))
        kind = value.WhichOneof("value")
        where = f"user feature {name!r} ({spec.kind})"
        if kind is None:
            raise invalid(f"{where} has no value")
        if spec.kind == "numeric":
            if kind not in ("number_value", "int_value"):
                raise invalid(f"{where} needs a number, got {kind}")
            number = float(getattr(value, kind))
            if not math.isfinite(number):
                raise invalid(f"{where} must be finite, got {number!r}")
            out[name] = number
        elif spec.kind == "categorical":
            if kind == "string_list":
                raise invalid(f"{where} takes one value, got a list")
            raw = getattr(value, kind)
            if kind == "number_value" and not math.isfinite(raw):
                raise invalid(f"{where} must be finite, got {raw!r}")
            if kind == "string_value":
                check_feature_value(raw, where, limits)
            out[name] = raw
        else:  # multi_hot
            if kind == "string_list":
                values = list(value.string_list.values)
                if len(values) > limits.max_feature_values:
                    raise invalid(f"{where} has {len(values)} values (max {limits.max_feature_values})")
                for token in values:
                    check_feature_value(token, where, limits)
                out[name] = values
            elif kind == "string_value" and spec.separator is not None:
                check_feature_value(value.string_value, where, limits,
                                    limits.max_id_length * limits.max_feature_values)
                out[name] = value.string_value
            else:
                raise invalid(f"{where} needs a string list, got {kind}")
    return out
