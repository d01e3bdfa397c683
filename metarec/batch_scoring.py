"""Batch jobs: adapt to every user of an interactions file and write their top-k.

Users are processed in fixed chunks of whole users, each chunk vectorised through
``learner.adapt_flat`` / ``recommend_many``. Input given as a path is streamed in bounded
memory (``metarec.user_chunks``: one record batch and one chunk at a time); a DataFrame is
sorted by user id in memory. Each chunk's user features are found with one vectorised index
lookup (:class:`UserFeatureLookup`). Every chunk is written as its own Parquet part file
(``part-00000.parquet``, ...) inside the output folder, atomically (temporary file, then
rename), so an interrupted job restarted with the same arguments skips the finished parts and
never duplicates a user. A ``_manifest.json`` (ignored by Parquet readers, like every name
starting with "_") records the settings a resumed run must share. ``metarec.ray_scoring``
runs the same job on Ray Data.
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
from metarec.user_chunks import chunks_of_frame, input_fingerprint, iter_user_chunks, open_dataset, user_bounds


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
        interactions: every user's support, with ``user_id``, ``item_id``, ``rating``: a
            DataFrame, or a path to a Parquet file, a folder of Parquet files or a CSV file.
            A path is streamed in bounded memory (``metarec.user_chunks``): input sorted by
            ``user_id`` in one pass, other input through temporary hash partitions of users.
        out_dir: the output folder of Parquet parts (a rerun with the same arguments resumes).
        candidates: raw item ids to rank (None: the whole catalogue).
        k: items per user.
        user_features: optional DataFrame indexed by ``user_id`` (unique); each chunk's users
            are found in it with one vectorised index lookup.
        exclude_seen: leave each user's support items out of their top-k.
        chunk_users: users per vectorised chunk (and per output part).
        verbose: 0 (silent), 1 (a progress bar), 2 (one line per chunk), or ``"auto"``: a bar
            on a terminal, lines otherwise.
        unknown_ids: ``"warn"`` (default), ``"error"`` or ``"ignore"``: what to do with item
            ids outside the model's catalogue (in the interactions or the candidates) and user
            feature columns the model lacks (``metarec.unknown_ids``; the messages count them,
            as the server's do). Candidates and feature columns are checked before any
            scoring; the interactions of a DataFrame too, those of a streamed path chunk by
            chunk ("error" stops at the first chunk holding one, "warn" warns once at the
            end with the job's counts). Unknown items are scored as the unknown item, unknown
            columns dropped.

    Returns:
        ``out_dir`` as a ``Path``. Output columns: ``user_id``, ``rank`` (1 = best),
        ``item_id``, ``score``.
    """
    check_policy(unknown_ids)
    verbose = resolve_verbose(verbose)
    if not isinstance(learner, keras.Model):
        learner = load(resolve_model_path(learner))
    if not isinstance(chunk_users, int) or chunk_users < 1:
        raise ValueError(f"chunk_users must be a positive integer; got {chunk_users!r}.")
    settings = {"chunk_users": chunk_users, "k": int(k), "exclude_seen": bool(exclude_seen)}
    if isinstance(interactions, pd.DataFrame):
        _check_columns(interactions.columns)
        if interactions.empty:
            raise ValueError("interactions is empty: there is no user to score.")
        settings["users"] = int(interactions["user_id"].nunique())
        chunks = chunks_of_frame(interactions[list(INPUT_COLUMNS)], chunk_users)
        total = settings["users"]
    else:
        dataset = open_dataset(interactions)
        _check_columns(dataset.schema.names)
        settings["input"] = input_fingerprint(interactions)
        chunks = iter_user_chunks(interactions, chunk_users, INPUT_COLUMNS)
        total = None
    cand = None if candidates is None else np.asarray(candidates)
    user_features = _check_candidates_and_features(learner.encoder, cand, user_features, unknown_ids)
    unknown = UnknownInteractions(learner.encoder, unknown_ids)
    if isinstance(interactions, pd.DataFrame):
        unknown.add(interactions["item_id"].to_numpy(), interactions["user_id"].to_numpy())
        unknown.report()
        unknown = None  # checked whole: not again per chunk
    features = UserFeatureLookup(user_features) if user_features is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(out_dir, settings)
    progbar = None
    if verbose == 1:
        progbar = keras.utils.Progbar(total, unit_name="user")
    elif verbose:
        progbar = _ChunkLines(total)
    done = 0
    # One writer thread: chunk c's DataFrame and Parquet file are built while the model adapts
    # and scores chunk c + 1. At most one part is pending (bounded memory), and a write error
    # surfaces at the next chunk or at the end.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="metarec-parts") as writer:
        pending = None
        for c, chunk in enumerate(chunks):
            part = out_dir / f"part-{c:05d}.parquet"
            users, lengths = _users_of(chunk)
            if unknown is not None:
                unknown.add(chunk["item_id"].to_numpy(), chunk["user_id"].to_numpy())
            if not part.exists():
                recs = score_chunk(learner, chunk, users, lengths, cand, k, exclude_seen, features)
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write_part, part, users, recs)
            done += len(users)
            if progbar:
                progbar.update(done)
        if pending is not None:
            pending.result()
    if done == 0:
        raise ValueError(f"interactions is empty: there is no user to score; got {interactions!r}.")
    if unknown is not None:
        unknown.report()
    return out_dir


INPUT_COLUMNS = ("user_id", "item_id", "rating")


def _check_columns(columns):
    missing = set(INPUT_COLUMNS) - set(columns)
    if missing:
        raise ValueError(f"interactions lack columns {sorted(missing)}; got {list(columns)}.")


def _users_of(chunk):
    """The users of a user-sorted chunk, in order, and their row counts."""
    user_col = chunk["user_id"].to_numpy()
    starts, lengths = user_bounds(user_col)
    return user_col[starts], lengths


class UserFeatureLookup:
    """User features found per chunk with one vectorised join on an index built once.

    Args:
        user_features: a DataFrame indexed by ``user_id`` (unique), one column per feature.
    """

    def __init__(self, user_features: pd.DataFrame) -> None:
        if not isinstance(user_features, pd.DataFrame):
            raise ValueError(f"user_features must be a DataFrame indexed by user_id; got "
                             f"{type(user_features).__name__}.")
        if not user_features.index.is_unique:
            dupes = user_features.index[user_features.index.duplicated()][:5].tolist()
            raise ValueError(f"user_features has users twice (e.g. {dupes}); give one row per user.")
        self.frame = user_features
        self.names = list(user_features.columns)
        # Plain numpy columns are gathered directly (``tolist`` gives Python scalars, as
        # ``to_dict`` does); other dtypes (dates, extension types) go through pandas.
        self.columns = [user_features[name].to_numpy() for name in self.names]
        self.plain = all(isinstance(user_features[name].dtype, np.dtype)
                         and user_features[name].dtype.kind in "biufOU" for name in self.names)
        self.frame.index.get_indexer(self.frame.index[:1])  # builds the index's hash table once

    def rows(self, users: np.ndarray) -> list[dict]:
        """One feature dict per user of ``users`` (``{}`` for a user without a row).

        Args:
            users: raw user ids.

        Returns:
            A list of ``len(users)`` dicts.
        """
        positions = self.frame.index.get_indexer(users)
        found = np.flatnonzero(positions >= 0)
        out = [{} for _ in range(len(users))]
        if not len(found):
            return out
        if self.plain:
            values = zip(*(column[positions[found]].tolist() for column in self.columns))
            records = [dict(zip(self.names, row)) for row in values]
        else:
            records = self.frame.iloc[positions[found]].to_dict("records")
        for i, record in zip(found, records):
            out[i] = record
        return out


def score_chunk(learner, chunk, users, lengths, candidates, k, exclude_seen, features):
    """Adapt to and rank the items of the users of one user-sorted chunk.

    Args:
        learner: the ``MetaLearner``.
        chunk: DataFrame with ``user_id``, ``item_id``, ``rating``, each user's rows contiguous.
        users, lengths: the chunk's users in order and their row counts.
        candidates: raw item ids shared by every user, or None (the catalogue).
        k: items per user.
        exclude_seen: leave each user's support items out.
        features: a :class:`UserFeatureLookup` or None.

    Returns:
        One ``(item ids, scores)`` pair per user.
    """
    rows = None if features is None else features.rows(users)
    # Unknown ids are counted for the whole job by the caller (score_batch), not per call.
    adapted = learner.adapt_flat(chunk["item_id"].to_numpy(), chunk["rating"].to_numpy(),
                                 lengths, rows, unknown_ids="ignore")
    return learner.recommend_many(
        adapted, k=k, exclude_seen=exclude_seen,
        candidates=None if candidates is None else [candidates] * len(users), unknown_ids="ignore",
    )


def top_k_frame(users, recs):
    """The output rows of scored users: ``user_id``, ``rank``, ``item_id``, ``score``."""
    sizes = [len(ids) for ids, _ in recs]
    return pd.DataFrame({
        "user_id": np.repeat(np.asarray(users, dtype=object), sizes).tolist(),
        "rank": np.concatenate([np.arange(1, n + 1) for n in sizes]),
        "item_id": np.concatenate([ids for ids, _ in recs]),
        "score": np.concatenate([scores for _, scores in recs]),
    })


def _write_part(part, users, recs):
    """One chunk's top-k as a Parquet part, atomically (temporary file, then rename)."""
    write_atomically(top_k_frame(users, recs), part)


def write_atomically(frame, part):
    """``frame`` as the Parquet file ``part``: a temporary file, then a rename, so that a part
    is either complete or absent."""
    tmp = part.with_name(f".{part.name}.tmp")  # hidden from Parquet dataset readers
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, part)


class UnknownInteractions:
    """The ``unknown_ids`` policy over a job's interaction item ids, seen a chunk at a time:
    "error" raises at the first unknown id, "warn" counts them for one warning at the end."""

    def __init__(self, encoder, policy):
        self.encoder, self.policy = encoder, policy
        self.ids, self.rows, self.users, self.all_users = {}, 0, set(), set()

    def add(self, item_col, user_col):
        if self.policy == "ignore":
            return
        self.all_users.update(pd.unique(user_col).tolist())
        unknown = self.encoder.item_index(item_col) == 0
        if unknown.any():
            self.ids.update(dict.fromkeys(item_col[unknown].tolist()))
            self.rows += int(unknown.sum())
            self.users.update(pd.unique(user_col[unknown]).tolist())
            if self.policy == "error":
                self.report()

    def report(self):
        self.report_counts(list(self.ids), self.rows, len(self.users), len(self.all_users))

    def report_counts(self, ids, rows, users, all_users):
        """The policy over counts gathered elsewhere (e.g. by ``score_batch_ray``'s actors):
        ``rows`` rows of ``users`` of ``all_users`` users hold the distinct unknown ``ids``."""
        if rows:
            apply_policy(self.policy, unknown_items_message("interaction", ids, rows, self.encoder.item_ids[1:])
                         + f" (in the supports of {users} of {all_users} users: "
                           f"distinct unknown ids {len(ids)})")


def _check_candidates_and_features(encoder, candidates, user_features, policy):
    """The ``unknown_ids`` policy applied to the candidates and the user-feature columns;
    returns the user features without columns the model lacks."""
    if policy == "ignore":
        return user_features
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
        self.bar = ProgressBar(total, stream=sys.stdout) if total is not None else None
        self.done = 0

    def update(self, done):
        if self.bar is not None:
            self.bar.update("users scored", advance=done - self.done)
        else:
            print(f"{done} users scored", flush=True)
        self.done = done


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
