"""The ledger: every statement on `source_files` and `chunks`, for Mechanism X and Mechanism Y alike.

`source_files` holds one row per file seen in the source and how far it was ingested; `chunks` one row
per chunk, whose `seq` is the global order Y follows. The guarantees rest on how these rows move:

- X records a chunk (`record_chunk`) and the file's progress in one transaction *before* writing its
  object; the object is then written and the chunk marked `written` (`mark_chunk_written`). A crash in
  between leaves a `pending` chunk that X rebuilds from the same bytes (`pending_chunks`).
- Y marks a batch of chunks processed (`mark_batch_processed`) in the same transaction as its state and
  detections, tagged with the batch id, so a redo after a lost acknowledgement is recognised
  (`batch_committed`) instead of counted twice.
- What retrying cannot fix is counted per file and per chunk (`note_file_failure`, `note_chunk_failure`);
  after MAX_ATTEMPTS the item is marked `failed` with its last error and the worker goes on. A chunk X
  gives up on takes its rows back out of its file's counters, so the ledger never claims rows the lake
  lacks.

Functions taking a `cur` join the caller's transaction; those taking a `db` run their own (redone on a
new connection after a fault, so each is written to be harmless when redone).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg2.extensions

from src.errors import ProcessorError
from src.utils.db import CHUNK_CHANNEL, Database

log = logging.getLogger(__name__)
Cursor = psycopg2.extensions.cursor

FILE_COLUMNS = (
    "file_id",
    "name",
    "kind",
    "status",
    "checksum",
    "bytes_done",
    "next_line",
    "prefix_md5",
    "chunks",
    "conflict_checksum",
    "reason",
    "attempts",
)


# ---------------------------------------------------------------------------------------------- files


def file_records(db: Database) -> dict[str, dict[str, Any]]:
    """Every file's ledger row, by file id."""
    rows = db.query(f"SELECT {', '.join(FILE_COLUMNS)} FROM source_files")  # noqa: S608 - constant columns
    return {r[0]: dict(zip(FILE_COLUMNS, r)) for r in rows}


def start_file(db: Database, f: Any, *, source: str, kind: str) -> None:
    """Mark a file as being ingested (creating its row if new)."""
    db.execute(
        "INSERT INTO source_files (file_id, source, name, kind, status, size_bytes, modified_time) "
        "VALUES (%s, %s, %s, %s, 'ingesting', %s, %s) "
        "ON CONFLICT (file_id) DO UPDATE SET name = EXCLUDED.name, kind = EXCLUDED.kind, status = 'ingesting', "
        "size_bytes = EXCLUDED.size_bytes, modified_time = EXCLUDED.modified_time, reason = NULL, updated_at = now()",
        (f.file_id, source, f.name, kind, f.size, f.modified_time),
    )


def record_file_status(
    db: Database, f: Any, *, source: str, kind: str, status: str, reason: str | None, checksum: str | None
) -> None:
    """A terminal state for a file that is not ingested (ignored, failed)."""
    db.execute(
        "INSERT INTO source_files (file_id, source, name, kind, status, checksum, size_bytes, modified_time, reason) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (file_id) DO UPDATE SET name = EXCLUDED.name, "
        "kind = CASE WHEN source_files.lines_done > 0 THEN source_files.kind ELSE EXCLUDED.kind END, "
        "status = EXCLUDED.status, checksum = EXCLUDED.checksum, size_bytes = EXCLUDED.size_bytes, "
        "modified_time = EXCLUDED.modified_time, reason = EXCLUDED.reason, updated_at = now()",
        (f.file_id, source, f.name, kind, status, checksum, f.size, f.modified_time, reason),
    )


def restore_file_status(db: Database, file_id: str, status: str) -> None:
    """A file is back in the source with the content last recorded."""
    db.execute(
        "UPDATE source_files SET status = %s, conflict_checksum = NULL, "
        "reason = CASE WHEN %s = 'done' THEN NULL ELSE reason END, updated_at = now() WHERE file_id = %s",
        (status, status, file_id),
    )


def mark_file_deleted(db: Database, file_id: str) -> None:
    db.execute("UPDATE source_files SET status = 'deleted', updated_at = now() WHERE file_id = %s", (file_id,))


def record_conflict(db: Database, file_id: str, new_checksum: str, reason: str) -> tuple[int, int] | None:
    """Mark a file rewritten in place; (lines_done, bytes_done) the first time this content is seen, else None."""
    rows = db.query(
        "UPDATE source_files SET status = 'conflict', conflict_checksum = %s, updated_at = now(), reason = %s "
        "WHERE file_id = %s AND conflict_checksum IS DISTINCT FROM %s RETURNING lines_done, bytes_done",
        (new_checksum, reason, file_id, new_checksum),
    )
    return (rows[0][0], rows[0][1]) if rows else None


def finish_file(
    cur: Cursor, file_id: str, *, checksum: str, size: int, modified_time: datetime
) -> tuple[int, int, int]:
    """A transactions file is ingested to its end; returns (rows ingested, rows quarantined, chunks)."""
    cur.execute(
        "UPDATE source_files SET status = 'done', checksum = %s, size_bytes = %s, modified_time = %s, "
        "reason = NULL, conflict_checksum = NULL, attempts = 0, last_error = NULL, finished_at = now(), "
        "updated_at = now() WHERE file_id = %s RETURNING rows_ingested, rows_quarantined, chunks",
        (checksum, size, modified_time, file_id),
    )
    return cur.fetchone()


def finish_importance_file(
    cur: Cursor, file_id: str, *, checksum: str, size: int, modified_time: datetime, good: int, bad: int
) -> None:
    cur.execute(
        "UPDATE source_files SET status = 'done', checksum = %s, size_bytes = %s, modified_time = %s, "
        "rows_ingested = %s, rows_quarantined = %s, lines_done = %s, reason = NULL, attempts = 0, last_error = NULL, "
        "finished_at = now(), updated_at = now() WHERE file_id = %s",
        (checksum, size, modified_time, good, bad, good + bad, file_id),
    )


def note_file_failure(db: Database, f: Any, *, source: str, error: str, max_attempts: int) -> tuple[int, bool]:
    """Count one failed attempt at a file (an error retrying did not fix); mark it failed at `max_attempts`.

    Returns (attempts so far, failed now).
    """

    def fn(cur: Cursor) -> tuple[int, bool]:
        cur.execute(
            "INSERT INTO source_files (file_id, source, name, kind, status, size_bytes, modified_time, attempts, "
            "last_error) VALUES (%s, %s, %s, 'unknown', 'ingesting', %s, %s, 1, %s) "
            "ON CONFLICT (file_id) DO UPDATE SET attempts = source_files.attempts + 1, last_error = EXCLUDED.last_error, "
            "updated_at = now() RETURNING attempts",
            (f.file_id, source, f.name, f.size, f.modified_time, error),
        )
        attempts = cur.fetchone()[0]
        if attempts < max_attempts:
            return attempts, False
        cur.execute(
            "UPDATE source_files SET status = 'failed', checksum = %s, reason = %s, updated_at = now() "
            "WHERE file_id = %s",
            (f.checksum, f"gave up after {attempts} attempts: {error}", f.file_id),
        )
        return attempts, True

    return db.run(fn, what=f"count a failed attempt at file {f.file_id}")


def x_busy(db: Database) -> bool:
    """Is Mechanism X in the middle of a file (more chunks may come)?"""
    return bool(db.query("SELECT 1 FROM source_files WHERE status = 'ingesting' LIMIT 1"))


# ---------------------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class NewChunk:
    """What X knows about a chunk before its object is written."""

    file_id: str
    chunk_seq: int
    first_line: int
    last_line: int
    rows_total: int
    rows_valid: int
    rows_quarantined: int
    bytes_start: int
    bytes_end: int
    prefix_md5: str
    object_key: str
    ingest_date: date


def record_chunk(cur: Cursor, c: NewChunk) -> int | None:
    """Record a `pending` chunk and move its file's progress past it, in the caller's transaction.

    Returns its seq; None when this very chunk is already recorded (a redo after the commit went through
    but its acknowledgement was lost): then nothing is changed. A different chunk under the same
    (file, chunk_seq) is a conflict and raises.
    """
    cur.execute(
        "INSERT INTO chunks (file_id, chunk_seq, first_line, last_line, rows_total, rows_valid, rows_quarantined, "
        "bytes_start, bytes_end, prefix_md5, object_key, ingest_date, status) "
        "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'pending') ON CONFLICT (file_id, chunk_seq) DO NOTHING "
        "RETURNING seq",
        (
            c.file_id,
            c.chunk_seq,
            c.first_line,
            c.last_line,
            c.rows_total,
            c.rows_valid,
            c.rows_quarantined,
            c.bytes_start,
            c.bytes_end,
            c.prefix_md5,
            c.object_key,
            c.ingest_date,
        ),
    )
    row = cur.fetchone()
    if row is None:
        cur.execute(
            "SELECT seq, bytes_start, bytes_end, prefix_md5 FROM chunks WHERE file_id = %s AND chunk_seq = %s",
            (c.file_id, c.chunk_seq),
        )
        seq, b0, b1, md5 = cur.fetchone()
        if (b0, b1, md5) != (c.bytes_start, c.bytes_end, c.prefix_md5):
            raise ProcessorError(
                f"chunk {c.file_id}-{c.chunk_seq:06d} is already recorded for bytes {b0}-{b1}, not {c.bytes_start}-"
                f"{c.bytes_end}: the ledger and the file disagree"
            )
        return None
    cur.execute(
        "UPDATE source_files SET bytes_done = %s, next_line = %s, lines_done = lines_done + %s, "
        "rows_ingested = rows_ingested + %s, rows_quarantined = rows_quarantined + %s, chunks = chunks + 1, "
        "prefix_md5 = %s, updated_at = now() WHERE file_id = %s",
        (c.bytes_end, c.last_line + 1, c.rows_total, c.rows_valid, c.rows_quarantined, c.prefix_md5, c.file_id),
    )
    return row[0]


def chunk_seq_of(db: Database, file_id: str, chunk_seq: int) -> int:
    return db.query("SELECT seq FROM chunks WHERE file_id = %s AND chunk_seq = %s", (file_id, chunk_seq))[0][0]


def mark_chunk_written(db: Database, seq: int, content_md5: str) -> None:
    """The chunk's object is in the lake: Y may take it. Notifies Y in the same transaction."""

    def fn(cur: Cursor) -> None:
        # Losing this commit in a server crash is harmless: the chunk stays `pending` and recovery
        # rewrites the same bytes under the same key. So it need not wait for the WAL flush.
        cur.execute("SET LOCAL synchronous_commit = off")
        mark_written(cur, seq, content_md5)

    db.run(fn, what=f"mark chunk {seq} written")


def mark_written(cur: Cursor, seq: int, content_md5: str) -> None:
    """`mark_chunk_written` in the caller's transaction: X commits it with the next chunk's record."""
    cur.execute(
        "UPDATE chunks SET status = 'written', written_at = coalesce(written_at, clock_timestamp()), "
        "content_md5 = %s, attempts = 0, last_error = NULL WHERE seq = %s",
        (content_md5, seq),
    )
    cur.execute("SELECT pg_notify(%s, %s)", (CHUNK_CHANNEL, str(seq)))


@dataclass(frozen=True)
class PendingChunk:
    seq: int
    file_id: str
    chunk_seq: int
    start_line: int  # the line number at bytes_start (blank lines may precede the first row)
    bytes_start: int
    bytes_end: int
    prefix_md5: str
    object_key: str
    attempts: int


def pending_chunks(db: Database) -> list[PendingChunk]:
    """Chunks recorded but not confirmed written, in order."""
    rows = db.query(
        "SELECT c.seq, c.file_id, c.chunk_seq, COALESCE((SELECT p.last_line + 1 FROM chunks p "
        "WHERE p.file_id = c.file_id AND p.chunk_seq = c.chunk_seq - 1), 2), c.bytes_start, c.bytes_end, "
        "c.prefix_md5, c.object_key, c.attempts FROM chunks c WHERE c.status = 'pending' ORDER BY c.seq"
    )
    return [PendingChunk(*r) for r in rows]


def note_chunk_failure(db: Database, seq: int, *, error: str, max_attempts: int, by: str) -> tuple[int, bool]:
    """Count one failed attempt at a chunk; at `max_attempts` mark it failed (see `fail_chunk`).

    `by` is "x" (the chunk's object could not be written: its rows leave the file's counters) or "y".
    Returns (attempts so far, failed now).
    """

    def fn(cur: Cursor) -> tuple[int, bool]:
        cur.execute(
            "UPDATE chunks SET attempts = attempts + 1, last_error = %s WHERE seq = %s AND status <> 'failed' "
            "AND processed_at IS NULL RETURNING attempts",
            (error, seq),
        )
        row = cur.fetchone()
        if row is None:
            return 0, False
        if row[0] < max_attempts:
            return row[0], False
        fail_chunk(cur, seq, f"gave up after {row[0]} attempts: {error}", rollback_counters=(by == "x"))
        return row[0], True

    return db.run(fn, what=f"count a failed attempt at chunk {seq}")


def fail_chunk(cur: Cursor, seq: int, reason: str, *, rollback_counters: bool) -> None:
    """Mark a chunk failed for good. With `rollback_counters` (its object was never written), its rows are
    taken back out of its file's counters and the file's reason says which lines are missing."""
    cur.execute(
        "UPDATE chunks SET status = 'failed', last_error = %s WHERE seq = %s AND status <> 'failed' "
        "RETURNING file_id, first_line, last_line, rows_total, rows_valid, rows_quarantined",
        (reason, seq),
    )
    row = cur.fetchone()
    if row is None or not rollback_counters:
        return
    file_id, first, last, total, valid, quarantined = row
    cur.execute(
        "UPDATE source_files SET lines_done = lines_done - %s, rows_ingested = rows_ingested - %s, "
        "rows_quarantined = rows_quarantined - %s, reason = %s, updated_at = now() WHERE file_id = %s",
        (total, valid, quarantined, f"lines {first}-{last} could not be written to the lake: {reason}", file_id),
    )


@dataclass(frozen=True)
class ChunkRef:
    """A ledger row of a chunk Y is about to process."""

    seq: int
    file_id: str
    chunk_seq: int
    key: str
    first_line: int
    last_line: int
    written_at: datetime | None
    rows_total: int
    status: str
    attempts: int


def waiting_chunks(db: Database, limit: int) -> list[ChunkRef]:
    """The next unprocessed chunks in ledger order (pending ones included: a batch stops before them)."""
    rows = db.query(
        "SELECT seq, file_id, chunk_seq, object_key, first_line, last_line, written_at, rows_total, status, attempts "
        "FROM chunks WHERE processed_at IS NULL AND status <> 'failed' ORDER BY seq LIMIT %s",
        (limit,),
    )
    return [ChunkRef(*r) for r in rows]


@dataclass(frozen=True)
class ChunkMark:
    seq: int
    rows_clean: int
    rows_rejected: int
    new_detections: int


def mark_batch_processed(cur: Cursor, batch_id: str, marks: list[ChunkMark]) -> None:
    """Mark a batch's chunks processed, in the caller's (commit) transaction, with one clock reading.

    Guarded: a chunk already processed is never counted again; if any is, the whole transaction fails.
    """
    cur.execute(
        "WITH clock AS (SELECT clock_timestamp() AS ts) "
        "UPDATE chunks c SET processed_at = clock.ts, y_batch_id = %s, y_rows_clean = v.clean, "
        "y_rows_rejected = v.rejected, y_new_detections = v.new, attempts = 0, last_error = NULL "
        "FROM clock, unnest(%s::bigint[], %s::int[], %s::int[], %s::int[]) AS v(seq, clean, rejected, new) "
        "WHERE c.seq = v.seq AND c.processed_at IS NULL",
        (
            batch_id,
            [m.seq for m in marks],
            [m.rows_clean for m in marks],
            [m.rows_rejected for m in marks],
            [m.new_detections for m in marks],
        ),
    )
    if cur.rowcount != len(marks):
        raise ProcessorError(
            f"chunks {marks[0].seq}..{marks[-1].seq} were processed by someone else; refusing to count them twice"
        )


def batch_committed(db: Database, batch_id: str) -> bool:
    """Did the commit of this batch go through (its acknowledgement may have been lost with the connection)?"""
    return bool(db.query("SELECT 1 FROM chunks WHERE y_batch_id = %s LIMIT 1", (batch_id,)))


def fail_unreadable_chunk(cur: Cursor, seq: int, reason: str) -> None:
    """Y cannot read a chunk's object at all: it is failed (its rows never enter the state)."""
    fail_chunk(cur, seq, reason, rollback_counters=False)


def processed_totals(db: Database) -> tuple[int, int, int]:
    """(chunks processed, clean rows, rejected rows) over the whole ledger."""
    row = db.query(
        "SELECT count(*) FILTER (WHERE processed_at IS NOT NULL), coalesce(sum(y_rows_clean), 0), "
        "coalesce(sum(y_rows_rejected), 0) FROM chunks"
    )[0]
    return int(row[0]), int(row[1]), int(row[2])
