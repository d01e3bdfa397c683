"""Validated interaction data: who rated what, plus optional user / item feature frames."""

from __future__ import annotations

import numpy as np
import pandas as pd

from metarec.ratings import describe_bad_rating, first_bad_rating
from metarec.schema import Schema, infer_schema

REQUIRED_COLUMNS = ("user_id", "item_id", "rating")
DUPLICATE_POLICIES = ("error", "last", "mean")
MISSING_FEATURE_POLICIES = ("error", "default")


def _py(value):
    """Plain Python scalar for error messages (``1`` rather than ``np.int64(1)``)."""
    return value.item() if isinstance(value, np.generic) else value


def _feature_frame(frame: pd.DataFrame | None, id_column: str) -> pd.DataFrame | None:
    """A copy of a user / item frame indexed by ``id_column`` (accepts index or column)."""
    if frame is None:
        return None
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"the {id_column[:-3]} frame must be a pandas DataFrame, "
                         f"got {type(frame).__name__}")
    if id_column in frame.columns:
        out = frame.set_index(id_column)  # set_index copies; the caller's frame is untouched
    elif frame.index.name == id_column:
        out = frame.copy()
    else:
        raise ValueError(f"the {id_column[:-3]} frame needs a {id_column!r} column or index; "
                         f"got columns {list(frame.columns)} and index {frame.index.name!r}")
    if out.index.hasnans:
        raise ValueError(f"the {id_column[:-3]} frame has missing {id_column} values")
    if out.index.has_duplicates:
        dupes = out.index[out.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"the {id_column[:-3]} frame has duplicate {id_column} values, "
                         f"e.g. {dupes}")
    return out


class InteractionData:
    """Interactions (``user_id``, ``item_id``, ``rating``[, ``timestamp``]) with features.

    Args:
        interactions: one row per (user, item) interaction; ``rating`` is an explicit rating
            or an implicit 0/1 label. Other columns are dropped.
        users, items: optional feature frames, indexed by (or with a column) ``user_id`` /
            ``item_id``; every other column is a feature.
        schema: the feature schema; inferred with :func:`metarec.schema.infer_schema` when
            ``None``.
        duplicates: what to do with repeated (user, item) rows: ``"error"``; ``"last"``
            keeps the last row (by timestamp when there is one, else by row order);
            ``"mean"`` averages explicit ratings (implicit labels take the maximum, so any
            positive wins) and keeps the latest timestamp.
        missing_features: when a non-empty feature frame lacks ids that appear in the
            interactions: ``"error"``, or ``"default"`` to add rows of missing values, which
            the encoder maps to the unknown category / 0.
        rating_range: ``(low, high)`` of explicit ratings when the schema is inferred (e.g.
            ``(1, 5)``); by default the observed range, with a
            :class:`metarec.schema.RatingRangeWarning` when that is not a usual scale.

    The caller's frames are never modified: everything is copied.
    """

    def __init__(
        self,
        interactions: pd.DataFrame,
        users: pd.DataFrame | None = None,
        items: pd.DataFrame | None = None,
        schema: Schema | None = None,
        duplicates: str = "error",
        missing_features: str = "error",
        rating_range: tuple[float, float] | None = None,
    ) -> None:
        if duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
        if missing_features not in MISSING_FEATURE_POLICIES:
            raise ValueError(f"missing_features must be one of {MISSING_FEATURE_POLICIES}, "
                             f"got {missing_features!r}")
        frame = self._check_interactions(interactions)
        users = _feature_frame(users, "user_id")
        items = _feature_frame(items, "item_id")
        if schema is None:
            schema = infer_schema(frame, users, items, rating_range=rating_range)
        elif rating_range is not None:
            raise ValueError(f"pass rating_range={rating_range!r} or schema=, not both (the schema "
                             f"holds its own rating_range, {getattr(schema, 'rating_range', None)!r})")
        elif not isinstance(schema, Schema):
            raise ValueError(f"schema must be a metarec Schema, got {type(schema).__name__}")
        self._check_ratings(frame["rating"], schema)
        frame = self._resolve_duplicates(frame, duplicates, schema)
        users = self._check_features(users, frame["user_id"], schema.user_features,
                                     "user", missing_features)
        items = self._check_features(items, frame["item_id"], schema.item_features,
                                     "item", missing_features)
        self.interactions: pd.DataFrame = frame.reset_index(drop=True)
        self.users: pd.DataFrame | None = users
        self.items: pd.DataFrame | None = items
        self.schema: Schema = schema

    # ----------------------------------------------------------------- validation
    @staticmethod
    def _check_interactions(interactions: pd.DataFrame) -> pd.DataFrame:
        if not isinstance(interactions, pd.DataFrame):
            raise ValueError(f"interactions must be a pandas DataFrame, got {type(interactions).__name__}")
        missing = [c for c in REQUIRED_COLUMNS if c not in interactions.columns]
        if missing:
            raise ValueError(f"interactions are missing columns {missing}; got columns "
                             f"{list(interactions.columns)} (rename yours to user_id, item_id, rating)")
        if len(interactions) == 0:
            raise ValueError("interactions are empty: need at least one (user_id, item_id, rating) row")
        keep = list(REQUIRED_COLUMNS) + (["timestamp"] if "timestamp" in interactions.columns else [])
        frame = interactions[keep].copy()
        for column in ("user_id", "item_id"):
            if frame[column].isna().any():
                row = int(np.flatnonzero(frame[column].isna().to_numpy())[0])
                raise ValueError(f"interactions have a missing {column} (first at row {row})")
        if not pd.api.types.is_numeric_dtype(frame["rating"]):  # bool is numeric: True → 1.0
            numbers = pd.to_numeric(frame["rating"], errors="coerce")
            bad = numbers.isna() & frame["rating"].notna()
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise ValueError(f"ratings must be numbers, got {_py(frame['rating'].iloc[row])!r} "
                                 f"at row {row} (dtype {frame['rating'].dtype})")
            frame["rating"] = numbers
        frame["rating"] = frame["rating"].astype(np.float64)
        ratings = frame["rating"].to_numpy()
        bad = first_bad_rating(ratings, "explicit", None)  # finiteness; the schema's rule comes later
        if bad is not None:
            raise ValueError(f"{describe_bad_rating(bad, None)} at row {bad.position} "
                             f"({int((~np.isfinite(ratings)).sum())} bad rows)")
        if "timestamp" in frame.columns:
            ts = frame["timestamp"]
            if pd.api.types.is_datetime64_any_dtype(ts):
                # Integer nanoseconds keep ordering exact and are backend-neutral.
                frame["timestamp"] = ts.astype("int64")
            elif not pd.api.types.is_numeric_dtype(ts) or pd.api.types.is_bool_dtype(ts):
                raise ValueError(f"timestamp must be numeric or datetime; got dtype {ts.dtype} "
                                 f"with first value {ts.iloc[0]!r}")
            if frame["timestamp"].isna().any():
                row = int(np.flatnonzero(frame["timestamp"].isna().to_numpy())[0])
                raise ValueError(f"timestamps must not be missing (first at row {row})")
        return frame

    @staticmethod
    def _check_ratings(ratings: pd.Series, schema: Schema) -> None:
        bad = first_bad_rating(ratings.to_numpy(), schema.feedback, schema.rating_range)
        if bad is not None:
            raise ValueError(f"{describe_bad_rating(bad, schema.rating_range)} at row {bad.position} "
                             "(the schema's rule)")

    @staticmethod
    def _resolve_duplicates(frame: pd.DataFrame, policy: str, schema: Schema) -> pd.DataFrame:
        dup = frame.duplicated(["user_id", "item_id"], keep=False)
        if not dup.any():
            return frame
        if policy == "error":
            first = frame.loc[dup, ["user_id", "item_id"]].iloc[0]
            raise ValueError(
                f"interactions have {int(dup.sum())} rows with a repeated (user_id, item_id) pair, "
                f"e.g. ({_py(first['user_id'])!r}, {_py(first['item_id'])!r}); "
                "pass duplicates='last' or 'mean'"
            )
        has_time = "timestamp" in frame.columns
        if policy == "last":
            ordered = frame.sort_values("timestamp", kind="stable") if has_time else frame
            out = ordered.drop_duplicates(["user_id", "item_id"], keep="last")
            return out.sort_index()  # restore the caller's row order for the survivors
        how = {"rating": "max" if schema.feedback == "implicit" else "mean"}
        if has_time:
            how["timestamp"] = "max"
        return frame.groupby(["user_id", "item_id"], sort=False, as_index=False).agg(how)

    @staticmethod
    def _check_features(
        frame: pd.DataFrame | None,
        ids: pd.Series,
        specs,
        side: str,
        policy: str,
    ) -> pd.DataFrame | None:
        names = [s.name for s in specs]
        if frame is None:
            if names:
                raise ValueError(f"the schema has {side} features {names} but no {side} frame was given")
            return None
        missing_columns = [n for n in names if n not in frame.columns]
        if missing_columns:
            raise ValueError(f"the {side} frame lacks schema feature columns {missing_columns}; "
                             f"got {list(frame.columns)}")
        frame = frame[names]
        if len(frame) == 0:
            return frame  # an empty frame means "no features known": everything is OOV
        unknown = pd.Index(ids.unique()).difference(frame.index)
        if len(unknown):
            if policy == "error":
                raise ValueError(
                    f"{len(unknown)} {side}_id values of the interactions are missing from the {side} "
                    f"frame, e.g. {unknown[:5].tolist()}; add them or pass missing_features='default'"
                )
            # reindex appends all-missing rows and upcasts ints to float where needed.
            frame = frame.reindex(frame.index.append(unknown))
        return frame

    # ----------------------------------------------------------------- properties
    @property
    def feedback(self) -> str:
        """``"explicit"`` or ``"implicit"``."""
        return self.schema.feedback

    @property
    def has_timestamps(self) -> bool:
        return "timestamp" in self.interactions.columns

    @property
    def user_ids(self) -> np.ndarray:
        """Distinct user ids of the interactions, in order of first appearance."""
        return self.interactions["user_id"].unique()

    @property
    def item_ids(self) -> np.ndarray:
        """Distinct item ids of the interactions, in order of first appearance."""
        return self.interactions["item_id"].unique()

    @property
    def num_users(self) -> int:
        return int(self.interactions["user_id"].nunique())

    @property
    def num_items(self) -> int:
        return int(self.interactions["item_id"].nunique())

    def __len__(self) -> int:
        return len(self.interactions)

    def __repr__(self) -> str:
        return (f"InteractionData({len(self)} interactions, {self.num_users} users, "
                f"{self.num_items} items, feedback={self.feedback!r})")
