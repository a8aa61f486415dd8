"""PostgreSQL: the embedded server (pgserver) or the one named by POSTGRES_*, the schema, batched writes.

Every statement is parameterised; bulk rows go through COPY, never one INSERT per row.
"""

from __future__ import annotations

import io
import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from config.config import PROJECT_ROOT, Settings
from src.errors import ProcessorError, RetryableError
from src.utils.embedded_postgres import embedded_pgdata, start_embedded  # start_embedded: re-exported

log = logging.getLogger(__name__)

SCHEMA_FILES = ("postgres_setup.sql", "create_missing_tables.sql")
# Set by the supervisor for its children so they share the embedded server it started.
DSN_ENV = "TP_DATABASE_URL"


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """How to reach the database: the supervisor's embedded server, or POSTGRES_*."""
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        return {"dsn": dsn}
    if settings.embedded_postgres:
        return {"dsn": start_embedded(settings)}
    kwargs: dict[str, Any] = {
        "host": settings.postgres_host,
        "port": settings.postgres_port,
        "dbname": settings.postgres_db,
        "user": settings.postgres_user,
        "connect_timeout": 10,
        "application_name": "transaction-processor",
    }
    if settings.postgres_password:
        kwargs["password"] = settings.postgres_password.get()
    return kwargs


def describe_target(settings: Settings) -> str:
    if os.environ.get(DSN_ENV) or settings.embedded_postgres:
        return f"embedded PostgreSQL (pgserver) in {embedded_pgdata(settings)}"
    return f"PostgreSQL at {settings.postgres_host}:{settings.postgres_port}/{settings.postgres_db} as {settings.postgres_user}"


class Database:
    """One connection with retry on connect; callers use `transaction()` for atomic work."""

    def __init__(self, settings: Settings, *, attempts: int = 8, kwargs: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self._kwargs = kwargs or connection_kwargs(settings)
        self._attempts = attempts
        self._conn: psycopg2.extensions.connection | None = None

    @property
    def conn(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> psycopg2.extensions.connection:
        delay = 0.5
        for attempt in range(1, self._attempts + 1):
            try:
                conn = psycopg2.connect(**self._kwargs)
                conn.autocommit = False
                return conn
            except psycopg2.OperationalError as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if attempt == self._attempts:
                    raise RetryableError(
                        f"cannot connect to {describe_target(self.settings)} after {attempt} attempts: {reason}"
                    ) from None
                log.warning(
                    "waiting for %s (attempt %d/%d, retry in %.1fs): %s",
                    describe_target(self.settings),
                    attempt,
                    self._attempts,
                    delay,
                    reason,
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        conn = self.conn
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except BaseException:
            if not conn.closed:
                conn.rollback()
            raise

    def query(self, sql: str, params: Sequence[Any] | dict | None = None) -> list[tuple]:
        with self.transaction() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def execute(self, sql: str, params: Sequence[Any] | dict | None = None) -> None:
        with self.transaction() as cur:
            cur.execute(sql, params)

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

    def apply_schema(self) -> None:
        """Apply both setup scripts (idempotent). A lock keeps concurrent starters in line."""
        with self.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(7261001)")
            for name in SCHEMA_FILES:
                cur.execute((PROJECT_ROOT / "setup" / name).read_text(encoding="utf-8"))

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
        cur.copy_expert(
            f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT text)",
            buf,
        )
    return count


def copy_csv(cur: psycopg2.extensions.cursor, table: str, columns: Sequence[str], data: bytes | io.BytesIO) -> None:
    """COPY a CSV payload with a header row (as written by pyarrow.csv) into `table`."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    cur.copy_expert(
        f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, HEADER true)",
        stream,
    )


def _copy_text(value: Any) -> str:
    if value is None:
        return r"\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError, RetryableError))


__all__ = [
    "Database",
    "ProcessorError",
    "connection_kwargs",
    "copy_csv",
    "copy_rows",
    "describe_target",
    "start_embedded",
    "is_transient",
]
