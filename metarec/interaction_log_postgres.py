"""The interaction log in PostgreSQL: one log that several server replicas share.

The same interface and the same guarantees as the embedded SQLite store
(:class:`metarec.interaction_log.InteractionLog`): ``write`` returns only after its transaction
has committed, with ``synchronous_commit=on`` set for the session (PostgreSQL flushes the
write-ahead log to disk before the commit returns), so an acknowledged row survives a killed
server process and a killed database server; request ids make a retried call store nothing new.

Several ``metarec serve`` processes, on one host or many, write to and read from the same
database: a user's interactions logged through any replica serve ``Recommend`` by user id on
every replica, and ``metarec retrain --logs postgresql://...`` reads them all.

Tables (created when missing, under an advisory lock so that replicas starting together do not
race): ``metarec_interactions`` (the rows, the same columns as SQLite's ``interactions``) and
``metarec_log_requests`` (request ids). They live in the connection's default schema; choose
another with ``?options=-csearch_path%3Dmyschema`` in the URL.

Connections: one writer connection under a lock (a transaction at a time, as in SQLite) and
one reader connection per thread, all in autocommit mode (reads see every committed row). A
connection that broke (the database restarted) is replaced on next use; the call that met the
break raises ``ConnectionError`` (the service answers ``UNAVAILABLE``) and may be retried.

Needs the ``psycopg`` driver (version 3): ``pip install 'metarec[postgres]'``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from metarec.interaction_log import (
    EXPORT_DTYPES,
    LoggedInteraction,
    LogWrite,
    prepare_rows,
    replay_of,
)

try:
    import psycopg
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "a postgresql:// interaction log needs the psycopg driver: pip install 'metarec[postgres]'"
    ) from error

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metarec_interactions (
    seq        BIGSERIAL        PRIMARY KEY,
    user_id    TEXT             NOT NULL,
    item_id    TEXT             NOT NULL,
    rating     DOUBLE PRECISION NOT NULL,
    timestamp  BIGINT           NOT NULL,
    logged_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS metarec_interactions_by_user
    ON metarec_interactions (user_id, timestamp, seq);
CREATE TABLE IF NOT EXISTS metarec_log_requests (
    request_id TEXT             PRIMARY KEY,
    digest     BYTEA            NOT NULL,
    stored     BIGINT           NOT NULL,
    logged_at  DOUBLE PRECISION NOT NULL
);
"""

#: Key of the advisory lock held while the tables are created ("metarec" in ASCII).
_SCHEMA_LOCK = 0x6D6574617265


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for log lines and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


class PostgresInteractionLog:
    """Append-only store of (user, item, rating, timestamp) rows in a PostgreSQL database.

    Args:
        url: ``postgresql://user@host:port/dbname`` (any libpq connection URL; passwords
            preferably from ``PGPASSWORD`` or ``~/.pgpass``).
        connect_timeout_s: how long opening a connection may take.

    Raises:
        ConnectionError: the database cannot be reached (the message names the URL,
            password redacted); later calls raise it too while the database is away.
    """

    def __init__(self, url: str, connect_timeout_s: float = 10.0) -> None:
        self.url = url
        self.location = redact(url)
        self._connect_timeout_s = max(1, int(round(connect_timeout_s)))
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[psycopg.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._writer = self._connect()
        with self._reachable(), self._writer.transaction():
            self._writer.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            self._writer.execute(_SCHEMA)

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn a lost or refused connection into ``ConnectionError`` naming the log."""
        try:
            yield
        except psycopg.OperationalError as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConnectionError(f"interaction log {self.location} unavailable: {message}") from None

    def _connect(self) -> psycopg.Connection:
        with self._reachable():
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout_s)
            # Commit only once the write-ahead log is on disk, whatever the server's default.
            conn.execute("SET synchronous_commit TO on")
        return conn

    def _live_writer(self) -> psycopg.Connection:
        if self._closed:
            raise RuntimeError("interaction log is closed")
        if self._writer.closed or self._writer.broken:
            self._writer = self._connect()
        return self._writer

    def _reader(self) -> psycopg.Connection:
        if self._closed:
            raise RuntimeError("interaction log is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
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
                and contents stores nothing.

        Returns:
            The :class:`~metarec.interaction_log.LogWrite`, once the rows are committed.

        Raises:
            ValueError: an empty user id, empty item ids or non-finite ratings (nothing is
                stored), or a request id used before for other contents
                (:class:`~metarec.interaction_log.RequestIdConflictError`).
        """
        records, digest = prepare_rows(user_id, rows, now)
        if not records:
            return LogWrite(0)
        with self._write_lock, self._reachable():
            conn = self._live_writer()
            with conn.transaction():
                if request_id is not None:
                    # A concurrent call with the same id waits here until the first commits.
                    claimed = conn.execute(
                        "INSERT INTO metarec_log_requests (request_id, digest, stored, logged_at) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT (request_id) DO NOTHING",
                        (request_id, digest, len(records), records[0][4]),
                    ).rowcount
                    if claimed == 0:
                        first = conn.execute(
                            "SELECT digest, stored FROM metarec_log_requests WHERE request_id = %s",
                            (request_id,),
                        ).fetchone()
                        return replay_of(request_id, first[0], digest, first[1])
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO metarec_interactions (user_id, item_id, rating, timestamp, logged_at) "
                        "VALUES (%s, %s, %s, %s, %s)",
                        records,
                    )
        return LogWrite(len(records))

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
        with self._reachable():
            return self._user_interactions(user_id, limit)

    def _user_interactions(self, user_id: str, limit: int | None) -> list[LoggedInteraction]:
        conn = self._reader()
        if limit is None:
            rows = conn.execute(
                "SELECT item_id, rating, timestamp FROM metarec_interactions WHERE user_id = %s "
                "ORDER BY timestamp, seq",
                (user_id,),
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT item_id, rating, timestamp FROM metarec_interactions WHERE user_id = %s "
                "ORDER BY timestamp DESC, seq DESC LIMIT %s",
                (user_id, int(limit)),
            ).fetchall()[::-1]
        return [LoggedInteraction(item, float(rating), int(ts)) for item, rating, ts in rows]

    def count(self) -> int:
        """Number of stored rows."""
        with self._reachable():
            return int(self._reader().execute("SELECT COUNT(*) FROM metarec_interactions").fetchone()[0])

    def to_pandas(self, since: float | None = None, users: Sequence[str] | None = None):
        """Export rows for retraining as a DataFrame (the SQLite store's columns and order).

        Args:
            since: keep rows logged at or after this time (seconds since the epoch).
            users: keep these users only.

        Returns:
            Columns ``user_id``, ``item_id`` (strings), ``rating``, ``timestamp``,
            ``logged_at``, in log order.
        """
        import pandas as pd  # only the export needs pandas

        clauses, params = [], []
        if since is not None:
            clauses.append("logged_at >= %s")
            params.append(float(since))
        if users is not None:
            clauses.append("user_id = ANY(%s)")
            params.append([str(u) for u in users])
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._reachable():
            rows = (
                self._reader()
                .execute(
                    "SELECT user_id, item_id, rating, timestamp, logged_at FROM metarec_interactions"
                    f"{where} ORDER BY seq",
                    params,
                )
                .fetchall()
            )
        return pd.DataFrame(rows, columns=list(EXPORT_DTYPES)).astype(EXPORT_DTYPES)

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

    def __enter__(self) -> PostgresInteractionLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
