"""PostgreSQL: how to reach it, one connection that survives a server restart, LISTEN/NOTIFY, bulk COPY.

The embedded server (pgserver) or the one named by POSTGRES_* / TP_DATABASE_URL. Every unit of work
goes through `Database.run(fn)`: `fn(cursor)` runs in one transaction and, when the connection is cut
(a restart, a failover, a network blip), the connection is rebuilt and `fn` is run again from the
start — so `fn` must be a complete transaction whose redo is harmless (the ledger's statements are
written that way). Hooks registered with `on_connect` run on every new connection: Mechanism Y takes
its advisory lock there, so a reconnect re-takes it. Every statement is parameterised; bulk rows go
through COPY, never one INSERT per row.
"""

from __future__ import annotations

import io
import logging
import os
import select
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from config.config import Settings
from src.errors import ProcessorError, SettingsError, is_retryable
from src.packaging import project_file
from src.utils.retry import brief, call_with_retry

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_FILES = ("setup/postgres_setup.sql", "setup/create_missing_tables.sql")  # read by `project_file`: zip too
# Set by the supervisor for its children so they share the embedded server it started; a user may set it
# to any libpq URL instead of POSTGRES_*.
DSN_ENV = "TP_DATABASE_URL"
# Mechanism X notifies this channel when a chunk is written (payload: its seq) or importance is loaded.
CHUNK_CHANNEL = "chunk_written"
SCHEMA_LOCK = 7261001
# Connection errors that waiting will not fix: they name a setting to change.
_PERMANENT_CONNECT = (
    ("password authentication failed", "POSTGRES_USER/POSTGRES_PASSWORD are refused by the server"),
    ("no password supplied", "the server wants a password: set POSTGRES_PASSWORD"),
    ("does not exist", "set POSTGRES_DB/POSTGRES_USER to a database and role that exist"),
    ("no pg_hba.conf entry", "the server's pg_hba.conf refuses this host/user: allow it or change POSTGRES_*"),
)


def start_embedded(settings: Settings) -> str:
    """Start (or attach to) the embedded server under DATA_DIR and return its URI."""
    from src.utils.embedded_postgres import start_embedded as start

    return start(settings)


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """How to reach the database (TP_DATABASE_URL, the embedded server, or POSTGRES_*), with keepalives
    and timeouts so a half-open connection to a remote server is noticed in seconds, not minutes."""
    common: dict[str, Any] = {
        "connect_timeout": settings.postgres_connect_timeout,
        "application_name": "transaction-processor",
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "options": f"-c statement_timeout={settings.postgres_statement_timeout * 1000}",
    }
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        return {"dsn": dsn, **common}
    if settings.embedded_postgres:
        return {"dsn": start_embedded(settings), **common}
    kwargs = {
        "host": settings.postgres_host,
        "port": settings.postgres_port,
        "dbname": settings.postgres_db,
        "user": settings.postgres_user,
        **common,
    }
    if settings.postgres_password:
        kwargs["password"] = settings.postgres_password.get_secret_value()
    return kwargs


def describe_target(settings: Settings) -> str:
    """Where the database is, for logs: never a password."""
    dsn = os.environ.get(DSN_ENV)
    if dsn and not settings.embedded_postgres:
        return f"PostgreSQL from {DSN_ENV} ({_dsn_location(dsn)})"
    if settings.embedded_postgres:
        from src.utils.embedded_postgres import embedded_pgdata

        return f"embedded PostgreSQL (pgserver) in {embedded_pgdata(settings)}"
    return (
        f"PostgreSQL at {settings.postgres_host}:{settings.postgres_port}/{settings.postgres_db} "
        f"as {settings.postgres_user} (POSTGRES_HOST/POSTGRES_PORT)"
    )


def _dsn_location(dsn: str) -> str:
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "a libpq connection string"
    host = parts.hostname or "local socket"
    return f"{host}:{parts.port or 5432}{parts.path or ''}"


LOCK_POLL_SECONDS = 1.0  # default of `hold_lock`'s poll (Mechanism Y passes Y_STANDBY_POLL_SECONDS)


class Database:
    """One connection to PostgreSQL, rebuilt with backoff whenever it is lost; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        stop: threading.Event | None = None,
        kwargs: dict[str, Any] | None = None,
        attempts: int | None = None,
    ) -> None:
        """`attempts`: give up after this many tries (a probe, a status read); None waits as long as it takes."""
        self.settings = settings
        self.stop = stop
        self.attempts = attempts
        self._kwargs = kwargs or connection_kwargs(settings)
        self._conn: psycopg2.extensions.connection | None = None
        self._hooks: list[Callable[[psycopg2.extensions.connection], None]] = []
        self.target = describe_target(settings)

    # ------------------------------------------------------------ connections

    def connect(self, *, autocommit: bool = False) -> psycopg2.extensions.connection:
        """A new connection, waiting for the server for as long as it is down (or until stop)."""

        def attempt() -> psycopg2.extensions.connection:
            try:
                conn = psycopg2.connect(**self._kwargs)
            except psycopg2.OperationalError as exc:
                _raise_if_permanent(exc, self.target)
                raise
            conn.autocommit = autocommit
            return conn

        return call_with_retry(
            attempt, dependency="PostgreSQL", what="connect", target=self.target, stop=self.stop, attempts=self.attempts
        )

    def on_connect(self, hook: Callable[[psycopg2.extensions.connection], None]) -> None:
        """Run `hook(conn)` now (if connected) and on every new connection."""
        self._hooks.append(hook)
        if self._conn is not None and not self._conn.closed:
            hook(self._conn)

    @property
    def conn(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            conn = self.connect()
            for hook in self._hooks:
                hook(conn)
            self._conn = conn
        return self._conn

    def reset(self) -> None:
        """Drop the connection (after a fault); the next use reconnects."""
        _close_quietly(self._conn)
        self._conn = None

    def close(self) -> None:
        self.reset()

    # ------------------------------------------------------------ units of work

    def run(self, fn: Callable[[psycopg2.extensions.cursor], T], *, what: str = "transaction") -> T:
        """`fn(cur)` in one transaction; redone from the start on a new connection if the server goes away."""

        def attempt() -> T:
            try:
                with self.transaction() as cur:
                    return fn(cur)
            except BaseException as exc:
                if is_retryable(exc):
                    self.reset()
                raise

        return call_with_retry(
            attempt, dependency="PostgreSQL", what=what, target=self.target, stop=self.stop, attempts=self.attempts
        )

    @contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        """One transaction on the current connection, without redo: prefer `run` for anything that matters."""
        conn = self.conn
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except BaseException:
            if not conn.closed:
                try:
                    conn.rollback()
                except psycopg2.Error:
                    self.reset()
            raise

    def query(self, sql: str, params: Sequence[Any] | dict | None = None) -> list[tuple]:
        def fn(cur: psycopg2.extensions.cursor) -> list[tuple]:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

        return self.run(fn, what="query")

    def execute(self, sql: str, params: Sequence[Any] | dict | None = None) -> None:
        self.run(lambda cur: cur.execute(sql, params), what="statement")

    def apply_schema(self) -> None:
        """Apply both setup scripts (idempotent). A lock keeps concurrent starters in line."""

        def fn(cur: psycopg2.extensions.cursor) -> None:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for name in SCHEMA_FILES:
                cur.execute(project_file(name).decode("utf-8"))

        self.run(fn, what="apply the schema")

    def log_event(
        self,
        component: str,
        level: str,
        event: str,
        message: str,
        *,
        file_id: str | None = None,
        chunk_id: int | None = None,
        row_count: int | None = None,
        cur: psycopg2.extensions.cursor | None = None,
    ) -> None:
        """Record an event in processing_logs (inside the caller's transaction when `cur` is given)."""
        sql = (
            "INSERT INTO processing_logs (component, level, event, file_id, chunk_id, row_count, message) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)"
        )
        params = (component, level, event, file_id, chunk_id, row_count, message)
        if cur is not None:
            cur.execute(sql, params)
        else:
            self.execute(sql, params)

    # ------------------------------------------------------------ advisory locks

    def hold_lock(
        self,
        key: int,
        *,
        who: str,
        wait: bool = True,
        while_waiting: Callable[[psycopg2.extensions.connection], None] | None = None,
        on_taken: Callable[[psycopg2.extensions.connection, bool], None] | None = None,
        poll: float = LOCK_POLL_SECONDS,
    ) -> None:
        """Hold session advisory lock `key` on this connection, now and after every reconnect.

        With `wait`, poll every `poll` seconds while another process holds it — a standby waiting for the
        active one (`while_waiting(conn)` runs at each poll: it may raise to give up); without, raise LockHeld
        at once. `on_taken(conn, first)` runs once the lock is held. After a reconnect the lock is taken again
        without waiting: if another process took it while the connection was down, LockLost is raised (the
        holder's work in memory may be stale; it must start again), and `on_taken(conn, False)` may raise it too.
        """
        first = True

        def take(conn: psycopg2.extensions.connection) -> None:
            nonlocal first
            waited = _wait_for_lock(
                conn, key, who, wait=wait and first, while_waiting=while_waiting, stop=self.stop, poll=poll
            )
            if waited is None and first:
                raise LockHeld(f"another {who} is already running against this database; stop it first")
            if waited is None:
                raise LockLost(f"another {who} took the lock while this one's connection was down; starting again")
            if on_taken is not None:
                on_taken(conn, first)
            conn.commit()
            first = False

        self.on_connect(take)
        self.conn  # noqa: B018 - connect now, so the lock is held before any work

    @contextmanager
    def session_lock(self, key: int) -> Iterator[None]:
        """Hold advisory lock `key` (waiting for it) around a block that does I/O elsewhere, outside any
        transaction. A connection lost meanwhile loses the lock: use it where a block run unguarded is harmless
        (a file rewritten from the database, say)."""
        self.run(lambda cur: cur.execute("SELECT pg_advisory_lock(%s)", (key,)), what="take an advisory lock")
        try:
            yield
        finally:
            try:
                with self.transaction() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg2.Error as exc:  # the connection went, and the lock with it
                log.debug("advisory lock %d not released: %s", key, brief(exc))
                self.reset()


def _wait_for_lock(
    conn: psycopg2.extensions.connection,
    key: int,
    who: str,
    *,
    wait: bool,
    while_waiting: Callable[[psycopg2.extensions.connection], None] | None,
    stop: threading.Event | None,
    poll: float = LOCK_POLL_SECONDS,
) -> float | None:
    """Take advisory lock `key` on `conn`; returns the seconds waited, None when it is held and `wait` is off."""
    t0 = time.monotonic()
    announced = False
    while True:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            got = cur.fetchone()[0]
        conn.commit()
        if got:
            waited = time.monotonic() - t0
            if announced:
                log.warning(
                    "%s: the lock is free (its holder stopped); taking over after %.1f s as standby",
                    who,
                    waited,
                    extra={"event": "standby_takeover"},
                )
            return waited
        if not wait:
            return None
        if not announced:
            log.warning(
                "another %s holds the lock on this database; standing by until it stops",
                who,
                extra={"event": "standby_waiting"},
            )
            announced = True
        if while_waiting is not None:
            while_waiting(conn)
        if (stop or threading.Event()).wait(poll):
            raise LockHeld(f"stopped while waiting for another {who} to stop")


class LockHeld(ProcessorError):
    """Another process holds the advisory lock this one needs."""


class LockLost(ProcessorError):
    """This process held an advisory lock, lost it with its connection, and another process took it."""


def _raise_if_permanent(exc: psycopg2.OperationalError, target: str) -> None:
    text = str(exc).lower()
    for needle, advice in _PERMANENT_CONNECT:
        if needle in text:
            raise SettingsError(f"cannot connect to {target}: {brief(exc)} ({advice})") from None


class Listener:
    """LISTEN on a channel over its own autocommit connection, re-established after a fault."""

    def __init__(self, db: Database, channel: str) -> None:
        self.db = db
        self.channel = channel
        self._conn: psycopg2.extensions.connection | None = None

    def _ensure(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            conn = self.db.connect(autocommit=True)
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {psycopg2.extensions.quote_ident(self.channel, cur)}")
            self._conn = conn
        return self._conn

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Wait up to `timeout` s for a notification; True if one came (or the connection was rebuilt, which
        may have missed one: the caller looks at the ledger either way)."""
        try:
            conn = self._ensure()
            ready, _, _ = select.select([conn], [], [], max(0.0, timeout))
            if ready:
                conn.poll()
                if conn.notifies:
                    conn.notifies.clear()
                    return True
            return False
        except (psycopg2.Error, OSError) as exc:
            if not is_retryable(exc):
                raise
            log.warning("lost the LISTEN connection (%s); reconnecting", brief(exc), extra={"event": "listen_lost"})
            self.close()
            stop.wait(min(timeout, 1.0))
            return True

    def close(self) -> None:
        _close_quietly(self._conn)
        self._conn = None


def _close_quietly(conn: psycopg2.extensions.connection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass


def copy_rows(
    cur: psycopg2.extensions.cursor, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> int:
    """COPY rows (Python values) into `table` in one round trip; returns the row count."""
    buf = io.StringIO()
    count = 0
    for row in rows:
        buf.write("\t".join(_copy_text(v) for v in row))
        buf.write("\n")
        count += 1
    if count:
        buf.seek(0)
        cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT text)", buf)
    return count


COPY_PIECE = 1 << 20  # bytes handed to COPY per read of its payload


def copy_csv(cur: psycopg2.extensions.cursor, table: str, columns: Sequence[str], data: bytes | io.IOBase) -> None:
    """COPY a CSV payload with a header row (as written by pyarrow.csv) into `table`."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    # Read in large pieces: each piece is a trip through Python (and the GIL) for psycopg2's COPY loop.
    sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, HEADER true)"
    cur.copy_expert(sql, stream, size=COPY_PIECE)


def _copy_text(value: Any) -> str:
    if value is None:
        return r"\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    # PostgreSQL text cannot hold NUL: it is kept visible as the four characters \x00 instead.
    text = str(value).replace("\x00", "\\x00")
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


__all__ = [
    "CHUNK_CHANNEL",
    "DSN_ENV",
    "Database",
    "Listener",
    "LockHeld",
    "LockLost",
    "connection_kwargs",
    "copy_csv",
    "copy_rows",
    "describe_target",
    "start_embedded",
]
