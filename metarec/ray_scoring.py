"""``score-batch`` on Ray Data: the batch job spread over a pool of scoring actors.

The pipeline is ``ray.data.read_parquet`` (or ``read_csv``) → a stateless ``map_batches``
that gives each row the hash partition of its user id (and drops partitions already written)
→ ``groupby(partition).map_groups`` on a pool of :class:`TopKScorer` actors. A group is one
partition: every row of its users, so no user is ever split between two actors. Each actor
loads the model once and keeps it, with its compiled kernels, for every partition it is
given; it ranks its partition's users in chunks of ``chunk_users`` exactly as the
single-process job does (:func:`metarec.batch_scoring.score_chunk`) and writes them as one
Parquet part, ``part-<partition>.parquet``, atomically (temporary file, then rename).

The output folder has the single-process job's layout (Parquet parts of ``user_id``,
``rank``, ``item_id``, ``score`` and a ``_manifest.json``). A part per partition is what makes
the job resumable: a rerun with the same arguments skips the partitions whose part exists.
(``Dataset.write_parquet`` names its files after write tasks, which may hold several
partitions or part of one, so a resumed run could not tell which users were done.)

Ray is imported only when this job runs: ``pip install 'metarec[ray]'``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.batch_scoring import (
    INPUT_COLUMNS,
    UnknownInteractions,
    UserFeatureLookup,
    _check_candidates_and_features,
    _check_columns,
    _check_manifest,
    _users_of,
    resolve_model_path,
    score_chunk,
    top_k_frame,
    write_atomically,
)
from metarec.unknown_ids import check_policy
from metarec.user_chunks import chunks_of_frame, input_fingerprint, open_dataset, user_hash

#: Input rows per hash partition when ``partitions`` is not given.
ROWS_PER_PARTITION = 1_000_000
PARTITION_COLUMN = "__metarec_partition"


def require_ray():
    """The ``ray`` module, or an ``ImportError`` that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"score-batch --engine ray needs Ray Data, which is not installed ({exc}). Install it "
            "with `pip install 'metarec[ray]'` (or `pip install 'ray[data]'`), or use the "
            "default --engine local."
        ) from exc
    return ray


def part_path(out_dir: Path, partition: int) -> Path:
    """The output part of one hash partition of users."""
    return Path(out_dir) / f"part-{partition:05d}.parquet"


class TopKScorer:
    """A Ray actor: holds the model and ranks the users of whole partitions.

    Args:
        model_path: a ``.keras`` file every worker can read.
        out_dir: the output folder (shared storage on a cluster).
        candidates: raw item ids shared by every user, or None (the catalogue).
        k, exclude_seen, chunk_users: as in :func:`metarec.batch_scoring.score_batch`.
        user_features: a Ray object reference to the user-feature DataFrame, or None.
        unknown_ids: the job's policy for interaction item ids unknown to the model: the
            actor counts them (the driver warns once, with the job's counts); with
            ``"error"`` a partition that holds one is not scored.
    """

    def __init__(self, model_path, out_dir, candidates, k, exclude_seen, chunk_users,
                 user_features=None, unknown_ids="warn"):
        from metarec.saving import load

        self.learner = load(model_path)
        self.unknown_ids = unknown_ids
        self.out_dir = Path(out_dir)
        self.candidates = candidates
        self.k = k
        self.exclude_seen = exclude_seen
        self.chunk_users = chunk_users
        self.features = None
        if user_features is not None:
            ray = require_ray()
            self.features = UserFeatureLookup(ray.get(user_features))

    def __call__(self, group: pd.DataFrame) -> pd.DataFrame:
        """Rank one partition's users and write its part; returns a one-row summary (with the
        partition's unknown interaction ids, counted for the driver's report)."""
        partition = int(group[PARTITION_COLUMN].iloc[0])
        summary = {"partition": [partition], "users": [int(group["user_id"].nunique())], "rows": [0],
                   "unknown_rows": [0], "unknown_users": [0], "unknown_ids": ["[]"]}
        if self.unknown_ids != "ignore":
            unknown = self.learner.encoder.item_index(group["item_id"].to_numpy()) == 0
            if unknown.any():
                ids = pd.unique(group["item_id"].to_numpy()[unknown])
                summary.update(unknown_rows=[int(unknown.sum())],
                               unknown_users=[int(group["user_id"][unknown].nunique())],
                               unknown_ids=[json.dumps(ids.tolist())])
                if self.unknown_ids == "error":  # refused: this partition is not scored
                    return pd.DataFrame(summary)
        frames = []
        for chunk in chunks_of_frame(group[list(INPUT_COLUMNS)], self.chunk_users):
            users, lengths = _users_of(chunk)
            recs = score_chunk(self.learner, chunk, users, lengths, self.candidates, self.k,
                               self.exclude_seen, self.features)
            frames.append(top_k_frame(users, recs))
        frame = pd.concat(frames, ignore_index=True)
        write_atomically(frame, part_path(self.out_dir, partition))
        summary["rows"] = [len(frame)]
        return pd.DataFrame(summary)


def _tag_partitions(batch: pd.DataFrame, partitions: int, done: frozenset) -> pd.DataFrame:
    """Each row's user partition; rows of partitions already written are dropped."""
    batch = batch.assign(**{PARTITION_COLUMN: user_hash(batch["user_id"].to_numpy(), partitions)})
    if done:
        batch = batch[~batch[PARTITION_COLUMN].isin(list(done))]
    return batch


def score_batch_ray(
    learner,
    interactions,
    out_dir,
    candidates=None,
    k=20,
    user_features=None,
    exclude_seen=True,
    chunk_users=1024,
    actors=1,
    num_cpus=1.0,
    num_gpus=0.0,
    partitions=None,
    address=None,
    unknown_ids="warn",
):
    """:func:`metarec.batch_scoring.score_batch` on Ray Data; returns the output folder.

    Args:
        learner: a path to a ``.keras`` file or a model folder of numbered versions, readable
            by every Ray worker; or a ``MetaLearner``, which is saved into ``out_dir`` first.
        interactions: a Parquet file, a folder of Parquet files or a CSV file with
            ``user_id``, ``item_id``, ``rating`` (any row order: users are hash-partitioned).
        out_dir: the output folder (shared storage on a cluster); a rerun with the same
            arguments skips the partitions already written.
        candidates: raw item ids to rank (None: the whole catalogue).
        k: items per user.
        user_features: optional DataFrame indexed by ``user_id``, put once in Ray's object store.
        exclude_seen: leave each user's support items out of their top-k.
        chunk_users: users per vectorised chunk inside an actor.
        actors: scoring actors (each loads the model once).
        num_cpus, num_gpus: resources of each actor (``num_gpus=1``: one GPU per actor).
        partitions: hash partitions of users (the unit of work and of resumption); default
            one per million input rows, at least four per actor.
        address: the Ray cluster to join (``"ray://head:10001"``, ``"auto"``); None: the
            running Ray instance, else ``RAY_ADDRESS``, else a new local instance.
        unknown_ids: ``"warn"`` (default), ``"error"`` or ``"ignore"``, as in ``score_batch``:
            unknown candidates and user-feature columns are checked before Ray starts;
            unknown interaction item ids are counted by the actors, and the job then warns
            once with the counts of the partitions it scored (``"error"``: partitions holding
            one are not written, and the job raises ``ValueError`` at the end).

    Returns:
        ``out_dir`` as a ``Path``, with one ``part-<partition>.parquet`` per non-empty partition.
    """
    import keras

    ray = require_ray()
    check_policy(unknown_ids)
    if not isinstance(chunk_users, int) or chunk_users < 1:
        raise ValueError(f"chunk_users must be a positive integer; got {chunk_users!r}.")
    if not isinstance(actors, int) or actors < 1:
        raise ValueError(f"actors must be a positive integer; got {actors!r}.")
    if partitions is not None and (not isinstance(partitions, int) or partitions < 1):
        raise ValueError(f"partitions must be a positive integer or None; got {partitions!r}.")
    dataset = open_dataset(interactions)
    _check_columns(dataset.schema.names)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if partitions is None:
        partitions = max(4 * actors, math.ceil(dataset.count_rows() / ROWS_PER_PARTITION))
    _check_manifest(out_dir, {"engine": "ray", "partitions": partitions,
                              "chunk_users": chunk_users, "k": int(k),
                              "exclude_seen": bool(exclude_seen),
                              "input": input_fingerprint(interactions)})
    if isinstance(learner, keras.Model):
        model_path = out_dir / "_model.keras"
        if not model_path.exists():
            learner.save(model_path)
    else:
        model_path = resolve_model_path(learner).resolve()
    done = frozenset(p for p in range(partitions) if part_path(out_dir, p).exists())
    if len(done) == partitions:
        return out_dir
    encoder = None
    if unknown_ids != "ignore":  # the model's ids, for the checks and the messages
        from metarec.saving import load

        encoder = (learner if isinstance(learner, keras.Model) else load(model_path)).encoder
        cand = None if candidates is None else np.asarray(candidates)
        user_features = _check_candidates_and_features(encoder, cand, user_features, unknown_ids)
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    features = None
    if user_features is not None:
        UserFeatureLookup(user_features)  # checked here, before any actor starts
        features = ray.put(user_features)
    source = str(Path(interactions).resolve())
    columns = list(INPUT_COLUMNS)
    if Path(interactions).suffix == ".csv":
        ds = ray.data.read_csv(source).select_columns(columns)
    else:
        ds = ray.data.read_parquet(source).select_columns(columns)
    ds = ds.map_batches(_tag_partitions, batch_format="pandas",
                        fn_kwargs={"partitions": partitions, "done": done})
    summary = ds.groupby(PARTITION_COLUMN, num_partitions=partitions).map_groups(
        TopKScorer, batch_format="pandas", concurrency=actors, num_cpus=num_cpus,
        num_gpus=num_gpus,
        fn_constructor_kwargs={
            "model_path": str(model_path), "out_dir": str(out_dir),
            "candidates": None if candidates is None else np.asarray(candidates), "k": int(k),
            "exclude_seen": bool(exclude_seen), "chunk_users": chunk_users,
            "user_features": features, "unknown_ids": unknown_ids,
        },
    )
    frame = summary.to_pandas()  # runs the job; the parts are written by the actors
    if encoder is not None:
        _report_unknown(encoder, unknown_ids, frame)
    return out_dir


def _report_unknown(encoder, policy, summary: pd.DataFrame) -> None:
    """The ``unknown_ids`` policy over the actors' per-partition counts (partitions hold
    disjoint users, so the user counts add up)."""
    ids = list(dict.fromkeys(i for text in summary["unknown_ids"] for i in json.loads(text)))
    UnknownInteractions(encoder, policy).report_counts(
        ids, int(summary["unknown_rows"].sum()), int(summary["unknown_users"].sum()),
        int(summary["users"].sum()))

