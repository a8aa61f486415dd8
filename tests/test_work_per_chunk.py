"""Spark's work per chunk does not grow with history (issue 13, item 7).

Mechanism Y folds each chunk into its running state instead of recomputing from every row seen so far,
so the rows Spark reads for a batch are the chunk's rows (twice) plus the state (one row per (merchant, customer)
pair), never the history; and it does so in one Spark job per batch that returns no row of the chunk to Y's
driver (issues 11 and 12). Measured, not assumed: each batch runs under a Spark job group of its own,
and Spark's status store (what its UI shows as "Input") says how many records the batch's stages read,
from Parquet objects and from the checkpointed state and weights alike.

The sample keeps the pairs fixed (every chunk touches the same PAIRS pairs) while the history grows
chunk after chunk, so a Y that re-read its history would read more at every batch.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from src.utils.db import Database
from tests.test_mechanism_x import HEADER, IMPORTANCE_HEADER, row

CHUNKS = 6
CHUNK_ROWS = 200
CUSTOMERS, MERCHANTS = 8, 5
PAIRS = CUSTOMERS * MERCHANTS  # every chunk touches every pair (CHUNK_ROWS is a multiple of PAIRS)


def _write_inbox(inbox: Path) -> None:
    lines = []
    for i in range(CHUNKS * CHUNK_ROWS):
        pair = i % PAIRS
        customer, merchant = f"C{pair // MERCHANTS:03d}", f"M{pair % MERCHANTS:03d}"
        lines.append(row(step=i, customer=customer, merchant=merchant, gender="MF"[i % 2], amount=f"{1 + i % 90}.25"))
    (inbox / "transactions.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    weights = [
        f"'C{c:03d}','M{m:03d}',{0.1 + c / 100:.2f},'es_food',0" for c in range(CUSTOMERS) for m in range(MERCHANTS)
    ]
    (inbox / "CustomerImportance.csv").write_text("\n".join([IMPORTANCE_HEADER, *weights]) + "\n")


def _records_read(spark, group: str) -> int:
    """Input records of every stage of every job run under `group` (Spark's status store, as its UI shows)."""
    sc = spark.sparkContext
    jvm = sc._jvm
    store = sc._jsc.sc().statusStore()
    no_statuses = jvm.java.util.ArrayList()
    no_quantiles = sc._gateway.new_array(jvm.double, 0)
    total = 0
    for job in sc.statusTracker().getJobIdsForGroup(group):
        for stage in sc.statusTracker().getJobInfo(job).stageIds:
            attempts = store.stageData(stage, False, no_statuses, False, no_quantiles)
            total += sum(attempts.apply(i).inputRecords() for i in range(attempts.length()))
    return total


def test_rows_spark_reads_per_chunk_stay_flat_as_history_grows(make_settings, spark):
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.resources import open_lake
    from tests.test_mechanism_y import run_x

    settings = make_settings(BATCH_SIZE=str(CHUNK_ROWS), Y_MAX_BATCH_CHUNKS="1")
    _write_inbox(settings.local_inbox_dir)
    run_x(settings)
    tag = uuid.uuid4().hex[:8]
    groups: list[str] = []
    to_driver: list[int] = []

    class ObservedProcessor(StreamProcessor):
        """The product's processor; each batch's Spark jobs are tagged with a job group of their own."""

        def process_batch(self, batch):
            groups.append(f"work-per-chunk-{tag}-{batch[0].seq}")
            self.spark.sparkContext.setLocalProperty("spark.jobGroup.id", groups[-1])  # this thread's jobs only
            try:
                return super().process_batch(batch)
            finally:
                to_driver.append(self.rows_to_driver)
                self.spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)

    db = Database(settings)
    try:
        processor = ObservedProcessor(settings, db, open_lake(settings), spark, threading.Event())
        assert processor.run(drain=True) == 0
        state_pairs = processor.state.count()
        published, staged_left = db.query(
            "SELECT (SELECT count(*) FROM transactions), (SELECT count(*) FROM staged_rows)"
        )[0]
    finally:
        db.close()
    spark.sparkContext._jsc.sc().listenerBus().waitUntilEmpty()  # the status store has every stage's end
    read = [_records_read(spark, g) for g in groups]
    jobs = [len(spark.sparkContext.statusTracker().getJobIdsForGroup(g)) for g in groups]

    assert len(groups) == CHUNKS, groups
    # ONE Spark job per batch (issue 12), and what it returns to Y's driver is a summary row per chunk (no
    # detection, no rejected row here), not the chunk's rows: those reach `transactions` from X's staging.
    assert jobs == [1] * CHUNKS, f"Spark jobs per batch: {jobs}"
    assert to_driver == [1] * CHUNKS, f"rows returned to Y's driver per batch: {to_driver}"
    assert (published, staged_left) == (CHUNKS * CHUNK_ROWS, 0)
    assert state_pairs == PAIRS
    assert read[0] > CHUNK_ROWS, f"Spark read {read[0]} records for a chunk of {CHUNK_ROWS} rows: not measured"
    # A batch reads its chunk twice (the fold's scan of the object, and the per-chunk summary's), the
    # state (the previous batch's versions: one row per pair, plus one per pair the previous chunk touched),
    # its own versions and the weights. The state fills during the first two batches (empty, then built on an
    # empty base); from the third on, the history grows by CHUNK_ROWS per batch and what Spark reads does not.
    assert read[2:] == [read[2]] * (CHUNKS - 2), f"records Spark read per batch: {read}"
    assert read[2] <= 2 * CHUNK_ROWS + 5 * PAIRS, f"records Spark read per batch: {read}"
    history_before_last = (CHUNKS - 1) * CHUNK_ROWS
    assert read[-1] < history_before_last, f"records Spark read per batch: {read}; history: {history_before_last}"
