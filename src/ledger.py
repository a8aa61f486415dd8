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

With several daemons on one database, each file is leased to one X at a time (`claim_file`, `fence_file`,
`renew_leases`, `release_file`) and Y's leader is recorded beside its advisory lock (`take_leadership`).
X also stages each chunk's rows in `staged_rows` between its record and its release (`stage_chunk`, on a
connection of its own), and Y's commit publishes them into `transactions` and `y_state` (`publish_staged`).

The operator's views (the status page and command, the metrics, the quality report, X's processing log)
read through the functions at the end of this module (`file_summaries`, `chunk_totals`, ...).

Functions taking a `cur` join the caller's transaction; those taking a `db` run their own (redone on a
new connection after a fault, so each is written to be harmless when redone).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Protocol

import psycopg2.extensions

from src.errors import ProcessorError
from src.utils.db import CHUNK_CHANNEL, Database, copy_csv

if TYPE_CHECKING:
    import pyarrow as pa

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


def file_records(db: Database, file_id: str | None = None) -> dict[str, dict[str, Any]]:
    """Every file's ledger row (or only `file_id`'s), by file id."""
    rows = db.query(
        f"SELECT {', '.join(FILE_COLUMNS)} FROM source_files WHERE %s::text IS NULL OR file_id = %s",  # noqa: S608 - constant columns
        (file_id, file_id),
    )
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


def mark_file_deleted(db: Database, file_id: str) -> bool:
    """Mark a file gone from the source; False when it already was (another X saw it first)."""
    rows = db.query(
        "UPDATE source_files SET status = 'deleted', updated_at = now() WHERE file_id = %s AND status <> 'deleted' "
        "RETURNING 1",
        (file_id,),
    )
    return bool(rows)


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


def pending_chunks(db: Database, file_id: str | None = None) -> list[PendingChunk]:
    """Chunks recorded but not confirmed written, in order (only those of `file_id` when given)."""
    rows = db.query(
        "SELECT c.seq, c.file_id, c.chunk_seq, COALESCE((SELECT p.last_line + 1 FROM chunks p "
        "WHERE p.file_id = c.file_id AND p.chunk_seq = c.chunk_seq - 1), 2), c.bytes_start, c.bytes_end, "
        "c.prefix_md5, c.object_key, c.attempts FROM chunks c WHERE c.status = 'pending' "
        "AND (%s::text IS NULL OR c.file_id = %s) ORDER BY c.seq",
        (file_id, file_id),
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
    cur.execute("DELETE FROM staged_rows WHERE seq = %s", (seq,))  # rows of a chunk no Y will publish
    if row is None or not rollback_counters:
        return
    file_id, first, last, total, valid, quarantined = row
    cur.execute(
        "UPDATE source_files SET lines_done = lines_done - %s, rows_ingested = rows_ingested - %s, "
        "rows_quarantined = rows_quarantined - %s, reason = %s, updated_at = now() WHERE file_id = %s",
        (total, valid, quarantined, f"lines {first}-{last} could not be written to the lake: {reason}", file_id),
    )


# ---------------------------------------------------------------------------------------------- staged rows
# X stages a chunk's rows after its ledger record and before its release (`stage_chunk`); Y's commit publishes
# them (`publish_staged`). Neither worker's driver ever carries rows to the other: only the chunk's seq and counts.

# Chunk column (Arrow) -> `transactions` / `staged_rows` column (PostgreSQL).
TRANSACTION_COLUMNS = {
    "source_file_id": "source_file_id",
    "source_line": "source_line",
    "chunk_seq": "chunk_seq",
    "step": "step",
    "customer": "customer",
    "age": "age",
    "gender": "gender",
    "zipcodeOri": "zipcode_ori",
    "merchant": "merchant",
    "zipMerchant": "zip_merchant",
    "category": "category",
    "amount": "amount",
    "fraud": "fraud",
}


# The lineage columns every row of a chunk shares: `staged_rows` fills them from the chunk's ledger row.
_CHUNK_CONSTANT = ("source_file_id", "chunk_seq")
_STAGED_COLUMNS = [c for c in TRANSACTION_COLUMNS if c not in _CHUNK_CONSTANT]


def staging_payload(good: pa.Table) -> bytes:
    """A chunk's good rows as the CSV payload of `stage_rows` (built off X's hot path, in its parse thread),
    without the columns the whole chunk shares. Strings are quoted, so an empty one stays empty, not NULL."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = good.select(_STAGED_COLUMNS).rename_columns([TRANSACTION_COLUMNS[c] for c in _STAGED_COLUMNS])
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    return sink.getvalue().to_pybytes()


# Sets what `staged_rows` fills in itself (the chunk's seq, file and chunk_seq) from the chunk's ledger row.
_STAGING_SETTINGS = (
    "set_config('tp.staged_seq', seq::text, true), set_config('tp.staged_file', file_id, true), "
    "set_config('tp.staged_chunk', chunk_seq::text, true)"
)


def stage_rows(cur: Cursor, seq: int, payload: bytes) -> None:
    """Add `payload` (`staging_payload`) to the staged rows of recorded chunk `seq` in the caller's transaction
    (X goes through `stage_chunk`, which replaces them)."""
    cur.execute(f"SELECT {_STAGING_SETTINGS} FROM chunks WHERE seq = %s", (seq,))  # noqa: S608 - constant
    if cur.fetchone() is None:
        raise ProcessorError(f"chunk {seq} is not in the ledger: its rows cannot be staged")
    _copy_staged(cur, payload)


def _copy_staged(cur: Cursor, payload: bytes) -> None:
    copy_csv(cur, "staged_rows", [TRANSACTION_COLUMNS[c] for c in _STAGED_COLUMNS], payload)


def stage_chunk(cur: Cursor, seq: int, payload: bytes) -> bool:
    """Stage the rows of chunk `seq` (`staging_payload`) in the caller's transaction, replacing any a previous
    attempt staged; False (nothing staged) when the chunk is no longer `pending`.

    X commits it after recording the chunk and before marking it written, so Y never sees a written chunk
    whose staging is half done: it has all its rows staged or none (a crash in between, or a server crash,
    which empties the unlogged table), and without them Y loads the chunk from its object. The chunk's row
    stays locked until the commit, so two stagers of one chunk (an X rebuilding it after a takeover, the X
    that lost it) go one after the other, and one that comes after the chunk was written or failed leaves it.
    Only the unlogged table is written, so the commit need not wait for the WAL flush (`synchronous_commit`
    off for this transaction alone): a server crash loses the staged rows either way.
    """
    cur.execute(
        f"SELECT status, {_STAGING_SETTINGS}, set_config('synchronous_commit', 'off', true) "  # noqa: S608 - constant
        "FROM chunks WHERE seq = %s FOR NO KEY UPDATE",
        (seq,),
    )
    row = cur.fetchone()
    if row is None or row[0] != "pending":
        return False
    cur.execute("DELETE FROM staged_rows WHERE seq = %s", (seq,))
    _copy_staged(cur, payload)
    return True


def staged_chunks(db: Database, seqs: list[int]) -> set[int]:
    """Which of these chunks have their rows staged: those with staged rows (an index probe each, the rows are
    not read), and those without a row to stage."""
    rows = db.query(
        "SELECT s FROM unnest(%s::bigint[]) AS s WHERE EXISTS (SELECT 1 FROM staged_rows r WHERE r.seq = s) "
        "OR EXISTS (SELECT 1 FROM chunks c WHERE c.seq = s AND c.rows_valid = 0)",
        (seqs,),
    )
    return {r[0] for r in rows}


# Y's commit publishes a batch's staged rows in ONE round trip of plain statements, each reading the staging by its
# index on `seq`: a single statement of data-modifying CTEs (DELETE ... RETURNING * feeding the INSERTs) held every
# row twice in tuplestores that spilled to temporary files, ~10 ms of a 10,000-row chunk's ~70 ms of server CPU (the
# rest is `transactions`' heap and its three indexes: see bench/README.md, "ycommit"). `work_mem` for this
# transaction alone keeps the fold's grouping of up to MAX_BATCH_ROWS rows in memory.
_STAGED_OF_BATCH = "staged_rows WHERE seq = ANY(%(seqs)s::bigint[])"
_PUBLISH_SQL = f"""
SET LOCAL work_mem = '64MB';
{{drop_rejected}}
INSERT INTO transactions ({", ".join(TRANSACTION_COLUMNS.values())})
SELECT {", ".join(TRANSACTION_COLUMNS.values())} FROM {_STAGED_OF_BATCH};
INSERT INTO y_state (merchant, customer, n, amount_sum, has_f, has_m)
SELECT merchant, customer, count(*), sum(amount), bool_or(gender = 'F'), bool_or(gender = 'M')
FROM {_STAGED_OF_BATCH} GROUP BY merchant, customer
ON CONFLICT (merchant, customer) DO UPDATE SET
    n = y_state.n + EXCLUDED.n, amount_sum = y_state.amount_sum + EXCLUDED.amount_sum,
    has_f = y_state.has_f OR EXCLUDED.has_f, has_m = y_state.has_m OR EXCLUDED.has_m;
WITH gone AS (DELETE FROM {_STAGED_OF_BATCH} RETURNING seq, amount)
SELECT seq, count(*), sum(amount) FROM gone GROUP BY seq
"""  # noqa: S608 - constant column names
_DROP_REJECTED = (
    "DELETE FROM staged_rows s USING unnest(%(r_seq)s::bigint[], %(r_line)s::bigint[]) AS r(seq, line) "
    "WHERE s.seq = r.seq AND s.source_line = r.line;"
)


def publish_staged(cur: Cursor, seqs: list[int], rejected: list[tuple[int, int]]) -> dict[int, tuple[int, Any]]:
    """In Y's commit transaction: move chunks `seqs`' staged rows into `transactions`, except the `rejected`
    (seq, source_line), fold the same rows into `y_state`, and empty their staging. Returns {seq: (rows
    published, sum of their amounts)} for the caller to check against what Spark read from the objects.

    The rejected rows leave the staging first, so the statements after read the published rows alone; the
    caller's transaction locked the chunks' rows (`mark_batch_processed`), and X stages only `pending` chunks, so
    no other session changes these staged rows between the statements."""
    sql = _PUBLISH_SQL.format(drop_rejected=_DROP_REJECTED if rejected else "")
    cur.execute(sql, {"seqs": seqs, "r_seq": [s for s, _ in rejected], "r_line": [ln for _, ln in rejected]})
    return {seq: (n, total) for seq, n, total in cur.fetchall()}


def discard_staged(cur: Cursor, seqs: list[int]) -> None:
    """Empty chunks `seqs`' staging (Y's commit when it loads their rows itself, from the objects)."""
    cur.execute("DELETE FROM staged_rows WHERE seq = ANY(%s::bigint[])", (seqs,))


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


def waiting_chunks(db: Database, limit: int, *, after: int = 0) -> list[ChunkRef]:
    """The next unprocessed chunks in ledger order (pending ones included: a batch stops before them), from the
    first after seq `after` (Y's batch waiting for its commit is not waiting for Spark)."""
    rows = db.query(
        "SELECT seq, file_id, chunk_seq, object_key, first_line, last_line, written_at, rows_total, status, attempts "
        "FROM chunks WHERE processed_at IS NULL AND status <> 'failed' AND seq > %s ORDER BY seq LIMIT %s",
        (after, limit),
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


class ChunkIds(Protocol):
    """What identifies a chunk in a log line (PendingChunk and ChunkRef both have it)."""

    seq: int
    file_id: str


def give_up_chunk(
    cur: Cursor,
    db: Database,
    c: ChunkIds,
    event: str,
    message: str,
    *,
    component: str,
    reason: str | None = None,
    rollback_counters: bool = False,
) -> None:
    """Give a chunk up for good in the caller's transaction: mark it failed (unless `reason` is None, when
    `note_chunk_failure` already did) and record `event` in processing_logs, so the two commit together.
    The caller logs its own line after the commit: a redone transaction must not log twice."""
    if reason is not None:
        fail_chunk(cur, c.seq, reason, rollback_counters=rollback_counters)
    db.log_event(component, "ERROR", event, message, file_id=c.file_id, chunk_id=c.seq, cur=cur)


# ---------------------------------------------------------------------------------------------- leases
# Several daemons may share the database (SPEC §9). Each source file is leased to one Mechanism X at a time
# (`file_leases`); the holder renews it while it works, and every ledger transaction that moves the file on
# is fenced by it (`fence_file`), so an X that lost its lease (it stalled, its session was cut, another X took
# the file over) can no longer record a chunk of that file: each chunk is recorded once, by its file's holder.
# A lease is free when released, when its expiry (the database's clock) has passed, or when the server session
# that renews it is gone (its process was killed): then another X takes the file over at its recorded offset.


def holder_id() -> str:
    """host:pid:token: who holds a lease or leads, unique to this process and readable by an operator."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class LeaseLost(ProcessorError):
    """This X no longer holds the lease on a file: another X has taken it over."""


@dataclass(frozen=True)
class Claim:
    """The outcome of `claim_file`."""

    got: bool
    holder: str | None  # the other holder when not got (None: another X is claiming it this instant)
    taken_over_from: str | None = None  # when got from a holder that stopped renewing


# A lease `l` whose holder still has it: not expired, and the holder's renewing session still connected.
_LEASE_LIVE = (
    "l.expires_at > clock_timestamp() AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.holder_pid)"
)
_LEASE_FREE = f"l.holder IS NULL OR l.holder = %(me)s OR NOT ({_LEASE_LIVE})"


def claim_file(db: Database, file_id: str, holder: str, *, seconds: float, pid: int | None = None) -> Claim:
    """Lease `file_id` to `holder` for `seconds` unless another live holder has it.

    `FOR UPDATE SKIP LOCKED`: a lease row another X is claiming or fencing right now is skipped, not waited
    for. `pid` is the server pid of the session that will renew the lease (default: this one).
    """

    def fn(cur: Cursor) -> Claim:
        # NOT EXISTS first: a bare ON CONFLICT would wait for a transaction that is updating the row.
        cur.execute(
            "INSERT INTO file_leases (file_id) SELECT %(f)s WHERE NOT EXISTS "
            "(SELECT 1 FROM file_leases WHERE file_id = %(f)s) ON CONFLICT (file_id) DO NOTHING",
            {"f": file_id},
        )
        cur.execute(
            f"SELECT l.holder, {_LEASE_FREE} FROM file_leases l WHERE l.file_id = %(f)s FOR UPDATE SKIP LOCKED",  # noqa: S608 - constant
            {"me": holder, "f": file_id},
        )
        row = cur.fetchone()
        if row is None:
            return Claim(False, None)
        previous, free = row
        if not free:
            return Claim(False, previous)
        cur.execute(
            "UPDATE file_leases SET holder = %(me)s, holder_pid = coalesce(%(pid)s, pg_backend_pid()), "
            "expires_at = clock_timestamp() + %(s)s * interval '1 second', "
            "taken_at = CASE WHEN holder = %(me)s THEN taken_at ELSE clock_timestamp() END, "
            "takeovers = takeovers + (holder IS NOT NULL AND holder <> %(me)s)::int WHERE file_id = %(f)s",
            {"me": holder, "pid": pid, "s": seconds, "f": file_id},
        )
        return Claim(True, None, previous if previous not in (None, holder) else None)

    return db.run(fn, what=f"claim the lease on file {file_id}")


def fence_file(cur: Cursor, file_id: str, holder: str, *, seconds: float) -> None:
    """In the caller's transaction: raise LeaseLost unless `holder` still holds the lease on `file_id` (and
    extend it). The row stays locked until the caller commits, so no other X can take the file meanwhile."""
    cur.execute(
        "UPDATE file_leases SET expires_at = greatest(expires_at, clock_timestamp() + %s * interval '1 second') "
        "WHERE file_id = %s AND holder = %s RETURNING 1",
        (seconds, file_id, holder),
    )
    if cur.fetchone() is None:
        raise LeaseLost(f"file {file_id}: another Mechanism X has taken over its lease; this one stops work on it")


def hold_file(cur: Cursor, file_id: str, holder: str) -> None:
    """In the caller's transaction: raise LeaseLost unless `holder` holds the lease on `file_id`, and keep it
    until the commit without blocking the holder's own `fence_file` (a KEY SHARE lock: another X's
    `claim_file` skips the row, while the holder's no-key updates of it go on). For work on a second
    connection of the holder beside its fenced ledger transactions (X's staging)."""
    cur.execute("SELECT 1 FROM file_leases WHERE file_id = %s AND holder = %s FOR KEY SHARE", (file_id, holder))
    if cur.fetchone() is None:
        raise LeaseLost(f"file {file_id}: another Mechanism X has taken over its lease; this one stops work on it")


def renew_leases(db: Database, holder: str, *, seconds: float) -> set[str]:
    """Extend every lease `holder` holds, recording this session as the one that renews them; returns the
    files still held (a file missing from the answer was taken over)."""

    def fn(cur: Cursor) -> set[str]:
        cur.execute(
            "UPDATE file_leases SET expires_at = clock_timestamp() + %s * interval '1 second', "
            "holder_pid = pg_backend_pid() WHERE holder = %s RETURNING file_id",
            (seconds, holder),
        )
        return {r[0] for r in cur.fetchall()}

    return db.run(fn, what="renew the file leases")


def release_file(db: Database, file_id: str, holder: str) -> None:
    """Give the lease on `file_id` back (a no-op if `holder` no longer has it)."""
    db.execute(
        "UPDATE file_leases SET holder = NULL, holder_pid = NULL, expires_at = NULL WHERE file_id = %s AND holder = %s",
        (file_id, holder),
    )


Y_ROLE = "mechanism_y"  # Mechanism Y's row in `leaders` (its COMPONENT)


def take_leadership(cur: Cursor, role: str, holder: str) -> tuple[int, str | None]:
    """Record `holder` as the leader of `role` (its caller holds the role's advisory lock); returns (its term,
    the previous leader)."""
    cur.execute("SELECT holder FROM leaders WHERE role = %s FOR UPDATE", (role,))
    row = cur.fetchone()
    cur.execute(
        "INSERT INTO leaders (role, holder, term) VALUES (%s, %s, 1) ON CONFLICT (role) DO UPDATE SET "
        "holder = EXCLUDED.holder, term = leaders.term + 1, since = now() RETURNING term",
        (role, holder),
    )
    return cur.fetchone()[0], (row[0] if row else None)


def still_leader(cur: Cursor, role: str, holder: str, term: int) -> bool:
    """Has nobody else led `role` since `holder` took term `term`?"""
    cur.execute("SELECT 1 FROM leaders WHERE role = %s AND holder = %s AND term = %s", (role, holder, term))
    return cur.fetchone() is not None


def all_processed(cur: Cursor) -> bool:
    """No chunk waits for Mechanism Y and no file is mid-ingest: a standby's drain has nothing left to do."""
    cur.execute(
        "SELECT NOT EXISTS (SELECT 1 FROM chunks WHERE processed_at IS NULL AND status <> 'failed') "
        "AND NOT EXISTS (SELECT 1 FROM source_files WHERE status = 'ingesting')"
    )
    return bool(cur.fetchone()[0])


# ---------------------------------------------------------------------- reads for the operator's views
# The status page, the metrics, the processing log and the quality report read the ledger through these,
# in the caller's transaction (the status page reads them all in one snapshot).

FILE_SUMMARY_KEYS = (
    "file_id",
    "name",
    "kind",
    "status",
    "rows_ingested",
    "rows_quarantined",
    "chunks",
    "lines_done",
    "reason",
    "updated_at",
)
_NEEDS_ATTENTION_FIRST = "(status IN ('failed', 'conflict', 'ingesting')) DESC, updated_at DESC"


def file_summaries(cur: Cursor, *, attention_first: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
    """One dict per file (FILE_SUMMARY_KEYS, `updated_at` a datetime): in the order files were first seen,
    or with `attention_first` the failed, conflicting and ingesting ones first, then the latest updated."""
    order = _NEEDS_ATTENTION_FIRST if attention_first else "first_seen, file_id"
    cur.execute(
        f"SELECT {', '.join(FILE_SUMMARY_KEYS)} FROM source_files ORDER BY {order} LIMIT %s",  # noqa: S608 - constants
        (limit,),
    )
    return [dict(zip(FILE_SUMMARY_KEYS, r)) for r in cur.fetchall()]


def file_counts_by_status(cur: Cursor, *, kind: str | None = None) -> dict[str, int]:
    """How many files are in each status (only those of `kind` when given)."""
    if kind is None:
        cur.execute("SELECT status, count(*) FROM source_files GROUP BY status")
    else:
        cur.execute("SELECT status, count(*) FROM source_files WHERE kind = %s GROUP BY status", (kind,))
    return dict(cur.fetchall())


@dataclass(frozen=True)
class Leadership:
    """Who works now, for the status page and /metrics: Y's leader and the live file leases."""

    leader: dict[str, Any] | None  # holder, term, since (Y's active daemon); None before any Y has led
    leases: list[dict[str, Any]]  # file_id, holder, expires_in_seconds, takeovers, for leases held by a live X
    takeovers: int  # leases ever taken from a holder that stopped renewing


def leadership(cur: Cursor) -> Leadership:
    """`Leadership` as the database sees it now: the leases held are the live ones (`_LEASE_LIVE`)."""
    cur.execute("SELECT holder, term, since FROM leaders WHERE role = %s", (Y_ROLE,))
    row = cur.fetchone()
    leader = dict(zip(("holder", "term", "since"), row)) if row else None
    cur.execute(
        "SELECT l.file_id, l.holder, extract(epoch FROM l.expires_at - clock_timestamp())::float8, l.takeovers "  # noqa: S608 - constant
        f"FROM file_leases l WHERE l.holder IS NOT NULL AND {_LEASE_LIVE} ORDER BY l.file_id"
    )
    leases = [dict(zip(("file_id", "holder", "expires_in_seconds", "takeovers"), r)) for r in cur.fetchall()]
    cur.execute("SELECT coalesce(sum(takeovers), 0) FROM file_leases")
    return Leadership(leader, leases, int(cur.fetchone()[0]))


def file_reject_totals(cur: Cursor) -> tuple[int, int]:
    """(rows X quarantined, files failed) over every file."""
    cur.execute(
        "SELECT coalesce(sum(rows_quarantined), 0), count(*) FILTER (WHERE status = 'failed') FROM source_files"
    )
    rows, failed = cur.fetchone()
    return int(rows), int(failed)


def failed_files(cur: Cursor, limit: int) -> list[tuple[str, str, str, str | None, datetime]]:
    """(file_id, name, kind, reason, updated_at) of the failed files, latest first."""
    cur.execute(
        "SELECT file_id, name, kind, reason, updated_at FROM source_files WHERE status = 'failed' "
        "ORDER BY updated_at DESC, file_id LIMIT %s",
        (limit,),
    )
    return cur.fetchall()


def files_with_rejects(cur: Cursor, limit: int) -> list[tuple[str, str, str, int, int]]:
    """(file_id, name, kind, rows_ingested, rows_quarantined) of the files with quarantined rows, latest first."""
    cur.execute(
        "SELECT file_id, name, kind, rows_ingested, rows_quarantined FROM source_files "
        "WHERE rows_quarantined > 0 ORDER BY updated_at DESC, file_id LIMIT %s",
        (limit,),
    )
    return cur.fetchall()


@dataclass(frozen=True)
class ChunkTotals:
    """The chunk counters over the whole ledger, from one scan of `chunks`."""

    written: int  # objects in the lake and not given up (status `written`), processed or not
    rows_written: int
    rows_quarantined_written: int
    ever_written: int  # objects ever written, including those Y failed afterwards
    rows_ever_written: int
    processed: int
    rows_processed: int  # rows_valid of processed chunks
    rows_clean: int  # rows Y kept in its state
    rows_rejected: int  # rows Y excluded
    backlog: int  # written and not yet processed
    pending: int
    failed: int
    seconds_since_last_processed: float | None
    oldest_waiting_seconds: float | None  # age of the oldest chunk in the backlog


def chunk_totals(cur: Cursor) -> ChunkTotals:
    cur.execute(
        """
SELECT
    count(*) FILTER (WHERE status = 'written'),
    coalesce(sum(rows_valid) FILTER (WHERE status = 'written'), 0),
    coalesce(sum(rows_quarantined) FILTER (WHERE status = 'written'), 0),
    count(*) FILTER (WHERE written_at IS NOT NULL),
    coalesce(sum(rows_valid) FILTER (WHERE written_at IS NOT NULL), 0),
    count(*) FILTER (WHERE processed_at IS NOT NULL),
    coalesce(sum(rows_valid) FILTER (WHERE processed_at IS NOT NULL), 0),
    coalesce(sum(y_rows_clean), 0),
    coalesce(sum(y_rows_rejected), 0),
    count(*) FILTER (WHERE status = 'written' AND processed_at IS NULL),
    count(*) FILTER (WHERE status = 'pending'),
    count(*) FILTER (WHERE status = 'failed'),
    extract(epoch FROM now() - max(processed_at)),
    extract(epoch FROM now() - min(written_at) FILTER (WHERE status = 'written' AND processed_at IS NULL))
FROM chunks
"""
    )
    row = cur.fetchone()
    *counts, since_processed, oldest = row
    return ChunkTotals(*(int(n) for n in counts), _seconds(since_processed), _seconds(oldest))


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


CHUNK_SERIES_KEYS = ("t", "ingested_chunks", "ingested_rows", "processed_chunks", "processed_rows", "backlog_chunks")


def chunk_series(cur: Cursor, minutes: int) -> list[dict[str, Any]]:
    """Per minute of the last `minutes` (CHUNK_SERIES_KEYS): chunks and rows written by X, processed by Y,
    and the backlog at the end of the minute."""
    cur.execute(
        """
WITH minutes AS (
    SELECT generate_series(
        date_trunc('minute', now()) - (%(minutes)s - 1) * interval '1 minute',
        date_trunc('minute', now()), interval '1 minute') AS t
), recent AS (
    SELECT written_at, processed_at, rows_valid, status FROM chunks
    WHERE written_at IS NOT NULL
      AND (processed_at IS NULL OR processed_at >= now() - (%(minutes)s + 1) * interval '1 minute')
)
SELECT m.t,
    count(r.written_at) FILTER (WHERE r.written_at >= m.t AND r.written_at < m.t + interval '1 minute'),
    coalesce(sum(r.rows_valid) FILTER (WHERE r.written_at >= m.t AND r.written_at < m.t + interval '1 minute'), 0),
    count(r.processed_at) FILTER (WHERE r.processed_at >= m.t AND r.processed_at < m.t + interval '1 minute'),
    coalesce(sum(r.rows_valid) FILTER (WHERE r.processed_at >= m.t AND r.processed_at < m.t + interval '1 minute'), 0),
    count(*) FILTER (WHERE r.status = 'written' AND r.written_at < least(m.t + interval '1 minute', now())
                     AND (r.processed_at IS NULL OR r.processed_at >= least(m.t + interval '1 minute', now())))
FROM minutes m LEFT JOIN recent r ON true
GROUP BY m.t ORDER BY m.t
""",
        {"minutes": minutes},
    )
    return [dict(zip(CHUNK_SERIES_KEYS, r)) for r in cur.fetchall()]


def chunk_latency(cur: Cursor, last: int) -> tuple[Any, Any, int]:
    """(p50, p95, n): seconds from written to processed over the `last` chunks processed."""
    cur.execute(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s), percentile_cont(0.95) WITHIN GROUP (ORDER BY s), "
        "count(*) FROM (SELECT extract(epoch FROM processed_at - written_at) AS s FROM chunks "
        "WHERE processed_at IS NOT NULL AND written_at IS NOT NULL ORDER BY processed_at DESC LIMIT %s) recent",
        (last,),
    )
    return cur.fetchone()


def rows_written_since(cur: Cursor, minutes: int) -> tuple[int, int]:
    """(rows, rows quarantined) of the chunks written in the last `minutes`."""
    cur.execute(
        "SELECT coalesce(sum(rows_total), 0), coalesce(sum(rows_quarantined), 0) FROM chunks "
        "WHERE written_at >= now() - %s * interval '1 minute'",
        (minutes,),
    )
    rows, bad = cur.fetchone()
    return int(rows), int(bad)


FAILED_CHUNK_KEYS = ("seq", "file_id", "name", "chunk_seq", "first_line", "last_line", "created_at")


def failed_chunks(cur: Cursor, limit: int) -> list[dict[str, Any]]:
    """The failed chunks (FAILED_CHUNK_KEYS), latest first."""
    cur.execute(
        "SELECT c.seq, c.file_id, f.name, c.chunk_seq, c.first_line, c.last_line, c.created_at "
        "FROM chunks c JOIN source_files f USING (file_id) WHERE c.status = 'failed' ORDER BY c.seq DESC LIMIT %s",
        (limit,),
    )
    return [dict(zip(FAILED_CHUNK_KEYS, r)) for r in cur.fetchall()]


def oldest_pending_chunk(cur: Cursor) -> tuple[int, str, int, float] | None:
    """(seq, file name, chunk_seq, seconds since recorded) of the first chunk X has not released, if any."""
    cur.execute(
        "SELECT c.seq, f.name, c.chunk_seq, extract(epoch FROM now() - c.created_at) FROM chunks c "
        "JOIN source_files f USING (file_id) WHERE c.status = 'pending' ORDER BY c.seq LIMIT 1"
    )
    return cur.fetchone()


def chunks_with_problems(cur: Cursor, limit: int) -> list[tuple[int, str, int, int, int | None, int | None]]:
    """(seq, file_id, chunk_seq, rows_quarantined, y_rows_clean, y_rows_rejected) of the chunks with
    rejected rows or failed, latest first."""
    cur.execute(
        "SELECT seq, file_id, chunk_seq, rows_quarantined, y_rows_clean, y_rows_rejected FROM chunks "
        "WHERE rows_quarantined > 0 OR y_rows_rejected > 0 OR status = 'failed' ORDER BY seq DESC LIMIT %s",
        (limit,),
    )
    return cur.fetchall()
