"""Mechanism X: source files -> validated chunks of BATCH_SIZE rows -> Parquet objects in the lake + ledger.

Exactly once: a chunk's ledger row (with its key, line range and byte range) and the file's
progress commit together *before* the object is written; the object is then written (a no-op if
the same bytes are already there) and the chunk marked `written`. After a crash, `pending`
chunks are rebuilt from the same bytes and written under the same key; ingestion resumes at the
file's recorded byte offset, so there is no duplicate and no gap. Between the record and the release,
the chunk's rows are staged in PostgreSQL for Y's commit (`ledger.stage_chunk`, on a connection of X's
staging thread), so a written chunk has all its rows staged or none.

    python -m src.mechanism_x.data_ingestion [--drain]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from config.config import Settings
from src import ledger
from src.errors import FileRejected, is_retryable
from src.mechanism_x.csv_parser import (
    KIND_IGNORED,
    KIND_IMPORTANCE,
    KIND_TRANSACTIONS,
    ParsedRows,
    RowBlock,
    iter_row_blocks,
    parse_transactions,
    read_header,
    scan_file,
)
from src.mechanism_x.file_monitor import FileMonitor, FileWork, looks_like_importance
from src.mechanism_x.importance import copy_importance
from src.mechanism_x.leases import LeaseKeeper
from src.quality_report import LAKE_REPORTS_LOCK, reject_counts, write_quality_report
from src.schemas.transaction_schemas import QUARANTINE_SCHEMA, QUARANTINE_TABLE_COLUMNS
from src.utils import lake_paths
from src.utils.db import CHUNK_CHANNEL, DSN_ENV, Database, copy_rows
from src.utils.object_store import ObjectStore, parquet_bytes
from src.utils.retry import brief
from src.utils.runtime import CONSUMER_READY_TIMEOUT, READY_FILE_ENV, drain_parser
from src.utils.sources import Source, SourceFile, md5_file

log = logging.getLogger(__name__)
COMPONENT = "mechanism_x"
# Several X may share a database: each file is leased to one of them at a time (src/mechanism_x/leases.py).
# A file missing from the source while one of its chunks is pending keeps the chunk pending this long
# (a Drive file moved for a minute comes back); after that the chunk is given up and its rows taken
# back out of the file's counters.
MISSING_FILE_GRACE_SECONDS = 600.0
READ_AHEAD = 3  # chunks parsed and encoded ahead of the one being recorded (each about 2 MB for 10,000 rows)
PARSE_THREADS = 2  # Arrow releases the GIL in its kernels and the Parquet writer: two chunks parse at once
OVERLAP_AHEAD = 32  # ... and while an importance file is being loaded in the background


class Ingestor:
    """Turns source files into chunk objects and ledger rows. One instance per X process."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: ObjectStore,
        source: Source,
        stop: threading.Event,
        *,
        leases: LeaseKeeper | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.source = source
        self.stop = stop
        self.monitor = FileMonitor(source, db)
        self._last_release = 0.0
        self._consumer_ready = not os.environ.get(READY_FILE_ENV)
        self._missing_since: dict[int, float] = {}
        self._importance: _BackgroundImportance | None = None
        self.leases = leases or LeaseKeeper(settings, db, stop)
        self.skipped = 0  # files left alone since the loop's last turn: leased to another X

    # ---------------------------------------------------------------- top level

    def recover(self) -> None:
        """Finish chunks whose ledger row committed but whose object may not have been written.

        Only the chunks of files this X can lease: a file another live X holds has its own chunks in flight.
        A chunk is only ever rebuilt from its own byte range, and only if the bytes before it are still
        those recorded. A file briefly missing keeps its chunks pending; an error retrying cannot fix is
        counted, and after MAX_ATTEMPTS the chunk is failed and its rows leave the file's counters.
        """
        pending = ledger.pending_chunks(self.db)
        if not pending:
            return
        listing = {f.file_id: f for f in self.source.list_files()}
        for file_id in dict.fromkeys(c.file_id for c in pending):
            if self.stop.is_set():
                return
            if not self.leases.claim(file_id).got:
                self.skipped += 1
                continue
            try:
                self._recover_chunks(listing.get(file_id), ledger.pending_chunks(self.db, file_id))
            finally:
                self.leases.release(file_id)

    def _recover_chunks(self, f: SourceFile | None, pending: list[ledger.PendingChunk]) -> None:
        """Rebuild the pending chunks of one file (`f` None: not in the source right now); its lease is held."""
        if pending:
            log.info("recovering %d chunk(s) recorded but not confirmed written", len(pending))
        for c in pending:
            if self.stop.is_set():
                return
            if f is None:
                self._source_missing(c)
                continue
            self._missing_since.pop(c.seq, None)
            try:
                self._rebuild(f, c)
            except FileRejected as exc:
                self._chunk_attempt_failed(c, str(exc))
            except Exception as exc:  # noqa: BLE001 - counted per chunk, so one poison chunk cannot wedge X
                if is_retryable(exc):
                    raise
                self._chunk_attempt_failed(c, f"{type(exc).__name__}: {brief(exc)}")

    def _rebuild(self, f: SourceFile, c: ledger.PendingChunk) -> None:
        with self.source.fetch(f) as path:
            # Only the bytes up to the chunk's end matter: what was appended after it is not looked at.
            if md5_file(path, limit=c.bytes_end) != c.prefix_md5:
                self._give_up_chunk(c, "the source file changed before the chunk could be rebuilt")
                return
            blocks = iter_row_blocks(
                path, c.bytes_start, c.start_line, end=c.bytes_end, max_line_bytes=self.settings.max_line_bytes
            )
            block = _concat_blocks(blocks)
            parsed = parse_transactions(block, file_id=c.file_id, chunk_seq=c.chunk_seq)
            content_md5 = self._write_chunk_objects(c.object_key, c.file_id, c.chunk_seq, parsed)
            if parsed.good.num_rows:
                self._stage(self.db, c.file_id, c.seq, ledger.staging_payload(parsed.good))
            ledger.mark_chunk_written(self.db, c.seq, content_md5)
        log.info(
            "chunk %s-%06d recovered at %s",
            c.file_id,
            c.chunk_seq,
            c.object_key,
            extra={"event": "chunk_recovered", "file_id": c.file_id, "chunk_id": c.seq, "chunk_seq": c.chunk_seq},
        )

    def _source_missing(self, c: ledger.PendingChunk) -> None:
        since = self._missing_since.setdefault(c.seq, time.monotonic())
        waited = time.monotonic() - since
        if waited >= MISSING_FILE_GRACE_SECONDS:
            self._give_up_chunk(c, f"its source file has been missing for {waited:.0f} s")
        elif waited == 0:
            log.warning(
                "chunk %s-%06d waits: its source file is not in the source right now; it stays pending",
                c.file_id,
                c.chunk_seq,
                extra={"event": "chunk_source_missing", "file_id": c.file_id, "chunk_id": c.seq},
            )

    def _give_up_chunk(self, c: ledger.PendingChunk, reason: str) -> None:
        def fn(cur) -> None:
            message = f"chunk {c.file_id}-{c.chunk_seq} cannot be rebuilt: {reason}"
            ledger.give_up_chunk(
                cur, self.db, c, "chunk_lost", message, component=COMPONENT, reason=reason, rollback_counters=True
            )

        self.db.run(fn, what=f"give up chunk {c.seq}")
        self._missing_since.pop(c.seq, None)
        log.error(
            "chunk %s-%06d cannot be rebuilt (%s); marked failed and its rows taken out of the file's counts",
            c.file_id,
            c.chunk_seq,
            reason,
            extra={"event": "chunk_lost", "file_id": c.file_id, "chunk_id": c.seq, "chunk_seq": c.chunk_seq},
        )

    def _chunk_attempt_failed(self, c: ledger.PendingChunk, error: str) -> None:
        attempts, failed = ledger.note_chunk_failure(
            self.db, c.seq, error=error, max_attempts=self.settings.max_attempts, by="x"
        )
        ids = {"file_id": c.file_id, "chunk_id": c.seq, "chunk_seq": c.chunk_seq}
        if failed:
            self.db.log_event(
                COMPONENT, "ERROR", "chunk_failed", f"chunk {c.seq}: {error}", file_id=c.file_id, chunk_id=c.seq
            )
            log.error(
                "chunk %d failed for good after %d attempts: %s",
                c.seq,
                attempts,
                error,
                extra={"event": "chunk_failed", **ids},
            )
        else:
            log.warning(
                "chunk %d: attempt %d failed: %s",
                c.seq,
                attempts,
                error,
                extra={"event": "chunk_attempt_failed", **ids},
            )

    def poll_once(self) -> int:
        """One pass over the source; returns how many files needed work (`skipped` counts those left to
        another X that holds their lease)."""
        work = self.monitor.poll()
        skipped_before = self.skipped
        rejects_before = reject_counts(self.db) if work else None
        try:
            for i, item in enumerate(work):
                if self.stop.is_set():
                    break
                if not self._claim(item):
                    if looks_like_importance(item):
                        break  # reference data before the transactions after it, as with one X: next poll
                    continue
                self._work_on(item, work[i + 1 :])
        finally:
            self._importance_done()
        if len(work) > self.skipped - skipped_before:  # this X did something
            with self.db.session_lock(LAKE_REPORTS_LOCK):  # another X, or Y, may be writing them: one at a time
                self._write_processing_log()
                if reject_counts(self.db) != rejects_before:  # rows quarantined or a file failed: report it
                    write_quality_report(self.db, self.store)
        return len(work)

    def _claim(self, item: FileWork) -> bool:
        """Lease the file to this X; False (counted in `skipped`) while another live X holds it."""
        claim = self.leases.claim(item.file.file_id)
        if not claim.got:
            self.skipped += 1
            log.debug("file %s is leased to %s; left to it", item.file.file_id, claim.holder or "another X")
        return claim.got

    def _work_on(self, item: FileWork, rest: list[FileWork]) -> None:
        """Handle a file whose lease this X holds, and give the lease back (an importance file loaded in the
        background gives it back when its load is over: `_importance_done`)."""
        background = False
        try:
            fresh = self._after_claim(item)
            if fresh is not None and self._overlaps_importance(fresh, rest):
                self._importance = _BackgroundImportance(self, fresh)
                background = True
            elif fresh is not None:
                self._handle(fresh)
        finally:
            if not background:
                self.leases.release(item.file.file_id)

    def _after_claim(self, item: FileWork) -> FileWork | None:
        """Once the lease is held: rebuild what a previous holder left pending, then look at the file's ledger
        row again (another X may have moved it on since the poll read it); None if nothing is left to do."""
        f = item.file
        self._recover_chunks(f, ledger.pending_chunks(self.db, f.file_id))
        return self.monitor.recheck(f)

    def _overlaps_importance(self, item: FileWork, rest: list[FileWork]) -> bool:
        """Load this importance file in the background while the transaction files after it are parsed?

        Only with a source whose files can be fetched concurrently; chunks are still recorded only once the
        load has committed (see `_importance_done`), so Y never evaluates one against the previous weights.
        """
        if not (
            self.source.concurrent_fetch
            and self._importance is None
            and looks_like_importance(item)
            and any(not looks_like_importance(w) for w in rest)
        ):
            return False
        try:
            with self.source.fetch(item.file) as path:
                return read_header(path).kind == KIND_IMPORTANCE  # the header decides, not the name
        except Exception:  # noqa: BLE001 - handled in place, where `_handle` reports it
            return False

    def _importance_loading(self) -> bool:
        return self._importance is not None and not self._importance.done()

    def _importance_done(self) -> None:
        """Wait for a background importance load (its faults are raised here, as if it ran in place)."""
        job, self._importance = self._importance, None
        if job is not None:
            try:
                job.wait()
            finally:
                self.leases.release(job.file_id)

    def run(self, *, drain: bool) -> int:
        """Poll until stopped (or, with `drain`, until one poll finds everything ingested, by this X or others),
        renewing this X's file leases meanwhile.

        Transient faults (PostgreSQL restarting, the source or the lake unreachable) are waited out in
        place; an error that is not transient is counted against its file or chunk and never stops X.
        """
        self.leases.start()
        try:
            return self._poll_until_stopped(drain=drain)
        finally:
            self.leases.close()

    def _poll_until_stopped(self, *, drain: bool) -> int:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.skipped = 0
                self.recover()  # chunks left pending by a crash or a write that failed
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - transient faults only; the rest is raised
                if not is_retryable(exc):
                    raise
                log.warning(
                    "poll interrupted by a transient fault, trying again in %.0f s: %s",
                    self.settings.processing_interval,
                    brief(exc),
                    extra={"event": "poll_retry"},
                )
            else:
                if drain and not self.skipped and not ledger.pending_chunks(self.db):
                    log.info(
                        "drain: every file in the %s is ingested", self.source.describe(), extra={"event": "drained"}
                    )
                    return 0
            self.stop.wait(max(0.0, self.settings.processing_interval - (time.monotonic() - started)))
        return 1 if drain else 0

    # ---------------------------------------------------------------- per file

    def _handle(self, item: FileWork) -> None:
        f = item.file
        ids = {"file_id": f.file_id}
        try:
            with self.source.fetch(f) as path:
                header = read_header(path)
                if header.kind == KIND_IGNORED:
                    self.monitor.record_status(f, KIND_IGNORED, "ignored", header.reason, checksum=f.checksum)
                    log.info(
                        "file %s (%s) ignored: %s",
                        f.file_id,
                        f.name,
                        header.reason,
                        extra={"event": "file_ignored", **ids},
                    )
                    return
                if header.kind == KIND_IMPORTANCE:
                    self._importance_done()  # two importance files of a poll are loaded in order
                    self._load_importance(f, path, header.data_offset)
                else:
                    self._ingest_transactions(f, path, header.data_offset, item)
        except FileRejected as exc:
            self._fail_file(f, str(exc))
        except ledger.LeaseLost as exc:
            log.warning("%s", exc, extra={"event": "lease_lost", **ids})
        except FileNotFoundError:
            log.warning(
                "file %s (%s) disappeared before it could be read; will look again", f.file_id, f.name, extra=ids
            )
        except Exception as exc:  # noqa: BLE001 - transient faults go up; anything else is counted per file
            if is_retryable(exc):
                raise
            from src.utils.sources import SourceError

            if isinstance(exc, SourceError):
                self._fail_file(f, str(exc))  # the source says this file cannot be had (404, not CSV, ...)
                return
            error = f"{type(exc).__name__}: {brief(exc)}"
            attempts, failed = ledger.note_file_failure(
                self.db, f, source=self.monitor.source_tag, error=error, max_attempts=self.settings.max_attempts
            )
            if failed:
                self.db.log_event(COMPONENT, "ERROR", "file_failed", f"{f.name}: {error}", file_id=f.file_id)
                log.error(
                    "file %s (%s) failed after %d attempts: %s",
                    f.file_id,
                    f.name,
                    attempts,
                    error,
                    extra={"event": "file_failed", **ids},
                )
            else:
                log.warning(
                    "file %s (%s): attempt %d of %d failed: %s",
                    f.file_id,
                    f.name,
                    attempts,
                    self.settings.max_attempts,
                    error,
                    exc_info=True,
                    extra={"event": "file_attempt_failed", **ids},
                )

    def _fail_file(self, f: SourceFile, reason: str) -> None:
        self.monitor.record_status(f, "unknown", "failed", reason, checksum=f.checksum)
        self.db.log_event(COMPONENT, "ERROR", "file_failed", f"{f.name}: {reason}", file_id=f.file_id)
        log.error(
            "file %s (%s) failed: %s", f.file_id, f.name, reason, extra={"event": "file_failed", "file_id": f.file_id}
        )

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
        with (
            _RunningMd5(path) as hashed,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="x-write") as writer,
            _Stager(self) as stager,
        ):
            hashed.advance(start)
            in_flight: _InFlight | None = None
            for rows, seq, parsed, payload in self._prepared_chunks(path, start, first_line, chunk_seq, f.file_id):
                self._importance_done()  # reference data committed before this file's first chunk is
                if self.stop.is_set():
                    break
                in_flight = self._emit_chunk(f, hashed, rows, seq, parsed, payload, writer, stager, in_flight)
            # The last chunk, or the one under way when asked to stop. After an error it stays `pending`
            # (its write is finished by the executor's exit) and `recover` releases it.
            if in_flight is not None:
                self._release(f, in_flight)
            if self.stop.is_set():
                return
            hashed.advance(scan.size)  # trailing blank lines, if any
            checksum = hashed.hexdigest()
        if self.stop.is_set():
            return

        def finish(cur) -> tuple[int, int, int]:
            self.leases.fence(cur, f.file_id)
            done = ledger.finish_file(cur, f.file_id, checksum=checksum, size=scan.size, modified_time=f.modified_time)
            self.db.log_event(
                COMPONENT,
                "INFO",
                "file_ingested",
                f"{f.name}: {done[0]} rows in {done[2]} chunks, {done[1]} quarantined",
                file_id=f.file_id,
                row_count=done[0],
                cur=cur,
            )
            return done

        ingested, quarantined, chunks = self.db.run(finish, what=f"finish file {f.file_id}")
        log.info(
            "file %s (%s) done: %d rows in %d chunks, %d quarantined",
            f.file_id,
            f.name,
            ingested,
            chunks,
            quarantined,
            extra={"event": "file_ingested", "file_id": f.file_id},
        )

    def _prepared_chunks(self, path: Path, start: int, first_line: int, chunk_seq: int, file_id: str):
        """(rows, chunk_seq, parsed, payloads) for each chunk in file order. Parsing and encoding (Parquet, and the
        staged rows' CSV) of the next READ_AHEAD chunks run in a helper thread (Arrow releases the GIL) while the
        caller records and writes the current one."""
        with ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="x-parse") as pool:
            ahead: deque = deque()
            for cut in itertools.chain(self._cut(path, start, first_line, chunk_seq), [None]):
                if cut is not None:
                    ahead.append((*cut, pool.submit(_prepare_chunk, cut[0], file_id, cut[1])))
                # While an importance file loads, chunks cannot be recorded yet: parse further ahead meanwhile.
                limit = OVERLAP_AHEAD if self._importance_loading() else READ_AHEAD
                while ahead and (cut is None or len(ahead) > limit):
                    rows, seq, job = ahead.popleft()
                    yield (rows, seq, *job.result())

    def _cut(self, path: Path, start: int, first_line: int, chunk_seq: int):
        """(rows, chunk_seq) for each chunk of BATCH_SIZE data rows from byte `start`, in file order."""
        pending = RowBlock.empty()
        batch = self.settings.batch_size
        for block in iter_row_blocks(path, start, first_line, max_line_bytes=self.settings.max_line_bytes):
            pending = RowBlock.concat(pending, block)
            while len(pending) >= batch:
                yield pending.slice(0, batch), chunk_seq
                pending = pending.slice(batch, len(pending))
                chunk_seq += 1
        if len(pending):
            yield pending, chunk_seq

    def _emit_chunk(
        self,
        f: SourceFile,
        hashed: _RunningMd5,
        rows: RowBlock,
        chunk_seq: int,
        parsed: ParsedRows,
        payload: _Payloads,
        writer: ThreadPoolExecutor,
        stager: _Stager,
        previous: _InFlight | None,
    ) -> _InFlight:
        """Release the previous chunk and record this one in one ledger transaction, then start writing its objects
        and staging its rows.

        The object write (and its fsync) and the staging COPY run in their own threads while the next chunk is
        cut, hashed and recorded. Each chunk's own order is unchanged: recorded, then written and staged, then
        marked written, so a crash at any point leaves only `pending` chunks that `recover` rebuilds.
        """
        t0 = time.perf_counter()
        pos, end = hashed.pos, int(rows.end_offset[-1])
        prefix_md5 = hashed.advance(end)
        today = datetime.now(timezone.utc).date()
        chunk = ledger.NewChunk(
            file_id=f.file_id,
            chunk_seq=chunk_seq,
            first_line=int(rows.line_no[0]),
            last_line=int(rows.line_no[-1]),
            rows_total=len(rows),
            rows_valid=parsed.good.num_rows,
            rows_quarantined=len(parsed.bad_lines),
            bytes_start=pos,
            bytes_end=end,
            prefix_md5=prefix_md5,
            object_key=lake_paths.chunk_key(today, f.file_id, chunk_seq),
            ingest_date=today,
        )
        release = None
        if previous is not None:
            release = (previous.seq, previous.done())
            self._pace()
        seq = self._record_chunk(f, chunk, parsed, release=release)
        write = writer.submit(
            self._write_chunk_objects, chunk.object_key, f.file_id, chunk_seq, parsed, payload.parquet
        )
        stage = stager.submit(f.file_id, seq, payload.staged) if payload.staged is not None else None
        if previous is not None:
            self._log_release(f, previous)
        return _InFlight(chunk, seq, write, stage, t0)

    def _release(self, f: SourceFile, c: _InFlight) -> None:
        """Once the chunk's objects are in the lake and its rows staged, wait for its turn (pace) and mark it
        written: Y may take it."""
        content_md5 = c.done()
        self._pace()
        ledger.mark_chunk_written(self.db, c.seq, content_md5)
        self._log_release(f, c)

    def _log_release(self, f: SourceFile, c: _InFlight) -> None:
        chunk = c.chunk
        log.info(
            "chunk %s-%06d written: lines %d-%d, %d rows, %d quarantined, %s (%.0f ms)",
            f.file_id,
            chunk.chunk_seq,
            chunk.first_line,
            chunk.last_line,
            chunk.rows_valid,
            chunk.rows_quarantined,
            chunk.object_key,
            (time.perf_counter() - c.started) * 1000,
            extra={"event": "chunk_written", "file_id": f.file_id, "chunk_id": c.seq, "chunk_seq": chunk.chunk_seq},
        )

    def _record_chunk(
        self,
        f: SourceFile,
        chunk: ledger.NewChunk,
        parsed: ParsedRows,
        *,
        release: tuple[int, str] | None = None,
    ) -> int:
        """The chunk's ledger row, the file's progress and its quarantined rows, in one transaction, with the
        previous chunk's release (seq, content md5) when given."""

        def fn(cur) -> int | None:
            self.leases.fence(cur, f.file_id)  # LeaseLost if another X has taken the file over
            if release is not None:
                ledger.mark_written(cur, *release)
            seq = ledger.record_chunk(cur, chunk)
            if seq is None or not parsed.bad_lines:
                return seq
            copy_rows(
                cur,
                "quarantine",
                QUARANTINE_TABLE_COLUMNS,
                (
                    (f.file_id, ln, chunk.chunk_seq, "ingest", r, raw)
                    for ln, r, raw in zip(parsed.bad_lines, parsed.bad_reasons, parsed.bad_raw)
                ),
            )
            self.db.log_event(
                COMPONENT,
                "WARNING",
                "rows_quarantined",
                f"{f.name}: {chunk.rows_quarantined} bad row(s) in chunk {chunk.chunk_seq}, first at line "
                f"{parsed.bad_lines[0]}: {parsed.bad_reasons[0]}",
                file_id=f.file_id,
                chunk_id=seq,
                row_count=chunk.rows_quarantined,
                cur=cur,
            )
            return seq

        seq = self.db.run(fn, what=f"record chunk {f.file_id}-{chunk.chunk_seq:06d}")
        # None: a redo of a commit that had gone through (its acknowledgement was lost with the connection).
        return seq if seq is not None else ledger.chunk_seq_of(self.db, f.file_id, chunk.chunk_seq)

    def _stage(self, db: Database, file_id: str, seq: int, payload: bytes) -> None:
        """Stage a recorded chunk's rows for Y's commit (`ledger.stage_chunk`), fenced by the file's lease."""

        def fn(cur) -> None:
            self.leases.hold(cur, file_id)  # LeaseLost if another X has taken the file over
            ledger.stage_chunk(cur, seq, payload)

        db.run(fn, what=f"stage chunk {seq}")

    def _write_chunk_objects(
        self, key: str, file_id: str, chunk_seq: int, parsed: ParsedRows, payload: bytes | None = None
    ) -> str:
        """Write the chunk (and its quarantine rows) to the lake; returns the chunk object's md5.

        Idempotent (the same bytes under the same key are a no-op); different bytes under the key raise
        ObjectConflict, which is counted against the chunk by `recover`.
        """
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
            self.store.put_bytes(
                lake_paths.quarantine_key("ingest", file_id, chunk_seq), parquet_bytes(bad), overwrite=True
            )
        self.store.put_bytes(key, payload)
        return hashlib.md5(payload, usedforsecurity=False).hexdigest()

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
        """Replace customer_importance with this file's rows in one transaction (streamed: see importance.py)."""
        self.monitor.start_file(f, KIND_IMPORTANCE)

        def load(cur):
            self.leases.fence(cur, f.file_id)
            cur.execute("LOCK TABLE customer_importance IN ACCESS EXCLUSIVE MODE")
            cur.execute("TRUNCATE customer_importance")
            cur.execute("DELETE FROM quarantine WHERE file_id = %s AND stage = 'ingest'", (f.file_id,))
            done = copy_importance(cur, path, data_offset, f.file_id, max_line_bytes=self.settings.max_line_bytes)
            if done.first_bad is not None:
                self.db.log_event(
                    COMPONENT,
                    "WARNING",
                    "rows_quarantined",
                    f"{f.name}: {done.rows_quarantined} bad importance row(s), first at line {done.first_bad[0]}: "
                    f"{done.first_bad[1]}",
                    file_id=f.file_id,
                    row_count=done.rows_quarantined,
                    cur=cur,
                )
            cur.execute(
                "INSERT INTO importance_state (id, file_id, checksum, rows_loaded, version) VALUES (1, %s, %s, %s, 1) "
                "ON CONFLICT (id) DO UPDATE SET file_id = EXCLUDED.file_id, checksum = EXCLUDED.checksum, "
                "rows_loaded = EXCLUDED.rows_loaded, version = importance_state.version + 1, loaded_at = now()",
                (f.file_id, done.md5, done.rows_loaded),
            )
            ledger.finish_importance_file(
                cur,
                f.file_id,
                checksum=done.md5,
                size=done.size,
                modified_time=f.modified_time,
                good=done.rows_loaded,
                bad=done.rows_quarantined,
            )
            self.db.log_event(
                COMPONENT,
                "INFO",
                "importance_loaded",
                f"{f.name}: {done.rows_loaded} rows loaded",
                file_id=f.file_id,
                row_count=done.rows_loaded,
                cur=cur,
            )
            cur.execute("SELECT pg_notify(%s, %s)", (CHUNK_CHANNEL, "importance"))
            return done

        done = self.db.run(load, what=f"load importance file {f.file_id}")  # streamed again from the file on a redo
        log.info(
            "importance file %s (%s) loaded: %d rows, %d quarantined",
            f.file_id,
            f.name,
            done.rows_loaded,
            done.rows_quarantined,
            extra={"event": "importance_loaded", "file_id": f.file_id},
        )

    def _write_processing_log(self) -> None:
        files = self.db.run(ledger.file_summaries, what="read the files for the processing log")
        for f in files:  # the log's own shape: no lines_done, times to the second
            del f["lines_done"]
            f["updated_at"] = f["updated_at"].astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        doc = {
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": self.source.describe(),
            "files": files,
            "totals": {
                "files": len(files),
                "rows_ingested": sum(f["rows_ingested"] for f in files),
                "rows_quarantined": sum(f["rows_quarantined"] for f in files),
                "chunks": sum(f["chunks"] for f in files),
            },
        }
        data = json.dumps(doc, indent=2, default=str).encode()
        self.store.put_bytes(lake_paths.PROCESSING_LOG_KEY, data, overwrite=True)


class _BackgroundImportance:
    """An importance file handled in a thread on its own connection, while X parses the transaction files after it.

    The load is the same transaction as in place (PostgreSQL does most of its work); what it does with a
    failure is what `_handle` does. Only a transient fault is left for `wait` to raise in the poll.
    """

    def __init__(self, owner: Ingestor, item: FileWork) -> None:
        self.file_id = item.file.file_id
        self._db = Database(owner.settings, stop=owner.stop)
        self._sibling = Ingestor(owner.settings, self._db, owner.store, owner.source, owner.stop, leases=owner.leases)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="x-importance")
        self._job = self._pool.submit(self._sibling._handle, item)

    def done(self) -> bool:
        return self._job.done()

    def wait(self) -> None:
        try:
            self._job.result()
        finally:
            self._pool.shutdown()
            self._db.close()


class _Stager:
    """X's staging thread and its own connection: a chunk's rows are staged (`Ingestor._stage`) while the main
    thread records the next chunks. One thread, so the connection is never shared."""

    def __init__(self, owner: Ingestor) -> None:
        self._owner = owner
        self._db = Database(owner.settings, stop=owner.stop)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="x-stage")

    def submit(self, file_id: str, seq: int, payload: bytes) -> Future:
        return self._pool.submit(self._owner._stage, self._db, file_id, seq, payload)

    def __enter__(self) -> _Stager:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # After an error, chunks not yet staged stay `pending` and `recover` stages them.
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        self._db.close()


@dataclass(frozen=True)
class _InFlight:
    """A chunk recorded in the ledger whose objects are being written and rows staged, not yet released to Y."""

    chunk: ledger.NewChunk
    seq: int
    write: Future
    stage: Future | None  # None: no row to stage
    started: float

    def done(self) -> str:
        """Wait for the object write and the staging (their faults are raised here); the object's md5."""
        if self.stage is not None:
            self.stage.result()
        return self.write.result()


def _glued_to_last_row(path: Path, start: int) -> bool:
    """Bytes appended right after an unterminated last row extend that row: a row already ingested changed."""
    with open(path, "rb") as fh:
        fh.seek(start - 1)
        tail = fh.read(3)
    nxt = tail[1:]
    if tail[:1] == b"\n" or not nxt:
        return False
    return not (nxt.startswith(b"\n") or nxt.startswith(b"\r\n") or nxt == b"\r")


class _Payloads(NamedTuple):
    parquet: bytes  # the chunk object
    staged: bytes | None  # its rows for `ledger.stage_chunk`; None when it has none


def _prepare_chunk(rows: RowBlock, file_id: str, chunk_seq: int) -> tuple[ParsedRows, _Payloads]:
    parsed = parse_transactions(rows, file_id=file_id, chunk_seq=chunk_seq)
    staged = ledger.staging_payload(parsed.good) if parsed.good.num_rows else None
    return parsed, _Payloads(parquet_bytes(parsed.good), staged)


def _concat_blocks(blocks) -> RowBlock:
    out = RowBlock.empty()
    for b in blocks:
        out = RowBlock.concat(out, b)
    return out


class _RunningMd5:
    """The md5 of a file's bytes [0, pos), advanced chunk by chunk: each chunk's prefix md5 and, at the end,
    the whole file's, in one read of the file."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.pos = 0

    def __enter__(self) -> _RunningMd5:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def advance(self, end: int) -> str:
        """Hash up to byte `end`; returns the md5 of [0, end)."""
        self._fh.seek(self.pos)
        while self.pos < end:
            data = self._fh.read(min(end - self.pos, 8 << 20))
            if not data:
                break
            self._md5.update(data)
            self.pos += len(data)
        return self.hexdigest()

    def hexdigest(self) -> str:
        return self._md5.hexdigest()


# -------------------------------------------------------------------- entry point


def run_worker(settings: Settings, *, drain: bool, stop: threading.Event | None = None) -> int:
    """Build X's resources from the settings and run until stopped (or drained): under the supervisor, once its own
    start-up (the embedded PostgreSQL, the schema) is done (`wait_for_start`)."""
    from src.resources import open_lake, open_source
    from src.utils.runtime import wait_for_start

    stop = stop or threading.Event()
    if not wait_for_start(stop, DSN_ENV):  # launched before the supervisor's own start-up was done, then stopped
        return 0
    db = Database(settings, stop=stop)
    db.apply_schema()
    store = open_lake(settings, stop=stop)
    source = open_source(settings, db, stop=stop)
    log.info("mechanism X: reading %s, writing %s", source.describe(), store.describe())
    try:
        return Ingestor(settings, db, store, source, stop).run(drain=drain)
    finally:
        source.close()
        db.close()


def build_parser() -> argparse.ArgumentParser:
    return drain_parser(
        "python -m src.mechanism_x.data_ingestion",
        (
            "Mechanism X alone: watch the source (Google Drive folder when GDRIVE_FOLDER_ID is set, else "
            "LOCAL_INBOX_DIR) every PROCESSING_INTERVAL seconds, validate each CSV, cut transaction files into "
            "chunks of BATCH_SIZE rows released one per CHUNK_INTERVAL_SECONDS, write each chunk as Parquet to "
            "the lake and record files and chunks in PostgreSQL. Settings come from the environment and .env."
        ),
        drain_help="ingest everything now in the source, then exit 0 (instead of polling forever)",
    )


class _NoPandas(importlib.abc.MetaPathFinder):
    """Refuses `import pandas` in the X process, which never uses it.

    pyarrow looks for pandas on its first conversion of Python values (`pa.array`, a scalar argument
    to a compute kernel) and imports it if installed: a second of start-up on the 2-core machine, for
    nothing. Refused, pyarrow records that pandas is absent and carries on; the objects are the same.
    """

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("Mechanism X does not use pandas", name=name)
        return None


def main(argv: list[str] | None = None) -> int:
    from src.worker import worker_main

    if "pandas" not in sys.modules:
        sys.meta_path.insert(0, _NoPandas())
    return worker_main(
        "mechanism X",
        build_parser(),
        argv,
        lambda settings, args, stop: run_worker(settings, drain=args.drain, stop=stop),
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
