"""Raw ids and feature values → model-input arrays (numpy only).

:class:`FeatureEncoder` owns the id vocabularies and precomputed per-item / per-user feature
tables. Index 0 is always the out-of-vocabulary (OOV) row: unknown item ids, unknown users,
unknown categories and unknown multi-hot tokens all map there, so a model can score anything
a request sends without special cases. The encoder is saved inside model files through
:meth:`FeatureEncoder.get_config` (JSON) and :meth:`FeatureEncoder.to_arrays` (numpy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from metarec.interactions import InteractionData
from metarec.ratings import check_ratings
from metarec.schema import FeatureSpec, Schema, is_multi_value

_CONFIG_VERSION = 1


# ---------------------------------------------------------------------------- value helpers
def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # list-likes: pd.isna returns an array
        return False


def canonical_token(value: Any) -> str | None:
    """The vocabulary string of one categorical value (``None`` when missing).

    Floats with integral values map like ints (``3.0`` → ``"3"``) because a column of
    integer codes becomes float as soon as one value is missing.
    """
    if _is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _cell_tokens(cell: Any, separator: str | None) -> list[str]:
    """The tokens of one multi-hot cell (list-like, delimited string or scalar)."""
    if is_multi_value(cell):
        tokens = [canonical_token(v) for v in cell]
        return [t for t in tokens if t is not None]
    if _is_missing(cell):
        return []
    if isinstance(cell, str) and separator is not None:
        return [t for t in (p.strip() for p in cell.split(separator)) if t]
    token = canonical_token(cell)
    return [] if token in (None, "") else [token]


def _encode_categorical(values: pd.Series, vocabulary: pd.Index) -> np.ndarray:
    # Factorize first so the Python-level token mapping runs once per distinct value.
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    tokens = [canonical_token(u) for u in uniques]
    lookup = vocabulary.get_indexer(pd.Index(tokens, dtype=object)) + 1  # -1 (unknown) → 0
    out = np.zeros(len(values), dtype=np.int32)
    known = codes >= 0
    out[known] = lookup[codes[known]]
    return out


def _to_float(values: pd.Series, name: str) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce").astype(np.float64)
    bad = numbers.isna() & ~values.isna()
    if bad.any():
        raise ValueError(f"numeric feature {name!r} got a non-numeric value "
                         f"{values[bad].iloc[0]!r}")
    return numbers.to_numpy()


#: For numeric specs without a training range (models saved before it was kept): how many
#: standard deviations from the mean a value may lie before it is clipped.
FALLBACK_STDS = 10.0


def clip_to_training_range(numbers: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """The rule for numeric values outside what the model was trained on, shared by the SDK
    and the server (both encode through here): clip them to ``[spec.low, spec.high]``, the
    range seen in training, or to ``mean +- FALLBACK_STDS * std`` where no range was kept.

    Args:
        numbers: float64 raw values (NaN and infinities pass through).
        spec: the fitted numeric feature.

    Returns:
        The clipped values (a new array).
    """
    if spec.low is not None:
        low, high = spec.low, spec.high
    else:
        low, high = spec.mean - FALLBACK_STDS * spec.std, spec.mean + FALLBACK_STDS * spec.std
    finite = np.isfinite(numbers)
    out = numbers.copy()
    out[finite] = np.clip(numbers[finite], low, high)
    return out


def _encode_numeric(values: pd.Series, spec: FeatureSpec) -> np.ndarray:
    numbers = (clip_to_training_range(_to_float(values, spec.name), spec) - spec.mean) / spec.std
    # Missing / infinite values sit at the mean, i.e. 0 after standardisation.
    numbers[~np.isfinite(numbers)] = 0.0
    return numbers.astype(np.float32)


def _encode_multi_hot(values: pd.Series, spec: FeatureSpec, vocabulary: pd.Index) -> np.ndarray:
    out = np.zeros((len(values), spec.dim), dtype=np.float32)
    for row, cell in enumerate(values.tolist()):
        tokens = _cell_tokens(cell, spec.separator)
        if tokens:
            # Unknown tokens (-1) land in column 0, the OOV bucket.
            out[row, vocabulary.get_indexer(pd.Index(tokens, dtype=object)) + 1] = 1.0
    return out


def _fit_spec(spec: FeatureSpec, values: pd.Series) -> FeatureSpec:
    """Fill the vocabulary (categorical / multi-hot) or mean / std (numeric) of ``spec``."""
    if spec.kind == "numeric":
        numbers = _to_float(values, spec.name)
        numbers = numbers[np.isfinite(numbers)]
        mean = float(numbers.mean()) if numbers.size else 0.0
        std = float(numbers.std()) if numbers.size else 1.0
        low, high = (float(numbers.min()), float(numbers.max())) if numbers.size else (None, None)
        return dataclasses.replace(spec, mean=mean, std=std if std > 1e-12 else 1.0, low=low, high=high)
    if spec.vocabulary is not None:
        return spec  # a declared vocabulary is kept so indices stay stable across refits
    if spec.kind == "categorical":
        tokens = {canonical_token(v) for v in pd.unique(values)}
    else:
        tokens = {t for cell in values.tolist() for t in _cell_tokens(cell, spec.separator)}
    tokens.discard(None)
    return dataclasses.replace(spec, vocabulary=tuple(sorted(tokens)))


# ---------------------------------------------------------------------------- id vocabularies
class _IdVocabulary:
    """Raw ids ↔ indices 1..n (0 = unknown); ids keep their int or str type."""

    def __init__(self, ids: np.ndarray, dtype: str) -> None:
        self.dtype = dtype
        self.ids = ids  # int64 or unicode array, sorted, no OOV entry
        self._index = pd.Index(ids)
        self._dense = self._dense_table(ids) if dtype == "int" else None

    @staticmethod
    def _dense_table(ids: np.ndarray) -> np.ndarray | None:
        """``table[id] = index`` for compact non-negative int ids (most catalogues number
        their items 0..n or 1..n), so a lookup is one gather: a batch job looks up a million
        candidate ids per batch. None where the ids are sparse (the table would be big)."""
        if not len(ids) or ids[0] < 0 or ids[-1] >= 8 * len(ids) + 65536:
            return None
        table = np.zeros(int(ids[-1]) + 1, np.int32)
        table[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        return table

    @classmethod
    def from_values(cls, values: Iterable[Any]) -> _IdVocabulary:
        unique = pd.unique(pd.Series(list(values), dtype=object))
        if len(unique) and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                               for v in unique):
            return cls(np.sort(np.asarray(unique, dtype=np.int64)), "int")
        # Anything else (strings, mixed) is keyed by its canonical string form, so that a
        # float id 3.0 (ints upcast by a missing value) and the int 3 are the same id.
        return cls(np.sort(np.asarray([canonical_token(v) for v in unique], dtype=str)), "str")

    def lookup(self, ids: Any) -> np.ndarray:
        values = np.asarray(ids, dtype=object) if not isinstance(ids, np.ndarray) else ids
        shape = np.shape(values)
        flat = np.ravel(values)
        if self._dense is not None and flat.dtype.kind in "iu":
            table = self._dense
            inside = (flat >= 0) & (flat < len(table))
            if inside.all():
                return table[flat].reshape(shape)
            out = np.zeros(flat.shape, np.int32)
            out[inside] = table[flat[inside]]
            return out.reshape(shape)
        if self.dtype == "int" and flat.dtype.kind in "iu" and len(self.ids):
            # Sorted int ids: a binary search, much cheaper than a hash lookup for the few ids
            # of one request (and no slower for many).
            pos = np.minimum(np.searchsorted(self.ids, flat), len(self.ids) - 1)
            out = np.where(self.ids[pos] == flat, pos + 1, 0)
            return out.astype(np.int32).reshape(shape)
        if self.dtype == "str":
            flat = np.asarray([canonical_token(v) for v in flat], dtype=object)
        elif flat.dtype.kind not in "iu":
            flat = pd.Index(flat, dtype=object)
        out = self._index.get_indexer(flat) + 1  # -1 (unknown) → OOV row 0
        return out.astype(np.int32).reshape(shape)

    def raw(self) -> np.ndarray:
        """Object array of raw ids in index order; entry 0 (OOV) is ``None``."""
        return np.asarray([None] + self.ids.tolist(), dtype=object)

    def __len__(self) -> int:
        return len(self.ids) + 1


# ---------------------------------------------------------------------------- the encoder
class FeatureEncoder:
    """Encodes ids and features of users and items into model-input arrays.

    Build it with :meth:`fit`; restore it with :meth:`from_config`. Every method returns
    numpy arrays: int32 indices for ids and categorical features, float32 for numeric and
    multi-hot features.
    """

    def __init__(
        self,
        schema: Schema,
        item_vocab: _IdVocabulary,
        user_vocab: _IdVocabulary,
        item_tables: dict[str, np.ndarray],
        user_tables: dict[str, np.ndarray],
    ) -> None:
        self._schema = schema
        self._items = item_vocab
        self._users = user_vocab
        self._item_tables = item_tables
        self._user_tables = user_tables
        self._vocab_index = {
            s.name: pd.Index(list(s.vocabulary), dtype=object)
            for s in schema.features if s.vocabulary is not None
        }

    # ------------------------------------------------------------------ building
    @classmethod
    def fit(cls, data: InteractionData) -> FeatureEncoder:
        """Fit id vocabularies, feature vocabularies and numeric statistics on ``data``.

        Vocabularies cover every id seen in the interactions or the feature frames; this
        uses no ratings, so it is safe to fit on all users before a user-level split.
        Numeric statistics are computed over the rows of the user / item frames.
        """
        if not isinstance(data, InteractionData):
            raise ValueError(f"FeatureEncoder.fit expects an InteractionData, got {type(data).__name__}")
        schema = data.schema
        item_ids = list(data.interactions["item_id"].unique())
        user_ids = list(data.interactions["user_id"].unique())
        if data.items is not None:
            item_ids += list(data.items.index)
        if data.users is not None:
            user_ids += list(data.users.index)
        items = _IdVocabulary.from_values(item_ids)
        users = _IdVocabulary.from_values(user_ids)

        def fitted(specs, frame):
            if frame is None:
                return tuple(specs)
            return tuple(_fit_spec(s, frame[s.name]) for s in specs)

        schema = schema.replace(
            user_features=fitted(schema.user_features, data.users),
            item_features=fitted(schema.item_features, data.items),
        )
        encoder = cls(schema, items, users, {}, {})
        encoder._item_tables = encoder._build_tables(schema.item_features, data.items, items)
        encoder._user_tables = encoder._build_tables(schema.user_features, data.users, users)
        return encoder

    def _build_tables(self, specs, frame: pd.DataFrame | None, vocab: _IdVocabulary):
        """Per-feature arrays with one row per vocabulary index (row 0 = OOV defaults)."""
        ids = vocab.ids.tolist() if vocab.dtype == "int" else vocab.ids.astype(object).tolist()
        if frame is None:
            frame = pd.DataFrame(index=pd.Index([], dtype=object))
        if vocab.dtype == "str":
            frame = frame.set_axis(frame.index.map(canonical_token))
        aligned = frame.reindex(ids) if len(frame.columns) else pd.DataFrame(index=ids)
        return {s.name: self._encode_with_oov_row(s, aligned) for s in specs}

    def _encode_with_oov_row(self, spec: FeatureSpec, frame: pd.DataFrame) -> np.ndarray:
        column = frame[spec.name] if spec.name in frame.columns else pd.Series([None] * len(frame))
        encoded = self._encode_column(spec, column)
        return np.concatenate([np.zeros((1,) + encoded.shape[1:], encoded.dtype), encoded])

    def _encode_column(self, spec: FeatureSpec, values: pd.Series) -> np.ndarray:
        values = values.reset_index(drop=True)
        if spec.kind == "numeric":
            return _encode_numeric(values, spec)
        if spec.kind == "categorical":
            return _encode_categorical(values, self._vocab_index[spec.name])
        return _encode_multi_hot(values, spec, self._vocab_index[spec.name])

    # ------------------------------------------------------------------ properties
    @property
    def schema(self) -> Schema:
        """The fitted schema (vocabularies, means and stds filled in)."""
        return self._schema

    @property
    def feature_specs(self) -> dict[str, FeatureSpec]:
        """Fitted feature specs by name, user features first."""
        return {s.name: s for s in self._schema.features}

    @property
    def feedback(self) -> str:
        return self._schema.feedback

    @property
    def item_ids(self) -> np.ndarray:
        """Raw item ids in index order (object array); entry 0 is ``None`` (OOV)."""
        return self._items.raw()

    @property
    def user_ids(self) -> np.ndarray:
        """Raw user ids in index order (object array); entry 0 is ``None`` (OOV)."""
        return self._users.raw()

    @property
    def num_items(self) -> int:
        """Number of item rows, including the OOV row 0."""
        return len(self._items)

    @property
    def num_users(self) -> int:
        """Number of user rows, including the OOV row 0."""
        return len(self._users)

    # ------------------------------------------------------------------ lookups
    def item_index(self, item_ids: Any) -> np.ndarray:
        """int32 indices of raw item ids (any shape); unknown ids → 0."""
        return self._items.lookup(item_ids)

    def user_index(self, user_ids: Any) -> np.ndarray:
        """int32 indices of raw user ids (any shape); unknown ids → 0."""
        return self._users.lookup(user_ids)

    @staticmethod
    def _gather(tables: dict[str, np.ndarray], idx: Any, size: int, what: str) -> dict[str, np.ndarray]:
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise ValueError(f"{what} indices must be integers, got dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(f"{what} indices must be in [0, {size}); got range "
                             f"[{idx.min()}, {idx.max()}]")
        return {name: np.take(table, idx, axis=0) for name, table in tables.items()}

    @property
    def item_tables(self) -> dict[str, np.ndarray]:
        """Each item feature's table ``[num_items, ...]``: row ``i`` is item index ``i``'s
        encoded feature (what ``item_inputs`` gathers). Read-only."""
        return dict(self._item_tables)

    def item_inputs(self, item_idx: Any) -> dict[str, np.ndarray]:
        """``item_id`` plus every item feature for item indices of any shape ``[...]``."""
        inputs = {"item_id": np.asarray(item_idx).astype(np.int32, copy=False)}
        inputs.update(self._gather(self._item_tables, item_idx, self.num_items, "item"))
        return inputs

    def user_inputs_from_index(self, user_idx: Any) -> dict[str, np.ndarray]:
        """Every user feature for known-user indices of any shape ``[...]`` (0 = defaults)."""
        return self._gather(self._user_tables, user_idx, self.num_users, "user")

    def user_inputs_from_features(
        self, features: pd.DataFrame | Mapping[str, Any] | list[Mapping[str, Any]]
    ) -> dict[str, np.ndarray]:
        """Encode features of (possibly unseen) users sent with a request: ``[n_users, ...]``.

        ``features`` is a frame with one row per user, a list of dicts, or a single dict
        (one user). Missing columns, missing values and unknown categories map to the OOV
        index / 0; extra columns (``user_id``, say) are ignored.
        """
        if isinstance(features, pd.DataFrame):
            frame = features.reset_index(drop=True)
        elif isinstance(features, Mapping):
            frame = pd.DataFrame([dict(features)])
        elif isinstance(features, list) and all(isinstance(f, Mapping) for f in features):
            frame = pd.DataFrame([dict(f) for f in features])
        else:
            raise ValueError("user features must be a DataFrame, a dict (one user) or a list of "
                             f"dicts, got {type(features).__name__}")
        out = {}
        for spec in self._schema.user_features:
            column = frame[spec.name] if spec.name in frame.columns else pd.Series([None] * len(frame),
                                                                                   dtype=object)
            out[spec.name] = self._encode_column(spec, column)
        return out

    def input_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{name: (shape suffix, dtype)}`` of every model input, for ``keras.Input``."""
        spec = {"item_id": ((), "int32")}
        for feature in self._schema.features:
            if feature.kind == "multi_hot":
                spec[feature.name] = ((feature.dim,), "float32")
            elif feature.kind == "categorical":
                spec[feature.name] = ((), "int32")
            else:
                spec[feature.name] = ((), "float32")
        return spec

    def vocabulary_size(self, name: str) -> int:
        """Rows an embedding for input ``name`` needs (vocabulary + OOV); ids included."""
        if name == "item_id":
            return self.num_items
        spec = self.feature_specs[name]
        if spec.vocabulary is None:
            raise ValueError(f"feature {name!r} is {spec.kind}, it has no vocabulary")
        return len(spec.vocabulary) + 1

    def encode_interactions(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(item_idx int32 [n], rating float32 [n])`` of a frame with ``item_id``, ``rating``.

        Ratings are validated: finite, within the schema's rating range (explicit) or 0/1
        (implicit). Unknown items map to index 0.
        """
        missing = [c for c in ("item_id", "rating") if c not in frame.columns]
        if missing:
            raise ValueError(f"interaction frame lacks columns {missing}; got {list(frame.columns)}")
        return self.item_index(frame["item_id"].to_numpy()), self.check_ratings(frame["rating"].to_numpy())

    def check_ratings(self, ratings: Any) -> np.ndarray:
        """Ratings as float32, checked: finite, within the schema's rating range (explicit) or
        0/1 (implicit); ``ValueError`` naming the first bad value otherwise
        (``metarec.ratings.check_ratings``)."""
        return check_ratings(ratings, self._schema.feedback, self._schema.rating_range)

    # ------------------------------------------------------------------ serialisation
    def get_config(self) -> dict[str, Any]:
        """JSON-able configuration; the arrays come from :meth:`to_arrays`."""
        return {
            "version": _CONFIG_VERSION,
            "schema": self._schema.to_config(),
            "item_id_dtype": self._items.dtype,
            "user_id_dtype": self._users.dtype,
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Id vocabularies and feature tables as plain (non-object) numpy arrays.

        Table keys use the feature's position in the schema, not its name, so any column
        name survives formats with restricted key characters (``.npz``, HDF5).
        """
        arrays = {"item_ids": self._items.ids, "user_ids": self._users.ids}
        for i, spec in enumerate(self._schema.item_features):
            arrays[f"item_table_{i}"] = self._item_tables[spec.name]
        for i, spec in enumerate(self._schema.user_features):
            arrays[f"user_table_{i}"] = self._user_tables[spec.name]
        return arrays

    @classmethod
    def from_config(cls, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> FeatureEncoder:
        """Rebuild an encoder saved with :meth:`get_config` and :meth:`to_arrays`."""
        if config.get("version") != _CONFIG_VERSION:
            raise ValueError(f"unsupported FeatureEncoder config version {config.get('version')!r}")
        schema = Schema.from_config(config["schema"])

        def vocab(key: str, dtype: str) -> _IdVocabulary:
            values = np.asarray(arrays[key])
            if dtype not in ("int", "str"):
                raise ValueError(f"unknown id dtype tag {dtype!r}")
            return _IdVocabulary(values.astype(np.int64 if dtype == "int" else str), dtype)

        item_tables = {s.name: np.asarray(arrays[f"item_table_{i}"])
                       for i, s in enumerate(schema.item_features)}
        user_tables = {s.name: np.asarray(arrays[f"user_table_{i}"])
                       for i, s in enumerate(schema.user_features)}
        return cls(schema, vocab("item_ids", config["item_id_dtype"]),
                   vocab("user_ids", config["user_id_dtype"]), item_tables, user_tables)

    def __repr__(self) -> str:
        return (f"FeatureEncoder({self.num_items - 1} items, {self.num_users - 1} users, "
                f"features={[s.name for s in self._schema.features]})")
