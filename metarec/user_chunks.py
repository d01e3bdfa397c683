"""Interactions read in bounded memory, as chunks that each hold every row of their users.

A batch job or an out-of-core training run cannot hold a table of 100 million users; it reads
the table a record batch at a time and cuts it at user boundaries. :func:`iter_user_chunks`
does that for a Parquet file, a folder of Parquet files (read through ``pyarrow.dataset``)
or a CSV file:

* input sorted by ``user_id`` (in file-name order, then row order) is streamed in one pass;
  at most one chunk and one record batch are in memory;
* other input is first hash-partitioned by user id into temporary Parquet files (one
  streaming pass), and each partition, which holds whole users, is then read and sorted on
  its own: memory is bounded by the partition size, not by the table.

Both orders yield the same users in a deterministic order for the same input, which is what
makes a resumed job skip exactly the parts it had finished.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.dataset as pa_ds
import pyarrow.parquet as pq

#: Rows per record batch read from the input.
BATCH_ROWS = 262_144
#: Rows per hash partition when the input is not sorted by user (about 100 MB in pandas).
PARTITION_ROWS = 2_000_000
PARQUET_SUFFIXES = (".parquet", ".pq")


def open_dataset(path: str | os.PathLike) -> pa_ds.Dataset:
    """The input as a ``pyarrow.dataset``: a Parquet file, a folder of Parquet files, or a CSV file.

    Args:
        path: the file or folder.

    Returns:
        The dataset (nothing is read yet but file metadata).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"No such file or folder: got {str(path)!r}.")
    if path.is_dir() or path.suffix in PARQUET_SUFFIXES:
        return pa_ds.dataset(str(path), format="parquet", exclude_invalid_files=False,
                             ignore_prefixes=[".", "_"])
    if path.suffix == ".csv":
        return pa_ds.dataset(str(path), format="csv")
    raise ValueError(f"Unsupported file type {path.suffix!r} for {str(path)!r}: use .parquet, .csv "
                     "or a folder of Parquet files.")


def input_fingerprint(path: str | os.PathLike) -> list:
    """Names and sizes of the input's files: what a resumed job checks it reads the same input."""
    files = sorted(open_dataset(path).files)
    return [[Path(f).name, os.path.getsize(f)] for f in files]


def _record_batches(dataset: pa_ds.Dataset, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The dataset's rows in file order, then row order (``Scanner.to_batches`` keeps order)."""
    missing = set(columns) - set(dataset.schema.names)
    if missing:
        raise ValueError(f"The input lacks columns {sorted(missing)}; got {dataset.schema.names}.")
    yield from dataset.to_batches(columns=list(columns), batch_size=BATCH_ROWS)


def is_sorted_by_user(dataset: pa_ds.Dataset) -> bool:
    """Whether ``user_id`` never decreases over the dataset (reads that one column only)."""
    last = None
    for batch in _record_batches(dataset, ["user_id"]):
        users = batch.column(0)
        if len(users) == 0:
            continue
        if last is not None and pc.less(users[0], last).as_py():
            return False
        if len(users) > 1 and pc.any(pc.less(users[1:], users[:-1])).as_py():
            return False
        last = users[-1]
    return True


def iter_user_chunks(
    path: str | os.PathLike,
    chunk_users: int,
    columns: Sequence[str] = ("user_id", "item_id", "rating"),
    partition_rows: int = PARTITION_ROWS,
) -> Iterator[pd.DataFrame]:
    """DataFrames of at most ``chunk_users`` whole users each, sorted by ``user_id`` inside.

    Args:
        path: a Parquet file, a folder of Parquet files or a CSV file, with a ``user_id`` column.
        chunk_users: users per chunk (the last chunk of the input, or of a partition, has fewer).
        columns: the columns to read (``user_id`` among them).
        partition_rows: rows per temporary hash partition when the input is not sorted by user.

    Returns:
        An iterator of DataFrames with ``columns``, each user's rows contiguous and in input order.
    """
    if not isinstance(chunk_users, int) or chunk_users < 1:
        raise ValueError(f"chunk_users must be a positive integer; got {chunk_users!r}.")
    columns = list(columns)
    if "user_id" not in columns:
        raise ValueError(f"columns must include 'user_id'; got {columns}.")
    dataset = open_dataset(path)
    if is_sorted_by_user(dataset):
        yield from _chunks_of_sorted(_record_batches(dataset, columns), chunk_users)
        return
    with tempfile.TemporaryDirectory(prefix="metarec-partitions-") as tmp:
        for part in _hash_partition(dataset, columns, Path(tmp), partition_rows):
            frame = pq.read_table(part).to_pandas()
            frame = frame.sort_values("user_id", kind="stable").reset_index(drop=True)
            yield from _chunks_of_frame(frame, chunk_users)


def chunks_of_frame(frame: pd.DataFrame, chunk_users: int) -> Iterator[pd.DataFrame]:
    """:func:`iter_user_chunks` for a DataFrame already in memory (sorted here, stably)."""
    ordered = frame.sort_values("user_id", kind="stable").reset_index(drop=True)
    return _chunks_of_frame(ordered, chunk_users)


def user_bounds(user_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First row of each user in a user-sorted column, and each user's row count."""
    if len(user_col) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, user_col[1:] != user_col[:-1]])
    return starts, np.diff(np.r_[starts, len(user_col)])


def _chunks_of_frame(frame: pd.DataFrame, chunk_users: int) -> Iterator[pd.DataFrame]:
    starts, _ = user_bounds(frame["user_id"].to_numpy())
    cuts = np.r_[starts[::chunk_users], len(frame)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        yield frame.iloc[a:b].reset_index(drop=True)


def _chunks_of_sorted(batches: Iterator[pa.RecordBatch], chunk_users: int) -> Iterator[pd.DataFrame]:
    """Chunks from record batches sorted by user: the last user of a batch may go on in the
    next, so it is held back (with any users short of a full chunk) until the next batch."""
    pending = None
    for batch in batches:
        frame = batch.to_pandas()
        if pending is not None and len(pending):
            frame = pd.concat([pending, frame], ignore_index=True)
        starts, _ = user_bounds(frame["user_id"].to_numpy())
        if len(starts) == 0:
            continue
        complete = len(starts) - 1  # the last user may go on in the next batch
        full = complete // chunk_users
        for c in range(full):
            a = starts[c * chunk_users]
            b = starts[(c + 1) * chunk_users]
            yield frame.iloc[a:b].reset_index(drop=True)
        pending = frame.iloc[starts[full * chunk_users]:].reset_index(drop=True)
    if pending is not None and len(pending):
        yield from _chunks_of_frame(pending, chunk_users)


def user_hash(user_ids: np.ndarray | pd.Series, partitions: int) -> np.ndarray:
    """A stable partition number in ``[0, partitions)`` per user id (the same in every process
    and run: pandas' fixed-key hash of the id's value)."""
    values = np.asarray(user_ids)
    if values.dtype.kind in "OUS":
        values = values.astype(str).astype(object)
    return (pd.util.hash_array(values) % np.uint64(partitions)).astype(np.int64)


def _hash_partition(dataset: pa_ds.Dataset, columns: list[str], folder: Path,
                    partition_rows: int) -> list[Path]:
    """Write the dataset as hash partitions of user id, one Parquet file each (one pass)."""
    rows = dataset.count_rows()
    partitions = max(1, math.ceil(rows / partition_rows))
    paths = [folder / f"partition-{p:05d}.parquet" for p in range(partitions)]
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for batch in _record_batches(dataset, columns):
            table = pa.Table.from_batches([batch])
            buckets = user_hash(batch.column(columns.index("user_id")).to_numpy(zero_copy_only=False),
                                partitions)
            order = np.argsort(buckets, kind="stable")
            starts, counts = user_bounds(buckets[order])
            for a, n in zip(starts, counts):
                p = int(buckets[order[a]])
                piece = table.take(pa.array(order[a:a + n]))
                if p not in writers:
                    writers[p] = pq.ParquetWriter(paths[p], piece.schema)
                writers[p].write_table(piece)
    finally:
        for writer in writers.values():
            writer.close()
    return [paths[p] for p in sorted(writers)]
