"""Feature schema: which user / item columns feed the model, and how.

A :class:`Schema` is the contract between raw pandas frames and model inputs. It is
inferred from the frames by :func:`infer_schema` (or written by hand), refined by
:class:`metarec.encoding.FeatureEncoder` (which fills vocabularies and numeric
statistics) and serialised with the model via :meth:`Schema.to_config`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

FEATURE_KINDS = ("categorical", "numeric", "multi_hot")
#: Lowest and highest ends of the rating scales in common use (1-5 stars, 0.5-5 in half
#: stars, 1-10, 0-100, ...): an inferred range made of one of each raises no warning.
USUAL_SCALE_LOWS = (0.0, 0.5, 1.0)
USUAL_SCALE_HIGHS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 10.0, 100.0)


class RatingRangeWarning(UserWarning):
    """A rating range inferred from the data is not a usual scale (pass ``rating_range=``)."""
FEEDBACK_KINDS = ("explicit", "implicit")
#: Column names with a fixed meaning in interaction frames; features may not reuse them.
RESERVED_NAMES = ("user_id", "item_id", "rating", "timestamp")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One model input feature.

    Args:
        name: column name in the user or item frame, and key in the model-input dict.
        kind: ``"categorical"`` (int32 index, 0 = unknown), ``"numeric"`` (float32,
            standardised with ``mean`` / ``std``) or ``"multi_hot"`` (float32 ``[V]``,
            column 0 = unknown tokens).
        vocabulary: known categories / tokens in index order starting at index 1
            (``None`` until an encoder fits it). Stored as strings so it is JSON-able.
        mean, std: standardisation statistics for numeric features.
        low, high: the smallest and largest value of a numeric feature seen in training
            (``None`` until an encoder fits it, and in models saved before they were kept).
            Values outside are clipped to them when encoded (``metarec.encoding``): a model
            says nothing reliable about an age of 1,000.
        separator: for multi-hot features given as delimited strings (``"a|b"``), the
            delimiter; ``None`` when cells are lists / tuples / sets.
    """

    name: str
    kind: str
    vocabulary: tuple[str, ...] | None = None
    mean: float = 0.0
    std: float = 1.0
    separator: str | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"feature name must be a non-empty string, got {self.name!r}")
        if self.kind not in FEATURE_KINDS:
            raise ValueError(
                f"feature {self.name!r}: kind must be one of {FEATURE_KINDS}, got {self.kind!r}"
            )
        if self.vocabulary is not None:
            # Frozen dataclass: normalise through object.__setattr__ so lists become tuples
            # and the spec stays hashable and immutable.
            object.__setattr__(self, "vocabulary", tuple(str(v) for v in self.vocabulary))
            if len(set(self.vocabulary)) != len(self.vocabulary):
                raise ValueError(f"feature {self.name!r}: vocabulary has duplicate entries")
        if not math.isfinite(float(self.mean)):
            raise ValueError(f"feature {self.name!r}: mean must be finite, got {self.mean!r}")
        if not (math.isfinite(float(self.std)) and float(self.std) > 0):
            raise ValueError(f"feature {self.name!r}: std must be finite and > 0, got {self.std!r}")
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))
        if (self.low is None) != (self.high is None):
            raise ValueError(f"feature {self.name!r}: low and high come together; got low={self.low!r}, "
                             f"high={self.high!r}")
        if self.low is not None:
            low, high = float(self.low), float(self.high)
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"feature {self.name!r}: low and high must be finite with low <= high; "
                                 f"got ({self.low!r}, {self.high!r})")
            object.__setattr__(self, "low", low)
            object.__setattr__(self, "high", high)

    @property
    def dim(self) -> int | None:
        """Width of a multi-hot vector (vocabulary + the unknown column 0), else ``None``."""
        if self.kind != "multi_hot" or self.vocabulary is None:
            return None
        return len(self.vocabulary) + 1

    def to_config(self) -> dict[str, Any]:
        """JSON-able dict; inverse of :meth:`from_config`."""
        return {
            "name": self.name,
            "kind": self.kind,
            "vocabulary": None if self.vocabulary is None else list(self.vocabulary),
            "mean": self.mean,
            "std": self.std,
            "separator": self.separator,
            "low": self.low,
            "high": self.high,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FeatureSpec:
        return cls(**config)


@dataclasses.dataclass(frozen=True)
class Schema:
    """User and item features plus the kind of feedback.

    Args:
        user_features, item_features: feature specs; names must be unique across both
            lists and must not be one of :data:`RESERVED_NAMES`.
        feedback: ``"explicit"`` (ratings in ``rating_range``) or ``"implicit"`` (0/1 labels).
        rating_range: ``(low, high)`` for explicit feedback; ``None`` for implicit.
    """

    user_features: tuple[FeatureSpec, ...] = ()
    item_features: tuple[FeatureSpec, ...] = ()
    feedback: str = "explicit"
    rating_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "user_features", tuple(self.user_features))
        object.__setattr__(self, "item_features", tuple(self.item_features))
        for spec in self.user_features + self.item_features:
            if not isinstance(spec, FeatureSpec):
                raise ValueError(f"features must be FeatureSpec instances, got {spec!r}")
        names = [s.name for s in self.user_features + self.item_features]
        reserved = sorted(set(names) & set(RESERVED_NAMES))
        if reserved:
            raise ValueError(
                f"feature names {reserved} are reserved for interaction columns "
                f"{RESERVED_NAMES}; rename these feature columns"
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"feature names must be unique across user and item features; {dupes} "
                "appear more than once (rename one of them, e.g. with a user_/item_ prefix)"
            )
        if self.feedback not in FEEDBACK_KINDS:
            raise ValueError(f"feedback must be one of {FEEDBACK_KINDS}, got {self.feedback!r}")
        if self.rating_range is not None:
            low, high = (float(v) for v in self.rating_range)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"rating_range must be finite (low, high) with low < high, "
                                 f"got {self.rating_range!r}")
            object.__setattr__(self, "rating_range", (low, high))
        if self.feedback == "implicit" and self.rating_range not in (None, (0.0, 1.0)):
            raise ValueError(f"implicit feedback uses 0/1 labels; rating_range must be None or "
                             f"(0, 1), got {self.rating_range!r}")

    @property
    def features(self) -> tuple[FeatureSpec, ...]:
        """All features, user features first."""
        return self.user_features + self.item_features

    def feature(self, name: str) -> FeatureSpec:
        """The spec called ``name`` (``KeyError`` if absent)."""
        for spec in self.features:
            if spec.name == name:
                return spec
        raise KeyError(f"no feature named {name!r}; known: {[s.name for s in self.features]}")

    def replace(self, **changes: Any) -> Schema:
        """A copy with some fields changed (the schema itself is immutable)."""
        return dataclasses.replace(self, **changes)

    def to_config(self) -> dict[str, Any]:
        """JSON-able dict; inverse of :meth:`from_config`."""
        return {
            "user_features": [s.to_config() for s in self.user_features],
            "item_features": [s.to_config() for s in self.item_features],
            "feedback": self.feedback,
            "rating_range": None if self.rating_range is None else list(self.rating_range),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Schema:
        rating_range = config.get("rating_range")
        return cls(
            user_features=[FeatureSpec.from_config(c) for c in config.get("user_features", [])],
            item_features=[FeatureSpec.from_config(c) for c in config.get("item_features", [])],
            feedback=config.get("feedback", "explicit"),
            rating_range=None if rating_range is None else tuple(rating_range),
        )


def is_multi_value(cell: Any) -> bool:
    """True for cells that hold several tokens (list, tuple, set, frozenset, 1-d array)."""
    return isinstance(cell, (list, tuple, set, frozenset, np.ndarray))


def infer_feature_kind(column: pd.Series, name: str) -> str:
    """The feature kind of one column.

    Rule: a column whose non-null cells are lists / tuples / sets is ``multi_hot``; bool,
    string, object and category columns are ``categorical``; integer and float columns are
    ``numeric`` *whatever their number of distinct values* - small integer sets such as
    MovieLens-1M's age buckets are still ordered quantities. Integer codes that are really
    categories (occupation ids, say) must be declared with ``categorical=[...]`` or
    converted to strings.
    """
    non_null = column.dropna()
    if len(non_null) and non_null.map(is_multi_value).all():
        return "multi_hot"
    if len(non_null) and non_null.map(is_multi_value).any():
        raise ValueError(f"column {name!r} mixes list-like and scalar cells; "
                         f"first cell is {non_null.iloc[0]!r}")
    dtype = column.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "categorical"
    if pd.api.types.is_numeric_dtype(dtype):
        return "numeric"
    if (pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype)
            or isinstance(dtype, pd.CategoricalDtype)):
        return "categorical"
    raise ValueError(f"cannot infer a feature kind for column {name!r} of dtype {dtype}; "
                     "convert it to numbers or strings")


def _frame_features(
    frame: pd.DataFrame | None,
    id_column: str,
    categorical: set[str],
    numeric: set[str],
    multi_hot: set[str],
    separator: str,
) -> list[FeatureSpec]:
    if frame is None:
        return []
    specs = []
    for name in frame.columns:
        if name == id_column:
            continue  # the id itself is not a feature (it is the index / lookup key)
        if not isinstance(name, str):
            raise ValueError(f"feature column names must be strings, got {name!r} in the "
                             f"{id_column.split('_')[0]} frame")
        if name in multi_hot:
            column = frame[name].dropna()
            as_strings = len(column) and not column.map(is_multi_value).all()
            specs.append(FeatureSpec(name, "multi_hot", separator=separator if as_strings else None))
        elif name in categorical:
            specs.append(FeatureSpec(name, "categorical"))
        elif name in numeric:
            specs.append(FeatureSpec(name, "numeric"))
        else:
            specs.append(FeatureSpec(name, infer_feature_kind(frame[name], name)))
    return specs


def infer_feedback(ratings: pd.Series | np.ndarray) -> tuple[str, tuple[float, float] | None]:
    """``("implicit", None)`` when every rating is 0 or 1, else ``("explicit", (min, max))``."""
    values = np.asarray(ratings, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("cannot infer the feedback kind from an empty / all-NaN rating column")
    if np.isin(values, (0.0, 1.0)).all():
        return "implicit", None
    low, high = float(values.min()), float(values.max())
    return "explicit", (low, high)


def warn_if_unusual_scale(rating_range: tuple[float, float], ratings: pd.Series) -> None:
    """A :class:`RatingRangeWarning` when a range inferred from ``ratings`` is not a usual
    scale (:data:`USUAL_SCALE_LOWS` x :data:`USUAL_SCALE_HIGHS`): one rating of 50 on a 1-5
    data set would otherwise widen the range of the whole model, and the server would accept
    ratings up to 50. Says how many ratings lie outside the nearest usual scale.

    Args:
        rating_range: the inferred ``(low, high)``.
        ratings: the ratings it was inferred from.
    """
    low, high = rating_range
    if low in USUAL_SCALE_LOWS and high in USUAL_SCALE_HIGHS:
        return
    values = pd.to_numeric(pd.Series(ratings), errors="coerce").to_numpy(np.float64)
    values = values[np.isfinite(values)]
    # The nearest usual scale that holds all but the extreme 1 % on either side: one stray
    # rating of 50 among 1-5 stars suggests (1, 5), not a scale that would refuse the 5s.
    bottom, top = np.quantile(values, [0.01, 0.99]) if values.size else (low, high)
    usual_high = min((h for h in USUAL_SCALE_HIGHS if h >= top), default=high)
    usual_low = max((lo for lo in USUAL_SCALE_LOWS if lo <= bottom), default=low)
    outside = int(((values < usual_low) | (values > usual_high)).sum())
    warnings.warn(
        f"the rating range inferred from the data, {rating_range}, is not a usual scale"
        + (f" ({outside} rating(s) lie outside ({usual_low:g}, {usual_high:g}))" if outside else "")
        + f": the model and the server will take ratings anywhere in it. Pass rating_range=(low, high) "
          f"to fix the scale (e.g. rating_range=({usual_low:g}, {usual_high:g})), which refuses ratings "
          f"outside it.",
        RatingRangeWarning, stacklevel=3)


def infer_schema(
    interactions: pd.DataFrame,
    users: pd.DataFrame | None = None,
    items: pd.DataFrame | None = None,
    feedback: str | None = None,
    *,
    rating_range: Sequence[float] | None = None,
    categorical: Iterable[str] = (),
    numeric: Iterable[str] = (),
    multi_hot: Iterable[str] = (),
    separator: str = "|",
) -> Schema:
    """Infer a :class:`Schema` from interaction, user and item frames.

    Every column of ``users`` / ``items`` other than ``user_id`` / ``item_id`` becomes a
    feature, its kind chosen by :func:`infer_feature_kind` unless named in ``categorical``,
    ``numeric`` or ``multi_hot`` (use ``multi_hot`` for ``separator``-delimited strings
    such as ``"Action|Comedy"``; list-valued columns are detected automatically).

    Feedback: when ``feedback`` is ``None``, ratings that are all 0/1 mean implicit feedback,
    anything else explicit with ``rating_range = (min, max)`` of the observed ratings
    (pass ``rating_range`` to fix the scale, e.g. ``(1, 5)``).
    """
    if "rating" not in interactions.columns:
        raise ValueError(f"interactions need a 'rating' column; got columns {list(interactions.columns)}")
    declared = [set(categorical), set(numeric), set(multi_hot)]
    overlap = (declared[0] & declared[1]) | (declared[0] & declared[2]) | (declared[1] & declared[2])
    if overlap:
        raise ValueError(f"columns {sorted(overlap)} are declared with more than one kind")
    if feedback is None:
        feedback, observed_range = infer_feedback(interactions["rating"])
    elif feedback == "explicit":
        observed_range = infer_feedback(interactions["rating"])[1] or (0.0, 1.0)
    elif feedback == "implicit":
        observed_range = None
    else:
        raise ValueError(f"feedback must be one of {FEEDBACK_KINDS} or None, got {feedback!r}")
    if rating_range is not None and feedback == "explicit":
        observed_range = tuple(rating_range)
    elif feedback == "explicit":
        warn_if_unusual_scale(observed_range, interactions["rating"])
    return Schema(
        user_features=_frame_features(users, "user_id", *declared, separator),
        item_features=_frame_features(items, "item_id", *declared, separator),
        feedback=feedback,
        rating_range=observed_range,
    )
