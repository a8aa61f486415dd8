"""The operator's summary of the pipeline, read from PostgreSQL alone.

The ledger (`chunks`, `source_files`, `pattern_detections`, `processing_logs`) already records when
each chunk was written and processed, so the summary needs no running daemon: the status page, the
`python main.py status` command and the webhook alerts all read the same numbers from here, and they
agree with the ledger because they are the ledger.
"""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from typing import Any

from config.config import Settings
from src import ledger

# The one place this package reaches the database module (it may move; only this import changes).
from src.utils.db import Database, connection_kwargs, describe_target  # noqa: F401

log = logging.getLogger(__name__)

WINDOW_MINUTES = 60  # charts cover the last hour, one point per minute
LATENCY_CHUNKS = 200  # latency percentiles over the most recently processed chunks
RECENT_ERRORS_MINUTES = 15  # ERROR lines this recent make `status` exit non-zero
QUARANTINE_MINUTES = 15  # the quarantine ratio the alert watches is over chunks written this recently
TABLE_LIMIT = 20
STATEMENT_TIMEOUT_MS = 10_000

_DETECTION_SERIES_SQL = f"""
SELECT date_trunc('minute', detection_time), pattern_id, count(*) FROM pattern_detections
WHERE detection_time >= date_trunc('minute', now()) - interval '{WINDOW_MINUTES - 1} minutes'
GROUP BY 1, 2 ORDER BY 1, 2
"""

_LAST_DETECTIONS_SQL = f"""
SELECT id, pattern_id, action_type, customer_name, merchant_id, detection_time, chunk_id
FROM pattern_detections ORDER BY id DESC LIMIT {TABLE_LIMIT}
"""
_DETECTION_KEYS = ("id", "pattern_id", "action_type", "customer_name", "merchant_id", "detection_time", "chunk_id")

_ERRORS_SQL = f"""
SELECT logged_at, component, event, file_id, chunk_id, message FROM processing_logs
WHERE level = 'ERROR' ORDER BY id DESC LIMIT {TABLE_LIMIT}
"""
_ERROR_KEYS = ("logged_at", "component", "event", "file_id", "chunk_id", "message")


def collect_status(settings: Settings) -> dict[str, Any]:
    """The whole summary, on a connection of its own (opened and closed here, one attempt: a status
    request must answer quickly, and says so when the database is down)."""
    db = Database(settings, attempts=1)
    try:
        return collect_from(db.conn)
    finally:
        db.close()


def collect_from(conn: Any) -> dict[str, Any]:
    """The summary from an open psycopg2 connection (or a `Database`), in one read-only snapshot so
    every number on the page comes from the same instant of the ledger."""
    conn = getattr(conn, "conn", conn)
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur.execute("SET LOCAL statement_timeout = %s", (STATEMENT_TIMEOUT_MS,))
            status = _collect(cur)
        conn.rollback()
    except BaseException:
        if not conn.closed:
            conn.rollback()
        raise
    finally:
        if not conn.closed:
            conn.autocommit = autocommit
    return status


def _collect(cur: Any) -> dict[str, Any]:
    cur.execute("SELECT now()")
    now = cur.fetchone()[0]
    totals = _totals(ledger.chunk_totals(cur))
    totals["detections"] = _one(cur, "SELECT count(*) FROM pattern_detections")[0]
    files = [_jsonable(f) for f in ledger.file_summaries(cur, attention_first=True, limit=TABLE_LIMIT * 5)]
    by_status = ledger.file_counts_by_status(cur)
    recent_errors = _one(
        cur,
        f"SELECT count(*) FROM processing_logs WHERE level = 'ERROR' "
        f"AND logged_at >= now() - interval '{RECENT_ERRORS_MINUTES} minutes'",
    )[0]
    status: dict[str, Any] = {
        "generated_at": _json(now),
        "window_minutes": WINDOW_MINUTES,
        "totals": {k: _json(v) for k, v in totals.items()},
        "files_by_status": by_status,
        "series": [_jsonable(p) for p in ledger.chunk_series(cur, WINDOW_MINUTES)],
        "latency": _latency(cur),
        "detections": _detections(cur),
        "files": files,
        "last_detections": _rows(cur, _LAST_DETECTIONS_SQL, _DETECTION_KEYS),
        "failures": {
            "recent_errors": recent_errors,
            "recent_errors_minutes": RECENT_ERRORS_MINUTES,
            "errors": _rows(cur, _ERRORS_SQL, _ERROR_KEYS),
            "failed_chunks": [_jsonable(c) for c in ledger.failed_chunks(cur, TABLE_LIMIT)],
        },
    }
    status["leadership"] = _leadership(ledger.leadership(cur))
    rows, bad = ledger.rows_written_since(cur, QUARANTINE_MINUTES)
    status["quarantine_recent"] = {"minutes": QUARANTINE_MINUTES, "rows": int(rows), "quarantined": int(bad)}
    status["waiting_for"] = _waiting_for(cur, status)
    status["problems"] = problems(status)
    return status


def _totals(t: ledger.ChunkTotals) -> dict[str, Any]:
    return {
        "chunks_written": t.written,
        "rows_ingested": t.rows_written,
        "rows_quarantined": t.rows_quarantined_written,
        "chunks_processed": t.processed,
        "rows_processed": t.rows_processed,
        "backlog_chunks": t.backlog,
        "pending_chunks": t.pending,
        "failed_chunks": t.failed,
        "seconds_since_last_processed": t.seconds_since_last_processed,
        "oldest_waiting_seconds": t.oldest_waiting_seconds,
    }


def _leadership(who: ledger.Leadership) -> dict[str, Any]:
    return {
        "y_leader": _jsonable(who.leader) if who.leader else None,
        "leases": [_jsonable(lease) for lease in who.leases],
        "lease_takeovers": who.takeovers,
    }


def _latency(cur: Any) -> dict[str, Any]:
    p50, p95, n = ledger.chunk_latency(cur, LATENCY_CHUNKS)
    return {"p50_seconds": _json(p50), "p95_seconds": _json(p95), "chunks": n, "over_last_chunks": LATENCY_CHUNKS}


def _detections(cur: Any) -> dict[str, Any]:
    totals = dict(_all(cur, "SELECT pattern_id, count(*) FROM pattern_detections GROUP BY 1 ORDER BY 1"))
    series = [{"t": _json(t), "pattern_id": p, "count": n} for t, p, n in _all(cur, _DETECTION_SERIES_SQL)]
    return {"by_pattern": totals, "series": series}


def _waiting_for(cur: Any, status: dict[str, Any]) -> list[str]:
    """What the daemon is waiting for, most blocking first, in the words an operator would use."""
    totals = status["totals"]
    out: list[str] = []
    pending = ledger.oldest_pending_chunk(cur)
    if pending:
        seq, name, chunk_seq, age = pending
        out.append(
            f"chunk {seq} ({name} #{chunk_seq}) is pending for {age:.0f}s: mechanism X has not released its "
            "object yet (writing it, or holding the first chunk until mechanism Y is warm); Y goes strictly in order"
        )
    backlog = totals["backlog_chunks"]
    if backlog:
        has_weights = bool(_all(cur, "SELECT 1 FROM importance_state WHERE id = 1"))
        if not has_weights:
            out.append(
                f"{backlog} chunk(s) wait for importance weights: no CustomerImportance file has been loaded yet"
            )
        else:
            out.append(
                f"mechanism Y has {backlog} chunk(s) to process (oldest written "
                f"{totals['oldest_waiting_seconds'] or 0:.0f}s ago)"
            )
    for f in status["files"]:
        if f["status"] == "ingesting":
            out.append(f"mechanism X is mid-file: {f['name']} ({f['lines_done']} lines read, {f['chunks']} chunk(s))")
    if not out:
        out.append("nothing to do: every file is ingested and every chunk processed; watching the source")
    return out


def problems(status: dict[str, Any]) -> list[str]:
    """What is failing now, one line each; empty when all is well (`status` then exits 0)."""
    out = []
    failed = [f for f in status["files"] if f["status"] in ("failed", "conflict")]
    for f in failed:
        out.append(f"file {f['name']} is {f['status']}: {f['reason'] or 'no reason recorded'}")
    n_failed_chunks = status["totals"]["failed_chunks"]
    if n_failed_chunks:
        out.append(f"{n_failed_chunks} chunk(s) failed (see the failed chunks table)")
    errors = status["failures"]["recent_errors"]
    if errors:
        out.append(f"{errors} ERROR line(s) in processing_logs in the last {RECENT_ERRORS_MINUTES} minutes")
    return out


def _one(cur: Any, sql: str) -> tuple:
    cur.execute(sql)
    return cur.fetchone() or ()


def _all(cur: Any, sql: str) -> list[tuple]:
    cur.execute(sql)
    return cur.fetchall()


def _rows(cur: Any, sql: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    return [_jsonable(dict(zip(keys, row))) for row in _all(cur, sql)]


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _json(v) for k, v in row.items()}


def _json(value: Any) -> Any:
    """JSON-ready values: UTC ISO-8601 times with Z, numbers as int/float."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value.isoformat(timespec="milliseconds") + "Z"
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value
