"""Mechanism Y: the chunks X records, in ledger order, through Spark into the running state and the patterns.

Y takes every chunk that is waiting (up to Y_MAX_BATCH_CHUNKS) as one batch: it reads their Parquet
objects with Spark in one pass, annotates problems, folds the clean rows into the per (merchant,
customer) state and judges PatId1-3 at each chunk's own boundary (`pattern_detector.detect_batch`), so
the detections and the chunk each is credited to are those of one-by-one processing. Keeping up, a
batch is one chunk; behind (start-up, a burst, a restart), it catches up without paying Spark's
per-job cost per chunk. It then commits in ONE PostgreSQL transaction: the clean rows
(`transactions`), the state delta (`y_state`), the new detections and every chunk's processed mark.
A crash before the commit leaves no trace, so the batch is done again from the state of the previous
commit; after it, none of its chunks is ever redone.

    python -m src.mechanism_y.stream_processor [--drain]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import select
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from config.config import Settings
from src.errors import ProcessorError
from src.mechanism_x.data_ingestion import CHUNK_CHANNEL, QUARANTINE_SCHEMA
from src.mechanism_y import pattern_detector as patterns
from src.mechanism_y.data_validator import PROBLEM, annotate_problems, chunk_schema_problems, mark_duplicates
from src.mechanism_y.detection_writer import DetectionWriter, ist
from src.schemas.transaction_schemas import (
    batch_rows_spark_schema,
    chunk_spark_schema,
    state_spark_schema,
    weights_spark_schema,
)
from src.utils import lake_paths
from src.utils.object_store import ObjectStore, parquet_bytes
from src.utils.postgres_utils import Database, copy_csv, copy_rows, is_transient
from src.utils.runtime import EXIT_DRAIN_IMPOSSIBLE, READY_FILE_ENV, retry_call, x_finished

log = logging.getLogger(__name__)
COMPONENT = "mechanism_y"
SINGLE_Y_LOCK = 7261002

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
ACTIONS = patterns.ACTION_TYPES
CUT = "_cut"
WARM_UP_ROUNDS = 3
MAX_BATCH_ROWS = 200_000  # a batch takes more than one chunk only while it stays within this many rows


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


class StreamProcessor:
    def __init__(self, settings: Settings, db: Database, store: ObjectStore, spark, stop: threading.Event) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.spark = spark
        self.stop = stop
        self.drain_requested = threading.Event()
        self.y_start = datetime.now(timezone.utc)
        self.thresholds = patterns.thresholds_from_settings(settings)
        self.writer = DetectionWriter(settings, db, store)
        self.state = None
        self._versions = None  # the checkpoint the state is a view of, released once the next one exists
        self.weights = None
        self.weights_version: int | None = None
        self.emitted: set[tuple[str, str, str]] = set()
        self._listen = None

    # ---------------------------------------------------------------- start-up

    def start(self) -> None:
        with self.db.transaction() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (SINGLE_Y_LOCK,))
            if not cur.fetchone()[0]:
                raise ProcessorError("another Mechanism Y is already running against this database; stop it first")
        self._listen = psycopg2.connect(**self.db._kwargs)
        self._listen.autocommit = True
        with self._listen.cursor() as cur:
            cur.execute(f"LISTEN {CHUNK_CHANNEL}")
        self._load_state()
        self.emitted = {
            (p, c, m)
            for p, c, m in self.db.query("SELECT pattern_id, customer_name, merchant_id FROM pattern_detections")
        }
        self.writer.tick(final=False)
        self._refresh_weights()
        if self.settings.chunk_interval_seconds > 0:
            # At a pace, every chunk's latency counts: warm Spark before the first one arrives. At 0 (as fast
            # as possible) the backlog is folded in large batches, where warming up would only delay it.
            self.warm_up()
            self._refresh_weights()  # X has often loaded CustomerImportance meanwhile: not on the first chunk's clock
        log.info(
            "mechanism Y up (YStartTime %s): state of %d (merchant, customer) pairs, %d detections so far",
            ist(self.y_start),
            self.state_rows,
            len(self.emitted),
        )
        ready = os.environ.get(READY_FILE_ENV)
        if ready:  # under the supervisor, X releases its first chunk once this exists (main.py)
            with open(ready, "w") as f:
                f.write(f"{os.getpid()}\n")

    def _copy_out(self, sql: str, schema: pa.Schema) -> pa.Table:
        buf = io.BytesIO()
        with self.db.transaction() as cur:
            cur.copy_expert(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER true)", buf)
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
        schema = pa.schema(
            [
                ("merchant", pa.string()),
                ("customer", pa.string()),
                ("n", pa.int64()),
                ("amount_sum", pa.decimal128(38, 2)),
                ("has_f", pa.bool_()),
                ("has_m", pa.bool_()),
            ]
        )
        table = self._copy_out("SELECT merchant, customer, n, amount_sum, has_f, has_m FROM y_state", schema)
        state = self.spark.createDataFrame(table, schema=state_spark_schema())
        self.state = patterns.by_merchant(state).localCheckpoint(eager=True)
        self.state_rows = table.num_rows

    def _refresh_weights(self) -> bool:
        """Load (or reload) the importance weights when X has loaded a new version; False if none yet."""
        rows = self.db.query("SELECT version FROM importance_state WHERE id = 1")
        if not rows:
            return False
        version = rows[0][0]
        if version == self.weights_version:
            return True
        # Aggregated to (customer, merchant) where the rows live: the file repeats keys, so joining raw
        # rows would multiply counts; and it ships a few thousand rows to Spark instead of the whole file.
        schema = pa.schema(
            [
                ("customer", pa.string()),
                ("merchant", pa.string()),
                ("weight_sum", pa.decimal128(38, 2)),
                ("weight_count", pa.int64()),
            ]
        )
        table = self._copy_out(
            "SELECT source, target, sum(weight), count(*) FROM customer_importance GROUP BY source, target", schema
        )
        if self.weights is not None:
            self.weights.unpersist()
        weights = self.spark.createDataFrame(table, schema=weights_spark_schema())
        # Partitioned and sorted like the versions the detection joins them to: that join needs no shuffle.
        self.weights = patterns.by_merchant(weights).localCheckpoint(eager=True)
        log.info("importance weights loaded: version %d, %d (customer, merchant) pairs", version, table.num_rows)
        self.weights_version = version
        return True

    # ---------------------------------------------------------------- loop

    def _waiting_chunks(self) -> list[tuple]:
        """The next unprocessed chunks in ledger order (pending ones included: the batch stops before them)."""
        return self.db.query(
            "SELECT seq, file_id, chunk_seq, object_key, first_line, last_line, status, written_at, rows_total "
            "FROM chunks WHERE processed_at IS NULL AND status <> 'failed' ORDER BY seq LIMIT %s",
            (self.settings.y_max_batch_chunks,),
        )

    @staticmethod
    def _ready_prefix(rows: list[tuple]) -> list[ChunkRef]:
        batch: list[ChunkRef] = []
        total = 0
        for seq, file_id, chunk_seq, key, first, last, status, written_at, n_rows in rows:
            if status != "written":
                break  # strictly in order: a chunk whose object is not written yet holds back the rest
            total += n_rows or 0
            if batch and total > MAX_BATCH_ROWS:
                break  # the batch's rows are held in memory on the driver: bound them, whatever BATCH_SIZE is
            batch.append(ChunkRef(seq, file_id, chunk_seq, key, first, last, written_at))
        return batch

    def _x_busy(self) -> bool:
        return bool(self.db.query("SELECT 1 FROM source_files WHERE status = 'ingesting' LIMIT 1"))

    def _wait(self, timeout: float) -> None:
        """Sleep until X notifies a chunk (or importance) or the timeout passes."""
        if self._listen is None:
            self.stop.wait(timeout)
            return
        end = time.monotonic() + timeout
        while not self.stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self._listen], [], [], min(left, 0.5))
            if ready:
                self._listen.poll()
                if self._listen.notifies:
                    self._listen.notifies.clear()
                    return

    def run(self, *, drain: bool) -> int:
        self.start()
        waiting_since: float | None = None
        try:
            while not self.stop.is_set():
                self.writer.tick()
                waiting = self._waiting_chunks()
                batch = self._ready_prefix(waiting)
                if x_finished():  # main.py --drain: the supervisor's mark that X has ingested everything
                    self.drain_requested.set()
                draining = drain or self.drain_requested.is_set()
                if not batch:
                    self._refresh_weights()  # while idle, so the next chunk does not wait for a reload
                    if draining and not waiting and (self.drain_requested.is_set() or not self._x_busy()):
                        log.info("drain: every chunk in the ledger is processed")
                        return 0
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
                self.process_batch(batch)
            return 0
        finally:
            try:
                self.writer.tick(final=True)
            finally:
                if self._listen is not None:
                    self._listen.close()

    # ---------------------------------------------------------------- one batch

    def warm_up(self) -> None:
        """Put a made-up chunk through the whole Spark path (read, validate, fold, detect) a few times before
        reporting ready: the first real chunks would otherwise pay for Spark's first query plans, code
        generation and JIT compilation, seconds each on a 2-core machine."""
        if not self.settings.spark_master.startswith("local"):
            return  # executors elsewhere cannot read a local scratch file; the first chunks warm them up
        t0 = time.perf_counter()
        scratch = self.settings.data_dir / "spark" / "warm-up"
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / f"warm-up-{os.getpid()}.parquet"
        path.write_bytes(parquet_bytes(made_up_chunk(self.settings.batch_size)))
        try:
            state = patterns.by_merchant(self.spark.createDataFrame([], schema=state_spark_schema()))
            state = state.localCheckpoint()
            weights = self.weights
            if weights is None:
                weights = patterns.by_merchant(self.spark.createDataFrame([], schema=weights_spark_schema()))
                weights = weights.localCheckpoint()
            previous = None
            for _ in range(WARM_UP_ROUNDS):
                rows = self._read([path.as_uri()], [path.name])
                versions = patterns.fold_batch(state, self._fold_input(rows), 1).localCheckpoint(eager=True)
                patterns.detect_batch(versions, weights, 1, **self.thresholds).collect()
                if previous is not None:
                    previous.unpersist()
                previous, state = versions, patterns.latest_state(versions, 1)
            previous.unpersist()
        finally:
            path.unlink(missing_ok=True)
        log.info("Spark warmed up in %.1f s", time.perf_counter() - t0)

    def _read(self, uris: list[str], names: list[str]) -> pa.Table:
        """Rows of the objects at `uris`, read by Spark in one pass and annotated; `_cut` is the index in
        `names` of each row's object file name, and rows are in (cut, position in the object) order."""
        from pyspark.sql import functions as F

        df = self.spark.read.schema(chunk_spark_schema()).parquet(*uris)
        df = annotate_problems(df).withColumn(CUT, F.col("_metadata.file_name"))
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

    def _read_batch(self, batch: list[ChunkRef]) -> pa.Table:
        return self._read([self.store.spark_uri(c.key) for c in batch], [c.key.rsplit("/", 1)[-1] for c in batch])

    def process_batch(self, batch: list[ChunkRef]) -> int:
        """Fold, judge and commit the chunks of `batch` (consecutive in the ledger); returns new detections."""
        t0 = time.perf_counter()
        try:
            rows = self._read_batch(batch)
        except Exception as exc:  # noqa: BLE001 - the object may be bad; find out which before giving up
            if self._fail_unreadable(batch, exc):
                return 0
            raise
        k = len(batch)
        t_read = time.perf_counter()
        problem = rows.column(PROBLEM)
        clean_mask = pc.is_null(problem)
        clean = rows.filter(clean_mask).drop_columns([PROBLEM])
        rejected = rows.filter(pc.invert(clean_mask))

        # Checkpointed (eagerly) every batch: it cuts the lineage, so planning and work stay flat with
        # history, and it keeps the merchant partitioning, so the detection reads it without a shuffle.
        versions = patterns.fold_batch(self.state, self._fold_input(clean), k).localCheckpoint(eager=True)
        t_fold = time.perf_counter()
        found = patterns.first_hits(patterns.detect_batch(versions, self.weights, k, **self.thresholds).collect())
        t_spark = time.perf_counter()
        new = sorted((cut, key) for key, cut in found.items() if key not in self.emitted)

        per_cut_clean = _counts(clean.column(CUT), k)
        per_cut_rejected = _counts(rejected.column(CUT), k)
        self._commit(batch, clean, rejected, new, per_cut_clean, per_cut_rejected)
        t_commit = time.perf_counter()
        if self._versions is not None:
            self._versions.unpersist()
        self._versions = versions
        self.state = patterns.latest_state(versions, k)
        self.emitted.update(key for _, key in new)
        self.writer.note_new(len(new))
        done = datetime.now(timezone.utc)
        for i, c in enumerate(batch):
            here = [key for cut, key in new if cut == i]
            log.info(
                "chunk %d (%s-%06d): %d rows, %d rejected, %d new detection(s) %s, latency %.3f s "
                "[batch of %d: %.0f ms in Y (read %.0f, fold %.0f, detect %.0f, commit %.0f)]",
                c.seq,
                c.file_id,
                c.chunk_seq,
                per_cut_clean[i],
                per_cut_rejected[i],
                len(here),
                "(" + ", ".join(f"{p}:{sum(1 for x in here if x[0] == p)}" for p in ACTIONS) + ")",
                (done - c.written_at).total_seconds() if c.written_at else float("nan"),
                k,
                (time.perf_counter() - t0) * 1000,
                (t_read - t0) * 1000,
                (t_fold - t_read) * 1000,
                (t_spark - t_fold) * 1000,
                (t_commit - t_spark) * 1000,
            )
        if rejected.num_rows:
            self.write_quality_report()
        return len(new)

    def _commit(
        self,
        batch: list[ChunkRef],
        clean: pa.Table,
        rejected: pa.Table,
        new: list[tuple[int, tuple[str, str, str]]],
        per_cut_clean: list[int],
        per_cut_rejected: list[int],
    ) -> None:
        """ONE PostgreSQL transaction for the whole batch: every chunk's processed mark (guarded, so a chunk is
        never counted twice), the clean rows, the state delta, the new detections and the rejected rows."""
        k = len(batch)
        per_cut_new = [0] * k
        for cut, _ in new:
            per_cut_new[cut] += 1
        with self.db.transaction() as cur:
            psycopg2.extras.execute_values(
                cur,
                # One clock reading for the whole batch: its chunks are committed together.
                "WITH clock AS (SELECT clock_timestamp() AS ts) "
                "UPDATE chunks c SET processed_at = clock.ts, y_rows_clean = v.clean, "
                "y_rows_rejected = v.rejected, y_new_detections = v.new "
                "FROM clock, (VALUES %s) AS v(seq, clean, rejected, new) "
                "WHERE c.seq = v.seq AND c.processed_at IS NULL",
                [(c.seq, per_cut_clean[i], per_cut_rejected[i], per_cut_new[i]) for i, c in enumerate(batch)],
            )
            if cur.rowcount != k:
                raise ProcessorError(
                    f"chunks {batch[0].seq}..{batch[-1].seq} were processed by someone else; refusing to count them twice"
                )
            if clean.num_rows:
                out = clean.select(list(TRANSACTION_COLUMNS)).rename_columns(list(TRANSACTION_COLUMNS.values()))
                buf = io.BytesIO()
                pacsv.write_csv(out, buf)
                buf.seek(0)
                copy_csv(cur, "transactions", out.column_names, buf)
                # The durable twin of Spark's fold: PostgreSQL folds the same rows into y_state in the same
                # transaction as the processed marks, so a restart reloads exactly this state.
                cur.execute(
                    "INSERT INTO y_state (merchant, customer, n, amount_sum, has_f, has_m) "
                    "SELECT t.merchant, t.customer, count(*), sum(t.amount), bool_or(t.gender = 'F'), "
                    "bool_or(t.gender = 'M') FROM transactions t "
                    "JOIN unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[]) AS b(file_id, chunk_seq, lo, hi) "
                    "ON t.source_file_id = b.file_id AND t.chunk_seq = b.chunk_seq AND t.source_line BETWEEN b.lo AND b.hi "
                    "GROUP BY t.merchant, t.customer "
                    "ON CONFLICT (merchant, customer) DO UPDATE SET "
                    "n = y_state.n + EXCLUDED.n, amount_sum = y_state.amount_sum + EXCLUDED.amount_sum, "
                    "has_f = y_state.has_f OR EXCLUDED.has_f, has_m = y_state.has_m OR EXCLUDED.has_m",
                    (
                        [c.file_id for c in batch],
                        [c.chunk_seq for c in batch],
                        [c.first_line for c in batch],
                        [c.last_line for c in batch],
                    ),
                )
            if new:
                now = datetime.now(timezone.utc)
                psycopg2.extras.execute_values(
                    cur,
                    "INSERT INTO pattern_detections (pattern_id, action_type, customer_name, merchant_id, "
                    "y_start_time, detection_time, chunk_id) VALUES %s",
                    [(p, ACTIONS[p], c, m, self.y_start, now, batch[cut].seq) for cut, (p, c, m) in new],
                )
            if rejected.num_rows:
                cuts = rejected.column(CUT)
                for i, chunk in enumerate(batch):
                    if per_cut_rejected[i]:
                        self._record_rejected(
                            cur, chunk.seq, chunk.file_id, chunk.chunk_seq, rejected.filter(pc.equal(cuts, i))
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
                if is_transient(err):
                    raise
                problems = [f"not a readable Parquet file ({err})"]
            if problems:
                bad.append((c, "; ".join(problems)))
        if not bad:
            return False
        for c, reason in bad:
            message = f"chunk object {c.key} cannot be processed: {reason}"
            with self.db.transaction() as cur:
                cur.execute("UPDATE chunks SET status = 'failed' WHERE seq = %s AND processed_at IS NULL", (c.seq,))
                copy_rows(
                    cur,
                    "quarantine",
                    ("file_id", "line_no", "chunk_seq", "stage", "reason", "raw_line"),
                    [
                        (
                            c.file_id,
                            c.first_line,
                            c.chunk_seq,
                            "detect",
                            f"whole chunk (lines {c.first_line}-{c.last_line}) rejected: {reason}",
                            None,
                        )
                    ],
                )
                self.db.log_event(
                    COMPONENT, "ERROR", "chunk_failed", message, file_id=c.file_id, chunk_id=c.seq, cur=cur
                )
            log.error("%s; marked failed and quarantined (Spark said: %s)", message, str(exc).splitlines()[0][:300])
        return True

    def _record_rejected(self, cur, seq: int, file_id: str, chunk_seq: int, rejected: pa.Table) -> None:
        """Quarantine rejected rows (one record per row id) in PostgreSQL and in the lake."""
        lines = rejected.column("source_line").to_pylist()
        reasons = rejected.column(PROBLEM).to_pylist()
        per_line: dict[int, list[str]] = {}
        for i, (ln, r) in enumerate(zip(lines, reasons)):
            # A row without a line number gets a negative placeholder unique within the file.
            per_line.setdefault(ln if ln is not None else -1 - (chunk_seq * 1_000_000 + i), []).append(r)
        records = [
            (ln, rs[0] if len(rs) == 1 else f"{rs[0]} (+{len(rs) - 1} more row(s) with this id)")
            for ln, rs in per_line.items()
        ]
        copy_rows(
            cur,
            "quarantine",
            ("file_id", "line_no", "chunk_seq", "stage", "reason", "raw_line"),
            ((file_id, ln, chunk_seq, "detect", r, None) for ln, r in records),
        )
        table = pa.table(
            {
                "source_file_id": [file_id] * len(records),
                "source_line": [ln for ln, _ in records],
                "reason": [r for _, r in records],
                "raw_line": pa.nulls(len(records), pa.string()),
            },
            schema=QUARANTINE_SCHEMA,
        )
        key = lake_paths.quarantine_key("detect", file_id, chunk_seq)
        payload = parquet_bytes(table)  # same rows on a redo -> same bytes: written before the commit, idempotently
        retry_call(
            lambda: self.store.put_bytes(key, payload, overwrite=True), what=f"write {key}", transient=is_transient
        )
        self.db.log_event(
            COMPONENT,
            "WARNING",
            "rows_rejected",
            f"chunk {seq}: {len(reasons)} row(s) excluded from the state, first: {reasons[0]}",
            file_id=file_id,
            chunk_id=seq,
            row_count=len(reasons),
            cur=cur,
        )

    def write_quality_report(self) -> None:
        totals = self.db.query(
            "SELECT count(*) FILTER (WHERE processed_at IS NOT NULL), coalesce(sum(y_rows_clean), 0), "
            "coalesce(sum(y_rows_rejected), 0) FROM chunks"
        )[0]
        by_reason = self.db.query(
            "SELECT reason, count(*) FROM quarantine WHERE stage = 'detect' GROUP BY reason ORDER BY 2 DESC"
        )
        recent = self.db.query(
            "SELECT seq, file_id, chunk_seq, y_rows_clean, y_rows_rejected FROM chunks "
            "WHERE y_rows_rejected > 0 ORDER BY seq DESC LIMIT 100"
        )
        doc = {
            "updated_at": ist(datetime.now(timezone.utc)),
            "chunks_checked": totals[0],
            "rows_clean": int(totals[1]),
            "rows_rejected": int(totals[2]),
            "rejected_by_reason": {r: n for r, n in by_reason},
            "chunks_with_problems": [
                {"chunk_id": s, "file_id": f, "chunk_seq": c, "rows_clean": rc, "rows_rejected": rr}
                for s, f, c, rc, rr in recent
            ],
        }
        data = json.dumps(doc, indent=2).encode()
        retry_call(
            lambda: self.store.put_bytes(lake_paths.QUALITY_REPORT_KEY, data, overwrite=True),
            what="write quality_reports.json",
            transient=is_transient,
        )


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
) -> int:
    from config.spark_config import build_spark_session
    from src.utils.object_store import open_lake

    stop = stop or threading.Event()
    db = Database(settings)
    db.apply_schema()
    store = open_lake(settings)
    spark = build_spark_session(settings, app_name="mechanism-y")
    processor = StreamProcessor(settings, db, store, spark, stop)
    if drain_requested is not None:
        processor.drain_requested = drain_requested
    log.info("mechanism Y: reading %s with Spark %s", store.describe(), spark.version)
    try:
        code = processor.run(drain=drain)
        processor.write_quality_report()
        return code
    finally:
        spark.stop()
        db.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.mechanism_y.stream_processor",
        description=(
            "Mechanism Y alone: process each chunk Mechanism X records, in order, with PySpark; keep the running "
            "state, evaluate PatId1 (UPGRADE), PatId2 (CHILD) and PatId3 (DEI-NEEDED) after every chunk, and "
            "write each new detection once to PostgreSQL and the lake. Settings come from the environment and .env."
        ),
    )
    parser.add_argument(
        "--drain",
        action="store_true",
        help="exit 0 once every chunk in the ledger is processed and no file is mid-ingest",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from src.utils.runtime import worker_main

    def run(settings: Settings, args: argparse.Namespace, stop: threading.Event) -> int:
        # Under `main.py --drain`, Y learns that X is done from the supervisor's file (runtime.x_finished).
        return run_worker(settings, drain=args.drain, stop=stop)

    return worker_main("mechanism Y", build_parser(), argv, run)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
