"""Requests: users' supports and candidates as the compiled programs take them.

Every input form of the per-user calls ends here in the same two things, and every check of
those inputs lives here, once:

* a :class:`SupportBatch`: the users' support interactions padded into ``[B_bucket, S_bucket]``
  arrays (users and support length each rounded up to a bucket, ``metarec.ranking``, so that
  compiled code is traced per bucket and never per request), their encoded features and their
  raw seen ids. Supports come as one DataFrame (one user), a list of DataFrames (one per
  user), :class:`FlatSupports` (raw ids and ratings as flat arrays and per-user lengths, the
  way a batch job holds them) or :class:`EncodedSupports` (item indices already encoded, the
  way the server holds them): :func:`support_batch`.
* a :class:`Candidates`: the candidate item indices, one array shared by every user (the
  catalogue, a candidate file, equal lists) or one array per user, and their raw ids for
  ranking. Candidates come as None (the whole catalogue), one raw-id array per user, or
  :class:`EncodedCandidates`: :func:`candidates`. :func:`item_batch` pads them for a score
  program.

Nothing here imports a Keras backend: it is numpy and pandas.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from metarec.ranking import bucket, check_min_pad, padded_users, support_bucket
from metarec.unknown_ids import apply_policy, unknown_features_message, unknown_items_message


@dataclasses.dataclass(frozen=True)
class FlatSupports:
    """Many users' supports as flat arrays of raw item ids and ratings: user ``u``'s are the
    next ``lengths[u]`` entries (faster than one DataFrame per user)."""

    item_ids: Any
    ratings: Any
    lengths: Any


@dataclasses.dataclass(frozen=True)
class EncodedSupports:
    """:class:`FlatSupports` with the items already encoded (``encoder.item_index``).

    ``seen_items``: each user's raw ids (what ``recommend`` excludes); by default the raw ids
    of ``item_index``. ``ratings_checked=True``: the caller has already checked the ratings by
    ``metarec.ratings`` (as the server's request validation does): they are not checked again.
    ``min_support_pad``: pad the support axis to at least this many rows (the padded rows are
    masked out, so the adapted users are the same): a caller that keeps a set of compiled
    shapes, such as the server while it warms up, pads a short support up to a compiled one
    instead of compiling a new shape. ``min_users_pad``: likewise for the users axis (the
    padded users are dropped from the results).
    """

    item_index: Any
    ratings: Any
    lengths: Any
    seen_items: Any = None
    ratings_checked: bool = False
    min_support_pad: int = 0
    min_users_pad: int = 0


@dataclasses.dataclass(frozen=True)
class EncodedCandidates:
    """Candidates already encoded: one int array of item indices shared by every user, or a
    list of one array per user (None: the whole catalogue)."""

    index: Any


class SupportBatch(NamedTuple):
    """Users' supports, padded: what the adapt programs take, and what the adapted users keep."""

    inputs: dict  # model inputs [B_bucket, S_bucket, ...]
    target: np.ndarray  # float32 [B_bucket, S_bucket]
    mask: np.ndarray  # float32 [B_bucket, S_bucket]: 1 for real interactions
    users: dict  # the users' encoded features stacked [B_bucket, ...]
    per_user: list  # each real user's encoded features {name: array}
    seen: list  # each real user's raw seen item ids

    @property
    def padded(self):
        return self.inputs, self.target, self.mask


class Candidates(NamedTuple):
    """Encoded candidates: ``index`` is one int32 array when ``shared``, else one per user."""

    index: Any
    shared: bool
    catalogue: bool  # the whole catalogue (its length is fixed per model: never padded)
    ids: list | None  # each user's raw candidate ids (for ranking), None when given encoded


# --------------------------------------------------------------------------- checks
def require_encoder(encoder):
    if encoder is None:
        raise ValueError("This learner has no feature encoder: fit it on a TaskSet, or pass encoder=.")
    return encoder


def check_item_index(index, num_items):
    """``ValueError`` unless ``index`` is a flat integer array of item indices in
    ``[0, num_items)`` (0 is the unknown item); returns it as int32."""
    index = np.asarray(index)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise ValueError(f"item_index must be a flat integer array; got {index.dtype} {index.shape}.")
    if index.size and (index.min() < 0 or index.max() >= num_items):
        raise ValueError(f"item_index values must lie in [0, {num_items}); got "
                         f"{index.min()}..{index.max()}.")
    return index.astype(np.int32, copy=False)


def check_lengths(lengths):
    """Per-user support lengths: one integer >= 0 per user (0: a user with no interactions yet,
    served by the meta-learned start)."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or len(lengths) == 0 or lengths.dtype.kind not in "iu" or lengths.min() < 0:
        raise ValueError(f"lengths must be one integer >= 0 per user (0: a user with no "
                         f"interactions yet, served by the meta-learned start); got {lengths!r}.")
    return lengths


def check_user_features(user_features, n_users, encoder=None, unknown_ids="ignore"):
    """One feature dict (or None) per user; None for every user when ``user_features`` is None.

    Feature names the encoder's schema lacks follow ``unknown_ids`` (``metarec.unknown_ids``):
    an error, or a warning (the default of the SDK's calls) and the names are dropped."""
    if user_features is None:
        return [{}] * n_users
    if len(user_features) != n_users:
        raise ValueError(f"user_features has {len(user_features)} entries for {n_users} users.")
    if encoder is None or unknown_ids == "ignore":
        return user_features
    known = {spec.name for spec in encoder.schema.user_features}
    unknown = sorted({name for f in user_features if f for name in f if name not in known}, key=str)
    if not unknown:
        return user_features
    apply_policy(unknown_ids, unknown_features_message(unknown, known))
    return [None if f is None else {k: v for k, v in f.items() if k in known} for f in user_features]


def check_unknown_items(encoder, raw_ids, index, what, unknown_ids):
    """Apply the ``unknown_ids`` policy to raw item ids and their encoded ``index`` (0: unknown).

    ``what``: ``"interaction"`` or ``"candidate"``, as in the server's message."""
    if unknown_ids == "ignore":
        return
    index = np.asarray(index)
    if not index.size or index.all():
        return
    positions = np.flatnonzero(index.reshape(-1) == 0)
    raw = np.asarray(raw_ids, dtype=object).reshape(-1)[positions]
    unique = list(dict.fromkeys(raw.tolist()))
    apply_policy(unknown_ids, unknown_items_message(what, unique, len(positions), encoder.item_ids[1:]))


def check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got k={k!r}.")


def check_head(head):
    if head not in ("rating", "ranking"):
        raise ValueError(f"head must be 'rating' or 'ranking'; got head={head!r}.")
    return head


def frame_list(supports):
    """A list of support DataFrames, one per user (at least one)."""
    if isinstance(supports, pd.DataFrame):
        raise ValueError("supports must be a list of DataFrames, one per user; got one DataFrame.")
    supports = list(supports)
    if not supports:
        raise ValueError("supports is empty: pass at least one user's interactions.")
    return supports


# --------------------------------------------------------------------------- supports
def support_batch(encoder, features, supports, user_features=None, unknown_ids="ignore"):
    """Any form of supports (see the module docstring) -> a :class:`SupportBatch`.

    ``features``: the :class:`UserFeatureCache` that encodes the users' features;
    ``user_features``: one dict (or None) per user. ``unknown_ids``: the policy for raw item
    ids outside the catalogue and unknown feature names (``metarec.unknown_ids``); encoded
    supports are not checked (index 0 is the unknown item by choice there).
    """
    encoder = require_encoder(encoder)
    if isinstance(supports, FlatSupports):
        item_ids, ratings = np.asarray(supports.item_ids), np.asarray(supports.ratings)
        lengths = check_lengths(supports.lengths)
        if item_ids.shape != ratings.shape or item_ids.ndim != 1 or len(item_ids) != lengths.sum():
            raise ValueError(
                f"item_ids and ratings must be flat arrays of sum(lengths) = {int(lengths.sum())} "
                f"entries; got shapes {item_ids.shape} and {ratings.shape}."
            )
        index = encoder.item_index(item_ids)
        check_unknown_items(encoder, item_ids, index, "interaction", unknown_ids)
        supports = EncodedSupports(index, ratings, lengths,
                                   seen_items=np.split(item_ids, np.cumsum(lengths)[:-1]))
        user_features = check_user_features(user_features, len(lengths), encoder, unknown_ids)
    if isinstance(supports, EncodedSupports):
        lengths = check_lengths(supports.lengths)
        item_index = check_item_index(supports.item_index, encoder.num_items)
        if len(item_index) != lengths.sum():
            raise ValueError(f"item_index must hold sum(lengths) = {int(lengths.sum())} entries; "
                             f"got {len(item_index)}.")
        y = (np.asarray(supports.ratings, np.float32) if supports.ratings_checked
             else encoder.check_ratings(supports.ratings))
        if y.shape != item_index.shape:
            raise ValueError(f"ratings must match item_index; got shapes {y.shape} and {item_index.shape}.")
        user_features = check_user_features(user_features, len(lengths))
        seen = supports.seen_items
        if seen is None:
            seen = np.split(encoder.item_ids[item_index], np.cumsum(lengths)[:-1])
        return pad_supports(encoder, features, item_index, y, lengths, user_features, seen,
                            supports.min_support_pad, supports.min_users_pad)
    frames = [supports] if isinstance(supports, pd.DataFrame) else frame_list(supports)
    user_features = check_user_features(user_features, len(frames), encoder, unknown_ids)
    seen = []
    encoded = encode_interactions(encoder, frames, seen)
    index = np.concatenate([idx for idx, _ in encoded])
    if unknown_ids != "ignore" and not index.all():
        raw = [v for ids in seen for v in np.asarray(ids, dtype=object).tolist()]
        check_unknown_items(encoder, raw, index, "interaction", unknown_ids)
    return pad_supports(
        encoder, features,
        index,
        np.concatenate([y for _, y in encoded]),
        [len(idx) for idx, _ in encoded],
        user_features, seen,
    )


def pad_supports(encoder, features, idx, y, lengths, user_features, seen, min_support_pad=0,
                 min_users_pad=0):
    """Encoded interactions of many users, flat (user ``u``'s are the next ``lengths[u]``
    rows), padded into arrays ``[B_bucket, S_bucket]`` in one scatter (``S_bucket`` at least
    ``min_support_pad``, ``B_bucket`` at least ``min_users_pad``)."""
    min_support_pad = check_min_pad("min_support_pad", min_support_pad)
    lengths = np.asarray(lengths, dtype=np.int64)
    n_users = len(lengths)
    b = padded_users(n_users, min_users_pad)
    s = max(support_bucket(int(lengths.max())), min_support_pad)
    rows = np.repeat(np.arange(n_users), lengths)
    cols = np.arange(len(idx)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    item_idx = np.zeros((b, s), np.int32)
    target = np.zeros((b, s), np.float32)
    mask = np.zeros((b, s), np.float32)
    item_idx[rows, cols] = idx
    target[rows, cols] = y
    mask[rows, cols] = 1.0
    users = features.encode(encoder, list(user_features) + [{}] * (b - n_users))
    inputs = encoder.item_inputs(item_idx)
    inputs.update({k: np.repeat(v[:, None], s, axis=1) for k, v in users.items()})
    per_user = [{k: v[u] for k, v in users.items()} for u in range(n_users)]
    return SupportBatch(inputs, target, mask, users, per_user, list(seen))


def encode_interactions(encoder, supports, raw_items=None):
    """``encoder.encode_interactions`` of each frame, in one call where the frames agree.

    The encoding is element-wise, so one call on the concatenated columns gives the same
    arrays. The frames are joined with one ``pd.concat`` (reading two columns of each of
    1,000 frames costs twice as much). Where the joined columns do not have one id type
    (integers, or strings) and numeric ratings, or on any error, each frame is encoded alone
    (which also raises exactly that frame's error). ``raw_items``, a list, receives each
    frame's raw item ids.
    """
    if len(supports) > 1:
        try:
            lengths = [len(frame) for frame in supports]
            joined = pd.concat(supports, ignore_index=True, sort=False)
            items, ratings = joined["item_id"], joined["rating"]
        except (KeyError, TypeError, ValueError, AttributeError, pd.errors.InvalidIndexError):
            items = None
        if items is not None and _one_id_type(items.dtype) and ratings.dtype.kind in "iuf":
            try:
                idx, y = encoder.encode_interactions(pd.DataFrame({"item_id": items, "rating": ratings}))
            except ValueError:
                pass
            else:
                bounds = np.cumsum(lengths)[:-1]
                if raw_items is not None:
                    raw_items.extend(np.split(items.to_numpy(), bounds))
                return list(zip(np.split(idx, bounds), np.split(y, bounds)))
    encoded = [encoder.encode_interactions(frame) for frame in supports]
    if raw_items is not None:
        raw_items.extend(np.asarray(frame["item_id"]) for frame in supports)
    return encoded


def _one_id_type(dtype) -> bool:
    """Integer ids, or string ids (a pandas string dtype): a join of frames with ids of
    different kinds is ``object`` or float, and those frames are encoded one by one."""
    return dtype.kind in "iu" or (dtype != object and pd.api.types.is_string_dtype(dtype))


_SCALAR_TYPES = (str, int, float, bool, np.integer, np.floating, np.bool_, type(None))


class UserFeatureCache:
    """``encoder.user_inputs_from_features`` of a list of dicts, one row per user, cached.

    Users' features repeat across requests (a handful of segments, ages, countries) and
    encoding them goes through pandas (about 1 ms a call), so each distinct user's row is
    encoded once and kept (up to ``size`` rows, per encoder): users of scalar features only
    are keyed by their schema features' (type, value); anything else takes the plain path.
    """

    def __init__(self, size=4096):
        self.size = size
        self._encoder = None
        self._rows = {}

    def encode(self, encoder, user_features):
        names = tuple(spec.name for spec in encoder.schema.user_features)
        dicts = [dict(f or {}) for f in user_features]
        keys = []
        for f in dicts:
            key = tuple((n, type(f[n]), f[n]) for n in names if n in f)
            if not all(isinstance(v, _SCALAR_TYPES) for _, _, v in key):
                return encoder.user_inputs_from_features(dicts)
            keys.append(key)
        if not names:
            return encoder.user_inputs_from_features(dicts)
        if self._encoder is not encoder:
            self._encoder, self._rows = encoder, {}
        rows = self._rows
        missing = [i for i, key in enumerate(keys) if key not in rows]
        if missing:
            if len(rows) + len(missing) > self.size:
                rows.clear()
            for i in missing:
                # One user per call, so that no user's encoding depends on the others'.
                one = encoder.user_inputs_from_features([dicts[i]])
                rows[keys[i]] = {k: v[0] for k, v in one.items()}
        got = [rows[key] for key in keys]
        if all(key == keys[0] for key in keys):
            # One row for every user (often: no features at all): repeat it, skipping
            # np.stack's per-row work.
            return {k: np.repeat(v[None], len(got), axis=0) for k, v in got[0].items()}
        return {k: np.stack([r[k] for r in got]) for k in got[0]}


# --------------------------------------------------------------------------- candidates
def candidates(encoder, candidates, n_users, unknown_ids="ignore"):
    """Candidates for ``n_users`` users -> :class:`Candidates`.

    ``candidates``: None (the whole catalogue), one raw-id array per user, or
    :class:`EncodedCandidates`. Equal lists (the same object, or equal arrays) for several
    users are encoded and gathered once, as one shared array. ``unknown_ids``: the policy for
    raw ids outside the catalogue (``metarec.unknown_ids``).
    """
    encoder = require_encoder(encoder)
    if isinstance(candidates, EncodedCandidates):
        if candidates.index is not None:
            index, shared = _checked_index(encoder, candidates.index, n_users)
            return Candidates(index, shared, False, None)
        candidates = None
    if candidates is None:
        index = np.arange(1, encoder.num_items, dtype=np.int32)
        return Candidates(index, True, True, [encoder.item_ids[1:]] * n_users)
    if len(candidates) != n_users:
        raise ValueError(f"candidates has {len(candidates)} entries for {n_users} users.")
    if n_users > 1 and _all_equal(candidates):
        # One list shared by every user (a batch job's candidate file, the same candidate
        # list in every request): encoded and gathered once, scored by the shared program.
        ids = np.asarray(candidates[0])
        index = encoder.item_index(ids)
        check_unknown_items(encoder, ids, index, "candidate", unknown_ids)
        return Candidates(index, True, False, [ids] * n_users)
    arrays = [np.asarray(c) for c in candidates]
    if all(a.ndim == 1 and a.dtype.kind in "iu" for a in arrays):
        # Integer ids: one lookup of all users' candidates (a batch job's million ids),
        # not one call per user.
        index = encoder.item_index(np.concatenate(arrays))
        check_unknown_items(encoder, np.concatenate(arrays), index, "candidate", unknown_ids)
        return Candidates(np.split(index, np.cumsum([len(a) for a in arrays])[:-1]), False, False, arrays)
    index = [encoder.item_index(a) for a in arrays]
    if unknown_ids != "ignore" and index:
        check_unknown_items(encoder, [v for a in arrays for v in np.asarray(a, dtype=object).reshape(-1).tolist()],
                            np.concatenate([i.reshape(-1) for i in index]), "candidate", unknown_ids)
    return Candidates(index, False, False, arrays)


def _checked_index(encoder, item_index, n_users):
    """Encoded candidates as (one shared array, True) or (one array per user, False), every
    index checked against the catalogue."""
    num_items = encoder.num_items
    if isinstance(item_index, np.ndarray):
        return check_item_index(item_index, num_items), True
    if len(item_index) != n_users:
        raise ValueError(f"item_index has {len(item_index)} entries for {n_users} users.")
    index = [check_item_index(i, num_items) for i in item_index]
    if n_users > 1 and _all_equal(index):
        return index[0], True
    return index, False


def _all_equal(lists):
    """Whether every user's candidate list is the first one (the same object, or equal)."""
    first = lists[0]
    first_array = None
    for c in lists[1:]:
        if c is first:
            continue
        if first_array is None:
            first_array = np.asarray(first)
        c = np.asarray(c)
        if c.shape != first_array.shape or c.dtype != first_array.dtype or not np.array_equal(c, first_array):
            return False
    return True


def item_batch(cands, n_users, user_rows=None):
    """Candidate item indices for a score program (int32), and each user's number of them.

    Per-user arrays are padded into ``[user_rows, candidates_bucket]`` (``user_rows``: by
    default ``bucket(n_users)``, else the users axis of the call); a shared array is
    padded to a bucket too (a new list length must not recompile), except the whole
    catalogue, whose length is fixed per model."""
    index = cands.index
    if cands.shared:
        sizes = [len(index)] * n_users
        if not cands.catalogue:
            index = np.concatenate([index, np.zeros(bucket(len(index), minimum=8) - len(index), np.int32)])
        return np.asarray(index, np.int32), sizes
    sizes = [len(i) for i in index]
    padded = np.zeros((user_rows or bucket(n_users), bucket(max(sizes), minimum=8)), np.int32)
    for u, idx in enumerate(index):
        padded[u, : len(idx)] = idx
    return padded, sizes


def item_rows(encoder, item_ids):
    """Model inputs of raw item ids padded to a bucket (a new number of items must not
    recompile), and the number of real rows."""
    idx = encoder.item_index(np.asarray(item_ids))
    n = len(idx)
    padded = np.zeros(bucket(n, minimum=8), np.int32)
    padded[:n] = idx
    return encoder.item_inputs(padded), n
