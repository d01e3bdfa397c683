"""Ranking candidates by score: padding buckets, seen-item masks and top-k (numpy only).

The SDK (``AdaptedUser.recommend``, ``recommend_many``, ``adapt_recommend_many``), batch jobs
and the gRPC server rank through these functions, so every path pads, masks and breaks ties
the same way. Nothing here imports Keras.

**Tie rule of** :func:`top_k`: among equal scores, the candidate that comes first in the
candidate list (the lower column of the score matrix) ranks first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "bucket",
    "support_bucket",
    "check_min_pad",
    "padded_users",
    "mask_padding",
    "mask_seen",
    "mask_seen_lists",
    "is_seen",
    "top_k",
]


# --------------------------------------------------------------------------- padded shapes
def bucket(n: int, minimum: int = 1) -> int:
    """Padded size of ``n`` rows (users, candidates): compiled code is traced per bucket.

    Args:
        n: the number of rows to hold.
        minimum: the smallest bucket to return.

    Returns:
        The smallest power of two >= ``max(n, minimum, 1)`` up to 1024, then the next
        multiple of 1024.
    """
    n = max(int(n), minimum, 1)
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 1024) * 1024


def check_min_pad(name: str, value: int) -> int:
    """A minimum padding argument (``min_support_pad``, ``min_users_pad``) as an int.

    Raises:
        ValueError: ``value`` is not an integer >= 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {name}={value!r}.")
    return int(value)


def padded_users(n_users: int, min_users_pad: int = 0) -> int:
    """Rows of the users axis of a compiled call.

    Args:
        n_users: the number of real users.
        min_users_pad: pad to at least this many rows (a caller that keeps a set of
            compiled shapes runs a batch on one of them; the padded users are dropped).

    Returns:
        ``max(bucket(n_users), min_users_pad)``.
    """
    return max(bucket(n_users), check_min_pad("min_users_pad", min_users_pad))


def support_bucket(n: int) -> int:
    """Padded support length: a multiple of 8 up to 64, then :func:`bucket`.

    Every padded row costs a full forward and backward pass at each inner step, so supports
    pad more tightly than candidates (K = 20 pads to 24, not 32: a quarter less adaptation
    work) at the price of at most eight compiled shapes up to 64.

    Args:
        n: a user's (or a batch's longest) number of support interactions.

    Returns:
        The padded length: ``ceil(n / 8) * 8`` for ``n <= 64``, else ``bucket(n)``.
    """
    n = max(int(n), 1)
    if n <= 64:
        return -(-n // 8) * 8
    return bucket(n)


# --------------------------------------------------------------------------- masks
def mask_padding(scores: np.ndarray, sizes: Sequence[int]) -> None:
    """Set the padding columns of a score matrix to ``-inf``, in place.

    Args:
        scores: float ``[users, columns]``; row ``u`` holds ``sizes[u]`` real candidates
            followed by padding.
        sizes: each row's number of real candidates.
    """
    scores[np.arange(scores.shape[1])[None, :] >= np.asarray(sizes)[:, None]] = -np.inf


def mask_seen(scores: np.ndarray, ids: Sequence[np.ndarray], seen: Sequence[np.ndarray]) -> None:
    """Set ``scores[u, j] = -inf`` where candidate ``ids[u][j]`` is among ``seen[u]``, in place.

    Many users sharing one candidate array (the same object: a catalogue, a candidate file)
    are looked up in one hash index of it; anything else (a few users, duplicate candidates,
    lists that differ) goes user by user.

    Args:
        scores: float ``[users, columns]`` (``columns >= len(ids[u])``).
        ids: each user's raw candidate ids (integers or strings).
        seen: each user's raw seen ids (of the same kind as ``ids``).
    """
    if len(ids) >= 16 and all(c is ids[0] for c in ids):
        import pandas as pd  # imported here: the server imports this module without pandas work

        try:
            index = pd.Index(ids[0])
            if index.is_unique:
                flat = np.concatenate([np.asarray(s, dtype=object) for s in seen]) if seen else []
                owner = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
                pos = index.get_indexer(pd.Index(flat, dtype=object))
                hit = pos >= 0
                scores[owner[hit], pos[hit]] = -np.inf
                return
        except (TypeError, ValueError):
            pass
    for u, (cands, s) in enumerate(zip(ids, seen)):
        scores[u, : len(cands)][np.isin(cands, s)] = -np.inf


def mask_seen_lists(
    scores: np.ndarray,
    ids: Sequence[np.ndarray],
    index: Sequence[np.ndarray],
    seen: Sequence[np.ndarray],
    item_index: Callable[[np.ndarray], np.ndarray],
    num_items: int,
) -> None:
    """:func:`mask_seen` for one candidate list per user, in place.

    With integer ids and many users, one ``isin`` over every user's (user, item index) pairs
    replaces one call per user (1,024 users per batch). Anything else, and users with ids
    unknown to the catalogue (index 0, which raw ids tell apart and indices do not), compare
    raw ids.

    Args:
        scores: float ``[users, columns]``.
        ids: each user's raw candidate ids.
        index: each user's encoded candidates (``item_index(ids[u])``).
        seen: each user's raw seen ids.
        item_index: raw ids -> item indices in ``[0, num_items)`` (0: unknown id).
        num_items: the catalogue's number of indices, the unknown one included.
    """
    seen = [np.asarray(s) for s in seen]
    if len(ids) < 16 or not all(a.ndim == 1 and a.dtype.kind in "iu" for a in list(ids) + seen):
        return mask_seen(scores, ids, seen)  # a few users: one isin each is quicker
    n = len(ids)
    seen_lengths = [len(s) for s in seen]
    if not sum(seen_lengths):
        return
    seen_index = item_index(np.concatenate(seen))
    cand = np.concatenate(index)
    lengths = np.array([len(i) for i in index])
    owner = np.repeat(np.arange(n), lengths)
    seen_owner = np.repeat(np.arange(n), seen_lengths)
    unknown = np.zeros(n, bool)
    unknown[owner[cand == 0]] = True
    unknown[seen_owner[seen_index == 0]] = True
    hit = np.isin(owner.astype(np.int64) * num_items + cand,
                  seen_owner.astype(np.int64) * num_items + seen_index) & ~unknown[owner]
    column = np.arange(len(cand)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    scores[owner[hit], column[hit]] = -np.inf
    for u in np.flatnonzero(unknown):
        scores[u, : len(ids[u])][np.isin(ids[u], seen[u])] = -np.inf


def is_seen(idx: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """``np.isin(idx, seen)`` for item indices (small non-negative integers).

    Through a lookup table as long as the largest seen index: for 1,000 candidates, a third
    to a half of ``np.isin``'s time (``bench/request_path.py``, "seen mask").

    Args:
        idx: int item indices ``[n]`` (the candidates).
        seen: int item indices ``[m]``, ``m >= 1``.

    Returns:
        bool ``[n]``: whether each ``idx`` is in ``seen``.
    """
    top = int(seen.max()) + 1
    table = np.zeros(top + 1, dtype=bool)  # the last entry stands for every index above
    table[seen] = True
    return table[np.minimum(idx, top)]


# --------------------------------------------------------------------------- top k
def top_k(scores: np.ndarray, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each row's ``k`` best columns of a (padded, masked) score matrix, best first.

    One partition over the whole matrix, then a sort of the ``k`` kept per row. **Ties**:
    among equal scores the lower column (the candidate that comes first in its list) ranks
    first, also where a tie straddles the ``k``-th place. Columns scored ``-inf`` (padding,
    masked seen items) or NaN are never returned.

    Args:
        scores: float ``[users, columns]``.
        k: positive number of items per row; more than ``columns`` means all of them.

    Returns:
        ``(columns, values)``: one array per row, each holding that row's kept column
        positions (int) and their scores (``scores``' dtype), best first; a row has fewer
        than ``k`` when it has fewer finite scores.
    """
    scores = np.asarray(scores)
    n, width = scores.shape
    kk = min(int(k), width)
    if n == 0 or kk == 0:
        return [np.zeros(0, np.int64)] * n, [np.zeros(0, scores.dtype)] * n
    if n == 1:
        # One row (a server request): the same steps on 1-D arrays, fewer numpy calls.
        neg = -scores[0]
        top = np.argpartition(neg, kk - 1)[:kk]
        top_neg = neg[top]
        threshold = top_neg.max()
        if np.isfinite(threshold) and (np.count_nonzero(neg == threshold)
                                       > np.count_nonzero(top_neg == threshold)):
            top = np.argsort(neg, kind="stable")[:kk]
            top_neg = neg[top]
        order = np.lexsort((top, top_neg))
        top, values = top[order], -top_neg[order]
        keep = np.isfinite(values)
        return [top[keep]], [values[keep]]
    neg = -scores
    top = np.argpartition(neg, kk - 1, axis=1)[:, :kk]
    top_neg = np.take_along_axis(neg, top, axis=1)
    # The partition keeps an arbitrary subset of a tie at the k-th place: rows where equal
    # scores were left out take the first ones in column order instead.
    threshold = top_neg.max(axis=1, keepdims=True)
    straddle = (np.isfinite(threshold[:, 0])
                & (np.count_nonzero(neg == threshold, axis=1)
                   > np.count_nonzero(top_neg == threshold, axis=1)))
    for u in np.flatnonzero(straddle):
        top[u] = np.argsort(neg[u], kind="stable")[:kk]
        top_neg[u] = neg[u, top[u]]
    order = np.lexsort((top, top_neg), axis=1)  # by score descending, then column
    top = np.take_along_axis(top, order, axis=1)
    values = -np.take_along_axis(top_neg, order, axis=1)
    keep = np.isfinite(values)
    return [top[u][keep[u]] for u in range(n)], [values[u][keep[u]] for u in range(n)]
