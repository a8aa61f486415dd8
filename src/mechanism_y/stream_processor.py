"""Mechanism Y: the chunks X records, in ledger order, through Spark into the running state and the patterns.

Y takes every chunk that is waiting (up to Y_MAX_BATCH_CHUNKS) as one batch and, in ONE Spark action
(`_single_pass`), reads their Parquet objects, annotates problems, folds the clean rows into the per
(merchant, customer) state and judges PatId1-3 at each chunk's own boundary
(`pattern_detector.detect_batch`), so the detections and the chunk each is credited to are those of
one-by-one processing. Keeping up, a batch is one chunk; behind (start-up, a burst, a restart), it
catches up without paying Spark's per-job cost per chunk. The action returns to the driver only the
detections, each chunk's counts and its rejected rows: the rows themselves reach `transactions` from the
copy X staged with each chunk's ledger record (`staged_rows`). Y then commits in ONE PostgreSQL
transaction: the staged rows published (minus the rejected) and folded into `y_state`, the new
detections and every chunk's processed mark. The commit runs on a thread of its own, beside the next
batch's Spark pass, which folds onto the committing batch's versions; a failed commit undoes that pass
too (`process_batch`). A crash before the commit leaves no trace, so the batch is done again from the
state of the previous commit; after it, none of its chunks is ever redone. Chunks without staged rows
(recorded by an older X) and chunks repeating a row id take the driver path: their rows are collected,
and the commit loads them.

    python -m src.mechanism_y.stream_processor [--drain]
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Callable, TypeVar

import psycopg2.extras
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from config.config import Settings
from src import ledger
from src.errors import ProcessorError, RetryableError, is_retryable
from src.ledger import ChunkMark, ChunkRef
from src.mechanism_y import pattern_detector as patterns
from src.mechanism_y.background_archive import IDLE_BEFORE_BUILD_S, BackgroundBuild
from src.mechanism_y.data_validator import (
    DUPLICATE,
    PROBLEM,
    chunk_schema_problems,
    mark_duplicates,
    problem_column,
)
from src.mechanism_y.detection_writer import DetectionWriter, ist
from src.observability import metrics
from src.quality_report import write_quality_report
from src.schemas.transaction_schemas import (
    QUARANTINE_SCHEMA,
    QUARANTINE_TABLE_COLUMNS,
    STATE_ARROW_SCHEMA,
    WEIGHTS_ARROW_SCHEMA,
    batch_rows_spark_schema,
    chunk_spark_schema,
    state_spark_schema,
    weights_spark_schema,
)
from src.utils import lake_paths
from src.utils.db import CHUNK_CHANNEL, DSN_ENV, Database, Listener, LockLost, copy_csv, copy_rows
from src.utils.object_store import ObjectStore, parquet_bytes
from src.utils.retry import brief
from src.utils.runtime import EXIT_DRAIN_IMPOSSIBLE, READY_FILE_ENV, drain_parser, x_finished
from src.utils.spark_utils import checkpoint

log = logging.getLogger(__name__)
COMPONENT = "mechanism_y"
SINGLE_Y_LOCK = 7261002

TRANSACTION_COLUMNS = ledger.TRANSACTION_COLUMNS
ACTIONS = patterns.ACTION_TYPES
CUT = "_cut"
WARM_UP_AFTER_IDLE_S = 2.0  # a chunk X releases when Y reports ready comes well within this
WARM_UP_ROWS = 1_000  # the plans do not depend on the size: a small made-up chunk warms the same code
STATE_SQL = "SELECT merchant, customer, n, amount_sum, has_f, has_m FROM y_state"
WEIGHTS_SQL = "SELECT source, target, sum(weight), count(*) FROM customer_importance GROUP BY source, target"
# work_mem for WEIGHTS_SQL's transaction alone. With the server's default (4 MB) PostgreSQL groups the file's rows
# by walking the (source, target) index, one heap visit per row; with room for a hash table of the pairs it reads
# the table once. 3,000,000 rows, 99,144 pairs: 2.98 s -> 1.15 s; 300,000 rows: 0.37 s -> 0.15 s (bench/README.md,
# "The weights' GROUP BY"). Past what fits, PostgreSQL's hash aggregate spills to disk, no worse than the sort.
WEIGHTS_WORK_MEM = "64MB"
WEIGHTS_POLL_S = 0.1  # how often `prefetch_weights` looks for X's importance file while the JVM starts
MAX_BATCH_ROWS = 200_000  # a batch takes more than one chunk only while it stays within this many rows
HIT, SUMMARY = "hit", "summary"  # the two kinds of rows the single pass returns
T = TypeVar("T")

# What a batch's single Spark action returns: every detection hit (`{hits}`, the detection statement itself, built
# in the same `spark.sql` call by `detect_batch(..., around=...)`), and per (chunk, file id, 32,768-line bucket) of
# the scanned rows: how many row ids and distinct row ids (a bitmap: exact, and partial aggregation keeps the
# shuffle to a few rows), the clean rows' count and amount, and the rejected rows.
_SUMMARY_AND_HITS_SQL = """
SELECT 'hit' AS kind, cut, pattern_id, customer_name, merchant_id,
       CAST(NULL AS BIGINT) AS ids, CAST(NULL AS BIGINT) AS distinct_ids, CAST(NULL AS BIGINT) AS clean,
       CAST(NULL AS DECIMAL(38,2)) AS clean_amount,
       CAST(NULL AS ARRAY<STRUCT<line: BIGINT, problem: STRING>>) AS rejected
FROM {hits}
UNION ALL
SELECT 'summary', cut, NULL, NULL, NULL,
       count(source_line),
       bitmap_count(bitmap_construct_agg(bitmap_bit_position(source_line))),
       count_if(_problem IS NULL),
       CAST(sum(CASE WHEN _problem IS NULL THEN amount END) AS DECIMAL(38,2)),
       collect_list(CASE WHEN _problem IS NOT NULL THEN named_struct('line', source_line, 'problem', _problem) END)
FROM {rows}
GROUP BY cut, source_file_id, bitmap_bucket_number(source_line)
"""


class StandbyDone(ProcessorError):
    """A standby under --drain found everything processed by the active Y: nothing is left to take over."""


class StreamProcessor:
    def __init__(self, settings: Settings, db: Database, store: ObjectStore, spark, stop: threading.Event) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.spark = spark
        self.stop = stop
        self.drain_requested = threading.Event()
        self.y_start = datetime.now(timezone.utc)
        self.thresholds = patterns.Thresholds.from_settings(settings)
        self.writer = DetectionWriter(settings, db, store)
        self.state = None
        self._versions = None  # the checkpoint the state is a view of, released once the next one exists
        self.weights = None
        self.weights_version: int | None = None
        self.emitted: set[tuple[str, str, str]] = set()
        self._listen: Listener | None = None
        self._running = False
        self._isolate = False  # after a failed batch: take one chunk at a time, so the failure finds its chunk
        self._fault_delay = 0.0
        self._prepared = False
        self._state_table: pa.Table | None = None  # read by `prepare`, handed to Spark by `_load_state`
        self._prefetched_weights: tuple[int, pa.Table] | None = None
        self._warmed = False  # no idle warm-up from now on: a batch or a warm-up ran, or it was decided against
        self._spark_cold = True  # no batch and no warm-up has been through Spark yet in this session
        self._problem: tuple[object, object] | None = None  # (session, `problem_column()`): built once per session
        self._idle_since: float | None = None
        self.holder = ledger.holder_id()
        self._term: int | None = None  # of this Y's leadership (ledger.take_leadership)
        self._standby_drain = False
        self._reported_ready = False
        self.standby_session = None  # a BackgroundSession a standby may warm up while it waits (run_worker)
        self._standby_warm_up: threading.Thread | None = None
        # Rows the last batch's Spark work returned to this driver: hits, per-chunk summaries and rejected rows.
        self.rows_to_driver = 0
        self._pending: _Computed | None = None  # a batch whose Spark pass is done, waiting for its commit
        self._in_flight: tuple[_Computed, Future] | None = None  # a batch committing on the commit thread
        self._committer: ThreadPoolExecutor | None = None
        self._settle_waiting: float | None = None  # perf_counter since which the loop waits for the commit
        self.archive_build = BackgroundBuild(settings)  # runs only while Y is idle (`_run`)

    # ---------------------------------------------------------------- start-up

    def prepare(self, *, drain: bool = False) -> None:
        """The start-up work that needs only PostgreSQL, done while Spark's JVM starts (`run_worker` starts the
        session on a thread): the leadership, the listener, the state and the weights read out as Arrow
        tables, the detections so far. Done once; `start` calls it when nobody did."""
        if self._prepared:
            return
        self._standby_drain = drain
        self._lead()
        self._listen = Listener(self.db, CHUNK_CHANNEL)
        self._state_table = self._copy_state()
        self._prefetched_weights = self._fetch_weights()
        self.emitted = {
            (p, c, m)
            for p, c, m in self.db.query("SELECT pattern_id, customer_name, merchant_id FROM pattern_detections")
        }
        self.writer.tick(final=False)
        self._prepared = True

    def _lead(self) -> None:
        """Become the one active Y on this database, or stand by until the active one (another daemon's) stops.

        The advisory lock decides; the session of a killed leader ends with it, so the lock frees at once and
        the standby, polling it every second, takes over (event `standby_takeover`). A standby holds one
        PostgreSQL connection and reads nothing of the state before it leads (the leader is changing it). The
        lock is re-taken on every reconnect; if another Y led meanwhile, LockLost ends this one (its state in
        memory is stale) and the supervisor starts it again, as a standby."""
        self.db.hold_lock(
            SINGLE_Y_LOCK,
            who="Mechanism Y",
            while_waiting=self._stand_by,
            on_taken=self._on_leading,
            poll=self.settings.y_standby_poll_seconds,
        )

    def _stand_by(self, conn) -> None:
        """At each poll of a standby: chunks are served by the leader, so this daemon's X need not hold them
        (`_report_ready`); under --drain, once the leader has processed everything, there is nothing to take
        over (StandbyDone)."""
        if not self._reported_ready:
            self._report_ready()
        self._warm_up_on_standby()
        if x_finished():
            self.drain_requested.set()
        if not (self._standby_drain or self.drain_requested.is_set()):
            return
        with conn.cursor() as cur:
            done = ledger.all_processed(cur)
        conn.commit()
        if done:
            raise StandbyDone("drain: the active Mechanism Y has processed every chunk; the standby exits")

    def _warm_up_on_standby(self) -> None:
        """Once the session a standby started in advance is up: Spark's first plans, code generation and JIT
        are paid for while waiting (`warm_up`, on a thread, so the lock is still polled every second), and
        the first batch after a takeover runs warm. The warm-up gives way as soon as this Y leads."""
        session = self.standby_session
        if self._standby_warm_up is not None or session is None or not session.started():
            return

        def warm() -> None:
            try:
                self.spark = session.wait()
                if self.warm_up(abandon=lambda: self.stop.is_set() or self._term is not None):
                    self._warmed = True
            except Exception as exc:  # noqa: BLE001 - only an optimisation: the first batch warms Spark up anyway
                log.info("standby warm-up skipped: %s", brief(exc))

        self._standby_warm_up = threading.Thread(target=warm, name="y-standby-warm-up", daemon=True)
        self._standby_warm_up.start()

    def _on_leading(self, conn, first: bool) -> None:
        with conn.cursor() as cur:
            if first:
                self._term, previous = ledger.take_leadership(cur, ledger.Y_ROLE, self.holder)
                log.info(
                    "mechanism Y %s leads (term %d; previous leader %s)",
                    self.holder,
                    self._term,
                    previous or "none",
                    extra={"event": "y_leader"},
                )
            elif not ledger.still_leader(cur, ledger.Y_ROLE, self.holder, self._term):
                raise LockLost("another Mechanism Y led while this one's connection was down; starting again")

    def start(self) -> None:
        """Ready as soon as the session is up: X releases its first chunk then (see `_report_ready`), and the
        first chunk, not a made-up one, pays for Spark's cold plans. State and weights are handed to Spark
        without a job of their own: their checkpoints fill in the first batch's jobs."""
        self.prepare()
        t0 = time.perf_counter()
        self._report_ready()
        self._load_state()
        self._refresh_weights()
        log.info(
            "mechanism Y up (YStartTime %s): state of %d (merchant, customer) pairs, %d detections so far "
            "(Spark side of the start-up %.2f s)",
            ist(self.y_start),
            self.state_rows,
            len(self.emitted),
            time.perf_counter() - t0,
            extra={"event": "y_ready"},
        )

    def _report_ready(self) -> None:
        """Under the supervisor, X holds its first chunk until this file exists (main.py): created once the
        session is up, so chunks are not paced out into a queue nobody serves during the JVM's start (or at
        once by a standby: the leader serves them)."""
        self._reported_ready = True
        ready = os.environ.get(READY_FILE_ENV)
        if ready:
            with open(ready, "w") as f:
                f.write(f"{os.getpid()}\n")

    def _copy_out(self, sql: str, schema: pa.Schema, *, what: str, work_mem: str | None = None) -> pa.Table:
        """The rows of `sql` as an Arrow table of `schema`, through one COPY (`work_mem` for its transaction);
        `what` names the read in the retry's messages."""
        buf = io.BytesIO()

        def fn(cur) -> None:
            buf.seek(0)
            buf.truncate()
            if work_mem is not None:
                cur.execute("SELECT set_config('work_mem', %s, true)", (work_mem,))
            cur.copy_expert(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER true)", buf)

        self.db.run(fn, what=what)
        if buf.tell() == 0:
            return schema.empty_table()
        buf.seek(0)
        table = pacsv.read_csv(
            buf,
            read_options=pacsv.ReadOptions(column_names=schema.names, skip_rows=1),
            convert_options=pacsv.ConvertOptions(
                column_types=schema,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                true_values=["t"],  # PostgreSQL's text form of booleans
                false_values=["f"],
            ),
        )
        return table.cast(schema)

    def _load_state(self) -> None:
        table = self._state_table if self._state_table is not None else self._copy_state()
        self._state_table = None
        state = patterns.arrow_frame(self.spark, table, state_spark_schema())
        # Lazy: the first fold computes and keeps it, instead of a job of its own on a cold JVM (seconds).
        self.state = checkpoint(patterns.by_merchant(state), self.settings, eager=False)
        self.state_rows = table.num_rows

    def _fetch_weights(self) -> tuple[int, pa.Table] | None:
        """(version, weights aggregated to (customer, merchant)) of the importance file X loaded; None if none."""
        rows = self.db.query("SELECT version FROM importance_state WHERE id = 1")
        if not rows:
            return None
        # Aggregated where the rows live: the file repeats keys, so joining raw rows would multiply counts;
        # and it ships a few thousand rows to Spark, as one Arrow table, instead of the whole file.
        return rows[0][0], self._copy_weights()

    def prefetch_weights(self, session_up: Callable[[], bool]) -> None:
        """While the JVM starts (`session_up` still False): if `prepare` found no importance file loaded yet, look
        for one every WEIGHTS_POLL_S and read its weights as soon as X has loaded it. X loads the file while Y's
        JVM starts, and reading its weights then (an aggregate of the whole file in PostgreSQL: 0.1-1 s for
        0.3-1.2 million rows) takes that read off the start's path: the session is not up yet anyway."""
        while self._prefetched_weights is None and not session_up() and not self.stop.is_set():
            self._prefetched_weights = self._fetch_weights()
            if self._prefetched_weights is None:
                self.stop.wait(WEIGHTS_POLL_S)

    def _copy_weights(self) -> pa.Table:
        return self._copy_out(WEIGHTS_SQL, WEIGHTS_ARROW_SCHEMA, what="read the weights", work_mem=WEIGHTS_WORK_MEM)

    def _copy_state(self) -> pa.Table:
        return self._copy_out(STATE_SQL, STATE_ARROW_SCHEMA, what="read state")

    def _refresh_weights(self) -> bool:
        """Load (or reload) the importance weights when X has loaded a new version; False if none yet."""
        rows = self.db.query("SELECT version FROM importance_state WHERE id = 1")
        if not rows:
            return False
        version = rows[0][0]
        if version == self.weights_version:
            return True
        t0 = time.perf_counter()
        fetched, self._prefetched_weights = self._prefetched_weights, None
        # Read while the JVM started (`prepare`, `prefetch_weights`), if of the version just read.
        early = fetched is not None and fetched[0] == version
        if not early:
            fetched = (version, self._copy_weights())  # the version just read
        version, table = fetched
        t_read = time.perf_counter()
        if self.weights is not None:
            self.weights.unpersist()
        weights = patterns.arrow_frame(self.spark, table, weights_spark_schema())
        # Partitioned and sorted like the versions the detection joins them to: that join needs no shuffle.
        # Lazy, like the state: computed and kept by the first detection that needs them.
        self.weights = checkpoint(patterns.by_pair(weights), self.settings, eager=False)
        t_done = time.perf_counter()
        log.info(
            "importance weights loaded: version %d, %d (customer, merchant) pairs in %.2f s "
            "(read from PostgreSQL %s, handed to Spark %.2f s)",
            version,
            table.num_rows,
            t_done - t0,
            "beforehand" if early else f"{t_read - t0:.2f} s",
            t_done - t_read,
        )
        self.weights_version = version
        return True

    # ---------------------------------------------------------------- loop

    def _waiting_chunks(self) -> list[ChunkRef]:
        """The next unprocessed chunks in ledger order (pending ones included: the batch stops before them).

        One at a time after a failed batch (to find its chunk), and for the first batch of a cold session: that
        batch pays Spark's first plans, code generation and JIT whatever its size, so a backlog found at start
        shows its first processed chunk after a cold batch of one chunk (3.2-3.3 s on 2 cores, quiet) rather than
        of `Y_MAX_BATCH_CHUNKS` (6.8-10.4 s); the backlog then goes in full batches (bench/README.md, "ywide")."""
        limit = 1 if self._isolate or self._spark_cold else self.settings.y_max_batch_chunks
        after = self._pending.batch[-1].seq if self._pending is not None else 0
        return ledger.waiting_chunks(self.db, limit, after=after)

    @staticmethod
    def _ready_prefix(rows: list[ChunkRef]) -> list[ChunkRef]:
        batch: list[ChunkRef] = []
        total = 0
        for c in rows:
            if c.status != "written":
                break  # strictly in order: a chunk whose object is not written yet holds back the rest
            total += c.rows_total or 0
            if batch and total > MAX_BATCH_ROWS:
                break  # bound the batch (the driver path holds its rows in memory), whatever BATCH_SIZE is
            batch.append(c)
        return batch

    def _x_busy(self) -> bool:
        return ledger.x_busy(self.db)

    def _wait(self, timeout: float) -> None:
        """Sleep until X notifies a chunk (or importance) or the timeout passes."""
        if self._listen is None:
            self.stop.wait(timeout)
            return
        end = time.monotonic() + timeout
        while not self.stop.is_set():
            left = end - time.monotonic()
            if left <= 0 or self._listen.wait(min(left, 0.5), self.stop):
                return

    def run(self, *, drain: bool) -> int:
        # A stop request cancels the Spark jobs under way, so Y stops within seconds even in the middle of a
        # long batch; the batch then never commits, and is redone from the committed state on the next start.
        self._running = True
        threading.Thread(target=self._cancel_jobs_on_stop, name="y-stop", daemon=True).start()
        try:
            return self._run(drain=drain)
        finally:
            self._running = False
            if self.stop.is_set():
                self._quiet_spark(False)

    def _run(self, *, drain: bool) -> int:
        self.start()
        waiting_since: float | None = None
        try:
            while not self.stop.is_set():
                self.writer.tick()
                self.archive_build.poll()
                waiting = self._waiting_chunks()
                batch = self._ready_prefix(waiting)
                if x_finished():  # main.py --drain: the supervisor's mark that X has ingested everything
                    self.drain_requested.set()
                draining = drain or self.drain_requested.is_set()
                if not batch and self._pending is not None:
                    self._process_or_count(self._pending.batch, self.commit_pending)  # nothing to overlap it with
                    continue
                if not batch:
                    self._refresh_weights()  # while idle, so the next chunk does not wait for a reload
                    if draining and not waiting and (self.drain_requested.is_set() or not self._x_busy()):
                        log.info("drain: every chunk in the ledger is processed")
                        return 0
                    if not waiting and not self._warmed and self._idle_for(WARM_UP_AFTER_IDLE_S):
                        self._warm_up_while_idle()
                        continue
                    if not waiting and self._idle_for(IDLE_BEFORE_BUILD_S):
                        self.archive_build.run_while_idle()
                    self._wait(min(0.5, self.settings.detections_flush_seconds))
                    continue
                if not self._refresh_weights():
                    if waiting_since is None:
                        waiting_since = time.monotonic()
                        log.warning("chunk %d waits: no CustomerImportance file has been loaded yet", batch[0].seq)
                    if draining and not self._x_busy():
                        log.error(
                            "drain impossible: chunks wait for a CustomerImportance file the source does not have"
                        )
                        return EXIT_DRAIN_IMPOSSIBLE
                    self._wait(1.0)
                    continue
                waiting_since = None
                if self.stop.is_set():
                    break
                self._warmed = True  # this batch warms Spark up: no made-up chunk after it
                self._spark_cold = False
                self._idle_since = None
                self.archive_build.pause()
                self._process_or_count(batch, functools.partial(self.process_batch, batch))
            return 0
        finally:
            self.drop_pending()
            if self._committer is not None:
                self._committer.shutdown(wait=True)
                self._committer = None
            try:
                self.writer.tick(final=True)
            finally:
                if self._listen is not None:
                    self._listen.close()

    def _process_or_count(self, batch: list[ChunkRef], step: Callable[[], object]) -> None:
        """`step()`: process `batch` (and commit the one before it), or commit the batch waiting for its commit. A
        transient fault is waited out, any other failure is pinned on one chunk and counted, so a poison chunk
        is failed after MAX_ATTEMPTS instead of wedging every later chunk. A failed commit is its own batch's
        failure (`_BatchFailed`), whichever batch's step it came in."""
        try:
            step()
        except _ChunksFailed:
            return  # a bad object was failed and quarantined; the other chunks come next round
        except Exception as raised:  # noqa: BLE001 - sorted below: transient, or counted against a chunk
            exc = raised
            if isinstance(raised, _BatchFailed):
                batch, exc = raised.batch, raised.cause
            if self.stop.is_set():
                log.info("batch from chunk %d abandoned: stopping (%s)", batch[0].seq, brief(exc))
                return
            if is_retryable(exc):
                self._fault_delay = min(self.settings.retry_max_delay_seconds, max(0.5, self._fault_delay * 2))
                log.warning(
                    "batch of %d chunk(s) from %d interrupted by a transient fault; again in %.1f s: %s",
                    len(batch),
                    batch[0].seq,
                    self._fault_delay,
                    brief(exc),
                    extra={"event": "batch_retry", "chunk_id": batch[0].seq},
                )
                self.stop.wait(self._fault_delay)
                return
            if len(batch) > 1:
                log.warning(
                    "batch of %d chunk(s) from %d failed (%s); taking them one at a time to find the cause",
                    len(batch),
                    batch[0].seq,
                    brief(exc),
                    extra={"event": "batch_failed", "chunk_id": batch[0].seq},
                )
                self._isolate = True
                return
            self._chunk_attempt_failed(batch[0], exc)
            return
        self._fault_delay = 0.0

    def _cancel_jobs_on_stop(self) -> None:
        """After a stop request, cancel Spark's jobs for a while: also those submitted after the first cancel,
        by a phase of the batch that was already planning when the request came."""
        self.stop.wait()
        if self._running:
            self._quiet_spark(True)
        for _ in range(40):
            if not self._running:
                return  # run() is over: the session's later jobs are someone else's (tests share it)
            try:
                self.spark.sparkContext.cancelAllJobs()
            except Exception:  # noqa: BLE001 - the session may be stopping already
                log.debug("cancelling Spark jobs on stop failed", exc_info=True)
                return
            time.sleep(0.25)

    def _quiet_spark(self, quiet: bool) -> None:
        """While a stop cancels the batch's jobs, Spark's log is limited to FATAL: its tasks, killed on purpose,
        report the cancellation as warnings and errors (a shuffle fetch cut off, a block not stored) that are
        the stop's doing, not faults. Y's own log says what became of the batch ("abandoned: stopping")."""
        try:
            self.spark.sparkContext.setLogLevel("FATAL" if quiet else "WARN")
        except Exception:  # noqa: BLE001 - the session may be stopping already
            log.debug("setting Spark's log level failed", exc_info=True)

    def _stop_point(self) -> None:
        """Between the phases of a batch: a stop request abandons it (nothing is committed before the end)."""
        if self.stop.is_set():
            raise ProcessorError("stop requested")

    def _chunk_attempt_failed(self, c: ChunkRef, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {brief(exc)}"
        attempts, failed = ledger.note_chunk_failure(
            self.db, c.seq, error=error, max_attempts=self.settings.max_attempts, by="y"
        )
        ids = {"file_id": c.file_id, "chunk_id": c.seq, "chunk_seq": c.chunk_seq}
        if not failed:
            log.warning(
                "chunk %d: attempt %d of %d failed: %s",
                c.seq,
                attempts,
                self.settings.max_attempts,
                error,
                exc_info=True,
                extra={"event": "chunk_attempt_failed", **ids},
            )
            return
        self._isolate = False

        def record(cur) -> None:
            _quarantine_whole_chunk(cur, c, f"rejected after {attempts} attempts: {error}")
            ledger.give_up_chunk(cur, self.db, c, "chunk_failed", f"chunk {c.seq}: {error}", component=COMPONENT)

        self.db.run(record, what=f"quarantine chunk {c.seq}")
        log.error(
            "chunk %d failed for good after %d attempts (%s); its rows are quarantined and later chunks go on",
            c.seq,
            attempts,
            error,
            extra={"event": "chunk_failed", **ids},
        )

    # ---------------------------------------------------------------- one batch

    def warm_up(self, *, abandon: Callable[[], bool] = lambda: False) -> bool:
        """Put a small made-up chunk once through the whole Spark path (read, validate, fold, detect), so a chunk
        arriving later does not pay for Spark's first query plans, code generation and JIT compilation
        (seconds on a 2-core machine). Run only while Y is idle (`_warm_up_while_idle`), never before a chunk
        that is already waiting: that chunk warms Spark up just as well. `abandon()` is asked before the
        Spark work; True stops the warm-up there. Returns whether it ran to the end."""
        if not self.settings.spark_local:
            return False  # executors elsewhere cannot read a local scratch file; the first chunks warm them up
        t0 = time.perf_counter()
        scratch = self.settings.data_dir / "spark" / "warm-up"
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / f"warm-up-{os.getpid()}.parquet"
        path.write_bytes(parquet_bytes(made_up_chunk(WARM_UP_ROWS)))
        done = None
        try:
            state = patterns.by_merchant(
                patterns.arrow_frame(self.spark, STATE_ARROW_SCHEMA.empty_table(), state_spark_schema())
            )
            state = state.localCheckpoint(eager=False)  # the shape of the real state's plan (`_load_state`)
            weights = self.weights
            if weights is None:
                weights = patterns.by_pair(
                    patterns.arrow_frame(self.spark, WEIGHTS_ARROW_SCHEMA.empty_table(), weights_spark_schema())
                )
            if abandon():
                return False
            # The path a batch takes (`_single_pass`): one job reads, folds, judges and summarises the chunk.
            done = self._single_pass(self._scan([path.as_uri()], [path.name]), [path.name], state, weights)
        finally:
            path.unlink(missing_ok=True)
            if done is not None:
                done.versions.unpersist()
        self._spark_cold = False
        log.info("Spark warmed up in %.1f s, while idle", time.perf_counter() - t0, extra={"event": "y_warmed_up"})
        return True

    def _idle_for(self, seconds: float) -> bool:
        """True once the loop has found nothing to do for `seconds` in a row (counted from the first time)."""
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= seconds

    def _warm_up_while_idle(self) -> None:
        """Once, when nothing waits at a pace (CHUNK_INTERVAL_SECONDS > 0): warm Spark up, giving way to the
        first chunk that arrives. At 0 (as fast as possible) the backlog comes in large batches instead."""
        self._warmed = True
        if self.settings.chunk_interval_seconds > 0 and self.weights is not None:
            self.warm_up(abandon=lambda: self.stop.is_set() or bool(self._waiting_chunks()))

    def _scan_batch(self, batch: list[ChunkRef]) -> tuple[list[str], object]:
        """The batch's objects' file names and their annotated scan (`_scan`), planned through `_reading`."""
        names = [c.key.rsplit("/", 1)[-1] for c in batch]
        uris = [self.store.spark_uri(c.key) for c in batch]
        return names, self._reading(batch, names, lambda: self._scan(uris, names), read_only=True)

    def _scan(self, uris: list[str], names: list[str]):
        """The annotated Spark read of the objects at `uris`, whose file names are `names`, in ONE projection (each
        DataFrame step is analysed on the driver as it is built): `_problem` (`annotate_problems`), `_cut` the
        row's object file name, `cut` its position in `names` (the chunk in the batch)."""
        from pyspark.sql import functions as F

        if self._problem is None or self._problem[0] is not self.spark:
            self._problem = (self.spark, problem_column())
        file_name = F.col("_metadata.file_name")
        cut = F.array_position(F.array(*(F.lit(n) for n in names)), file_name).cast("int") - 1
        df = self.spark.read.schema(chunk_spark_schema()).parquet(*uris)
        return df.select("*", self._problem[1].alias(PROBLEM), file_name.alias(CUT), cut.alias("cut"))

    def _single_pass(self, scan, names: list[str], state, weights) -> _Pass | None:
        """The batch in ONE Spark action whose result is only what the driver needs: the detections, and per chunk
        its counts and rejected rows (`_SUMMARY_AND_HITS_SQL`). The rows stay in Spark; the commit publishes X's
        staged copy of them. None when a chunk repeats a row id: only the driver path knows which copy comes
        first, so the caller takes it (rare: X never writes such a chunk)."""
        k = len(names)
        # Checkpointed every batch: it cuts the lineage, so planning and work stay flat with history, and it keeps
        # the merchant partitioning, so the detection reads it without a shuffle. Lazily: this batch's one job
        # computes the versions, keeps them as the checkpoint and judges them.
        versions = checkpoint(patterns.fold_batch(state, _clean_for_fold(scan), k), self.settings, eager=False)
        summary_and_hits = patterns.detect_batch(
            versions, weights, k, self.thresholds, around=(_SUMMARY_AND_HITS_SQL, scan)
        )
        planned = time.perf_counter()
        result = summary_and_hits.collect()
        summary = [r for r in result if r["kind"] == SUMMARY]
        if any(r["ids"] != r["distinct_ids"] for r in summary):
            versions.unpersist()
            return None
        rejected = _rejected_table([(r["cut"], x["line"], x["problem"]) for r in summary for x in r["rejected"]])
        clean_amounts = [Decimal(0)] * k
        for r in summary:
            clean_amounts[r["cut"]] += r["clean_amount"] or 0
        return _Pass(
            versions=versions,
            found=patterns.first_hits(r for r in result if r["kind"] == HIT),
            rejected=rejected,
            per_cut_clean=_sum_per_cut(((r["cut"], r["clean"]) for r in summary), k),
            per_cut_rejected=_counts(rejected.column(CUT), k),
            clean=None,
            clean_amounts=clean_amounts,
            rows_to_driver=len(result) + rejected.num_rows,
            planned=planned,
        )

    def _driver_pass(self, scan, names: list[str]) -> _Pass:
        """The batch with its rows collected on the driver, for what the single pass cannot do: a chunk without
        staged rows (recorded by an X older than the staging) or repeating a row id. The commit loads the clean
        rows from here. Two Spark jobs: the rows, then the fold and detection."""
        k = len(names)
        rows = self._collect_rows(scan.drop("cut"), names)
        problem = rows.column(PROBLEM)
        clean_mask = pc.is_null(problem)
        clean = rows.filter(clean_mask).drop_columns([PROBLEM])
        rejected = rows.filter(pc.invert(clean_mask)).select([CUT, "source_line", PROBLEM])
        if pc.any(pc.equal(problem, DUPLICATE)).as_py():
            fold_rows = self._fold_input(clean)  # the duplicates are known on the driver only: fold from there
        else:
            fold_rows = _clean_for_fold(scan)  # the rows never travel driver -> Spark
        versions = checkpoint(patterns.fold_batch(self.state, fold_rows, k), self.settings, eager=False)
        planned = time.perf_counter()
        found = patterns.first_hits(patterns.detect_batch(versions, self.weights, k, self.thresholds).collect())
        return _Pass(
            versions=versions,
            found=found,
            rejected=rejected,
            per_cut_clean=_counts(clean.column(CUT), k),
            per_cut_rejected=_counts(rejected.column(CUT), k),
            clean=clean,
            clean_amounts=None,
            rows_to_driver=rows.num_rows + len(found),
            planned=planned,
        )

    @staticmethod
    def _collect_rows(df, names: list[str]) -> pa.Table:
        """`_scan`'s rows on the driver, `_cut` turned into the index of the file in `names`, duplicates marked."""
        rows = df.toArrow()
        cuts = pc.index_in(rows.column(CUT), value_set=pa.array(names)).cast(pa.int32())
        if cuts.null_count:
            strays = pc.unique(pc.filter(rows.column(CUT), pc.is_null(cuts))).to_pylist()
            raise ProcessorError(
                f"Spark returned rows from files {strays[:3]} that are not in the batch {names[:3]}..."
            )
        rows = rows.set_column(rows.schema.get_field_index(CUT), CUT, cuts)
        # A stable sort: rows keep their order within their object, which `mark_duplicates` relies on.
        rows = rows.take(pc.sort_indices(rows, [(CUT, "ascending")]))
        return mark_duplicates(rows, within=(CUT,))

    def _fold_input(self, clean: pa.Table):
        """Clean rows -> the Spark DataFrame `fold_batch` takes (cut, merchant, customer, gender, amount)."""
        folded = clean.select([CUT, "merchant", "customer", "gender", "amount"]).rename_columns(
            ["cut", "merchant", "customer", "gender", "amount"]
        )
        return self.spark.createDataFrame(folded, schema=batch_rows_spark_schema())

    def _reading(self, batch: list[ChunkRef], names: list[str], step: Callable[[], T], *, read_only: bool) -> T:
        """`step()`, a Spark step that reads the batch's objects. When it fails, each object is judged by its own
        footer (`_fail_unreadable`): a bad one is failed and the batch ends (`_ChunksFailed`; the others come
        again next round). With every object fine, a read-only step or a failure naming one of the objects was
        the lake's (or Spark's access to it): retried; any other failure is raised as it is, and counted."""
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - the object may be bad; find out which before giving up
            if self.stop.is_set():
                raise
            self._settle()  # the commit in flight first: the failure handling below uses PostgreSQL too
            if self._fail_unreadable(batch, exc):
                raise _ChunksFailed from exc
            if read_only or any(name in str(exc) for name in names):
                raise RetryableError(f"Spark could not read the batch's objects: {brief(exc)}") from exc
            raise

    def _spark_pass(self, batch: list[ChunkRef], names: list[str], scan, *, staged: bool) -> _Pass:
        """The batch's Spark work: the single pass when every chunk is staged and no row id repeats, else the
        driver path."""
        if staged:
            done = self._reading(
                batch, names, lambda: self._single_pass(scan, names, self.state, self.weights), read_only=False
            )
            if done is not None:
                return done
            log.info(
                "batch from chunk %d repeats a row id within a chunk; its rows go through the driver",
                batch[0].seq,
                extra={"event": "batch_driver_path", "chunk_id": batch[0].seq},
            )
        return self._reading(batch, names, lambda: self._driver_pass(scan, names), read_only=False)

    def process_batch(self, batch: list[ChunkRef]) -> None:
        """Fold and judge the chunks of `batch` (consecutive in the ledger, after the batch waiting for its commit,
        if any) in Spark while that previous batch commits on the commit thread.

        The batch's own commit waits (`_pending`): the next batch hands it to the commit thread once that batch
        has asked PostgreSQL what it needs, so one connection serves both threads in turn, and the commit
        (PostgreSQL's CPU) runs beside the next batch's Spark pass (the JVM's). With no next batch, the loop
        commits it at once (`commit_pending`). The next batch folds onto this one's versions before its commit
        is confirmed: if that commit fails, Y's state goes back to the last committed one (`_settle`), the next
        batch's pass is dropped, and both come again.

        Chunks X staged (all, from a current X) take the single pass: one Spark action, and their rows reach
        `transactions` from the staging, inside the commit. A chunk not staged, or repeating a row id, sends its
        batch down the driver path, the way every batch went before the staging."""
        t0 = time.perf_counter()
        try:
            names, scan = self._scan_batch(batch)
            staged = len(ledger.staged_chunks(self.db, [c.seq for c in batch])) == len(batch)
            t_read = time.perf_counter()
            self._stop_point()
            self._submit_pending()  # PostgreSQL is the commit thread's until `_settle`
            try:
                done = self._spark_pass(batch, names, scan, staged=staged)
            except BaseException:
                self._settle()  # a failed commit of the previous batch is the failure to handle first
                raise
            t_spark = time.perf_counter()
            try:
                previous_stands = self._settle()
                self._stop_point()
            except BaseException:
                done.versions.unpersist()
                raise
            if not previous_stands:  # the previous batch went again, through the driver: this pass folded onto
                done.versions.unpersist()  # versions that are gone, and this batch comes again next round
                return
            self._hold(_Computed(batch, uuid.uuid4().hex[:16], done, t0, t_read, t_spark))
        except _ChunksFailed:
            return

    def _hold(self, c: _Computed) -> None:
        """A batch whose Spark pass is done waits for its commit. Its versions become the state the next batch
        folds onto; the committed versions are kept until its commit is confirmed."""
        c.new = sorted((cut, key) for key, cut in c.done.found.items() if key not in self.emitted)
        if c.done.rejected.num_rows:
            self._write_rejected_objects(c.batch, c.done.rejected)  # before the commit: same bytes on a redo
        c.previous = self.state
        self.state = patterns.latest_state(c.done.versions, len(c.batch))
        self.rows_to_driver = c.done.rows_to_driver
        self._pending = c

    def commit_pending(self) -> None:
        """Commit the batch waiting for its commit, if any, and wait for it (see `_settle`)."""
        self._submit_pending()
        self._settle()

    def drop_pending(self) -> None:
        """Forget the batch waiting for its commit (Y stops): it was never committed, so the next start does it
        again from the committed state."""
        c, self._pending = self._pending, None
        if c is not None:
            self._revert(c)

    def _revert(self, c: _Computed) -> None:
        """`c` will not be committed as computed: its versions go, and Y's state is the one it folded onto."""
        c.done.versions.unpersist()
        self.state = c.previous

    def _submit_pending(self) -> None:
        c, self._pending = self._pending, None
        if c is None:
            return
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="y-commit")
        self._in_flight = (c, self._committer.submit(self._timed_commit, c))

    def _timed_commit(self, c: _Computed) -> None:
        """On the commit thread: the batch's commit, then its log lines and measures, as soon as it is committed
        (the loop may still be in the next batch's pass)."""
        started = time.perf_counter()
        self._commit(c.batch_id, c.batch, c.done, c.new)
        ended = time.perf_counter()
        # Y's own time for the batch: its pass, and the part of its commit the loop waited for (from `_settle`);
        # the rest ran beside the next batch's pass.
        waiting = self._settle_waiting
        visible = ended - max(started, waiting) if waiting is not None else 0.0
        try:
            self._log_batch(c, ended - started, visible, datetime.now(timezone.utc))
        except Exception:  # the batch is committed whatever happens to its log lines and report
            log.exception("batch from chunk %d committed, but logging it failed", c.batch[0].seq)

    def _settle(self) -> bool:
        """Wait for the commit in flight, if any. Committed (and logged by the commit thread): its batch becomes
        Y's committed state. Failed: Y's state goes back to the last committed one (the caller drops the pass
        folded onto it since) and the failure is raised for the failed batch (`_BatchFailed`), except a staging
        mismatch: that batch goes again at once, through the driver, and False is returned (True otherwise): a
        pass folded onto the batch as it was computed is void."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return True
        c, future = flight
        self._settle_waiting = time.perf_counter()
        try:
            future.result()
        except BaseException as exc:
            self._revert(c)
            if isinstance(exc, _StagingMismatch) and not self.stop.is_set():
                log.warning(
                    "%s; the batch goes through the driver, from the objects",
                    exc,
                    extra={"event": "batch_driver_path", "chunk_id": c.batch[0].seq},
                )
                try:
                    self._redo_on_driver_path(c)
                except (_BatchFailed, _ChunksFailed):
                    raise
                except Exception as again:  # that batch's failure, whichever batch's step it came in
                    raise _BatchFailed(c.batch, again) from again
                return False
            raise _BatchFailed(c.batch, exc) from exc
        finally:
            self._settle_waiting = None
        self._promote(c)
        return True

    def _redo_on_driver_path(self, c: _Computed) -> None:
        """A batch whose staged rows were not its objects' rows, again from the committed state with its rows
        through the driver, and committed before anything else."""
        t0 = time.perf_counter()
        names, scan = self._scan_batch(c.batch)
        t_read = time.perf_counter()
        done = self._spark_pass(c.batch, names, scan, staged=False)
        self._hold(_Computed(c.batch, c.batch_id, done, t0, t_read, time.perf_counter()))
        self.commit_pending()

    def _promote(self, c: _Computed) -> None:
        """A committed batch becomes Y's committed state: its versions, its detections."""
        if self._versions is not None:
            self._versions.unpersist()
        self._versions = c.done.versions
        self.emitted.update(key for _, key in c.new)
        self.writer.note_new(len(c.new))
        if len(c.batch) == 1:
            self._isolate = False  # a lone chunk went through: back to full batches

    def _log_batch(self, computed: _Computed, commit_s: float, visible_s: float, finished: datetime) -> None:
        """A committed batch's chunks, logged and measured."""
        batch, batch_id, done, new = computed.batch, computed.batch_id, computed.done, computed.new
        t0, t_read, t_fold, t_spark = computed.started, computed.read, done.planned, computed.spark
        k = len(batch)
        metrics.observe_batch(t_read - t0, t_fold - t_read, t_spark - t_fold, commit_s)
        t_commit = t_spark + visible_s  # Y's own time: the pass, and the part of the commit Y waited for
        for i, c in enumerate(batch):
            here = [key for cut, key in new if cut == i]
            if c.written_at is not None:
                metrics.observe_chunk_latency((finished - c.written_at).total_seconds())
            log.info(
                "chunk %d (%s-%06d): %d rows, %d rejected, %d new detection(s) %s, latency %.3f s "
                "[batch of %d: %.0f ms in Y (read %.0f, fold %.0f, detect %.0f, commit %.0f)] "
                "[commit %.0f ms, %.0f of them beside the next batch's pass]",
                c.seq,
                c.file_id,
                c.chunk_seq,
                done.per_cut_clean[i],
                done.per_cut_rejected[i],
                len(here),
                "(" + ", ".join(f"{p}:{sum(1 for x in here if x[0] == p)}" for p in ACTIONS) + ")",
                (finished - c.written_at).total_seconds() if c.written_at else float("nan"),
                k,
                (t_commit - t0) * 1000,
                (t_read - t0) * 1000,
                (t_fold - t_read) * 1000,
                (t_spark - t_fold) * 1000,
                (t_commit - t_spark) * 1000,
                commit_s * 1000,
                max(0.0, commit_s - visible_s) * 1000,
                extra={
                    "event": "chunk_processed",
                    "file_id": c.file_id,
                    "chunk_id": c.seq,
                    "chunk_seq": c.chunk_seq,
                    "batch_id": batch_id,
                },
            )
        if done.rejected.num_rows:
            self.write_quality_report()

    def _commit(
        self, batch_id: str, batch: list[ChunkRef], done: _Pass, new: list[tuple[int, tuple[str, str, str]]]
    ) -> None:
        """ONE PostgreSQL transaction for the whole batch, touching only the database: every chunk's processed
        mark (guarded, so a chunk is never counted twice), the clean rows and the state delta (published from
        X's staging, or loaded from the driver), the new detections and the rejected rows. Redone on a new
        connection if the server goes away; a redo finds the batch id when the first attempt had committed
        after all, and then does nothing."""
        per_cut_new = [0] * len(batch)
        for cut, _ in new:
            per_cut_new[cut] += 1
        marks = [
            ChunkMark(c.seq, done.per_cut_clean[i], done.per_cut_rejected[i], per_cut_new[i])
            for i, c in enumerate(batch)
        ]
        seqs = [c.seq for c in batch]
        clean = done.clean
        payload = _transactions_csv(clean) if clean is not None and clean.num_rows else None
        delta = _state_delta(clean) if payload is not None else None

        def fn(cur) -> None:
            cur.execute("SELECT 1 FROM chunks WHERE y_batch_id = %s LIMIT 1", (batch_id,))
            if cur.fetchone():
                log.info("batch %s had committed before the connection was lost; not redone", batch_id)
                return
            ledger.mark_batch_processed(cur, batch_id, marks)
            if clean is None:
                self._publish_staged(cur, batch, done)
            else:
                ledger.discard_staged(cur, seqs)  # the rows come from the objects: a staged copy has no use left
                if payload is not None:
                    self._insert_rows(cur, payload, delta)
            if new:
                now = datetime.now(timezone.utc)
                psycopg2.extras.execute_values(
                    cur,
                    "INSERT INTO pattern_detections (pattern_id, action_type, customer_name, merchant_id, "
                    "y_start_time, detection_time, chunk_id) VALUES %s",
                    [(p, ACTIONS[p], c, m, self.y_start, now, batch[cut].seq) for cut, (p, c, m) in new],
                )
            if done.rejected.num_rows:
                self._copy_rejected(cur, batch, done.rejected, done.per_cut_rejected)

        self.db.run(fn, what=f"commit batch {batch_id} (chunks {batch[0].seq}..{batch[-1].seq})")

    @staticmethod
    def _publish_staged(cur, batch: list[ChunkRef], done: _Pass) -> None:
        """X's staged rows of the batch into `transactions` and `y_state`, minus the rows Spark rejected, checked
        chunk by chunk against what Spark read from the objects (count and amount): they are the same rows
        unless an object was replaced after X wrote it; then `_StagingMismatch` rolls the commit back."""
        cuts = done.rejected.column(CUT).to_pylist()
        lines = done.rejected.column("source_line").to_pylist()
        rejected = [(batch[cut].seq, ln) for cut, ln in zip(cuts, lines) if ln is not None]
        published = ledger.publish_staged(cur, [c.seq for c in batch], rejected)
        for i, c in enumerate(batch):
            n, total = published.get(c.seq, (0, None))
            expected = (done.per_cut_clean[i], done.clean_amounts[i])
            if (n, total or 0) != expected:
                raise _StagingMismatch(
                    f"chunk {c.seq}: X staged {n} clean row(s) summing to {total or 0}, its object {expected[0]} "
                    f"summing to {expected[1]}"
                )

    def _insert_rows(self, cur, payload: bytes, delta: pa.Table) -> None:
        """The clean rows into `transactions`, and their fold into `y_state`: the durable twin of Spark's fold,
        in the same transaction as the processed marks, so a restart reloads exactly this state. The state
        delta is the batch's own rows aggregated per pair on the driver (`_state_delta`), COPYed like the rows,
        so the upsert reads nothing back from `transactions`."""
        copy_csv(cur, "transactions", list(TRANSACTION_COLUMNS.values()), payload)
        # A temporary table lives as long as the connection; a reconnect (Database.run's redo) creates it anew.
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS y_state_delta (LIKE y_state) ON COMMIT DELETE ROWS")
        copy_csv(cur, "y_state_delta", STATE_ARROW_SCHEMA.names, _csv(delta))
        cur.execute(
            "INSERT INTO y_state (merchant, customer, n, amount_sum, has_f, has_m) "
            "SELECT merchant, customer, n, amount_sum, has_f, has_m FROM y_state_delta "
            "ON CONFLICT (merchant, customer) DO UPDATE SET "
            "n = y_state.n + EXCLUDED.n, amount_sum = y_state.amount_sum + EXCLUDED.amount_sum, "
            "has_f = y_state.has_f OR EXCLUDED.has_f, has_m = y_state.has_m OR EXCLUDED.has_m"
        )

    def _fail_unreadable(self, batch: list[ChunkRef], exc: Exception) -> bool:
        """After Spark failed to read a batch: mark failed (and quarantine) each chunk whose object is not a
        chunk, judged from its own Parquet footer. False if every object is fine, i.e. the failure was not
        theirs (a lake outage): then nothing is marked and the caller re-raises."""
        bad = []
        for c in batch:
            try:
                problems = chunk_schema_problems(pq.read_schema(io.BytesIO(self.store.get_bytes(c.key))))
            except FileNotFoundError:
                problems = ["the object is missing from the lake"]
            except (pa.ArrowInvalid, OSError) as err:
                if is_retryable(err):
                    raise
                problems = [f"not a readable Parquet file ({err})"]
            if problems:
                bad.append((c, "; ".join(problems)))
        if not bad:
            return False
        for c, reason in bad:
            message = f"chunk object {c.key} cannot be processed: {reason}"

            def fail(cur, c: ChunkRef = c, reason: str = reason, message: str = message) -> None:
                ledger.give_up_chunk(cur, self.db, c, "chunk_failed", message, component=COMPONENT, reason=message)
                _quarantine_whole_chunk(cur, c, f"rejected: {reason}")

            self.db.run(fail, what=f"fail chunk {c.seq}")
            log.error(
                "%s; marked failed and quarantined (Spark said: %s)",
                message,
                str(exc).splitlines()[0][:300],
                extra={"event": "chunk_failed", "file_id": c.file_id, "chunk_id": c.seq},
            )
        return True

    @staticmethod
    def _rejected_records(chunk_seq: int, rejected: pa.Table) -> list[tuple[int, str]]:
        """(line, reason) per rejected row id; a row without a line number gets a negative placeholder."""
        lines = rejected.column("source_line").to_pylist()
        reasons = rejected.column(PROBLEM).to_pylist()
        per_line: dict[int, list[str]] = {}
        for i, (ln, r) in enumerate(zip(lines, reasons)):
            per_line.setdefault(ln if ln is not None else -1 - (chunk_seq * 1_000_000 + i), []).append(r)
        return [
            (ln, rs[0] if len(rs) == 1 else f"{rs[0]} (+{len(rs) - 1} more row(s) with this id)")
            for ln, rs in per_line.items()
        ]

    def _write_rejected_objects(self, batch: list[ChunkRef], rejected: pa.Table) -> None:
        """Each chunk's rejected rows to the lake's quarantine (same rows on a redo -> same bytes)."""
        cuts = rejected.column(CUT)
        for i, c in enumerate(batch):
            mine = rejected.filter(pc.equal(cuts, i))
            if not mine.num_rows:
                continue
            records = self._rejected_records(c.chunk_seq, mine)
            table = pa.table(
                {
                    "source_file_id": [c.file_id] * len(records),
                    "source_line": [ln for ln, _ in records],
                    "reason": [r for _, r in records],
                    "raw_line": pa.nulls(len(records), pa.string()),
                },
                schema=QUARANTINE_SCHEMA,
            )
            self.store.put_bytes(
                lake_paths.quarantine_key("detect", c.file_id, c.chunk_seq), parquet_bytes(table), overwrite=True
            )

    def _copy_rejected(self, cur, batch: list[ChunkRef], rejected: pa.Table, per_cut_rejected: list[int]) -> None:
        """Quarantine rejected rows (one record per row id) in PostgreSQL, in the commit transaction."""
        cuts = rejected.column(CUT)
        for i, c in enumerate(batch):
            if not per_cut_rejected[i]:
                continue
            mine = rejected.filter(pc.equal(cuts, i))
            records = self._rejected_records(c.chunk_seq, mine)
            copy_rows(
                cur,
                "quarantine",
                QUARANTINE_TABLE_COLUMNS,
                ((c.file_id, ln, c.chunk_seq, "detect", r, None) for ln, r in records),
            )
            self.db.log_event(
                COMPONENT,
                "WARNING",
                "rows_rejected",
                f"chunk {c.seq}: {per_cut_rejected[i]} row(s) excluded from the state, first: {records[0][1]}",
                file_id=c.file_id,
                chunk_id=c.seq,
                row_count=per_cut_rejected[i],
                cur=cur,
            )

    def write_quality_report(self) -> None:
        write_quality_report(self.db, self.store)  # X's and Y's rejects, one report (src/quality_report.py)


@dataclass
class _Pass:
    """What a batch's Spark work leaves on the driver, for its commit."""

    versions: object  # the fold's versions (DataFrame), checkpointed: the state after the commit is read from them
    found: dict[tuple[str, str, str], int]  # first cut of every detection key that holds in the batch
    rejected: pa.Table  # CUT, source_line, PROBLEM: one row per rejected row
    per_cut_clean: list[int]
    per_cut_rejected: list[int]
    clean: pa.Table | None  # the driver path's clean rows; None: the commit publishes X's staged rows
    clean_amounts: list[Decimal] | None  # single pass: per chunk, the sum of the clean rows' amounts
    rows_to_driver: int
    planned: float  # perf_counter when the Spark plans were built and the work began


@dataclass
class _Computed:
    """A batch whose Spark pass is done, waiting for its commit (`StreamProcessor._hold`)."""

    batch: list[ChunkRef]
    batch_id: str
    done: _Pass
    started: float  # perf_counter at the batch's start
    read: float  # ... once its objects' scan was planned
    spark: float  # ... once its Spark pass was done
    new: list[tuple[int, tuple[str, str, str]]] = field(default_factory=list)  # (cut, key) of its new detections
    previous: object = None  # Y's state before it: the state again if its commit fails


class _BatchFailed(Exception):
    """The commit of `batch` failed (`cause`): handled as a failure of that batch, not of the one after it."""

    def __init__(self, batch: list[ChunkRef], cause: BaseException) -> None:
        super().__init__(str(cause))
        self.batch = batch
        self.cause = cause


class _ChunksFailed(Exception):
    """A bad object of the batch was failed and quarantined: the batch ends, the other chunks come next round."""


class _StagingMismatch(ProcessorError):
    """X's staged rows of a chunk are not the rows of its object (replaced after X wrote it)."""


def _clean_for_fold(rows):
    """The clean rows of `_scan`, as `fold_batch` takes them. Only for batches without repeated row ids,
    whose clean rows are exactly `_problem IS NULL`."""
    return rows.where(f"{PROBLEM} IS NULL").select("cut", "merchant", "customer", "gender", "amount")


def _rejected_table(rejected: list[tuple[int, int | None, str]]) -> pa.Table:
    """(cut, source_line, problem) triples as the rejected rows' table."""
    return pa.table(
        {
            CUT: pa.array([r[0] for r in rejected], pa.int32()),
            "source_line": pa.array([r[1] for r in rejected], pa.int64()),
            PROBLEM: pa.array([r[2] for r in rejected], pa.string()),
        }
    )


def _sum_per_cut(pairs, k: int) -> list[int]:
    """Sum (cut, n) pairs per cut 0..k-1."""
    sums = [0] * k
    for cut, n in pairs:
        sums[cut] += n
    return sums


def _quarantine_whole_chunk(cur, c: ChunkRef, why: str) -> None:
    """One quarantine record standing for every row of a chunk that never entered the state."""
    reason = f"whole chunk (lines {c.first_line}-{c.last_line}) {why}"
    copy_rows(
        cur, "quarantine", QUARANTINE_TABLE_COLUMNS, [(c.file_id, c.first_line, c.chunk_seq, "detect", reason, None)]
    )


def _transactions_csv(clean: pa.Table) -> bytes:
    """The clean rows as the CSV payload of the `transactions` COPY (PostgreSQL's column names)."""
    return _csv(clean.select(list(TRANSACTION_COLUMNS)).rename_columns(list(TRANSACTION_COLUMNS.values())))


def _csv(table: pa.Table) -> bytes:
    """`table` as a COPY payload with a header row (booleans as true/false, decimals as written)."""
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    return buf.getvalue()


def _state_delta(clean: pa.Table) -> pa.Table:
    """The batch's clean rows folded per (merchant, customer), in `STATE_ARROW_SCHEMA`: what `y_state` gains.
    Decimal sums are exact (Arrow widens them to 38 digits)."""
    rows = pa.table(
        {
            "merchant": clean.column("merchant"),
            "customer": clean.column("customer"),
            "amount": clean.column("amount"),
            "f": pc.equal(clean.column("gender"), "F"),
            "m": pc.equal(clean.column("gender"), "M"),
        }
    )
    agg = rows.group_by(["merchant", "customer"], use_threads=False).aggregate(
        [("amount", "count"), ("amount", "sum"), ("f", "any"), ("m", "any")]
    )
    columns = ["merchant", "customer", "amount_count", "amount_sum", "f_any", "m_any"]
    return agg.select(columns).rename_columns(STATE_ARROW_SCHEMA.names).cast(STATE_ARROW_SCHEMA)


def _counts(cuts: pa.ChunkedArray, k: int) -> list[int]:
    """How many entries of `cuts` fall on each cut 0..k-1."""
    counts = [0] * k
    if len(cuts):
        for value, n in zip(*pc.value_counts(cuts).flatten()):
            counts[value.as_py()] = n.as_py()
    return counts


def made_up_chunk(rows: int, seed: int = 1) -> pa.Table:
    """A chunk-shaped table of plausible, deterministic rows (50 merchants, 2,000 customers) for the warm-up."""
    import numpy as np

    from src.schemas.transaction_schemas import CHUNK_ARROW_SCHEMA

    rng = np.random.default_rng(seed)
    merchants = rng.integers(0, 50, rows)
    customers = rng.integers(0, 2000, rows)
    cents = rng.integers(0, 20_000, rows)
    text = lambda prefix, ids: pa.array([f"{prefix}{i}" for i in ids])  # noqa: E731
    columns = {
        "step": pa.array(np.zeros(rows, np.int32)),
        "customer": text("C-warm-up-", customers),
        "age": pa.array(["3"] * rows),
        "gender": pa.array(rng.choice(["M", "F", "E", "U"], rows).tolist()),
        "zipcodeOri": pa.array(["28007"] * rows),
        "merchant": text("M-warm-up-", merchants),
        "zipMerchant": pa.array(["28007"] * rows),
        "category": pa.array(["es_food"] * rows),
        "amount": pa.array([Decimal(int(c)).scaleb(-2) for c in cents], pa.decimal128(18, 2)),
        "fraud": pa.array(np.zeros(rows, np.int8)),
        "source_file_id": pa.array(["warm-up"] * rows),
        "chunk_seq": pa.array(np.zeros(rows, np.int32)),
        "source_line": pa.array(np.arange(2, rows + 2, dtype=np.int64)),
    }
    return pa.table(columns, schema=CHUNK_ARROW_SCHEMA)


# -------------------------------------------------------------------- entry point


def run_worker(
    settings: Settings,
    *,
    drain: bool,
    stop: threading.Event | None = None,
    drain_requested: threading.Event | None = None,
    submitted: dict[str, str] | None = None,
) -> int:
    """Y's process: the Spark session starts on a thread while the PostgreSQL side of the start-up (schema,
    leadership, state, weights, detections so far) is done here, then the loop runs. Under the supervisor, the JVM
    starts even before the supervisor's own start-up (the embedded PostgreSQL) is done (`wait_for_start`). `submitted` is
    spark-submit's conf, which wins over the product's own (`src.packaging.submitted_conf`).

    SPARK_DRIVER_JIT=auto becomes tiered compilation for a Y that runs until stopped and C1 only for `drain` (under
    `main.py --drain` the supervisor hands its workers c1 itself).

    A standby (another daemon's Y leads) waits in `prepare`. With a local master its session is started in
    advance meanwhile (memory of this machine only; takeover then skips the JVM's start); with a cluster master
    it starts only once this Y leads, so a standby holds none of the cluster's executors."""
    from config.spark_config import launched_jvm, resolve_jit
    from src.observability.logs import spark_logging_conf
    from src.resources import open_lake
    from src.utils.runtime import wait_for_start
    from src.utils.spark_utils import BackgroundSession

    stop = stop or threading.Event()
    settings = resolve_jit(settings, runs_until_stopped=not drain)
    conf = {**spark_logging_conf(settings), **(submitted or {})}

    def start_session() -> BackgroundSession:
        return BackgroundSession(settings, app_name="mechanism-y", extra_conf=conf)

    session = start_session() if settings.spark_local else None
    if not wait_for_start(stop, DSN_ENV):  # launched before the supervisor's own start-up was done, then stopped
        if session is not None:
            session.discard()
        return 0
    spark = None
    processor = None
    db = Database(settings, stop=stop)
    try:
        db.apply_schema()
        store = open_lake(settings, stop=stop)
        processor = StreamProcessor(settings, db, store, None, stop)
        if drain_requested is not None:
            processor.drain_requested = drain_requested
        processor.standby_session = session
        try:
            processor.prepare(drain=drain)
        except StandbyDone as exc:
            log.info("%s", exc, extra={"event": "drained"})
            return 0
        session = session or start_session()
        processor.prefetch_weights(session.started)
        spark = processor.spark = session.wait(stop)
        if spark is None:
            return 0  # stopped while the JVM was starting
        processor.archive_build.enabled = launched_jvm(spark) is not None  # not under spark-submit
        processor.archive_build.log_missing()
        log.info("mechanism Y: reading %s with Spark %s", store.describe(), spark.version)
        code = processor.run(drain=drain)
        processor.write_quality_report()
        return code
    finally:
        try:
            if processor is not None:
                processor.archive_build.stop()
            if spark is not None:
                spark.stop()
            elif session is not None:
                session.discard()
        finally:
            db.close()


def build_parser() -> argparse.ArgumentParser:
    return drain_parser(
        "python -m src.mechanism_y.stream_processor",
        (
            "Mechanism Y alone: process each chunk Mechanism X records, in order, with PySpark; keep the running "
            "state, evaluate PatId1 (UPGRADE), PatId2 (CHILD) and PatId3 (DEI-NEEDED) after every chunk, and "
            "write each new detection once to PostgreSQL and the lake. Settings come from the environment and .env."
        ),
        drain_help="exit 0 once every chunk in the ledger is processed and no file is mid-ingest",
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m src.mechanism_y.stream_processor`, or this file as spark-submit's script (the code then comes
    from the `--py-files` zip, and the master and conf from spark-submit)."""
    from src.errors import SettingsError, command_failed
    from src.packaging import submitted_conf, use_submitted_master
    from src.worker import worker_main

    submitted = submitted_conf()
    try:
        use_submitted_master(submitted)
    except SettingsError as exc:
        return command_failed(exc)

    def run(settings: Settings, args: argparse.Namespace, stop: threading.Event) -> int:
        # Under `main.py --drain`, Y learns that X is done from the supervisor's file (runtime.x_finished).
        return run_worker(settings, drain=args.drain, stop=stop, submitted=submitted)

    return worker_main("mechanism Y", build_parser(), argv, run)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
