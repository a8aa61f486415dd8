"""DetectionWriter: PostgreSQL detections -> lake files of at most DETECTIONS_PER_FILE rows, each exactly once.

No Spark here: detections are inserted into `pattern_detections` as Mechanism Y would, and the files the
writer leaves in a local lake are read back with pyarrow.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg2.errors
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from psycopg2 import sql

from src.mechanism_y.detection_writer import DetectionWriter
from src.utils.db import Database
from src.utils.object_store import LocalObjectStore

FLUSH_SECONDS = 4.0  # long enough that a loaded machine still ticks twice inside it
COLUMNS = ["YStartTime", "detectionTime", "patternId", "ActionType", "customerName", "MerchantId"]
ACTIONS = {"PatId1": "UPGRADE", "PatId2": "CHILD", "PatId3": "DEI-NEEDED"}
Y_START = datetime(2026, 1, 31, 10, 0, tzinfo=timezone.utc)


@pytest.fixture
def env(make_settings):
    settings = make_settings(DETECTIONS_PER_FILE="3", DETECTIONS_FLUSH_SECONDS=str(FLUSH_SECONDS))
    db = Database(settings)
    db.apply_schema()
    store = LocalObjectStore(settings.local_lake_dir)
    yield settings, db, store
    db.close()


def insert(db: Database, pattern: str, names: list[str], when: datetime, merchant: str = "M1") -> None:
    with db.transaction() as cur:
        for name in names:
            cur.execute(
                "INSERT INTO pattern_detections (pattern_id, action_type, customer_name, merchant_id, y_start_time, "
                "detection_time, chunk_id) VALUES (%s, %s, %s, %s, %s, %s, 1)",
                (pattern, ACTIONS[pattern], name, merchant, Y_START, when),
            )


def files(lake: Path, pattern: str) -> dict[str, list[dict]]:
    folder = lake / "pattern-detections" / pattern.lower()
    return {
        p.relative_to(folder).as_posix(): pq.read_table(p).to_pylist()
        for p in sorted(folder.rglob("*.parquet"))
        if not any(part.startswith("_") for part in p.relative_to(folder).parts)
    }


def test_full_files_at_once_partial_after_idle_or_shutdown(env):
    settings, db, store = env
    lake = settings.local_lake_dir
    writer = DetectionWriter(settings, db, store)
    now = datetime.now(timezone.utc)
    insert(db, "PatId2", [f"C{i}" for i in range(7)], now)
    noted = time.monotonic()
    writer.note_new(7)
    writer.tick()
    written = files(lake, "PatId2")
    assert sorted(len(rows) for rows in written.values()) == [3, 3], "full files are written at once"
    writer.tick()
    assert time.monotonic() - noted < FLUSH_SECONDS, "the machine is too slow for this test's flush window"
    assert len(files(lake, "PatId2")) == 2, "a partial file waits while detections may still come"
    # Idle: the partial file is flushed once the window has passed, not before.
    deadline = noted + FLUSH_SECONDS + 60
    while len(files(lake, "PatId2")) == 2:
        assert time.monotonic() < deadline, "the partial file was never flushed"
        time.sleep(0.1)
        writer.tick()
    assert time.monotonic() - noted >= FLUSH_SECONDS, "flushed before the idle window ended"
    written = files(lake, "PatId2")
    assert sorted(len(rows) for rows in written.values()) == [1, 3, 3]

    insert(db, "PatId3", [""], now, merchant="M9")
    writer.note_new(1)
    writer.tick()
    assert files(lake, "PatId3") == {}
    writer.tick(final=True)
    (rows,) = files(lake, "PatId3").values()
    assert [(r["customerName"], r["MerchantId"], r["ActionType"]) for r in rows] == [("", "M9", "DEI-NEEDED")]

    seen = Counter((r["customerName"]) for rows in files(lake, "PatId2").values() for r in rows)
    assert seen == Counter(f"C{i}" for i in range(7))
    assert db.query("SELECT count(*) FROM pattern_detections WHERE lake_file IS NULL") == [(0,)]
    stats = json.loads((lake / "pattern-detections/patid2/_summary/monthly_stats.json").read_text())
    assert stats["total_detections"] == 7
    ist_month = now.astimezone(ZoneInfo("Asia/Kolkata")).strftime("%Y-%m")
    assert [(m["month"], m["detections"]) for m in stats["months"]] == [(ist_month, 7)]


def test_columns_ist_times_and_month_partitions(env):
    settings, db, store = env
    lake = settings.local_lake_dir
    # 18:00 UTC on 31 January is 23:30 IST (January); 19:00 UTC is 00:30 IST on 1 February.
    insert(db, "PatId1", ["C_JAN"], datetime(2026, 1, 31, 18, 0, tzinfo=timezone.utc))
    insert(db, "PatId1", ["C_FEB"], datetime(2026, 1, 31, 19, 0, tzinfo=timezone.utc))
    DetectionWriter(settings, db, store).tick(final=True)
    written = files(lake, "PatId1")
    by_customer = {r["customerName"]: (path, r) for path, rows in written.items() for r in rows}
    jan_path, jan = by_customer["C_JAN"]
    feb_path, feb = by_customer["C_FEB"]
    assert jan_path.startswith("year=2026/month=01/")
    assert feb_path.startswith("year=2026/month=02/")
    assert jan["detectionTime"] == "2026-01-31T23:30:00.000+05:30"
    assert feb["detectionTime"] == "2026-02-01T00:30:00.000+05:30"
    assert jan["YStartTime"] == "2026-01-31T15:30:00.000+05:30"
    for path in written:
        table = pq.read_table(lake / "pattern-detections/patid1" / path)
        assert table.column_names == COLUMNS
    dataset = ds.dataset(lake / "pattern-detections/patid1", partitioning="hive").to_table()
    assert sorted(zip(dataset["customerName"].to_pylist(), dataset["month"].to_pylist())) == [
        ("C_FEB", 2),
        ("C_JAN", 1),
    ]
    stats = json.loads((lake / "pattern-detections/patid1/_summary/monthly_stats.json").read_text())
    assert [(m["month"], m["detections"]) for m in stats["months"]] == [("2026-01", 1), ("2026-02", 1)]


def test_restart_after_assignment_or_after_write_rewrites_the_same_object(env):
    """A crash between assigning a file and writing it, or between writing it and marking it, loses nothing."""
    settings, db, store = env
    lake = settings.local_lake_dir
    now = datetime.now(timezone.utc) - timedelta(seconds=1)
    insert(db, "PatId2", ["A", "B", "C", "D", "E", "F"], now)
    first = DetectionWriter(settings, db, store)
    first._assign("PatId2", partial=False)  # assigned in PostgreSQL, then the process dies before writing
    assert files(lake, "PatId2") == {}
    DetectionWriter(settings, db, store).tick()
    written = files(lake, "PatId2")
    assert sorted(len(r) for r in written.values()) == [3, 3]
    # The object is in the lake but the process died before marking it written: the restart rewrites it.
    db.execute("UPDATE detection_files SET written = false")
    before = {p: (lake / "pattern-detections/patid2" / p).read_bytes() for p in written}
    DetectionWriter(settings, db, store).tick(final=True)
    after = {p: (lake / "pattern-detections/patid2" / p).read_bytes() for p in files(lake, "PatId2")}
    assert after == before
    assert db.query("SELECT count(*) FROM detection_files WHERE NOT written") == [(0,)]
    names = Counter(r["customerName"] for rows in files(lake, "PatId2").values() for r in rows)
    assert names == Counter("ABCDEF")


def test_pattern_detections_unique_key_refuses_a_second_row(env):
    """SPEC §3: one row per (pattern, customer, merchant), whoever tries to insert it again."""
    _, db, _ = env
    insert(db, "PatId1", ["C1"], Y_START)
    insert(db, "PatId1", ["C1"], Y_START, merchant="M2")  # another merchant: another detection
    with pytest.raises(psycopg2.errors.UniqueViolation, match="pattern_detections_key"):
        insert(db, "PatId1", ["C1"], Y_START + timedelta(hours=1))
    assert db.query("SELECT count(*) FROM pattern_detections") == [(2,)]


@pytest.mark.parametrize(
    "column, index", [("merchant", "transactions_merchant_idx"), ("customer", "transactions_customer_idx")]
)
def test_transactions_lookups_use_their_index(env, column, index):
    """SPEC §3: `transactions` is indexed by merchant and by customer, and a lookup can use the index."""
    _, db, _ = env
    with db.transaction() as cur:
        cur.execute("SET LOCAL enable_seqscan = off")
        query = sql.SQL("EXPLAIN SELECT * FROM transactions WHERE {} = %s").format(sql.Identifier(column))
        cur.execute(query, ("X1",))
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert index in plan, plan
