"""Durable interaction log: an embedded SQLite database in WAL mode.

This module is the one definition of the log's format (the ``interactions`` table below) and
of how it is written and read: the gRPC service appends to it (``LogInteractions``), and
``metarec retrain`` (:func:`metarec.retrain.read_logs`) reads it back. It needs only the
standard library (pandas for :meth:`InteractionLog.to_pandas`), so the service's supervisor
process opens it without importing Keras.

``LogInteractions`` is acknowledged only after :meth:`InteractionLog.append` returns, and
``append`` returns only after its transaction has committed with ``synchronous=FULL``: in WAL
mode that fsyncs the write-ahead log on every commit, so an acknowledged row survives a killed
process and a power cut (``NORMAL`` would only survive a killed process).

The log keeps raw ids as strings, exactly as clients sent them: it is training data for the
next model, which may know items the current model does not.

All methods are blocking and thread-safe. The gRPC service calls them from worker threads so
that disk waits never block the event loop. Writes share one connection under a lock (SQLite
has one writer at a time anyway); reads use one connection per thread, which WAL lets run
concurrently with the writer.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT    NOT NULL,
    item_id    TEXT    NOT NULL,
    rating     REAL    NOT NULL,
    timestamp  INTEGER NOT NULL,
    logged_at  REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS interactions_by_user ON interactions (user_id, timestamp, seq);
"""


@dataclass(frozen=True)
class LoggedInteraction:
    """One stored row (``timestamp`` in seconds since the Unix epoch)."""

    item_id: str
    rating: float
    timestamp: int


class InteractionLog:
    """Append-only store of (user, item, rating, timestamp) rows.

    Args:
        path: database file; created with its parent folder when missing.
        busy_timeout_s: how long a writer waits for another process holding the write lock.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._writer = self._connect()
        # journal_mode=WAL is persistent in the file; the other pragmas are per connection.
        mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: could not switch SQLite to WAL mode (got {mode!r})")
        with self._writer:
            self._writer.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so a commit is explicit.
        # check_same_thread=False: the writer connection is shared under _write_lock.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("interaction log is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def append(
        self,
        user_id: str,
        rows: Iterable[tuple[str, float, int | None]],
        now: float | None = None,
    ) -> int:
        """Store ``(item_id, rating, timestamp or None)`` rows for one user, atomically.

        Returns the number of rows stored, once they are committed. A missing timestamp is
        replaced by ``now`` (the receive time). Raises ``ValueError`` for an empty user id,
        empty item ids or non-finite ratings; nothing is stored then.
        """
        if not user_id:
            raise ValueError("user_id must be non-empty")
        logged_at = time.time() if now is None else float(now)
        records = []
        for item_id, rating, timestamp in rows:
            if not item_id:
                raise ValueError("item_id must be non-empty")
            rating = float(rating)
            if not math.isfinite(rating):
                raise ValueError(f"rating must be finite, got {rating!r} for item {item_id!r}")
            ts = int(logged_at) if timestamp is None else int(timestamp)
            records.append((user_id, str(item_id), rating, ts, logged_at))
        if not records:
            return 0
        with self._write_lock:
            if self._closed:
                raise RuntimeError("interaction log is closed")
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                self._writer.executemany(
                    "INSERT INTO interactions (user_id, item_id, rating, timestamp, logged_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    records,
                )
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")
        return len(records)

    def user_interactions(self, user_id: str, limit: int | None = None) -> list[LoggedInteraction]:
        """A user's logged interactions, oldest first; with ``limit``, the most recent ones."""
        conn = self._reader()
        if limit is None:
            cur = conn.execute(
                "SELECT item_id, rating, timestamp FROM interactions WHERE user_id = ? "
                "ORDER BY timestamp, seq",
                (user_id,),
            )
            rows = cur.fetchall()
        else:
            cur = conn.execute(
                "SELECT item_id, rating, timestamp FROM interactions WHERE user_id = ? "
                "ORDER BY timestamp DESC, seq DESC LIMIT ?",
                (user_id, int(limit)),
            )
            rows = cur.fetchall()[::-1]
        return [LoggedInteraction(item, float(rating), int(ts)) for item, rating, ts in rows]

    def count(self) -> int:
        """Number of stored rows."""
        return int(self._reader().execute("SELECT COUNT(*) FROM interactions").fetchone()[0])

    def to_pandas(self, since: float | None = None, users: Sequence[str] | None = None):
        """Export rows for retraining as a DataFrame.

        Columns ``user_id``, ``item_id`` (strings, as logged), ``rating`` (float64),
        ``timestamp`` (int64 seconds) and ``logged_at`` (float64 seconds), in log order.
        ``since`` keeps rows logged at or after that time; ``users`` keeps those users only.
        Convert the id columns to the training data's dtype before fitting if it used ints.
        """
        import pandas as pd  # only the export needs pandas

        clauses, params = [], []
        if since is not None:
            clauses.append("logged_at >= ?")
            params.append(float(since))
        if users is not None:
            users = list(users)
            if not users:
                clauses.append("0")
            else:
                clauses.append(f"user_id IN ({','.join('?' * len(users))})")
                params.extend(users)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = (
            self._reader()
            .execute(
                "SELECT user_id, item_id, rating, timestamp, logged_at FROM interactions"
                f"{where} ORDER BY seq",
                params,
            )
            .fetchall()
        )
        frame = pd.DataFrame(
            rows, columns=["user_id", "item_id", "rating", "timestamp", "logged_at"]
        )
        return frame.astype(
            {
                "user_id": object,
                "item_id": object,
                "rating": "float64",
                "timestamp": "int64",
                "logged_at": "float64",
            }
        )

    def close(self) -> None:
        """Close every connection (idempotent); later calls raise ``RuntimeError``."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def __enter__(self) -> InteractionLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
