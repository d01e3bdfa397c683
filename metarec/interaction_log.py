"""Durable interaction log: an embedded SQLite database in WAL mode (the default store).

This module defines the log's interface (:class:`InteractionStore`), its format (the
``interactions`` table below) and the embedded store, :class:`InteractionLog`. A log that
several server replicas share lives in PostgreSQL instead
(:mod:`metarec.interaction_log_postgres`, the same interface); :func:`open_interaction_log`
picks the store from a location: a file path, or a ``postgresql://`` URL. The gRPC service
appends to the log (``LogInteractions``), and ``metarec retrain``
(:func:`metarec.retrain.read_logs`) reads it back. The SQLite store needs only the standard
library (pandas for :meth:`InteractionLog.to_pandas`), so the service's supervisor process
opens it without importing Keras.

``LogInteractions`` is acknowledged only after :meth:`InteractionLog.write` returns, and
``write`` returns only after its transaction has committed with ``synchronous=FULL``: in WAL
mode that fsyncs the write-ahead log on every commit, so an acknowledged row survives a killed
process and a power cut (``NORMAL`` would only survive a killed process).

The log keeps raw ids as strings, exactly as clients sent them: it is training data for the
next model, which may know items the current model does not.

All methods are blocking and thread-safe. The gRPC service calls them from worker threads so
that disk waits never block the event loop. Writes share one connection under a lock (SQLite
has one writer at a time anyway); reads use one connection per thread, which WAL lets run
concurrently with the writer.

Idempotent writes: a call may carry a request id. The first call with an id stores its rows and
records the id (table ``log_requests``) in the same transaction; a later call with the same id
and the same contents stores nothing and reports the first call's row count
(:attr:`LogWrite.replayed`). A client may therefore retry a call whose reply it never got (the
server was killed between the commit and the reply) without storing it twice. Request ids are
kept as long as the log: one small row per call.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
CREATE TABLE IF NOT EXISTS log_requests (
    request_id TEXT    PRIMARY KEY,
    digest     BLOB    NOT NULL,
    stored     INTEGER NOT NULL,
    logged_at  REAL    NOT NULL
);
"""

#: URL schemes that select the PostgreSQL store.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")

#: The columns of ``to_pandas`` and their dtypes (every store).
EXPORT_DTYPES = {
    "user_id": object,
    "item_id": object,
    "rating": "float64",
    "timestamp": "int64",
    "logged_at": "float64",
}


@dataclass(frozen=True)
class LoggedInteraction:
    """One stored row (``timestamp`` in seconds since the Unix epoch)."""

    item_id: str
    rating: float
    timestamp: int


@dataclass(frozen=True)
class LogWrite:
    """The outcome of a store's ``write``.

    Attributes:
        stored: rows the call's interactions occupy in the log: those it committed, or, for
            a replayed request id, those the first call with that id committed.
        replayed: the request id was seen before: this call stored nothing.
    """

    stored: int
    replayed: bool = False


class RequestIdConflictError(ValueError):
    """A request id came back with other contents than the call that first used it."""


class InteractionStore(Protocol):
    """What the service and ``metarec retrain`` need of an interaction log (every store)."""

    def write(
        self,
        user_id: str,
        rows: Iterable[tuple[str, float, int | None]],
        now: float | None = None,
        request_id: str | None = None,
    ) -> LogWrite: ...

    def append(
        self, user_id: str, rows: Iterable[tuple[str, float, int | None]], now: float | None = None
    ) -> int: ...

    def user_interactions(self, user_id: str, limit: int | None = None) -> list[LoggedInteraction]: ...

    def count(self) -> int: ...

    def to_pandas(self, since: float | None = None, users: Sequence[str] | None = None): ...

    def close(self) -> None: ...


def is_postgres_url(location: str | Path) -> bool:
    """Whether ``location`` names a PostgreSQL database (``postgresql://...``)."""
    return isinstance(location, str) and location.lower().startswith(POSTGRES_SCHEMES)


def open_interaction_log(location: str | Path) -> InteractionStore:
    """The interaction log at ``location``: a SQLite file path, or a PostgreSQL URL.

    Args:
        location: a file path (created when missing) for the embedded SQLite store, or a
            ``postgresql://user@host:port/dbname`` URL for a store that several server
            replicas share. Keep passwords out of the URL (command lines show in ``ps``):
            libpq reads ``PGPASSWORD`` or ``~/.pgpass``.

    Returns:
        The open store; close it (or use it as a context manager) when done.

    Raises:
        ImportError: a PostgreSQL URL without the ``psycopg`` driver installed.
    """
    if is_postgres_url(location):
        from metarec.interaction_log_postgres import PostgresInteractionLog

        return PostgresInteractionLog(str(location))
    return InteractionLog(location)


def prepare_rows(
    user_id: str, rows: Iterable[tuple[str, float, int | None]], now: float | None
) -> tuple[list[tuple[str, str, float, int, float]], bytes]:
    """Check one call's rows; return its records and the digest of what the caller sent.

    Args:
        user_id: whose rows.
        rows: ``(item_id, rating, timestamp or None)``.
        now: the receive time (default: the current time), the timestamp of rows without one.

    Returns:
        ``(records, digest)``: records are ``(user_id, item_id, rating, timestamp,
        logged_at)``; the digest covers the user id and the rows as given (a missing
        timestamp as missing), so a retry of the same call has the same digest.

    Raises:
        ValueError: an empty user id, an empty item id or a non-finite rating.
    """
    if not user_id:
        raise ValueError("user_id must be non-empty")
    logged_at = time.time() if now is None else float(now)
    digest = hashlib.blake2b(digest_size=16)
    raw_user = str(user_id).encode()
    digest.update(struct.pack("<I", len(raw_user)) + raw_user)
    records = []
    for item_id, rating, timestamp in rows:
        if not item_id:
            raise ValueError("item_id must be non-empty")
        rating = float(rating)
        if not math.isfinite(rating):
            raise ValueError(f"rating must be finite, got {rating!r} for item {item_id!r}")
        raw_item = str(item_id).encode()
        digest.update(struct.pack("<I", len(raw_item)) + raw_item)
        digest.update(struct.pack("<d?q", rating, timestamp is not None, 0 if timestamp is None else int(timestamp)))
        ts = int(logged_at) if timestamp is None else int(timestamp)
        records.append((user_id, str(item_id), rating, ts, logged_at))
    return records, digest.digest()


def replay_of(request_id: str, first_digest: bytes, digest: bytes, stored: int) -> LogWrite:
    """The :class:`LogWrite` of a call that repeats a request id.

    Raises:
        RequestIdConflictError: the call's contents differ from the first call's.
    """
    if bytes(first_digest) != digest:
        raise RequestIdConflictError(
            f"request_id {request_id!r} was already used by a call with other interactions; "
            "send new interactions under a new request id"
        )
    return LogWrite(stored=int(stored), replayed=True)


class InteractionLog:
    """Append-only store of (user, item, rating, timestamp) rows in a SQLite file.

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

    def write(
        self,
        user_id: str,
        rows: Iterable[tuple[str, float, int | None]],
        now: float | None = None,
        request_id: str | None = None,
    ) -> LogWrite:
        """Store ``(item_id, rating, timestamp or None)`` rows for one user, atomically.

        Args:
            user_id: whose interactions these are.
            rows: the interactions; a missing timestamp becomes ``now`` (the receive time).
            now: the receive time in seconds since the epoch (default: the current time).
            request_id: optional idempotency key: a call that repeats an earlier call's id
                and contents stores nothing (see the module docstring).

        Returns:
            The :class:`LogWrite`, once the rows are committed.

        Raises:
            ValueError: an empty user id, empty item ids or non-finite ratings; nothing is
                stored then. :class:`RequestIdConflictError` (a ``ValueError``) when
                ``request_id`` was used before for other contents.
        """
        records, digest = prepare_rows(user_id, rows, now)
        if not records:
            return LogWrite(0)
        with self._write_lock:
            if self._closed:
                raise RuntimeError("interaction log is closed")
            self._writer.execute("BEGIN IMMEDIATE")
            first = None
            try:
                if request_id is not None:
                    first = self._writer.execute(
                        "SELECT digest, stored FROM log_requests WHERE request_id = ?", (request_id,)
                    ).fetchone()
                if first is None:
                    self._insert(request_id, digest, records)
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            if first is not None:
                self._writer.execute("ROLLBACK")  # nothing was written
                return replay_of(request_id, first[0], digest, first[1])
            self._writer.execute("COMMIT")
        return LogWrite(len(records))

    def _insert(self, request_id: str | None, digest: bytes, records: list[tuple]) -> None:
        """Inside the write transaction: the request id (if any), then the rows."""
        if request_id is not None:
            self._writer.execute(
                "INSERT INTO log_requests (request_id, digest, stored, logged_at) VALUES (?, ?, ?, ?)",
                (request_id, digest, len(records), records[0][4]),
            )
        self._writer.executemany(
            "INSERT INTO interactions (user_id, item_id, rating, timestamp, logged_at) VALUES (?, ?, ?, ?, ?)",
            records,
        )

    def append(
        self,
        user_id: str,
        rows: Iterable[tuple[str, float, int | None]],
        now: float | None = None,
    ) -> int:
        """:meth:`write` without a request id; returns the number of rows stored."""
        return self.write(user_id, rows, now).stored

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
        frame = pd.DataFrame(rows, columns=list(EXPORT_DTYPES))
        return frame.astype(EXPORT_DTYPES)

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
