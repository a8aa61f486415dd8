"""Acceptance tests of Mechanism Y (issue 3) against real PostgreSQL, a local lake and Spark.

The detections Y emits are compared with `tests.reference`, which parses the inbox's CSV files itself,
cuts them into chunks as the contract says and finds, in plain PostgreSQL, the first chunk after which
each detection holds: every detection must be emitted once, credited to that chunk (its file, its
index in the file and its position in the ledger).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import psycopg2
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.chunk_rows import chunk_row as _row
from tests.conftest import run_env
from tests.reference import Chunk, expected_detections, inbox_files, limits_of, read_importance, read_transactions

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ("PatId1", "PatId2", "PatId3")
ACTIONS = {"PatId1": "UPGRADE", "PatId2": "CHILD", "PatId3": "DEI-NEEDED"}
DETECTION_FILE_COLUMNS = ["YStartTime", "detectionTime", "patternId", "ActionType", "customerName", "MerchantId"]
IST_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?\+05:30$")

# Generated sample: 3,000 rows in 12 chunks; the big merchants (~1,500 and ~1,000 rows) cross T mid-stream.
GENERATED_ENV = {
    "BATCH_SIZE": "250",
    "Y_MAX_BATCH_CHUNKS": "1",  # chunk by chunk, as when Y keeps up; the handcrafted run folds chunks in pairs
    "DETECTIONS_PER_FILE": "3",
    "PATID1_MIN_MERCHANT_TXNS": "700",
    "PATID2_MIN_TXNS": "6",
    "PATID3_MIN_FEMALE_CUSTOMERS": "5",
}
GENERATED_ROWS, GENERATED_SEED = 3000, 7


# ---------------------------------------------------------------- running the product in-process


@dataclass
class Run:
    settings: object
    env: dict[str, str]
    conn: psycopg2.extensions.connection
    inbox: Path
    lake: Path
    spark_state: list[tuple] | None = None  # Spark's in-memory state after the run (run_y)

    def rows(self, sql: str, params=None) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()


def _env(pg_server, db: str, root: Path, overrides: dict[str, str]) -> dict[str, str]:
    return {**run_env(pg_server, db, root), **overrides}


@contextmanager
def product_run(pg_server, root: Path, overrides: dict[str, str]) -> Iterator[Run]:
    """A fresh database, inbox and lake for one module-scoped scenario."""
    from config.config import Settings

    name = "y_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(pg_server.admin_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    (root / "inbox").mkdir(parents=True)
    env = _env(pg_server, name, root, overrides)
    conn = psycopg2.connect(pg_server.dsn_for(name))
    conn.autocommit = True
    try:
        yield Run(Settings.from_env(env, dotenv=Path("/nonexistent")), env, conn, root / "inbox", root / "lake")
    finally:
        conn.close()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def run_x(settings) -> None:
    from src.mechanism_x.data_ingestion import run_worker

    assert run_worker(settings, drain=True) == 0


def run_y(settings, spark, processor_class: type | None = None) -> list[tuple]:
    """Mechanism Y in this process, on the session's SparkSession, until the ledger is drained (`processor_class`: a
    StreamProcessor subclass that observes it); returns Spark's own running state, as the next batch would fold
    into it."""
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.resources import open_lake
    from src.utils.db import Database

    db = Database(settings)
    db.apply_schema()
    try:
        processor = (processor_class or StreamProcessor)(settings, db, open_lake(settings), spark, threading.Event())
        assert processor.run(drain=True) == 0
        processor.write_quality_report()
        return sorted(tuple(r) for r in processor.state.collect())
    finally:
        db.close()


# ---------------------------------------------------------------- expectations


def expected_from_sources(run: Run, settings=None) -> dict:
    """{detection: Expected(first chunk, holds at end)} computed by the reference from the inbox's CSVs."""
    settings = settings or run.settings
    files, importance = inbox_files(run.inbox)
    chunks, txns = read_transactions(files, settings.batch_size)
    assert len(chunks) == run.rows("SELECT count(*) FROM chunks")[0][0], "the ledger has other chunks than the CSVs"
    return expected_detections(run.conn, chunks, txns, read_importance(importance), limits_of(settings))


def emitted(run: Run) -> dict[tuple[str, str, str], int]:
    rows = run.rows("SELECT pattern_id, customer_name, merchant_id, chunk_id FROM pattern_detections")
    out = {(p, c, m): k for p, c, m, k in rows}
    assert len(out) == len(rows)
    return out


def emitted_chunks(run: Run) -> dict[tuple[str, str, str], Chunk]:
    """Each detection's chunk as the product recorded it: ledger position (rank of its seq), file name, index."""
    rows = run.rows(
        "SELECT d.pattern_id, d.customer_name, d.merchant_id, f.name, c.chunk_seq, "
        "(SELECT count(*) FROM chunks e WHERE e.seq < c.seq) "
        "FROM pattern_detections d JOIN chunks c ON c.seq = d.chunk_id JOIN source_files f ON f.file_id = c.file_id"
    )
    out = {(p, c, m): Chunk(position, name, seq) for p, c, m, name, seq, position in rows}
    assert len(out) == len(rows)
    return out


def assert_detections_match_replay(run: Run, settings=None) -> dict:
    """The product's detections are the reference's, each credited to the same chunk; returns the reference's."""
    expected = expected_from_sources(run, settings)
    got = emitted_chunks(run)
    for pattern in PATTERNS:
        exp_p = {d for d in expected if d[0] == pattern}
        got_p = {d for d in got if d[0] == pattern}
        assert got_p == exp_p, f"{pattern}: missing {sorted(exp_p - got_p)}, unexpected {sorted(got_p - exp_p)}"
    wrong_chunk = {d: (got[d], expected[d].chunk) for d in got if got[d] != expected[d].chunk}
    assert not wrong_chunk, f"detections emitted at the wrong chunk (got, first chunk where it holds): {wrong_chunk}"
    actions = run.rows("SELECT DISTINCT pattern_id, action_type FROM pattern_detections")
    assert all(ACTIONS[p] == a for p, a in actions), actions
    return expected


def state_from_sources(run: Run) -> list[tuple]:
    """(merchant, customer, n, amount sum, ever F, ever M) per pair, from the test's own reading of the CSVs."""
    files, _ = inbox_files(run.inbox)
    _, txns = read_transactions(files, run.settings.batch_size)
    pairs: dict[tuple[str, str], list] = {}
    for t in txns:
        p = pairs.setdefault((t.merchant, t.customer), [0, Decimal(0), False, False])
        p[0] += 1
        p[1] += t.amount
        p[2] |= t.gender == "F"
        p[3] |= t.gender == "M"
    return sorted((m, c, n, a, f, g) for (m, c), (n, a, f, g) in pairs.items())


def assert_state_matches_sources(run: Run) -> None:
    """Spark's in-memory state, its durable twin in PostgreSQL and the state the test derives from the CSVs
    itself are one and the same."""
    expected = state_from_sources(run)
    durable = sorted(run.rows("SELECT merchant, customer, n, amount_sum, has_f, has_m FROM y_state"))
    assert durable == expected, "y_state differs from the state of the source rows"
    assert run.spark_state == expected, "Spark's in-memory state differs from the state of the source rows"


def assert_state_matches_transactions(run: Run) -> None:
    state = run.rows("SELECT merchant, customer, n, amount_sum, has_f, has_m FROM y_state")
    reference = run.rows(
        "SELECT merchant, customer, count(*), sum(amount), bool_or(gender = 'F'), bool_or(gender = 'M') "
        "FROM transactions GROUP BY merchant, customer"
    )
    assert len(state) == len(reference)
    assert Counter(state) == Counter(reference), "y_state differs from a GROUP BY over transactions"
    (n_sum,), (txns,), (clean,) = (
        run.rows("SELECT coalesce(sum(n), 0) FROM y_state")[0],
        run.rows("SELECT count(*) FROM transactions")[0],
        run.rows("SELECT coalesce(sum(y_rows_clean), 0) FROM chunks")[0],
    )
    assert n_sum == txns == clean, (n_sum, txns, clean)


def read_detection_files(lake: Path, pattern: str) -> list[tuple[Path, pa.Table]]:
    folder = lake / "pattern-detections" / pattern.lower()
    return [
        (p, pq.read_table(p))
        for p in sorted(folder.rglob("*.parquet"))
        if not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts)
    ]


def lake_detections(lake: Path) -> Counter:
    out: Counter = Counter()
    for pattern in PATTERNS:
        for _, table in read_detection_files(lake, pattern):
            for r in table.to_pylist():
                out[(r["patternId"], r["customerName"], r["MerchantId"])] += 1
    return out


# ---------------------------------------------------------------- handcrafted data

B = 5  # rows per chunk in the handcrafted scenario
HAND_ENV = {
    "BATCH_SIZE": str(B),
    "Y_MAX_BATCH_CHUNKS": "2",
    "DETECTIONS_PER_FILE": "2",
    "PATID1_MIN_MERCHANT_TXNS": "20",
    "PATID1_COUNT_PERCENTILE": "0.9",
    "PATID1_WEIGHT_PERCENTILE": "0.1",
    "PATID2_MAX_AVG_AMOUNT": "23",
    "PATID2_MIN_TXNS": "3",
    "PATID3_MIN_FEMALE_CUSTOMERS": "2",
}
CATEGORY = {"M_T": "es_transportation", "M_F": "es_fashion", "M_G": "es_hyper", "M_H": "es_tech", "M_K": "es_food"}


def txn(customer: str, merchant: str, gender: str, amount: str, step: int = 0) -> str:
    cat = CATEGORY.get(merchant, "es_home")
    return f"{step},'{customer}','2','{gender}','28007','{merchant}','28007','{cat}',{amount},0"


def pad(rows: list[str]) -> list[str]:
    """Fill up to a chunk boundary with a customer of gender E at M_PAD (no importance row: w is null there)."""
    return rows + [txn("C_PAD", "M_PAD", "E", "100.00")] * (-len(rows) % B)


def handcrafted_segments() -> list[list[str]]:
    """Each segment starts on a chunk boundary. Comments say what holds after it."""
    tier = [f"C{i:02d}" for i in range(3, 11)]  # c03..c10 at M_T, 2 transactions each, weights 2..9
    top = ["C01", "C02", "C_NOIMP"]  # the top decile by count at M_T; C_NOIMP has no importance row
    return [
        # M_F, M_G, M_H get their male customers first.
        pad(
            [txn(f"FM{i}", "M_F", "M", "30.00") for i in range(1, 5)]
            + [txn(f"GM{i}", "M_G", "M", "30.00") for i in range(1, 4)]
            + [txn(f"HM{i}", "M_H", "M", "30.00") for i in range(1, 6)]
        ),
        # M_T: 4 rounds of the top three; T = 12.
        pad([txn(c, "M_T", "M", "40.00", 1) for _ in range(4) for c in top]),
        # PatId2 at M_K: C_CHILD (mean 10) and C_E2 (mean 22.99) hold, C_EDGE (mean exactly 23) does not.
        pad(
            [txn("C_CHILD", "M_K", "F", "10.00", 2)] * 3
            + [txn("C_EDGE", "M_K", "M", "23.00", 2)] * 3
            + [txn("C_E2", "M_K", "M", "22.99", 2)] * 3
        ),
        # M_T: each tier customer once; T = 20, not above the threshold yet. First female of M_F.
        pad([txn(c, "M_T", "M", "40.00", 3) for c in tier] + [txn("FF1", "M_F", "F", "30.00", 3)]),
        # M_T: second round of the tier; T crosses 20 in the first chunk of this segment. The top three tie
        # at P90 (n = 4), C01 and C02 tie at P10 (w = 1.00: C01's mean of 0.50 and 1.50, C02's single 1.00).
        pad([txn(c, "M_T", "M", "40.00", 4) for c in tier] + [txn("FF1", "M_F", "F", "30.00", 4)]),
        # C_CHILD's mean rises to 46: PatId2 no longer holds for it (it stays emitted).
        # M_F: FF2, FF3 make F = 3 > 2 with M = 4: PatId3 holds. M_G: F = M = 3. M_H: F = 2, not above 2.
        pad(
            [txn("C_CHILD", "M_K", "F", "100.00", 5)] * 2
            + [txn("FF2", "M_F", "F", "30.00", 5), txn("FF3", "M_F", "F", "30.00", 5)]
            + [txn(f"GF{i}", "M_G", "F", "30.00", 5) for i in range(1, 4)]
            + [txn(f"HF{i}", "M_H", "F", "30.00", 5) for i in range(1, 3)]
        ),
        # More of the top three, and FF1 again: still 3 distinct women at M_F, however many chunks they span.
        pad([txn(c, "M_T", "M", "40.00", 6) for _ in range(2) for c in top] + [txn("FF1", "M_F", "F", "30.00", 6)]),
        # M_F: FF4, FF5 make F = 5 >= M = 4: PatId3 no longer holds for M_F (it stays emitted).
        pad([txn("FF4", "M_F", "F", "30.00", 7), txn("FF5", "M_F", "F", "30.00", 7)]),
    ]


HAND_IMPORTANCE = [
    ("C01", "M_T", "0.50", "es_transportation"),
    ("C01", "M_T", "1.50", "es_food"),  # repeated (customer, merchant): w is the mean over both rows
    ("C02", "M_T", "1.00", "es_transportation"),
    *[(f"C{i:02d}", "M_T", f"{i - 1}.00", "es_transportation") for i in range(3, 11)],
    ("C_CHILD", "M_K", "5.00", "es_food"),
    ("C01", "M_NOWHERE", "0.01", "es_food"),  # a pair without any transaction
]


def write_csv(path: Path, header: str, lines: list[str], mtime: float) -> None:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    os.utime(path, (mtime, mtime))


def write_handcrafted_inbox(inbox: Path) -> list[list[str]]:
    segments = handcrafted_segments()
    header = "step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud"
    now = time.time()
    write_csv(
        inbox / "CustomerImportance.csv",
        "Source,Target,Weight,typeTrans,fraud",
        [f"'{c}','{m}',{w},'{t}',0" for c, m, w, t in HAND_IMPORTANCE],
        now - 300,
    )
    # Two transaction files: the global chunk order runs across them (the first file by time comes first).
    write_csv(inbox / "b_transactions.csv", header, [r for s in segments[:4] for r in s], now - 200)
    write_csv(inbox / "a_transactions.csv", header, [r for s in segments[4:] for r in s], now - 100)
    return segments


# ---------------------------------------------------------------- module-scoped runs


@pytest.fixture(scope="module")
def generated_run(pg_server, spark, tmp_path_factory):
    from src.sample_data import generate

    with product_run(pg_server, tmp_path_factory.mktemp("generated"), GENERATED_ENV) as run:
        generate(run.inbox, rows=GENERATED_ROWS, seed=GENERATED_SEED)
        run_x(run.settings)
        run.spark_state = run_y(run.settings, spark)
        yield run


@pytest.fixture(scope="module")
def handcrafted_run(pg_server, spark, tmp_path_factory):
    with product_run(pg_server, tmp_path_factory.mktemp("handcrafted"), HAND_ENV) as run:
        write_handcrafted_inbox(run.inbox)
        run_x(run.settings)
        run.spark_state = run_y(run.settings, spark)
        yield run


# ---------------------------------------------------------------- 1. detections vs the reference, chunk by chunk


def test_generated_detections_match_reference_replay(generated_run):
    run = generated_run
    n_chunks = run.rows("SELECT count(*), count(processed_at) FROM chunks")[0]
    assert n_chunks[0] == n_chunks[1] >= 10, n_chunks
    expected = {d: e.chunk.position for d, e in assert_detections_match_replay(run).items()}
    # The scenario is only worth its name if every pattern fires, and not all at the first chunk.
    for pattern in PATTERNS:
        chunks = {k for d, k in expected.items() if d[0] == pattern}
        assert chunks, f"{pattern} never fires on the generated sample: tune GENERATED_ENV"
    assert len({k for k in expected.values()}) >= 3
    first_busy = min(k for d, k in expected.items() if d[0] == "PatId1")
    assert first_busy > 1, "PatId1 should start only once a merchant crosses T, mid-stream"
    # PatId3 rows carry an empty customer name (SPEC §4).
    assert {c for p, c, _ in expected if p == "PatId3"} == {""}


def test_a_cold_session_takes_one_chunk_first_then_full_batches(handcrafted_run):
    """Y starts on a backlog (X ingested everything first): its first batch, cold, holds one chunk, so the first
    processed chunk does not wait for a cold batch of Y_MAX_BATCH_CHUNKS; the rest go in full batches."""
    run = handcrafted_run
    batches = run.rows(
        "SELECT count(*) FROM chunks WHERE processed_at IS NOT NULL GROUP BY y_batch_id ORDER BY min(seq)"
    )
    sizes = [n for (n,) in batches]
    limit = int(HAND_ENV["Y_MAX_BATCH_CHUNKS"])
    assert sizes[0] == 1 and len(sizes) > 2, sizes
    assert sizes[1] == limit and max(sizes) == limit, sizes


def test_a_session_idle_before_its_first_chunk_still_takes_one_chunk_first(pg_server, spark, tmp_path):
    """At CHUNK_INTERVAL_SECONDS=0 an idle Y decides against the idle warm-up (nothing is paced) and so stays
    cold: the backlog that arrives next still starts with a batch of one chunk. Y is stopped once idle, so the
    backlog is all there when it is asked for its next batch."""
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.resources import open_lake
    from src.utils.db import Database

    env = {**HAND_ENV, "CHUNK_INTERVAL_SECONDS": "0"}
    with product_run(pg_server, tmp_path, env) as run:
        now = time.time()
        write_csv(run.inbox / "CustomerImportance.csv", CI_HEADER, ["'C1','M1',0.50,'es_food',0"], now - 100)
        run_x(run.settings)  # the weights only
        db = Database(run.settings)
        db.apply_schema()
        stop = threading.Event()
        processor = StreamProcessor(run.settings, db, open_lake(run.settings), spark, stop)
        worker = threading.Thread(target=processor.run, kwargs={"drain": False}, daemon=True)
        worker.start()
        try:
            deadline = time.monotonic() + 300
            while not processor._warmed:  # idle long enough to have decided on the warm-up
                assert worker.is_alive() and time.monotonic() < deadline, "Y never went idle"
                time.sleep(0.1)
        finally:
            stop.set()
            worker.join(120)
        assert not worker.is_alive()
        try:
            write_csv(run.inbox / "t.csv", TX_HEADER, [txn(f"C{i % 3}", "M1", "F", "10.00") for i in range(4 * B)], now)
            run_x(run.settings)
            assert run.rows("SELECT count(*) FROM chunks WHERE status = 'written'") == [(4,)]
            assert [c.chunk_seq for c in processor._waiting_chunks()] == [0]
        finally:
            db.close()


def test_handcrafted_detections_match_reference_replay(handcrafted_run):
    run = handcrafted_run
    expected = assert_detections_match_replay(run)
    got = emitted(run)

    def chunk_of(customer: str, merchant: str, nth: int) -> int:
        """The chunk seq holding the nth (1-based) transaction of customer at merchant, in source order."""
        rows = run.rows(
            "SELECT c.seq FROM transactions t JOIN chunks c ON c.file_id = t.source_file_id "
            "AND c.chunk_seq = t.chunk_seq WHERE t.customer = %s AND t.merchant = %s ORDER BY c.seq, t.source_line",
            (customer, merchant),
        )
        return rows[nth - 1][0]

    # PatId1: ties at P90 and P10; C_NOIMP (no importance row) is in the top decile but never detected; T crosses
    # 20 with the 21st transaction at M_T, which is C03's second one, and not a chunk earlier.
    crossing = run.rows(
        "SELECT min(seq) FROM (SELECT c.seq, sum(count(*)) OVER (ORDER BY c.seq) AS t FROM transactions x "
        "JOIN chunks c ON c.file_id = x.source_file_id AND c.chunk_seq = x.chunk_seq WHERE x.merchant = 'M_T' "
        "GROUP BY c.seq) s WHERE t > 20"
    )[0][0]
    assert crossing == chunk_of("C03", "M_T", 2)
    patid1 = {d: k for d, k in got.items() if d[0] == "PatId1"}
    assert patid1 == {("PatId1", "C01", "M_T"): crossing, ("PatId1", "C02", "M_T"): crossing}

    # PatId2: strict mean below 23; C_CHILD holds at one chunk and no longer at the end, yet stays emitted once.
    patid2 = {d: k for d, k in got.items() if d[0] == "PatId2"}
    assert set(patid2) == {("PatId2", "C_CHILD", "M_K"), ("PatId2", "C_E2", "M_K")}
    assert patid2[("PatId2", "C_CHILD", "M_K")] == chunk_of("C_CHILD", "M_K", 3)
    assert not expected[("PatId2", "C_CHILD", "M_K")].holds_at_end

    # PatId3: M_F crosses F > 2 with FF3 and stops holding when F reaches M; M_G (F = M) and M_H (F = 2) never.
    patid3 = {d: k for d, k in got.items() if d[0] == "PatId3"}
    assert patid3 == {("PatId3", "", "M_F"): chunk_of("FF3", "M_F", 1)}
    assert not expected[("PatId3", "", "M_F")].holds_at_end
    # FF3, the third woman at M_F, is in the third chunk of the second file: the ledger order runs across files.
    assert expected[("PatId3", "", "M_F")].chunk == Chunk(12, "a_transactions.csv", 2)

    # The chunks were cut from two files and processed in the ledger's global order.
    files = run.rows("SELECT DISTINCT file_id FROM chunks")
    assert len(files) == 2
    processed = [r[0] for r in run.rows("SELECT seq FROM chunks ORDER BY processed_at, seq")]
    assert processed == sorted(processed)


# ---------------------------------------------------------------- 2. state equals the reference


def test_generated_state_equals_group_by_over_transactions(generated_run):
    assert_state_matches_sources(generated_run)
    assert_state_matches_transactions(generated_run)
    (valid,) = generated_run.rows("SELECT sum(rows_valid) FROM chunks")[0]
    (txns,) = generated_run.rows("SELECT count(*) FROM transactions")[0]
    assert txns == valid == GENERATED_ROWS


def test_handcrafted_state_equals_group_by_over_transactions(handcrafted_run):
    assert_state_matches_sources(handcrafted_run)
    assert_state_matches_transactions(handcrafted_run)
    rows = handcrafted_run.rows("SELECT n, has_f, has_m FROM y_state WHERE merchant = 'M_F' AND customer = 'FF1'")
    assert rows == [(3, True, False)]


# ---------------------------------------------------------------- 4. lake outputs


def _check_lake(run: Run, per_file: int) -> None:
    table_rows = run.rows(
        "SELECT pattern_id, action_type, customer_name, merchant_id, y_start_time, detection_time "
        "FROM pattern_detections"
    )
    assert table_rows
    by_key = {(p, c, m): (a, ys, dt) for p, a, c, m, ys, dt in table_rows}
    seen: Counter = Counter()
    for pattern in PATTERNS:
        files = read_detection_files(run.lake, pattern)
        n_pattern = sum(1 for d in by_key if d[0] == pattern)
        assert bool(files) == bool(n_pattern), pattern
        for path, table in files:
            rel = path.relative_to(run.lake / "pattern-detections" / pattern.lower())
            assert re.fullmatch(r"year=\d{4}/month=\d{2}/[^/]+\.parquet", rel.as_posix()), rel
            assert table.column_names == DETECTION_FILE_COLUMNS, (path, table.column_names)
            assert 1 <= table.num_rows <= per_file, (path, table.num_rows)
            for r in table.to_pylist():
                key = (r["patternId"], r["customerName"], r["MerchantId"])
                seen[key] += 1
                assert key[0] == pattern
                action, y_start, detected = by_key[key]
                assert r["ActionType"] == action == ACTIONS[pattern]
                for text, ts in ((r["YStartTime"], y_start), (r["detectionTime"], detected)):
                    assert IST_ISO.match(text), text
                    assert abs((datetime.fromisoformat(text) - ts).total_seconds()) < 0.001, (text, ts)
                ist = datetime.fromisoformat(r["detectionTime"])
                assert rel.parts[:2] == (f"year={ist.year:04d}", f"month={ist.month:02d}"), (rel, r)
        if n_pattern:
            dataset = ds.dataset(run.lake / "pattern-detections" / pattern.lower(), partitioning="hive")
            read = dataset.to_table()
            assert read.num_rows == n_pattern
            assert {"year", "month"} <= set(read.column_names)
            stats = json.loads(
                (run.lake / "pattern-detections" / pattern.lower() / "_summary/monthly_stats.json").read_text()
            )
            assert stats["total_detections"] == n_pattern, stats
            assert sum(m["detections"] for m in stats["months"]) == n_pattern, stats
    dupes = {k: n for k, n in seen.items() if n > 1}
    assert not dupes, f"detections in more than one lake file: {dupes}"
    assert set(seen) == set(by_key)


def test_generated_lake_outputs(generated_run):
    _check_lake(generated_run, per_file=3)


def test_handcrafted_lake_outputs(handcrafted_run):
    _check_lake(handcrafted_run, per_file=2)


# ---------------------------------------------------------------- 3. validator


def _register_chunk(run: Run, file_id: str, rows: list[dict], payload: bytes | None = None) -> int:
    """Write a hand-made chunk object into the lake and record it in the ledger as X would; returns its seq.

    `payload`, when given, is written as the object instead of the rows (a broken object)."""
    from src.schemas.transaction_schemas import CHUNK_ARROW_SCHEMA

    schema = pa.schema([f.with_nullable(True) for f in CHUNK_ARROW_SCHEMA])
    table = pa.Table.from_pylist(rows, schema=schema)
    key = f"raw-transactions/year=2026/month=01/day=02/{file_id}-000000.parquet"
    path = run.lake / key
    path.parent.mkdir(parents=True, exist_ok=True)
    if payload is None:
        pq.write_table(table, path)
    else:
        path.write_bytes(payload)
    lines = [r["source_line"] for r in rows if r["source_line"] is not None]
    with run.conn.cursor() as cur:
        cur.execute(
            "INSERT INTO source_files (file_id, source, name, kind, status) "
            "VALUES (%s, 'local', %s, 'transactions', 'done')",
            (file_id, f"{file_id}.csv"),
        )
        cur.execute(
            "INSERT INTO chunks (file_id, chunk_seq, first_line, last_line, rows_total, rows_valid, rows_quarantined, "
            "bytes_start, bytes_end, prefix_md5, object_key, ingest_date, status, written_at) "
            "VALUES (%s, 0, %s, %s, %s, %s, 0, 0, 1, 'x', %s, '2026-01-02', 'written', now()) RETURNING seq",
            (file_id, min(lines), max(lines), len(rows), len(rows), key),
        )
        return cur.fetchone()[0]


@pytest.fixture
def small_clean_run(pg_server, tmp_path):
    """Importance loaded and one clean 6-row file ingested by X: the ground a hand-made chunk is laid on."""
    with product_run(pg_server, tmp_path, {"BATCH_SIZE": "3", "DETECTIONS_PER_FILE": "50"}) as run:
        header = "step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud"
        write_csv(
            run.inbox / "CustomerImportance.csv",
            "Source,Target,Weight,typeTrans,fraud",
            ["'C_V1','M_V',1.00,'es_food',0"],
            time.time() - 100,
        )
        write_csv(run.inbox / "t.csv", header, [txn("C_V1", "M_V", "F", "12.00")] * 6, time.time() - 50)
        run_x(run.settings)
        yield run


def test_validator_excludes_counts_quarantines_and_reports(small_clean_run, spark):
    from src.mechanism_y.data_validator import DUPLICATE

    run = small_clean_run
    rows = [
        _row(2, customer="C_V1", amount="1.00"),
        _row(3, customer=None),
        _row(4, customer="C_V2", amount="-5.00"),
        _row(5, customer="C_V2", gender="X"),
        _row(6, customer="C_V2", gender="M", amount="2.00"),
        _row(6, customer="C_V2", gender="M", amount="2.00"),  # the same row id again
        _row(7, customer="C_V3", gender="M", amount="3.00"),
    ]
    seq = _register_chunk(run, "handmade-bad", rows)
    run_y(run.settings, spark)

    chunk = run.rows(
        "SELECT processed_at IS NOT NULL, y_rows_clean, y_rows_rejected FROM chunks WHERE seq = %s", (seq,)
    )
    assert chunk == [(True, 3, 4)]
    # Clean rows went on into transactions and the state; rejected ones did not.
    lines = run.rows("SELECT source_line FROM transactions WHERE source_file_id = 'handmade-bad' ORDER BY 1")
    assert [r[0] for r in lines] == [2, 6, 7]
    state = dict(
        ((c, (n, s)) for c, n, s in run.rows("SELECT customer, n, amount_sum FROM y_state WHERE merchant = 'M_V'"))
    )
    assert state == {"C_V1": (7, Decimal("73.00")), "C_V2": (1, Decimal("2.00")), "C_V3": (1, Decimal("3.00"))}
    assert_state_matches_transactions(run)

    quarantined = run.rows(
        "SELECT line_no, reason FROM quarantine WHERE stage = 'detect' AND file_id = 'handmade-bad' ORDER BY line_no"
    )
    assert [q[0] for q in quarantined] == [3, 4, 5, 6]
    reasons = dict(quarantined)
    assert "customer" in reasons[3]
    assert "negative" in reasons[4]
    assert "gender" in reasons[5]
    assert reasons[6] == DUPLICATE

    logged = run.rows(
        "SELECT component, row_count, chunk_id FROM processing_logs WHERE event = 'rows_rejected' AND chunk_id = %s",
        (seq,),
    )
    assert logged == [("mechanism_y", 4, seq)]

    report = json.loads((run.lake / "pattern-detections/validation/quality_reports.json").read_text())
    assert report["rows_rejected"] == 4
    assert report["rows_clean"] == 6 + 3
    assert sum(report["rejected_by_reason"].values()) == 4
    assert report["rejected_by_reason"][DUPLICATE] == 1
    assert [c["chunk_id"] for c in report["chunks_with_problems"]] == [seq]


def test_problem_expression_built_once_serves_every_batch(spark):
    """Y builds `problem_column()` once per session and adds it to every batch's scan: on two different frames it
    gives what `annotate_problems` gives each of them."""
    from src.mechanism_y.data_validator import PROBLEM, annotate_problems, problem_column
    from src.mechanism_y.stream_processor import made_up_chunk

    first = made_up_chunk(20, seed=1)
    second = made_up_chunk(30, seed=2)
    second = second.set_column(second.schema.get_field_index("gender"), "gender", pa.array(["M"] * 29 + ["X"]))
    problem = problem_column()
    for table in (first, second):
        df = spark.createDataFrame(table)
        reused = [(r["source_line"], r[PROBLEM]) for r in df.select("*", problem.alias(PROBLEM)).collect()]
        fresh = [(r["source_line"], r[PROBLEM]) for r in annotate_problems(df).collect()]
        assert sorted(reused) == sorted(fresh)
    assert [p for _, p in reused if p] == ["unknown gender X"]
    assert len(reused) == 30


def test_problem_names_the_first_column_holding_a_nul(spark):
    """A NUL anywhere in a text column rejects the row, naming the first such column in schema order; a row with an
    earlier problem keeps that one, and a null optional column is no NUL."""
    from src.mechanism_y.data_validator import PROBLEM, annotate_problems
    from src.mechanism_y.stream_processor import made_up_chunk

    table = made_up_chunk(6)
    columns = table.to_pydict()
    columns["customer"][1], columns["category"][1] = "C\x00X", "es_\x00food"  # two: the first is named
    columns["age"][2], columns["zipMerchant"][2] = None, "28\x0007"
    columns["age"][3], columns["category"][3] = None, "es_food\x00"
    columns["customer"][4], columns["amount"][4] = "\x00", Decimal("-1.00")  # the earlier check wins
    bad = pa.table(columns, schema=table.schema)
    got = {r["source_line"]: r[PROBLEM] for r in annotate_problems(spark.createDataFrame(bad)).collect()}
    assert got == {
        2: None,
        3: "NUL character in customer",
        4: "NUL character in zipMerchant",
        5: "NUL character in category",
        6: "negative amount",
        7: None,
    }


def test_validator_row_id_repeated_three_times(small_clean_run, spark):
    """Two rejected copies of one line must not break the chunk's commit (quarantine is keyed by line)."""
    run = small_clean_run
    rows = [_row(2, amount="1.00"), _row(3, amount="1.00"), _row(3, amount="1.00"), _row(3, amount="1.00")]
    seq = _register_chunk(run, "handmade-triple", [dict(r, source_file_id="handmade-triple") for r in rows])
    run_y(run.settings, spark)
    assert run.rows("SELECT y_rows_clean, y_rows_rejected FROM chunks WHERE seq = %s", (seq,)) == [(2, 2)]
    (rejected,) = run.rows(
        "SELECT coalesce(sum(row_count), 0) FROM processing_logs WHERE event = 'rows_rejected' AND chunk_id = %s",
        (seq,),
    )[0]
    assert rejected == 2
    assert_state_matches_transactions(run)


def test_validator_rejects_reach_the_lake_quarantine(small_clean_run, spark):
    """SPEC §2: a rejected row goes to a quarantine in the lake `quarantine/` as well as PostgreSQL."""
    run = small_clean_run
    _register_chunk(
        run, "handmade-neg", [_row(2, amount="-1.00", file_id="handmade-neg"), _row(3, file_id="handmade-neg")]
    )
    run_y(run.settings, spark)
    objects = [p for p in (run.lake / "quarantine").rglob("*.parquet")] if (run.lake / "quarantine").exists() else []
    lines = {
        (r["source_file_id"], r["source_line"])
        for p in objects
        for r in pq.read_table(p).to_pylist()
        if "source_line" in r
    }
    assert ("handmade-neg", 2) in lines, f"no lake quarantine object holds the rejected row; objects: {objects}"


def _stage(run: Run, seq: int, rows: list[dict]) -> None:
    """Stage `rows` for chunk `seq`, already recorded as written (`ledger.stage_rows`; X itself stages a pending
    chunk with `ledger.stage_chunk` before marking it written)."""
    from src import ledger
    from src.schemas.transaction_schemas import CHUNK_ARROW_SCHEMA
    from src.utils.db import Database

    table = pa.Table.from_pylist(rows, schema=pa.schema([f.with_nullable(True) for f in CHUNK_ARROW_SCHEMA]))
    db = Database(run.settings)
    try:
        db.run(lambda cur: ledger.stage_rows(cur, seq, ledger.staging_payload(table)), what="stage a hand-made chunk")
    finally:
        db.close()


@pytest.mark.parametrize("case", ["single pass", "row id repeated", "object replaced"])
def test_staged_chunk_reaches_transactions_without_its_rows_on_ys_driver(small_clean_run, spark, case):
    """Issues 11 and 12: a chunk X staged is published by Y's commit from the staging: Y's driver gets the
    detections, per-chunk counts and rejected rows, never the chunk's rows. A chunk repeating a row id, or whose
    staged rows are not its object's (replaced after X wrote it), goes through the driver, from the object."""
    from src.mechanism_y.data_validator import DUPLICATE
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.resources import open_lake
    from src.utils.db import Database

    run = small_clean_run
    fid = "handmade-staged"
    rows = [_row(2, file_id=fid), _row(3, amount="-1.00", file_id=fid)]
    rows += [_row(line, customer=f"C_S{line % 7}", amount=f"{line}.50", file_id=fid) for line in range(4, 400)]
    good = [r for r in rows if r["amount"] >= 0]  # what X stages: its good rows (X never takes a negative amount)
    staged = good
    if case == "row id repeated":
        rows = [*rows, dict(rows[-1], amount=Decimal("9.99"))]  # a later copy of line 399: rejected, the first kept
    if case == "object replaced":
        staged = [dict(r, amount=r["amount"] + 1) for r in good]
    seq = _register_chunk(run, fid, rows)
    _stage(run, seq, staged)

    db = Database(run.settings)
    try:
        processor = StreamProcessor(run.settings, db, open_lake(run.settings), spark, threading.Event())
        assert processor.run(drain=True) == 0
    finally:
        db.close()

    duplicated = case == "row id repeated"
    assert run.rows("SELECT y_rows_clean, y_rows_rejected FROM chunks WHERE seq = %s", (seq,)) == [
        (len(rows) - 1 - duplicated, 1 + duplicated)
    ]
    published = run.rows(
        "SELECT source_line, amount FROM transactions WHERE source_file_id = %s ORDER BY source_line", (fid,)
    )
    assert published == [(r["source_line"], r["amount"]) for r in good]  # the object's rows, each once
    quarantined = run.rows("SELECT line_no, reason FROM quarantine WHERE stage = 'detect' AND file_id = %s", (fid,))
    assert sorted(quarantined) == sorted([(3, "negative amount"), *([(399, DUPLICATE)] if duplicated else [])]), (
        quarantined
    )
    assert run.rows("SELECT count(*) FROM staged_rows") == [(0,)]
    assert_state_matches_transactions(run)
    if case == "single pass":
        # A summary row per chunk of the batch (this one and, at most, the two of t.csv), the rejected row, and
        # detection hits (none here): a few rows, where the chunk has hundreds.
        assert processor.rows_to_driver <= 4, processor.rows_to_driver
    else:
        assert processor.rows_to_driver >= len(rows), processor.rows_to_driver


def test_chunks_without_staged_rows_go_through_the_driver_and_match_the_reference(pg_server, spark, tmp_path):
    """Issue 12: a written chunk whose staged rows are missing (a server crash empties the unlogged table, an
    older X staged none) is processed from its object through Y's driver, the others from X's staging: the
    detections are the reference's, each at its chunk, the state is the source rows', and `transactions` holds
    each row once."""
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.sample_data import generate

    with product_run(pg_server, tmp_path, GENERATED_ENV) as run:
        generate(run.inbox, rows=GENERATED_ROWS, seed=GENERATED_SEED)
        run_x(run.settings)
        rows_of = dict(run.rows("SELECT seq, rows_valid FROM chunks WHERE status = 'written'"))
        dropped = sorted(rows_of)[1::3]
        run.rows("DELETE FROM staged_rows WHERE seq = ANY(%s) RETURNING seq", (dropped,))
        assert {s for (s,) in run.rows("SELECT DISTINCT seq FROM staged_rows")} == set(rows_of) - set(dropped)

        to_driver: dict[int, int] = {}

        class ObservedProcessor(StreamProcessor):
            """The product's processor; what each batch (one chunk: Y_MAX_BATCH_CHUNKS=1) returned to the driver."""

            def process_batch(self, batch):
                try:
                    return super().process_batch(batch)
                finally:
                    to_driver[batch[0].seq] = self.rows_to_driver

        run.spark_state = run_y(run.settings, spark, ObservedProcessor)

        assert sorted(to_driver) == sorted(rows_of)
        assert all(to_driver[s] >= rows_of[s] for s in dropped), (to_driver, rows_of)  # the chunk's rows
        assert all(to_driver[s] < rows_of[s] for s in rows_of if s not in dropped), to_driver  # a summary
        assert_detections_match_replay(run)
        assert_state_matches_sources(run)
        assert_state_matches_transactions(run)
        assert run.rows("SELECT count(*), count(DISTINCT (source_file_id, source_line)) FROM transactions") == [
            (sum(rows_of.values()),) * 2
        ]
        assert run.rows("SELECT count(*) FROM staged_rows") == [(0,)]


def test_a_commit_runs_beside_the_next_pass_and_a_refused_one_undoes_the_pass_folded_onto_it(
    pg_server, spark, tmp_path, caplog
):
    """Issue 12: Y commits a batch on its commit thread while the next batch's Spark pass runs, and that pass folds
    onto the versions of the batch still committing. PostgreSQL refuses one commit, once (a trigger on `chunks`
    raises the server's own error): the pass folded onto it is dropped, Y's state goes back to the last commit,
    and both chunks come again. Another chunk's staged rows are not its object's: its commit fails the check, the
    chunk goes again at once through the driver (that commit alone, not beside a pass), and the pass folded onto
    it is dropped too. The detections are still the reference's, each at its chunk, and Spark's state,
    `y_state`, `transactions` and the source rows agree. Each chunk is logged as processed by the commit thread,
    once committed, not after the next pass."""
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.sample_data import generate

    passes: list[int] = []  # the first chunk of each Spark pass's batch, in order
    commits: list[tuple[int, str, bool, bool]] = []  # (first chunk, thread, beside the next pass, committed)
    pass_started = threading.Condition()

    class ObservedProcessor(StreamProcessor):
        """The product's processor. Each commit first waits (up to 2 s) for the pass of a later batch to start
        after its own batch's pass: beside the next pass, that pass starts at once (or has already); a commit
        made before the next pass begins would wait in vain."""

        def _spark_pass(self, batch, *args, **kwargs):
            with pass_started:
                passes.append(batch[0].seq)
                pass_started.notify_all()
            return super()._spark_pass(batch, *args, **kwargs)

        def _commit(self, batch_id, batch, *args):
            with pass_started:
                own = max(i for i, first in enumerate(passes) if first == batch[0].seq)
                beside = pass_started.wait_for(lambda: any(s > batch[-1].seq for s in passes[own + 1 :]), 2.0)
            ok = False
            try:
                super()._commit(batch_id, batch, *args)
                ok = True
            finally:
                commits.append((batch[0].seq, threading.current_thread().name, beside, ok))

    with product_run(pg_server, tmp_path, GENERATED_ENV) as run:
        generate(run.inbox, rows=GENERATED_ROWS, seed=GENERATED_SEED)
        run_x(run.settings)
        seqs = [s for (s,) in run.rows("SELECT seq FROM chunks WHERE status = 'written' ORDER BY seq")]
        refused, after, replaced = seqs[4], seqs[5], seqs[8]
        with run.conn.cursor() as cur:
            cur.execute(
                "UPDATE staged_rows SET amount = amount + 1 WHERE seq = %s "
                "AND source_line = (SELECT min(source_line) FROM staged_rows WHERE seq = %s)",
                (replaced, replaced),
            )
            assert cur.rowcount == 1
            cur.execute("CREATE SEQUENCE refusals")
            cur.execute(
                "CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.seq = {refused} AND nextval('refusals') = 1 THEN "
                "RAISE EXCEPTION 'the test refuses the commit of chunk % once', NEW.seq; END IF; RETURN NEW; END $$"
            )
            cur.execute(
                "CREATE TRIGGER refuse_once BEFORE UPDATE OF processed_at ON chunks FOR EACH ROW "
                "WHEN (NEW.processed_at IS NOT NULL) EXECUTE FUNCTION refuse_once()"
            )

        caplog.set_level(logging.INFO, logger="src.mechanism_y.stream_processor")
        run.spark_state = run_y(run.settings, spark, ObservedProcessor)

        assert [c[0] for c in commits if not c[3]] == [refused, replaced], commits
        assert {c[1].split("_")[0] for c in commits} == {"y-commit"}, commits  # never on the loop's own thread
        # Every commit ran beside the pass of the batch after it, but the driver path's and the last one.
        assert [(c[0], c[3]) for c in commits if not c[2]] == [(replaced, True), (seqs[-1], True)], commits
        # Each failed commit had the next chunk's pass folded onto it: that pass was dropped and the chunk went again.
        assert passes.count(after) == 2 and passes.count(refused) == 2, passes
        assert passes.count(seqs[9]) == 2 and passes.count(replaced) == 2, passes
        assert run.rows("SELECT count(*) FROM staged_rows") == [(0,)]
        assert run.rows("SELECT count(*) FROM chunks WHERE processed_at IS NULL") == [(0,)]
        logged = [r for r in caplog.records if getattr(r, "event", None) == "chunk_processed"]
        assert sorted(r.chunk_id for r in logged) == seqs, logged  # each chunk once: a dropped pass logs nothing
        assert {r.threadName.split("_")[0] for r in logged} == {"y-commit"}
        assert_detections_match_replay(run)
        assert_state_matches_sources(run)
        assert_state_matches_transactions(run)


def test_warm_lone_batches_compile_no_new_code(pg_server, spark, tmp_path):
    """Spark generates Java for each batch's plans and compiles it with Janino unless its cache already holds the
    same code: a per-batch literal that reached the generated code (the batch's file names, the number of cuts, a
    view's name) would compile new classes for every chunk (bench/README.md, "yplan"). Chunk by chunk, as when Y
    keeps up, the first batches compile and every later one finds all its code in the cache."""
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.sample_data import generate

    compilations = spark.sparkContext._jvm.org.apache.spark.metrics.source.CodegenMetrics.METRIC_COMPILATION_TIME()
    compiled: list[int] = []  # classes compiled by each batch, in order

    class ObservedProcessor(StreamProcessor):
        def process_batch(self, batch):
            before = compilations.getCount()
            try:
                return super().process_batch(batch)
            finally:
                compiled.append(compilations.getCount() - before)

    with product_run(pg_server, tmp_path, GENERATED_ENV) as run:
        generate(run.inbox, rows=GENERATED_ROWS, seed=GENERATED_SEED)
        run_x(run.settings)
        run_y(run.settings, spark, ObservedProcessor)
        assert_detections_match_replay(run)

    assert len(compiled) == 12, compiled  # one batch per chunk
    assert compiled[3:] == [0] * 9, compiled


def _wrong_type_payload(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)  # inferred types: amount is a string, step an int64, ...
    table = table.set_column(table.schema.get_field_index("amount"), "amount", pc.cast(table["amount"], pa.string()))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("broken", ["wrong column type", "not parquet"])
def test_unreadable_chunk_is_failed_and_quarantined_while_its_batch_goes_on(small_clean_run, spark, broken):
    """A chunk object Spark cannot read is judged by its own footer: marked failed, quarantined and logged,
    once; the chunks around it in the same batch are processed, and Y does not crash-loop."""
    run = small_clean_run

    def rows(file_id, customer):
        return [
            dict(_row(2, customer=customer, amount="1.00"), source_file_id=file_id),
            dict(_row(3, customer=customer, amount="2.00"), source_file_id=file_id),
        ]

    before = _register_chunk(run, "handmade-before", rows("handmade-before", "C_B"))
    bad_rows = rows("handmade-broken", "C_X")
    payload = _wrong_type_payload(bad_rows) if broken == "wrong column type" else b"PAR1 but not really a parquet file"
    bad = _register_chunk(run, "handmade-broken", bad_rows, payload=payload)
    after = _register_chunk(run, "handmade-after", rows("handmade-after", "C_A"))
    run_y(run.settings, spark)

    status = dict(
        (
            (s, (st, done))
            for s, st, done in run.rows(
                "SELECT seq, status, processed_at IS NOT NULL FROM chunks WHERE seq IN (%s, %s, %s)",
                (before, bad, after),
            )
        )
    )
    assert status == {before: ("written", True), bad: ("failed", False), after: ("written", True)}
    assert run.rows(
        "SELECT DISTINCT source_file_id FROM transactions WHERE source_file_id LIKE 'handmade-%%' ORDER BY 1"
    ) == [("handmade-after",), ("handmade-before",)]
    assert_state_matches_transactions(run)
    quarantined = run.rows("SELECT line_no, stage, reason FROM quarantine WHERE file_id = 'handmade-broken'")
    assert len(quarantined) == 1
    line_no, stage, reason = quarantined[0]
    assert (line_no, stage) == (2, "detect")
    assert "whole chunk (lines 2-3)" in reason
    assert ("amount is string" in reason) if broken == "wrong column type" else ("not a readable Parquet" in reason)
    logged = run.rows(
        "SELECT level, message FROM processing_logs WHERE event = 'chunk_failed' AND chunk_id = %s", (bad,)
    )
    assert len(logged) == 1 and logged[0][0] == "ERROR" and "handmade-broken" in logged[0][1]


# ---------------------------------------------------------------- 5. restart and SIGKILL of Y: same result


def test_restart_resumes_from_saved_state(small_clean_run, spark):
    """A second Y (a restart) loads the state the first one committed and carries on from it."""
    run = small_clean_run
    env = {
        "PATID2_MIN_TXNS": "4",
        "PATID3_MIN_FEMALE_CUSTOMERS": "1",
    }
    from config.config import Settings

    settings = Settings.from_env(dict(run.env, **env), dotenv=Path("/nonexistent"))
    run_y(settings, spark)
    assert run.rows("SELECT count(*) FROM y_state") == [(1,)]
    # More rows arrive while Y is down: C_V1 reaches 8 cheap transactions at M_V; M_V gets men, then its second
    # woman, in chunk 2 of u.csv: PatId3 (1 < F < M) holds from there. The quarantined row (gender X) still takes
    # its place in chunk 1; were chunks cut from valid rows only, C_W would land in chunk 1.
    header = "step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud"
    more = [txn("C_V1", "M_V", "F", "12.00", 9)] * 2 + [
        txn("C_M1", "M_V", "M", "50.00"),
        txn("C_M2", "M_V", "M", "50.00"),
        txn("C_BAD", "M_V", "X", "50.00"),
        txn("C_M3", "M_V", "M", "50.00"),
        txn("C_W", "M_V", "F", "5.00", 9),
        txn("C_X", "M_V", "M", "50.00"),
    ]
    write_csv(run.inbox / "u.csv", header, more, time.time())
    run_x(settings)
    run_y(settings, spark)
    assert run.rows("SELECT count(*) FROM chunks WHERE processed_at IS NULL") == [(0,)]
    assert_state_matches_transactions(run)
    got = assert_detections_match_replay(run, settings)
    assert ("PatId2", "C_V1", "M_V") in got
    assert got[("PatId3", "", "M_V")].chunk == Chunk(4, "u.csv", 2)
    assert run.rows(
        "SELECT count(*) FROM quarantine WHERE file_id = (SELECT file_id FROM source_files WHERE name = 'u.csv')"
    ) == [(1,)]


KILL_ROWS = 3200
KILL_ENV = {
    "BATCH_SIZE": "200",
    # Small batches: many commits to land kills between (and inside), while still folding several chunks at once.
    "Y_MAX_BATCH_CHUNKS": "2",
    "DETECTIONS_PER_FILE": "2",
    "PATID1_MIN_MERCHANT_TXNS": "750",
    "PATID2_MIN_TXNS": "8",
    "PATID3_MIN_FEMALE_CUSTOMERS": "5",
    "DETECTIONS_FLUSH_SECONDS": "0.3",
}


def _processed(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(processed_at) FROM chunks")
        return cur.fetchone()[0]


@pytest.mark.slow
def test_sigkill_y_mid_run_then_restart(make_settings, product_env, pg_conn, tmp_path):
    from src.sample_data import generate

    settings = make_settings(**KILL_ENV)
    generate(settings.local_inbox_dir, rows=KILL_ROWS, seed=11)
    run_x(settings)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM chunks")
        total = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM staged_rows")
        staged = cur.fetchone()[0]
    assert total == KILL_ROWS // 200
    assert staged == KILL_ROWS  # X staged every row with its chunk: Y's commits publish them, across the kills

    env = dict(product_env, **KILL_ENV)
    cmd = [sys.executable, "-m", "src.mechanism_y.stream_processor", "--drain"]
    rng = random.Random(3)
    killed_at = []  # (chunks processed, detections) when each SIGKILL landed
    # Kill points spread over the run, so some land while detections are committed and filed.
    for attempt, target in enumerate((total * 3 // 10, total // 2, total * 7 // 10)):
        log_path = tmp_path / f"y-{attempt}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            goal = max(target, _processed(pg_conn) + 1)
            deadline = time.monotonic() + 150
            while _processed(pg_conn) < goal and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.8))
            assert proc.poll() is None, f"Y exited by itself ({proc.returncode}): {log_path.read_text()[-3000:]}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            with pg_conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pattern_detections")
                killed_at.append((_processed(pg_conn), cur.fetchone()[0]))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert killed_at[-1][0] < total, f"Y finished before the last kill: give it more chunks ({killed_at})"
    assert any(d for _, d in killed_at), f"no kill landed after the first detection: {killed_at}"

    log_path = tmp_path / "y-final.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, log_path.read_text()[-4000:]

    run = Run(settings, env, pg_conn, settings.local_inbox_dir, settings.local_lake_dir)
    assert _processed(pg_conn) == total
    assert_detections_match_replay(run)
    assert_state_matches_transactions(run)
    (txns, distinct_ids), (valid,) = (
        run.rows("SELECT count(*), count(DISTINCT (source_file_id, source_line)) FROM transactions")[0],
        run.rows("SELECT sum(rows_valid) FROM chunks")[0],
    )
    assert txns == distinct_ids == valid == KILL_ROWS
    assert run.rows("SELECT count(*) FROM staged_rows") == [(0,)]
    in_lake = lake_detections(run.lake)
    assert not {k: n for k, n in in_lake.items() if n > 1}, "a detection is in two lake files"
    assert set(in_lake) == set(emitted(run))
    _check_lake(run, per_file=2)


def test_drain_without_importance_file_ends_instead_of_waiting_forever(pg_server, spark, tmp_path):
    """`--drain` promises an exit: chunks that can never be evaluated (no CustomerImportance) end it non-zero."""
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.resources import open_lake
    from src.utils.db import Database

    with product_run(pg_server, tmp_path, {"BATCH_SIZE": "3"}) as run:
        header = "step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud"
        write_csv(run.inbox / "t.csv", header, [txn("C1", "M1", "F", "1.00")] * 3, time.time())
        run_x(run.settings)
        db = Database(run.settings)
        stop = threading.Event()
        result: list[int] = []
        try:
            processor = StreamProcessor(run.settings, db, open_lake(run.settings), spark, stop)
            worker = threading.Thread(target=lambda: result.append(processor.run(drain=True)), daemon=True)
            worker.start()
            worker.join(timeout=20)
            finished = not worker.is_alive()
            stop.set()
            worker.join(timeout=10)
        finally:
            db.close()
        assert finished, "Y in drain mode still waits for a CustomerImportance file the source does not have"
        assert result and result[0] != 0
        assert run.rows("SELECT count(*) FROM chunks WHERE processed_at IS NULL") == [(1,)]


# ---------------------------------------------------------------- 6. CLI


def test_stream_processor_help_exits_zero(product_env):
    out = subprocess.run(
        [sys.executable, "-m", "src.mechanism_y.stream_processor", "--help"],
        cwd=ROOT,
        env=product_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--drain" in out.stdout


def test_batch_is_the_written_prefix_within_the_row_bound():
    """A batch stops before the first chunk whose object is not written yet (strict order) and before it would
    exceed MAX_BATCH_ROWS, but always holds at least one written chunk."""
    from src.ledger import ChunkRef
    from src.mechanism_y.stream_processor import MAX_BATCH_ROWS, StreamProcessor

    def ledger(*rows):
        return [ChunkRef(i + 1, "f", i, f"k{i}", 1, 2, None, n, status, 0) for i, (status, n) in enumerate(rows)]

    def seqs(rows):
        return [c.seq for c in StreamProcessor._ready_prefix(rows)]

    assert seqs(ledger(("written", 10), ("written", 10), ("pending", 10), ("written", 10))) == [1, 2]
    assert seqs(ledger(("pending", 10), ("written", 10))) == []
    assert seqs(ledger(("written", MAX_BATCH_ROWS + 5), ("written", 1))) == [1]
    half = MAX_BATCH_ROWS // 2
    assert seqs(ledger(("written", half), ("written", half), ("written", 1))) == [1, 2]
    assert seqs([]) == []


def test_state_delta_folds_a_batch_per_pair_exactly():
    """What Y's commit adds to y_state is the batch's clean rows per (merchant, customer): counts, exact decimal
    sums past 18 digits, and whether the pair was ever paid as F or as M (E and U count for neither)."""
    from src.mechanism_y.stream_processor import _state_delta

    big = Decimal("9999999999999999.99")
    clean = pa.table(
        {
            "merchant": ["M1", "M1", "M2", "M1"],
            "customer": ["C1", "C1", "C1", "C2"],
            "gender": ["F", "M", "E", "U"],
            "amount": pa.array([big, big, Decimal("0.10"), Decimal("0.20")], pa.decimal128(18, 2)),
        }
    )
    got = {(r["merchant"], r["customer"]): r for r in _state_delta(clean).to_pylist()}
    assert got == {
        ("M1", "C1"): {"merchant": "M1", "customer": "C1", "n": 2, "amount_sum": 2 * big, "has_f": True, "has_m": True},
        ("M2", "C1"): {
            "merchant": "M2",
            "customer": "C1",
            "n": 1,
            "amount_sum": Decimal("0.10"),
            "has_f": False,
            "has_m": False,
        },
        ("M1", "C2"): {
            "merchant": "M1",
            "customer": "C2",
            "n": 1,
            "amount_sum": Decimal("0.20"),
            "has_f": False,
            "has_m": False,
        },
    }


def test_a_chunk_postgresql_refuses_is_failed_after_max_attempts_and_later_chunks_go_on(small_clean_run, spark):
    """Rows PostgreSQL refuses (here: a chunk repeating row ids an earlier chunk stored, a primary-key
    violation) fail the commit every time: the failure is pinned on that chunk, counted, and after
    MAX_ATTEMPTS the chunk is failed and quarantined while the chunks after it are processed."""
    from config.config import Settings
    from src.schemas.transaction_schemas import CHUNK_ARROW_SCHEMA

    run = small_clean_run
    settings = Settings.from_env({**run.env, "MAX_ATTEMPTS": "2"}, dotenv=Path("/nonexistent"))
    file_id = "handmade-dup"
    with run.conn.cursor() as cur:
        cur.execute(
            "INSERT INTO source_files (file_id, source, name, kind, status) VALUES (%s, 'local', 'd.csv', "
            "'transactions', 'done')",
            (file_id,),
        )
    seqs = []
    for chunk_seq, lines in enumerate(([2, 3], [2, 3], [4, 5])):  # the second repeats the first's rows
        rows = [dict(_row(ln, file_id=file_id), chunk_seq=chunk_seq) for ln in lines]
        key = f"raw-transactions/year=2026/month=01/day=02/{file_id}-{chunk_seq:06d}.parquet"
        (run.lake / key).parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([f.with_nullable(True) for f in CHUNK_ARROW_SCHEMA])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), run.lake / key)
        with run.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO chunks (file_id, chunk_seq, first_line, last_line, rows_total, rows_valid, "
                "rows_quarantined, bytes_start, bytes_end, prefix_md5, object_key, ingest_date, status, written_at) "
                "VALUES (%s, %s, %s, %s, 2, 2, 0, 0, 1, 'x', %s, '2026-01-02', 'written', now()) RETURNING seq",
                (file_id, chunk_seq, lines[0], lines[-1], key),
            )
            seqs.append(cur.fetchone()[0])

    run_y(settings, spark)

    state = dict(run.rows("SELECT seq, status FROM chunks WHERE file_id = %s", (file_id,)))
    processed = {s for (s,) in run.rows("SELECT seq FROM chunks WHERE processed_at IS NOT NULL")}
    assert state == {seqs[0]: "written", seqs[1]: "failed", seqs[2]: "written"}
    assert seqs[0] in processed and seqs[2] in processed and seqs[1] not in processed
    attempts, error = run.rows("SELECT attempts, last_error FROM chunks WHERE seq = %s", (seqs[1],))[0]
    assert attempts == 2 and "UniqueViolation" in error, error
    stored = sorted(
        ln for (ln,) in run.rows("SELECT source_line FROM transactions WHERE source_file_id = %s", (file_id,))
    )
    assert stored == [2, 3, 4, 5]
    quarantined = run.rows("SELECT reason FROM quarantine WHERE file_id = %s AND chunk_seq = 1", (file_id,))
    assert len(quarantined) == 1 and "rejected after 2 attempts" in quarantined[0][0]


TX_HEADER = "step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud"
CI_HEADER = "Source,Target,Weight,typeTrans,fraud"


def test_y_picks_up_new_weights_mid_run(pg_server, spark, tmp_path, caplog):
    """CustomerImportance replaced while Y runs: the chunks after the reload are judged with the new weights.

    M1 crosses T > 10 only in the second file, so PatId1 is first judged after the reload. With the old
    weights C1 (the top count) has the lowest weight and would be an UPGRADE; with the new ones the highest,
    and is not. The reference, fed each weight file, says so too (so the test can tell them apart).
    Y starts with weights and no chunk, at a pace: it warms Spark up while idle, which changes nothing found."""
    env = {"BATCH_SIZE": "4", "PATID1_MIN_MERCHANT_TXNS": "10", "PATID2_MIN_TXNS": "1000"}
    env["PATID3_MIN_FEMALE_CUSTOMERS"] = "1000"
    env["CHUNK_INTERVAL_SECONDS"] = "0.01"  # a pace: the idle warm-up runs only then
    with product_run(pg_server, tmp_path, env) as run:
        from src.mechanism_y.stream_processor import StreamProcessor
        from src.resources import open_lake
        from src.utils.db import Database

        others = ["C2", "C3", "C4", "C5"]
        old = ["'C1','M1',0.10,'es_food',0", *(f"'{c}','M1',1.00,'es_food',0" for c in others)]
        new = ["'C1','M1',5.00,'es_food',0", *(f"'{c}','M1',1.00,'es_food',0" for c in others)]
        now = time.time()
        write_csv(run.inbox / "CustomerImportance.csv", CI_HEADER, old, now - 100)
        first = [txn("C1", "M1", "M", "30.00")] * 4 + [txn(c, "M1", "F", "30.00") for c in others]
        run_x(run.settings)  # the weights only

        db = Database(run.settings)
        stop = threading.Event()
        processor = StreamProcessor(run.settings, db, open_lake(run.settings), spark, stop)
        worker = threading.Thread(target=processor.run, kwargs={"drain": False}, daemon=True)
        caplog.set_level(logging.INFO, logger="src.mechanism_y.stream_processor")
        worker.start()
        try:
            deadline = time.monotonic() + 300
            while not any(getattr(r, "event", None) == "y_warmed_up" for r in caplog.records):
                assert worker.is_alive() and time.monotonic() < deadline, "Y did not warm up while idle"
                time.sleep(0.2)
            write_csv(run.inbox / "t1.csv", TX_HEADER, first, now - 90)
            run_x(run.settings)
            while run.rows("SELECT count(*) FROM chunks WHERE processed_at IS NULL")[0][0]:
                assert worker.is_alive() and time.monotonic() < deadline, "Y did not process the first file"
                time.sleep(0.2)
            assert processor.weights_version == 1

            write_csv(run.inbox / "CustomerImportance.csv", CI_HEADER, new, now - 10)
            write_csv(run.inbox / "t2.csv", TX_HEADER, [txn("C1", "M1", "M", "30.00")] * 3, now - 5)
            run_x(run.settings)  # reloads the weights (version 2), then writes t2's chunk
            while run.rows("SELECT count(*) FROM chunks WHERE processed_at IS NULL")[0][0]:
                assert worker.is_alive() and time.monotonic() < deadline, "Y did not process the second file"
                time.sleep(0.2)
            assert processor.weights_version == 2
        finally:
            stop.set()
            worker.join(120)
            db.close()
        assert not worker.is_alive()

        found = {k for k in emitted(run) if k[0] == "PatId1"}
        files, _ = inbox_files(run.inbox)
        chunks, txns = read_transactions(files, run.settings.batch_size)

        def patid1_with(weights: list[str]) -> set:
            path = tmp_path / "weights.csv"
            path.write_text("\n".join([CI_HEADER, *weights]) + "\n")
            got = expected_detections(run.conn, chunks, txns, read_importance(path), limits_of(run.settings))
            return {k for k in got if k[0] == "PatId1"}

        assert patid1_with(old) == {("PatId1", "C1", "M1")}, "the data no longer tells old weights from new"
        assert found == patid1_with(new) == set()


def test_weights_that_x_loads_while_the_jvm_starts_are_read_before_the_session_is_up(pg_server, tmp_path):
    """`prefetch_weights`, which `run_worker` calls between `prepare` and waiting for the session: X loads the
    importance file while Y's JVM is still starting (`prepare` found none), and Y reads its weights then, so that
    once the session is up they only have to be handed to Spark. It stops looking, with nothing read, when the
    session is up first or Y is stopped."""
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.resources import open_lake
    from src.utils.db import Database

    with product_run(pg_server, tmp_path, {}) as run:
        db = Database(run.settings)
        try:
            db.apply_schema()
            processor = StreamProcessor(run.settings, db, open_lake(run.settings), None, threading.Event())
            processor.prepare()
            assert processor._prefetched_weights is None  # no importance file loaded yet
            processor.prefetch_weights(lambda: True)  # the session came up first
            assert processor._prefetched_weights is None
            stopped = StreamProcessor(run.settings, db, open_lake(run.settings), None, threading.Event())
            stopped.stop.set()
            stopped.prefetch_weights(lambda: False)  # returns: Y is stopping
            assert stopped._prefetched_weights is None

            weights = ["'C1','M1',0.30,'es_food',0", "'C1','M1',0.60,'es_health',0", "'C2','M1',0.90,'es_food',0"]
            (run.inbox / "weights.csv").write_text("\n".join([CI_HEADER, *weights]) + "\n")
            session_up = threading.Event()
            x = threading.Thread(target=lambda: (time.sleep(0.5), run_x(run.settings)))
            guard = threading.Timer(300, session_up.set)  # ends a wait that would never end (a failure below)
            x.start()
            guard.start()
            try:
                processor.prefetch_weights(session_up.is_set)
            finally:
                guard.cancel()
                x.join()
            assert not session_up.is_set()
            assert processor._prefetched_weights is not None, "the weights X loaded were not read"
            version, table = processor._prefetched_weights
            got = {
                (c, m): (w, n)
                for c, m, w, n in zip(
                    *(table.column(k).to_pylist() for k in ("customer", "merchant", "weight_sum", "weight_count"))
                )
            }
            assert (version, got) == (1, {("C1", "M1"): (Decimal("0.90"), 2), ("C2", "M1"): (Decimal("0.90"), 1)})
        finally:
            db.close()


def test_weights_are_read_per_pair_in_one_hash_aggregate(pg_server, tmp_path):
    """Y reads the weights as one row per (customer, merchant): the sum and count of the importance rows of the pair,
    whatever their typeTrans (checked against the rows the test wrote). Its transaction alone has the work_mem for a
    hash table of the pairs: PostgreSQL then reads the table once instead of walking the pair index row by row
    (3,000,000 rows: 2.98 s -> 1.15 s), and the connection's later transactions are back to the server's setting."""
    import io

    from src.mechanism_y.stream_processor import WEIGHTS_SQL, WEIGHTS_WORK_MEM, StreamProcessor
    from src.resources import open_lake
    from src.utils.db import Database

    rng = random.Random(12)
    pairs = [(f"C{i}", f"M{i % 37}") for i in range(40_000)]
    rows = [(c, m, Decimal(rng.randint(0, 99_999)) / 100, t) for c, m in pairs for t in ("es_food", "es_health", "x")]
    rows += [(c, m, Decimal("0.01"), "es_food") for c, m in pairs[:5]]  # a pair repeated within one typeTrans
    expected: dict[tuple[str, str], tuple[Decimal, int]] = {}
    for c, m, w, _ in rows:
        total, n = expected.get((c, m), (Decimal(0), 0))
        expected[(c, m)] = (total + w, n + 1)

    with product_run(pg_server, tmp_path, {}) as run:
        db = Database(run.settings)
        try:
            db.apply_schema()
            payload = "".join(f"{c},{m},{w},{t},0\n" for c, m, w, t in rows).encode()
            db.run(
                lambda cur: cur.copy_expert(
                    "COPY customer_importance (source, target, weight, type_trans, fraud) FROM STDIN WITH (FORMAT csv)",
                    io.BytesIO(payload),
                )
            )
            server_default = db.query("SHOW work_mem")[0][0]
            processor = StreamProcessor(run.settings, db, open_lake(run.settings), None, threading.Event())

            table = processor._copy_weights()
            got = {
                (c, m): (Decimal(w), n)
                for c, m, w, n in zip(
                    *(table.column(k).to_pylist() for k in ("customer", "merchant", "weight_sum", "weight_count"))
                )
            }
            assert got == expected
            assert db.query("SHOW work_mem")[0][0] == server_default  # SET LOCAL: gone with the transaction

            setting = processor._copy_out(
                "SELECT current_setting('work_mem') AS work_mem",
                pa.schema([("work_mem", pa.string())]),
                what="read the setting",
                work_mem="64MB",
            )
            assert setting.column("work_mem").to_pylist() == ["64MB"]

            def plan(cur) -> list[str]:
                cur.execute("SELECT set_config('work_mem', %s, true)", (WEIGHTS_WORK_MEM,))
                cur.execute(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {WEIGHTS_SQL}")
                return [r[0] for r in cur.fetchall()]

            lines = db.run(plan)
            aggregates = [ln for ln in lines if "Aggregate" in ln]
            assert aggregates and all("HashAggregate" in ln for ln in aggregates), lines
            assert not any("Index" in ln for ln in lines), lines  # one read of the table
            assert all(ln.split("Batches: ")[1].startswith("1 ") for ln in lines if "Batches: " in ln), lines
        finally:
            db.close()


def test_an_idle_y_builds_the_class_archive_and_pauses_the_build_while_a_chunk_waits(
    pg_server, spark, tmp_path, monkeypatch
):
    """SPARK_CLASS_ARCHIVE=auto: once Y has been idle for a while (shortened here), it starts the background build
    of the driver's class archive (tests/test_spark_start.py follows one to its end); a chunk arriving stops the
    build's process group (SIGSTOP) for as long as Y works, and Y resumes it once idle again. The chunk's
    results do not depend on any of it."""
    from src.mechanism_y import stream_processor
    from src.mechanism_y.stream_processor import StreamProcessor
    from src.resources import open_lake
    from src.utils.db import Database
    from tests.test_spark_start import _group_states, _jvm_states

    monkeypatch.setattr(stream_processor, "IDLE_BEFORE_BUILD_S", 0.5)
    with product_run(pg_server, tmp_path, {"SPARK_CLASS_ARCHIVE": "auto", "PATID2_MIN_TXNS": "3"}) as run:
        now = time.time()
        write_csv(run.inbox / "CustomerImportance.csv", CI_HEADER, ["'C1','M1',1.00,'es_food',0"], now - 100)
        run_x(run.settings)  # the weights only
        db = Database(run.settings)
        stop = threading.Event()
        processor = StreamProcessor(run.settings, db, open_lake(run.settings), spark, stop)
        worker = threading.Thread(target=processor.run, kwargs={"drain": False}, daemon=True)
        worker.start()
        build = processor.archive_build
        try:
            deadline = time.monotonic() + 300
            while build.proc is None or len(_group_states(build.proc.pid)) < 2:  # the build's JVM has started
                assert worker.is_alive() and time.monotonic() < deadline, "Y did not start the build while idle"
                time.sleep(0.2)
            pgid = build.proc.pid
            assert set(_group_states(pgid)) <= {"R", "S", "D"}
            write_csv(run.inbox / "t1.csv", TX_HEADER, [txn("C1", "M1", "M", "10.00")] * 3, now - 5)
            run_x(run.settings)
            seen_paused = False
            while run.rows("SELECT count(*) FROM chunks WHERE processed_at IS NULL")[0][0]:
                assert worker.is_alive() and time.monotonic() < deadline, "Y did not process the chunk"
                seen_paused = seen_paused or _jvm_states(pgid) == {"T"}
                time.sleep(0.05)
            assert seen_paused, "the build ran on while Y had a chunk to process"
            while build.paused:  # idle again: resumed
                assert build.proc is None or time.monotonic() < deadline, "Y did not resume the build"
                time.sleep(0.2)
            assert "T" not in _jvm_states(pgid)
        finally:
            stop.set()
            worker.join(120)
            build.stop()
            db.close()
        assert not worker.is_alive() and not _group_states(pgid)
        assert emitted(run) == {("PatId2", "C1", "M1"): 1}
