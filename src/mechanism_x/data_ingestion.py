"""Mechanism X: source files -> validated chunks of BATCH_SIZE rows -> Parquet objects in the lake + ledger.

Exactly once: a chunk's ledger row (with its key, line range and byte range) and the file's
progress commit together *before* the object is written; the object is then written (a no-op if
the same bytes are already there) and the chunk marked `written`. After a crash, `pending`
chunks are rebuilt from the same bytes and written under the same key; ingestion resumes at the
file's recorded byte offset, so there is no duplicate and no gap.

    python -m src.mechanism_x.data_ingestion [--drain]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from config.config import Settings
from src.errors import FileRejected, ObjectConflict, ProcessorError, RetryableError
from src.mechanism_x.csv_parser import (
    KIND_IGNORED,
    KIND_IMPORTANCE,
    KIND_TRANSACTIONS,
    ParsedRows,
    RowBlock,
    iter_row_blocks,
    parse_importance,
    parse_transactions,
    read_header,
    scan_file,
)
from src.mechanism_x.file_monitor import FileMonitor, FileWork
from src.mechanism_x.sources import Source, SourceFile, md5_file
from src.utils import lake_paths
from src.utils.object_store import ObjectStore, parquet_bytes
from src.utils.postgres_utils import Database, copy_csv, copy_rows, is_transient
from src.utils.runtime import CONSUMER_READY_TIMEOUT, READY_FILE_ENV, retry_call

log = logging.getLogger(__name__)
COMPONENT = "mechanism_x"
CHUNK_CHANNEL = "chunk_written"

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source_file_id", pa.string(), nullable=False),
        pa.field("source_line", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw_line", pa.string()),
    ]
)


def _transient(exc: BaseException) -> bool:
    return is_transient(exc)


class Ingestor:
    """Turns source files into chunk objects and ledger rows. One instance per X process."""

    def __init__(
        self, settings: Settings, db: Database, store: ObjectStore, source: Source, stop: threading.Event
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.source = source
        self.stop = stop
        self.monitor = FileMonitor(source, db)
        self._last_release = 0.0
        self._consumer_ready = not os.environ.get(READY_FILE_ENV)

    # ---------------------------------------------------------------- top level

    def recover(self) -> None:
        """Finish chunks whose ledger row committed but whose object may not have been written."""
        rows = self.db.query(
            # The line number at bytes_start (not the chunk's first row: blank lines may come before it).
            "SELECT c.seq, c.file_id, c.chunk_seq, COALESCE((SELECT p.last_line + 1 FROM chunks p "
            "WHERE p.file_id = c.file_id AND p.chunk_seq = c.chunk_seq - 1), 2), c.bytes_start, c.bytes_end, "
            "c.prefix_md5, c.object_key, c.ingest_date FROM chunks c WHERE c.status = 'pending' ORDER BY c.seq"
        )
        if not rows:
            return
        log.info("recovering %d chunk(s) recorded but not confirmed written", len(rows))
        listing = {f.file_id: f for f in self.source.list_files()}
        for seq, file_id, chunk_seq, start_line, b0, b1, prefix_md5, key, _day in rows:
            f = listing.get(file_id)
            reason = None
            if f is None:
                reason = "source file is gone"
            else:
                try:
                    with self.source.fetch(f) as path:
                        if scan_file(path, b1).prefix_md5 != prefix_md5:
                            reason = "source file changed before the chunk could be rebuilt"
                        else:
                            block = _concat_blocks(iter_row_blocks(path, b0, start_line, end=b1))
                            parsed = parse_transactions(block, file_id=file_id, chunk_seq=chunk_seq)
                            self._mark_written(seq, self._write_chunk_objects(key, file_id, chunk_seq, parsed))
                            log.info("chunk %s-%06d recovered at %s", file_id, chunk_seq, key)
                            continue
                except FileRejected as exc:
                    reason = str(exc)
            with self.db.transaction() as cur:
                cur.execute("UPDATE chunks SET status = 'failed' WHERE seq = %s", (seq,))
                self.db.log_event(
                    COMPONENT,
                    "ERROR",
                    "chunk_lost",
                    f"chunk {file_id}-{chunk_seq} cannot be rebuilt: {reason}",
                    file_id=file_id,
                    chunk_id=seq,
                    cur=cur,
                )
            log.error("chunk %s-%06d cannot be rebuilt (%s); marked failed", file_id, chunk_seq, reason)

    def poll_once(self) -> int:
        """One pass over the source; returns how many files needed work."""
        work = self.monitor.poll()
        for item in work:
            if self.stop.is_set():
                break
            self._handle(item)
        if work:
            self._write_processing_log()
        return len(work)

    def run(self, *, drain: bool) -> int:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.recover()  # chunks left pending by a crash or a write whose retries ran out
                self.poll_once()
            except (RetryableError, OSError) as exc:
                if drain and not isinstance(exc, RetryableError):
                    raise
                log.warning("poll failed, retrying in %.0fs: %s", self.settings.processing_interval, exc)
            else:
                if drain:
                    log.info("drain: every file in the %s is ingested", self.source.describe())
                    return 0
            self.stop.wait(max(0.0, self.settings.processing_interval - (time.monotonic() - started)))
        return 1 if drain else 0

    # ---------------------------------------------------------------- per file

    def _handle(self, item: FileWork) -> None:
        f = item.file
        try:
            with self.source.fetch(f) as path:
                header = read_header(path)
                if header.kind == KIND_IGNORED:
                    self.monitor.record_status(f, KIND_IGNORED, "ignored", header.reason, checksum=f.checksum)
                    log.info("file %s (%s) ignored: %s", f.file_id, f.name, header.reason)
                    return
                if header.kind == KIND_IMPORTANCE:
                    self._load_importance(f, path, header.data_offset)
                else:
                    self._ingest_transactions(f, path, header.data_offset, item)
        except FileRejected as exc:
            self.monitor.record_status(f, "unknown", "failed", str(exc), checksum=f.checksum)
            self.db.log_event(COMPONENT, "ERROR", "file_failed", f"{f.name}: {exc}", file_id=f.file_id)
            log.error("file %s (%s) failed: %s", f.file_id, f.name, exc)
        except FileNotFoundError:
            log.warning("file %s (%s) disappeared before it could be read; will look again", f.file_id, f.name)
        except ProcessorError as exc:
            from src.mechanism_x.sources import SourceError

            if isinstance(exc, SourceError) and not isinstance(exc, RetryableError):
                self.monitor.record_status(f, "unknown", "failed", str(exc), checksum=f.checksum)
                self.db.log_event(COMPONENT, "ERROR", "file_failed", f"{f.name}: {exc}", file_id=f.file_id)
                log.error("file %s (%s) failed: %s", f.file_id, f.name, exc)
            else:
                raise

    def _ingest_transactions(self, f: SourceFile, path: Path, data_offset: int, item: FileWork) -> None:
        rec = item.record
        start = data_offset if rec is None or rec["bytes_done"] == 0 else rec["bytes_done"]
        first_line = 2 if rec is None or rec["bytes_done"] == 0 else rec["next_line"]
        # One pass for the prefix and UTF-8; the whole-file md5 comes from the chunk hasher below.
        scan = scan_file(path, start, whole=False)
        if (
            rec is not None
            and rec["bytes_done"] > 0
            and (scan.prefix_md5 != rec["prefix_md5"] or _glued_to_last_row(path, start))
        ):
            self.monitor.record_conflict(f, md5_file(path))
            return
        if rec is None or rec["kind"] != KIND_TRANSACTIONS or rec["status"] != "ingesting":
            self.monitor.start_file(f, KIND_TRANSACTIONS)
        chunk_seq = rec["chunks"] if rec is not None else 0
        hasher = hashlib.md5()
        with open(path, "rb") as fh:
            _hash_range(fh, hasher, 0, start)
            pos = start
            # Parsing and Parquet encoding of the next chunk run in a helper thread (Arrow releases the GIL)
            # while this thread records and writes the current one; chunks are still released in order.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="x-parse") as pool:
                ahead: deque = deque()
                for rows, seq in self._cut(path, start, first_line, chunk_seq):
                    ahead.append((rows, seq, pool.submit(_prepare_chunk, rows, f.file_id, seq)))
                    if len(ahead) < 2:
                        continue
                    rows, seq, job = ahead.popleft()
                    if self.stop.is_set():
                        return
                    pos = self._emit_chunk(f, fh, hasher, pos, rows, seq, *job.result())
                while ahead:
                    rows, seq, job = ahead.popleft()
                    if self.stop.is_set():
                        return
                    pos = self._emit_chunk(f, fh, hasher, pos, rows, seq, *job.result())
            _hash_range(fh, hasher, pos, scan.size)  # trailing blank lines, if any
        if self.stop.is_set():
            return
        with self.db.transaction() as cur:
            cur.execute(
                "UPDATE source_files SET status = 'done', checksum = %s, size_bytes = %s, modified_time = %s, "
                "reason = NULL, conflict_checksum = NULL, finished_at = now(), updated_at = now() "
                "WHERE file_id = %s RETURNING rows_ingested, rows_quarantined, chunks",
                (hasher.hexdigest(), scan.size, f.modified_time, f.file_id),
            )
            ingested, quarantined, chunks = cur.fetchone()
            self.db.log_event(
                COMPONENT,
                "INFO",
                "file_ingested",
                f"{f.name}: {ingested} rows in {chunks} chunks, {quarantined} quarantined",
                file_id=f.file_id,
                row_count=ingested,
                cur=cur,
            )
        log.info(
            "file %s (%s) done: %d rows in %d chunks, %d quarantined", f.file_id, f.name, ingested, chunks, quarantined
        )

    def _cut(self, path: Path, start: int, first_line: int, chunk_seq: int):
        """(rows, chunk_seq) for each chunk of BATCH_SIZE data rows from byte `start`, in file order."""
        pending = RowBlock.empty()
        batch = self.settings.batch_size
        for block in iter_row_blocks(path, start, first_line):
            pending = RowBlock.concat(pending, block)
            while len(pending) >= batch:
                yield pending.slice(0, batch), chunk_seq
                pending = pending.slice(batch, len(pending))
                chunk_seq += 1
        if len(pending):
            yield pending, chunk_seq

    def _emit_chunk(
        self, f: SourceFile, fh, hasher, pos: int, rows: RowBlock, chunk_seq: int, parsed: ParsedRows, payload: bytes
    ) -> int:
        """Record, write and release one chunk; returns the byte offset after it."""
        t0 = time.perf_counter()
        end = int(rows.end_offset[-1])
        _hash_range(fh, hasher, pos, end)
        today = datetime.now(timezone.utc).date()
        key = lake_paths.chunk_key(today, f.file_id, chunk_seq)
        prefix_md5 = hasher.copy().hexdigest()
        n_rows, n_bad = len(rows), len(parsed.bad_lines)
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO chunks (file_id, chunk_seq, first_line, last_line, rows_total, rows_valid, rows_quarantined, "
                "bytes_start, bytes_end, prefix_md5, object_key, ingest_date, status) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'pending') RETURNING seq",
                (
                    f.file_id,
                    chunk_seq,
                    int(rows.line_no[0]),
                    int(rows.line_no[-1]),
                    n_rows,
                    parsed.good.num_rows,
                    n_bad,
                    pos,
                    end,
                    prefix_md5,
                    key,
                    today,
                ),
            )
            seq = cur.fetchone()[0]
            cur.execute(
                "UPDATE source_files SET bytes_done = %s, next_line = %s, lines_done = lines_done + %s, "
                "rows_ingested = rows_ingested + %s, rows_quarantined = rows_quarantined + %s, chunks = chunks + 1, "
                "prefix_md5 = %s, updated_at = now() WHERE file_id = %s",
                (end, int(rows.line_no[-1]) + 1, n_rows, parsed.good.num_rows, n_bad, prefix_md5, f.file_id),
            )
            if n_bad:
                copy_rows(
                    cur,
                    "quarantine",
                    ("file_id", "line_no", "chunk_seq", "stage", "reason", "raw_line"),
                    (
                        (f.file_id, ln, chunk_seq, "ingest", r, raw)
                        for ln, r, raw in zip(parsed.bad_lines, parsed.bad_reasons, parsed.bad_raw)
                    ),
                )
                self.db.log_event(
                    COMPONENT,
                    "WARNING",
                    "rows_quarantined",
                    f"{f.name}: {n_bad} bad row(s) in chunk {chunk_seq}, first at line {parsed.bad_lines[0]}: "
                    f"{parsed.bad_reasons[0]}",
                    file_id=f.file_id,
                    chunk_id=seq,
                    row_count=n_bad,
                    cur=cur,
                )
        content_md5 = self._write_chunk_objects(key, f.file_id, chunk_seq, parsed, payload)
        self._pace()
        self._mark_written(seq, content_md5)
        log.info(
            "chunk %s-%06d written: lines %d-%d, %d rows, %d quarantined, %s (%.0f ms)",
            f.file_id,
            chunk_seq,
            rows.line_no[0],
            rows.line_no[-1],
            parsed.good.num_rows,
            n_bad,
            key,
            (time.perf_counter() - t0) * 1000,
            extra={"event": "chunk_written", "chunk_id": seq, "file_id": f.file_id, "chunk_seq": chunk_seq},
        )
        return end

    def _write_chunk_objects(
        self, key: str, file_id: str, chunk_seq: int, parsed: ParsedRows, payload: bytes | None = None
    ) -> str:
        """Write the chunk (and its quarantine rows); returns the chunk object's md5."""
        payload = parquet_bytes(parsed.good) if payload is None else payload
        if parsed.bad_lines:
            bad = pa.table(
                {
                    "source_file_id": [file_id] * len(parsed.bad_lines),
                    "source_line": parsed.bad_lines,
                    "reason": parsed.bad_reasons,
                    "raw_line": parsed.bad_raw,
                },
                schema=QUARANTINE_SCHEMA,
            )
            qkey = lake_paths.quarantine_key("ingest", file_id, chunk_seq)
            retry_call(
                lambda: self.store.put_bytes(qkey, parquet_bytes(bad), overwrite=True),
                what=f"write {qkey}",
                transient=_transient,
            )
        try:
            retry_call(lambda: self.store.put_bytes(key, payload), what=f"write {key}", transient=_transient)
        except ObjectConflict:
            log.error("lake object %s exists with other content; the ledger row stays pending for inspection", key)
            raise
        return hashlib.md5(payload).hexdigest()

    def _mark_written(self, seq: int, content_md5: str) -> None:
        with self.db.transaction() as cur:
            # Losing this commit in a server crash is harmless: the chunk stays `pending` and recovery
            # rewrites the same bytes under the same key. So it need not wait for the WAL flush.
            cur.execute("SET LOCAL synchronous_commit = off")
            cur.execute(
                "UPDATE chunks SET status = 'written', written_at = clock_timestamp(), content_md5 = %s WHERE seq = %s",
                (content_md5, seq),
            )
            cur.execute("SELECT pg_notify(%s, %s)", (CHUNK_CHANNEL, str(seq)))

    def _await_consumer(self) -> None:
        """Under the supervisor, hold the first release until Mechanism Y reports ready (see main.py)."""
        path = os.environ.get(READY_FILE_ENV, "")
        deadline = time.monotonic() + CONSUMER_READY_TIMEOUT
        if not os.path.exists(path):
            log.info("first chunk ready; holding it until mechanism Y's Spark session is up")
        while not os.path.exists(path) and not self.stop.is_set():
            if time.monotonic() >= deadline:
                log.warning("mechanism Y not ready after %.0fs; releasing chunks anyway", CONSUMER_READY_TIMEOUT)
                break
            self.stop.wait(0.1)
        self._consumer_ready = True

    def _pace(self) -> None:
        """One chunk per CHUNK_INTERVAL_SECONDS: wait out the rest of the interval since the last release."""
        if not self._consumer_ready:
            self._await_consumer()
        interval = self.settings.chunk_interval_seconds
        if interval > 0 and self._last_release:
            self.stop.wait(max(0.0, interval - (time.monotonic() - self._last_release)))
        self._last_release = time.monotonic()

    def _load_importance(self, f: SourceFile, path: Path, data_offset: int) -> None:
        """Replace customer_importance with this file's rows in one transaction."""
        scan = scan_file(path, data_offset)
        parsed_parts = [parse_importance(b) for b in iter_row_blocks(path, data_offset, 2)]
        good = pa.concat_tables([p.good for p in parsed_parts]) if parsed_parts else None
        bad = [(ln, r, raw) for p in parsed_parts for ln, r, raw in zip(p.bad_lines, p.bad_reasons, p.bad_raw)]
        buf = io.BytesIO()
        if good is not None and good.num_rows:
            pacsv.write_csv(good, buf, pacsv.WriteOptions(include_header=True))
        n_good = good.num_rows if good is not None else 0
        self.monitor.start_file(f, KIND_IMPORTANCE)
        with self.db.transaction() as cur:
            cur.execute("LOCK TABLE customer_importance IN ACCESS EXCLUSIVE MODE")
            cur.execute("TRUNCATE customer_importance")
            if n_good:
                buf.seek(0)
                copy_csv(cur, "customer_importance", ("source", "target", "weight", "type_trans", "fraud"), buf)
            cur.execute("DELETE FROM quarantine WHERE file_id = %s AND stage = 'ingest'", (f.file_id,))
            if bad:
                copy_rows(
                    cur,
                    "quarantine",
                    ("file_id", "line_no", "chunk_seq", "stage", "reason", "raw_line"),
                    ((f.file_id, ln, None, "ingest", r, raw) for ln, r, raw in bad),
                )
                self.db.log_event(
                    COMPONENT,
                    "WARNING",
                    "rows_quarantined",
                    f"{f.name}: {len(bad)} bad importance row(s), first at line {bad[0][0]}: {bad[0][1]}",
                    file_id=f.file_id,
                    row_count=len(bad),
                    cur=cur,
                )
            cur.execute(
                "INSERT INTO importance_state (id, file_id, checksum, rows_loaded, version) VALUES (1, %s, %s, %s, 1) "
                "ON CONFLICT (id) DO UPDATE SET file_id = EXCLUDED.file_id, checksum = EXCLUDED.checksum, "
                "rows_loaded = EXCLUDED.rows_loaded, version = importance_state.version + 1, loaded_at = now()",
                (f.file_id, scan.md5, n_good),
            )
            cur.execute(
                "UPDATE source_files SET status = 'done', checksum = %s, size_bytes = %s, modified_time = %s, "
                "rows_ingested = %s, rows_quarantined = %s, lines_done = %s, reason = NULL, finished_at = now(), "
                "updated_at = now() WHERE file_id = %s",
                (scan.md5, scan.size, f.modified_time, n_good, len(bad), n_good + len(bad), f.file_id),
            )
            self.db.log_event(
                COMPONENT,
                "INFO",
                "importance_loaded",
                f"{f.name}: {n_good} rows loaded",
                file_id=f.file_id,
                row_count=n_good,
                cur=cur,
            )
            cur.execute("SELECT pg_notify(%s, %s)", (CHUNK_CHANNEL, "importance"))
        log.info("importance file %s (%s) loaded: %d rows, %d quarantined", f.file_id, f.name, n_good, len(bad))

    def _write_processing_log(self) -> None:
        files = self.db.query(
            "SELECT file_id, name, kind, status, rows_ingested, rows_quarantined, chunks, reason, "
            "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM source_files ORDER BY first_seen, file_id"
        )
        keys = (
            "file_id",
            "name",
            "kind",
            "status",
            "rows_ingested",
            "rows_quarantined",
            "chunks",
            "reason",
            "updated_at",
        )
        doc = {
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": self.source.describe(),
            "files": [dict(zip(keys, r)) for r in files],
            "totals": {
                "files": len(files),
                "rows_ingested": sum(r[4] for r in files),
                "rows_quarantined": sum(r[5] for r in files),
                "chunks": sum(r[6] for r in files),
            },
        }
        data = json.dumps(doc, indent=2, default=str).encode()
        retry_call(
            lambda: self.store.put_bytes(lake_paths.PROCESSING_LOG_KEY, data, overwrite=True),
            what="write processing_log.json",
            transient=_transient,
        )


def _glued_to_last_row(path: Path, start: int) -> bool:
    """Bytes appended right after an unterminated last row extend that row: a row already ingested changed."""
    with open(path, "rb") as fh:
        fh.seek(start - 1)
        tail = fh.read(3)
    nxt = tail[1:]
    if tail[:1] == b"\n" or not nxt:
        return False
    return not (nxt.startswith(b"\n") or nxt.startswith(b"\r\n") or nxt == b"\r")


def _prepare_chunk(rows: RowBlock, file_id: str, chunk_seq: int) -> tuple[ParsedRows, bytes]:
    parsed = parse_transactions(rows, file_id=file_id, chunk_seq=chunk_seq)
    return parsed, parquet_bytes(parsed.good)


def _concat_blocks(blocks) -> RowBlock:
    out = RowBlock.empty()
    for b in blocks:
        out = RowBlock.concat(out, b)
    return out


def _hash_range(fh, hasher, start: int, end: int) -> None:
    fh.seek(start)
    remaining = end - start
    while remaining > 0:
        data = fh.read(min(remaining, 8 << 20))
        if not data:
            break
        hasher.update(data)
        remaining -= len(data)


# -------------------------------------------------------------------- entry point


def run_worker(settings: Settings, *, drain: bool, stop: threading.Event | None = None) -> int:
    """Build X's resources from the settings and run until stopped (or drained)."""
    from src.mechanism_x.file_monitor import make_source
    from src.utils.object_store import open_lake

    stop = stop or threading.Event()
    db = Database(settings)
    db.apply_schema()
    store = open_lake(settings)
    source = make_source(settings, db)
    log.info("mechanism X: reading %s, writing %s", source.describe(), store.describe())
    try:
        return Ingestor(settings, db, store, source, stop).run(drain=drain)
    finally:
        source.close()
        db.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.mechanism_x.data_ingestion",
        description=(
            "Mechanism X alone: watch the source (Google Drive folder when GDRIVE_FOLDER_ID is set, else "
            "LOCAL_INBOX_DIR) every PROCESSING_INTERVAL seconds, validate each CSV, cut transaction files into "
            "chunks of BATCH_SIZE rows released one per CHUNK_INTERVAL_SECONDS, write each chunk as Parquet to "
            "the lake and record files and chunks in PostgreSQL. Settings come from the environment and .env."
        ),
    )
    parser.add_argument(
        "--drain",
        action="store_true",
        help="ingest everything now in the source, then exit 0 (instead of polling forever)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from src.utils.runtime import worker_main

    return worker_main(
        "mechanism X",
        build_parser(),
        argv,
        lambda settings, args, stop: run_worker(settings, drain=args.drain, stop=stop),
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
