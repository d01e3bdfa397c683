"""Batch jobs: adapt to every user of an interactions file and write their top-k.

Users are processed in fixed chunks, in sorted user-id order, each chunk vectorised through
``learner.adapt_many`` / ``recommend_many``. Every chunk is written as its own Parquet part file
(``part-00000.parquet``, ...) inside the output folder, atomically (temporary file, then
rename), so an interrupted job restarted with the same arguments skips the finished parts and
never duplicates a user. A ``_manifest.json`` (ignored by Parquet readers, like every name starting with "_") records the settings a resumed run must share.
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from metarec.progress import ProgressBar, resolve_verbose
from metarec.saving import load
from metarec.unknown_ids import (
    apply_policy,
    check_policy,
    unknown_features_message,
    unknown_items_message,
)


def resolve_model_path(path):
    """A ``.keras`` file, a version folder holding one, or a model folder of numbered versions
    (the newest is used)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir() and sorted(path.glob("*.keras")):
        return sorted(path.glob("*.keras"))[0]
    if path.is_dir():
        versions = sorted((int(p.name), p) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
        if versions:
            files = sorted(versions[-1][1].glob("*.keras"))
            if files:
                return files[0]
    raise ValueError(f"No model at {str(path)!r}: expected a .keras file or a folder of numbered versions.")


def read_table(path, columns=None):
    """A Parquet or CSV file as a DataFrame."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"No such file: {str(path)!r}.")
    if path.suffix in (".parquet", ".pq") or path.is_dir():
        return pd.read_parquet(path, columns=columns)
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        return frame if columns is None else frame[columns]
    raise ValueError(f"Unsupported file type {path.suffix!r} for {str(path)!r}: use .parquet or .csv.")


def score_batch(
    learner,
    interactions,
    out_dir,
    candidates=None,
    k=20,
    user_features=None,
    exclude_seen=True,
    chunk_users=1024,
    verbose="auto",
    unknown_ids="warn",
):
    """Write each user's top-``k`` to Parquet parts in ``out_dir``; returns the folder.

    Args:
        learner: a ``MetaLearner`` (or a path to a ``.keras`` file / model folder).
        interactions: DataFrame with ``user_id``, ``item_id``, ``rating``: every user's support.
        candidates: raw item ids to rank (None: the whole catalogue).
        user_features: optional DataFrame indexed by ``user_id``.
        chunk_users: users per vectorised chunk (and per output part).
        verbose: 0 (silent), 1 (a progress bar), 2 (one line per chunk), or ``"auto"``: a bar
            on a terminal, lines otherwise.
        unknown_ids: ``"warn"`` (default), ``"error"`` or ``"ignore"``: what to do, once for
            the whole job, with item ids outside the model's catalogue (in the interactions or
            the candidates) and user feature columns the model lacks (``metarec.unknown_ids``;
            the messages count them, as the server's do). Unknown items are scored as the
            unknown item, unknown columns dropped.
    Output columns: ``user_id``, ``rank`` (1 = best), ``item_id``, ``score``.
    """
    check_policy(unknown_ids)
    verbose = resolve_verbose(verbose)
    if not isinstance(learner, keras.Model):
        learner = load(resolve_model_path(learner))
    if not isinstance(chunk_users, int) or chunk_users < 1:
        raise ValueError(f"chunk_users must be a positive integer; got {chunk_users!r}.")
    missing = {"user_id", "item_id", "rating"} - set(interactions.columns)
    if missing:
        raise ValueError(f"interactions lack columns {sorted(missing)}; got {list(interactions.columns)}.")
    if interactions.empty:
        raise ValueError("interactions is empty: there is no user to score.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Users in sorted id order, each user's rows contiguous: a support is then a slice of two
    # arrays (slicing DataFrames per user cost more than the adaptation itself).
    ordered = interactions.sort_values("user_id", kind="stable")
    user_col = ordered["user_id"].to_numpy()
    item_col = ordered["item_id"].to_numpy()
    rating_col = ordered["rating"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user_col[1:] != user_col[:-1]])
    bounds = dict(zip(user_col[starts], zip(starts, np.r_[starts[1:], len(user_col)])))
    users = list(user_col[starts])
    cand = None if candidates is None else np.asarray(candidates)
    user_features = _check_unknown(learner.encoder, item_col, user_col, cand, user_features, unknown_ids)
    _check_manifest(out_dir, {"users": len(users), "chunk_users": chunk_users, "k": int(k),
                              "exclude_seen": bool(exclude_seen)})
    chunks = range(0, len(users), chunk_users)
    progbar = None
    if verbose == 1:
        progbar = keras.utils.Progbar(len(users), unit_name="user")
    elif verbose:
        progbar = _ChunkLines(len(users))
    # One writer thread: chunk c's DataFrame and Parquet file are built while the model adapts
    # and scores chunk c + 1. At most one part is pending (bounded memory), and a write error
    # surfaces at the next chunk or at the end.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="metarec-parts") as writer:
        pending = None
        for c, start in enumerate(chunks):
            part = out_dir / f"part-{c:05d}.parquet"
            chunk = users[start:start + chunk_users]
            if not part.exists():
                first, last = bounds[chunk[0]][0], bounds[chunk[-1]][1]
                lengths = [b - a for a, b in (bounds[u] for u in chunk)]
                features = None
                if user_features is not None:
                    known = user_features.index.isin(chunk)
                    rows = dict(zip(user_features.index[known], user_features[known].to_dict("records")))
                    features = [rows.get(u, {}) for u in chunk]
                # Unknown ids were counted once for the whole job above.
                adapted = learner.adapt_flat(item_col[first:last], rating_col[first:last], lengths, features,
                                             unknown_ids="ignore")
                recs = learner.recommend_many(
                    adapted, k=k, exclude_seen=exclude_seen,
                    candidates=None if cand is None else [cand] * len(chunk), unknown_ids="ignore",
                )
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write_part, part, chunk, recs)
            if progbar:
                progbar.update(min(start + chunk_users, len(users)))
        if pending is not None:
            pending.result()
    return out_dir


def _check_unknown(encoder, item_col, user_col, candidates, user_features, policy):
    """The ``unknown_ids`` policy applied once to the whole job, with counts; returns the user
    features without columns the model lacks."""
    if policy == "ignore":
        return user_features
    index = encoder.item_index(item_col)
    unknown = index == 0
    if unknown.any():
        ids = list(dict.fromkeys(item_col[unknown].tolist()))
        users = len(pd.unique(user_col[unknown]))
        total = len(pd.unique(user_col))
        apply_policy(policy, unknown_items_message("interaction", ids, int(unknown.sum()), encoder.item_ids[1:])
                     + f" (in the supports of {users} of {total} users: distinct unknown ids {len(ids)})")
    if candidates is not None:
        cand_index = encoder.item_index(candidates)
        if not cand_index.all():
            ids = candidates[cand_index == 0].tolist()
            apply_policy(policy, unknown_items_message("candidate", ids, len(ids), encoder.item_ids[1:]))
    if user_features is not None:
        known = [spec.name for spec in encoder.schema.user_features]
        extra = [c for c in user_features.columns if c not in known]
        if extra:
            apply_policy(policy, unknown_features_message([str(c) for c in extra], known)
                         + " (columns of the user-feature table)")
            user_features = user_features[[c for c in user_features.columns if c in known]]
    return user_features


class _ChunkLines:
    """``Progbar.update`` as one plain line per chunk (for output that is not a terminal)."""

    def __init__(self, total):
        self.bar = ProgressBar(total, stream=sys.stdout)
        self.done = 0

    def update(self, done):
        self.bar.update("users scored", advance=done - self.done)
        self.done = done


def _write_part(part, chunk, recs):
    """One chunk's top-k as a Parquet part, atomically (temporary file, then rename)."""
    sizes = [len(ids) for ids, _ in recs]
    frame = pd.DataFrame({
        "user_id": np.repeat(np.asarray(chunk, dtype=object), sizes).tolist(),
        "rank": np.concatenate([np.arange(1, n + 1) for n in sizes]),
        "item_id": np.concatenate([ids for ids, _ in recs]),
        "score": np.concatenate([scores for _, scores in recs]),
    })
    tmp = part.with_name(f".{part.name}.tmp")  # hidden from Parquet dataset readers
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, part)  # a part is either complete or absent


def _check_manifest(out_dir, settings):
    path = out_dir / "_manifest.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            raise ValueError(
                f"{str(out_dir)!r} holds the output of a run with other settings {previous}; "
                f"this run has {settings}. Use another --out folder."
            )
    else:
        path.write_text(json.dumps(settings))
