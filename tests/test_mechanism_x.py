"""Mechanism X against a real PostgreSQL and real files: validation, chunking, failures, resume, append, rewrite.

Expected results are computed here from the CSV text with plain Python (line numbers, unquoted values,
chunk groups); what X produced is read back from the lake with pyarrow and from the ledger with SQL.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from src.mechanism_x.data_ingestion import run_worker
from src.sample_data import generate

ROOT = Path(__file__).resolve().parent.parent
HEADER = "step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud"
IMPORTANCE_HEADER = "Source,Target,Weight,typeTrans,fraud"
COLUMNS = HEADER.split(",")
KEY_RE = re.compile(
    r"^raw-transactions/year=(\d{4})/month=(\d{2})/day=(\d{2})/(?P<file>[A-Za-z0-9_-]+)-(?P<seq>\d+)\.parquet$"
)


# ----------------------------------------------------------------------------- helpers


def row(
    step: object = 0,
    customer: str = "C100",
    age: str = "3",
    gender: str = "M",
    merchant: str = "M200",
    category: str = "es_food",
    amount: str = "12.50",
    fraud: str = "0",
) -> str:
    return f"{step},'{customer}','{age}','{gender}','28007','{merchant}','28007','{category}',{amount},{fraud}"


def rows(n: int, start_step: int = 0) -> list[str]:
    return [
        row(step=start_step + i, customer=f"C{1000 + start_step + i}", amount=f"{i}.{i % 100:02d}") for i in range(n)
    ]


def expected_rows(data: bytes) -> dict[int, dict]:
    """Independent reading of a transactions CSV: non-blank data lines by 1-based line number, quotes stripped."""
    text = data.decode("utf-8-sig")
    out = {}
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line_no == 1 or not line.strip():
            continue
        values = dict(zip(COLUMNS, (v.strip().strip("'") for v in line.split(",")), strict=False))
        try:
            values.update(step=int(values["step"]), amount=Decimal(values["amount"]), fraud=int(values["fraud"]))
        except (KeyError, ValueError, ArithmeticError):
            pass  # a bad row: kept as text
        out[line_no] = values
    return out


def produced(r: dict) -> dict:
    """A chunk object's row in the oracle's terms (the CSV columns, amount compared as a decimal)."""
    return {k: Decimal(str(r[k])) if k == "amount" else r[k] for k in COLUMNS}


def ingest(settings) -> None:
    assert run_worker(settings, drain=True) == 0


def query(conn, sql: str, params: tuple = ()) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def file_record(conn, name: str) -> dict:
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM source_files WHERE name = %s", (name,))
        found = cur.fetchall()
        assert len(found) == 1, f"{name} is not in the ledger exactly once: {found}"
        return dict(zip([d.name for d in cur.description], found[0], strict=True))


def chunk_records(conn, file_id: str | None = None) -> list[dict]:
    sql = "SELECT * FROM chunks" + (" WHERE file_id = %s" if file_id else "") + " ORDER BY file_id, chunk_seq"
    with conn.cursor() as cur:
        cur.execute(sql, (file_id,) if file_id else ())
        names = [d.name for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def lake_keys(lake: Path, prefix: str = "raw-transactions/") -> list[str]:
    base = lake / prefix
    if not base.exists():
        return []
    return sorted(p.relative_to(lake).as_posix() for p in base.rglob("*.parquet"))


def read_object(lake: Path, key: str) -> pa.Table:
    return pq.read_table(lake / key)


def source_lines(lake: Path, key: str) -> list[int]:
    return read_object(lake, key).column("source_line").to_pylist()


def events(conn, event: str, file_id: str | None = None) -> list[tuple]:
    sql = "SELECT level, file_id, chunk_id, row_count, message FROM processing_logs WHERE event = %s"
    params: tuple = (event,)
    if file_id:
        sql += " AND file_id = %s"
        params += (file_id,)
    return query(conn, sql + " ORDER BY id", params)


@pytest.fixture
def inbox(base_env) -> Path:
    return Path(base_env["LOCAL_INBOX_DIR"])


@pytest.fixture
def lake(base_env) -> Path:
    return Path(base_env["LOCAL_LAKE_DIR"])


def write_csv(path: Path, lines: list[str], *, header: str = HEADER, newline: str = "\n", final: bool = True) -> bytes:
    data = (newline.join([header, *lines]) + (newline if final else "")).encode()
    path.write_bytes(data)
    return data


def assert_chunks_match(conn, lake: Path, name: str, data: bytes, batch: int) -> list[dict]:
    """The file's chunks are the expected consecutive groups of `batch` non-blank lines, in ledger and lake."""
    expected = expected_rows(data)
    lines = sorted(expected)
    groups = [lines[i : i + batch] for i in range(0, len(lines), batch)]
    rec = file_record(conn, name)
    chunks = chunk_records(conn, rec["file_id"])
    assert [c["chunk_seq"] for c in chunks] == list(range(len(groups)))
    assert [(c["first_line"], c["last_line"], c["rows_total"]) for c in chunks] == [
        (g[0], g[-1], len(g)) for g in groups
    ]
    assert all(c["status"] == "written" for c in chunks)
    assert rec["status"] == "done" and rec["chunks"] == len(groups) and rec["rows_ingested"] == len(lines)
    for c, g in zip(chunks, groups, strict=True):
        m = KEY_RE.match(c["object_key"])
        assert m, c["object_key"]
        d = c["ingest_date"]
        assert m.group(1, 2, 3) == (f"{d.year:04d}", f"{d.month:02d}", f"{d.day:02d}")
        assert m["file"] == rec["file_id"] and int(m["seq"]) == c["chunk_seq"]
        table = read_object(lake, c["object_key"])
        assert table.num_rows == c["rows_valid"] == len(g)
        got = table.to_pylist()
        assert [r["source_line"] for r in got] == g
        for r in got:
            want = expected[r["source_line"]]
            assert produced(r) == want
            assert r["source_file_id"] == rec["file_id"] and r["chunk_seq"] == c["chunk_seq"]
    assert sorted(c["object_key"] for c in chunks) == [
        k for k in lake_keys(lake) if KEY_RE.match(k)["file"] == rec["file_id"]
    ]
    return chunks


# ----------------------------------------------------------------------------- 1. bad rows


BAD_ROWS = [
    # (line text, words the reason must contain)
    ("1,'C2','3','F','28007','M1','28007','es_food',10.00", ["expected 10 fields", "found 9"]),
    ("1,'C2','3','F','28007','M1','28007','es_food',10.00,0,extra", ["expected 10 fields", "found 11"]),
    (row(step="x1"), ["step", "'x1'"]),
    (row(step="-3"), ["step", "'-3'", "non-negative"]),
    (row(step="2.5"), ["step", "'2.5'"]),
    (row(amount="12,5x"), ["expected 10 fields", "found 11"]),
    (row(amount="1o.50"), ["amount", "'1o.50'", "not a number"]),
    (row(amount=""), ["amount", "not a number"]),
    (row(amount="-5.00"), ["negative amount", "-5.00"]),
    (row(amount="1.234"), ["amount", "'1.234'", "decimal places"]),
    (row(gender="X"), ["gender", "'X'"]),
    (row(gender="m"), ["gender", "'m'"]),
    (row(customer=""), ["empty customer id"]),
    (row(merchant=""), ["empty merchant id"]),
    (row(fraud="2"), ["fraud", "'2'"]),
    (row(fraud="yes"), ["fraud", "'yes'"]),
]


def test_bad_rows_are_quarantined_with_line_and_reason_and_the_rest_is_ingested(make_settings, inbox, lake, pg_conn):
    good = [
        row(step=7, customer="C1093826151", gender="F", merchant="M348934600", amount="4.55", fraud="0"),
        row(step=0, customer="C1", gender="E", amount="0", fraud="1"),
        row(step=179, customer="C2", gender="U", amount="123456.7"),
        " 3 , 'C3' ,'2','M','28007','M9','28007','es_health', 9.99 ,1",
    ]
    lines = [good[0], *(b for b, _ in BAD_ROWS[:8]), good[1], *(b for b, _ in BAD_ROWS[8:]), good[2], good[3]]
    data = write_csv(inbox / "tx.csv", lines)
    ingest(make_settings(BATCH_SIZE="4"))

    rec = file_record(pg_conn, "tx.csv")
    fid = rec["file_id"]
    bad_line_no = {lines.index(text) + 2: words for text, words in BAD_ROWS}
    good_line_no = [lines.index(g) + 2 for g in good]
    assert rec["status"] == "done"
    assert (rec["rows_ingested"], rec["rows_quarantined"]) == (len(good), len(BAD_ROWS))

    # PostgreSQL quarantine: one row per bad line with the raw text and a reason naming the problem
    q = query(pg_conn, "SELECT file_id, line_no, reason, raw_line, stage FROM quarantine ORDER BY line_no")
    assert [r[1] for r in q] == sorted(bad_line_no)
    for file_id, line_no, reason, raw, stage in q:
        assert file_id == fid and stage == "ingest"
        assert raw == lines[line_no - 2]
        for word in bad_line_no[line_no]:
            assert word in reason, (line_no, reason, word)

    # lake quarantine/ holds the same rows as Parquet
    qkeys = lake_keys(lake, "quarantine/")
    assert qkeys and all(fid in k for k in qkeys)
    lake_q = pa.concat_tables([read_object(lake, k) for k in qkeys]).to_pylist()
    assert sorted((r["source_line"], r["reason"], r["raw_line"]) for r in lake_q) == [(r[1], r[2], r[3]) for r in q]
    assert {r["source_file_id"] for r in lake_q} == {fid}

    # processing_logs counts them (one event per chunk holding bad rows)
    ev = events(pg_conn, "rows_quarantined", fid)
    assert ev and sum(e[3] for e in ev) == len(BAD_ROWS)
    assert all(e[0] == "WARNING" and "tx.csv" in e[4] and "line" in e[4] for e in ev)

    # good rows: unquoted, typed, traced to their line
    chunks = chunk_records(pg_conn, fid)
    assert sum(c["rows_total"] for c in chunks) == len(lines)
    assert sum(c["rows_quarantined"] for c in chunks) == len(BAD_ROWS)
    table = pa.concat_tables([read_object(lake, c["object_key"]) for c in chunks])
    schema = table.schema
    assert pa.types.is_integer(schema.field("step").type)
    assert pa.types.is_integer(schema.field("fraud").type)
    assert pa.types.is_decimal(schema.field("amount").type) or pa.types.is_floating(schema.field("amount").type)
    assert pa.types.is_integer(schema.field("source_line").type)
    got = table.to_pylist()
    assert [r["source_line"] for r in got] == good_line_no
    first = {k: got[0][k] for k in (*COLUMNS, "source_file_id", "chunk_seq", "source_line")}
    assert first == {
        "step": 7,
        "customer": "C1093826151",
        "age": "3",
        "gender": "F",
        "zipcodeOri": "28007",
        "merchant": "M348934600",
        "zipMerchant": "28007",
        "category": "es_food",
        "amount": Decimal("4.55"),
        "fraud": 0,
        "source_file_id": fid,
        "chunk_seq": 0,
        "source_line": 2,
    }
    assert [(r["step"], r["customer"], r["gender"], Decimal(str(r["amount"])), r["fraud"]) for r in got[1:]] == [
        (0, "C1", "E", Decimal("0"), 1),
        (179, "C2", "U", Decimal("123456.7"), 0),
        (3, "C3", "M", Decimal("9.99"), 1),
    ]
    by_seq = {c["chunk_seq"]: c for c in chunks}
    for r in got:
        c = by_seq[r["chunk_seq"]]
        assert c["first_line"] <= r["source_line"] <= c["last_line"]
    assert all("'" not in str(v) for r in got for v in r.values())
    assert expected_rows(data).keys() == set(good_line_no) | set(bad_line_no)


# ----------------------------------------------------------------------------- 2. chunk boundaries


@pytest.mark.parametrize(
    "case, n, newline, final, bom",
    [
        ("exact multiple", 12, "\n", True, False),
        ("last partial chunk", 10, "\n", True, False),
        ("single partial chunk", 2, "\n", True, False),
        ("no final newline", 9, "\n", False, False),
        ("CRLF", 10, "\r\n", True, False),
        ("CRLF without final newline", 7, "\r\n", False, False),
        ("UTF-8 BOM", 9, "\n", True, True),
    ],
)
def test_chunk_boundaries(make_settings, inbox, lake, pg_conn, case, n, newline, final, bom):
    data = (newline.join([HEADER, *rows(n)]) + (newline if final else "")).encode()
    (inbox / "tx.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    ingest(make_settings(BATCH_SIZE="4"))
    chunks = assert_chunks_match(pg_conn, lake, "tx.csv", (b"\xef\xbb\xbf" if bom else b"") + data, 4)
    assert [c["rows_total"] for c in chunks] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert query(pg_conn, "SELECT count(*) FROM quarantine") == [(0,)]
    if "CRLF" in case:
        for c in chunks:
            t = read_object(lake, c["object_key"])
            assert not any("\r" in v for v in t.column("category").to_pylist())


def test_blank_lines_are_skipped_and_line_numbers_stay_right(make_settings, inbox, lake, pg_conn):
    r = rows(9)
    lines = [r[0], "", r[1], r[2], "   ", r[3], "", "", r[4], r[5], r[6], "\t", r[7], r[8], ""]
    data = write_csv(inbox / "tx.csv", lines, newline="\r\n")
    ingest(make_settings(BATCH_SIZE="3"))
    chunks = assert_chunks_match(pg_conn, lake, "tx.csv", data, 3)
    assert [(c["first_line"], c["last_line"]) for c in chunks] == [(2, 5), (7, 11), (12, 15)]
    assert query(pg_conn, "SELECT count(*) FROM quarantine") == [(0,)]


def test_empty_file_is_ignored_and_header_only_file_is_done_without_chunks(make_settings, inbox, lake, pg_conn):
    (inbox / "empty.csv").write_bytes(b"")
    (inbox / "header.csv").write_bytes((HEADER + "\n").encode())
    (inbox / "header_no_newline.csv").write_bytes(HEADER.encode())
    (inbox / "header_crlf_blank.csv").write_bytes((HEADER + "\r\n\r\n").encode())
    ingest(make_settings(BATCH_SIZE="3"))

    empty = file_record(pg_conn, "empty.csv")
    assert empty["status"] == "ignored" and "empty" in empty["reason"]
    for name in ("header.csv", "header_no_newline.csv", "header_crlf_blank.csv"):
        rec = file_record(pg_conn, name)
        assert (rec["status"], rec["kind"], rec["chunks"], rec["rows_ingested"]) == ("done", "transactions", 0, 0)
    assert chunk_records(pg_conn) == []
    assert lake_keys(lake) == []


def test_header_only_file_that_later_gets_rows(make_settings, inbox, lake, pg_conn):
    path = inbox / "tx.csv"
    path.write_bytes(HEADER.encode())
    ingest(make_settings(BATCH_SIZE="3"))
    assert file_record(pg_conn, "tx.csv")["chunks"] == 0
    data = write_csv(path, rows(4))
    ingest(make_settings(BATCH_SIZE="3"))
    assert_chunks_match(pg_conn, lake, "tx.csv", data, 3)


def test_empty_file_that_later_gets_content_is_ingested(make_settings, inbox, lake, pg_conn):
    path = inbox / "tx.csv"
    path.write_bytes(b"")
    ingest(make_settings(BATCH_SIZE="3"))
    assert file_record(pg_conn, "tx.csv")["status"] == "ignored"
    data = write_csv(path, rows(5))
    ingest(make_settings(BATCH_SIZE="3"))
    assert_chunks_match(pg_conn, lake, "tx.csv", data, 3)


def test_chunks_read_as_one_hive_dataset(make_settings, inbox, lake, pg_conn):
    write_csv(inbox / "a.csv", rows(7))
    write_csv(inbox / "b.csv", rows(5, start_step=100))
    ingest(make_settings(BATCH_SIZE="3"))
    ingest(make_settings(BATCH_SIZE="3"))  # a second poll also writes _log/processing_log.json again
    dataset = ds.dataset(lake / "raw-transactions", format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == 12
    assert {"year", "month", "day"} <= set(table.column_names)
    assert len(chunk_records(pg_conn)) == len(dataset.files) == 3 + 2
    log_doc = (lake / "raw-transactions/_log/processing_log.json").read_text()
    assert '"rows_ingested": 12' in log_doc


# ----------------------------------------------------------------------------- 3. unreadable, ignored, importance


def test_unreadable_files_fail_with_a_reason_and_nothing_else_stops(make_settings, inbox, lake, pg_conn):
    latin = (HEADER + "\n" + row() + "\n" + row(customer="Müller") + "\n" + row() + "\n").encode("latin-1")
    (inbox / "latin1.csv").write_bytes(latin)
    (inbox / "binary.csv").write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(256)) * 4)
    (inbox / "png.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    wrong = "step,customer,age,gender,zipcode,merchant,zipMerchant,category,amount,fraud"
    write_csv(inbox / "wrong_header.csv", rows(3), header=wrong)
    write_csv(inbox / "short_header.csv", rows(3), header="step,customer,amount")
    write_csv(inbox / "people.csv", ["ann,ann@example.com", "bob,bob@example.com"], header="name,email")
    good = write_csv(inbox / "good.csv", rows(5))
    ingest(make_settings(BATCH_SIZE="2"))

    reasons = {}
    for name in ("binary.csv", "png.csv", "wrong_header.csv", "short_header.csv"):
        rec = file_record(pg_conn, name)
        assert rec["status"] == "failed", (name, rec)
        assert rec["chunks"] == 0
        reasons[name] = rec["reason"]
        ev = events(pg_conn, "file_failed", rec["file_id"])
        assert len(ev) == 1 and ev[0][0] == "ERROR" and name in ev[0][4] and rec["reason"] in ev[0][4]
    # a row that is not UTF-8 under a UTF-8 header is quarantined; the file goes on (issue 9, poison input)
    latin = file_record(pg_conn, "latin1.csv")
    assert (latin["status"], latin["rows_ingested"], latin["rows_quarantined"]) == ("done", 2, 1)
    assert [(n, "UTF-8" in r) for n, r in query(pg_conn, "SELECT line_no, reason FROM quarantine")] == [(3, True)]
    assert "binary" in reasons["binary.csv"] or "not a CSV" in reasons["binary.csv"]
    assert "UTF-8" in reasons["png.csv"] or "binary" in reasons["png.csv"]
    assert "header" in reasons["wrong_header.csv"] and "zipcodeOri" in reasons["wrong_header.csv"]
    assert "header" in reasons["short_header.csv"]

    people = file_record(pg_conn, "people.csv")
    assert people["status"] == "ignored" and "name,email" in people["reason"] and people["chunks"] == 0

    assert_chunks_match(pg_conn, lake, "good.csv", good, 2)
    assert {KEY_RE.match(k)["file"] for k in lake_keys(lake)} == {
        file_record(pg_conn, "good.csv")["file_id"],
        latin["file_id"],
    }

    # failed and ignored files are not retried on every poll
    before = query(pg_conn, "SELECT count(*) FROM processing_logs")
    ingest(make_settings(BATCH_SIZE="2"))
    assert query(pg_conn, "SELECT count(*) FROM processing_logs") == before


def importance_lines(pairs: list[tuple[str, str, str, str, int]]) -> list[str]:
    return [f"'{s}','{t}',{w},'{c}',{f}" for s, t, w, c, f in pairs]


def test_importance_file_is_told_apart_by_header_and_replaced_when_it_changes(make_settings, inbox, lake, pg_conn):
    v1 = [("C1", "M1", "4.55", "es_food", 0), ("C1", "M1", "10", "es_health", 0), ("C2", "M2", "0.5", "es_food", 1)]
    write_csv(inbox / "weights.csv", importance_lines(v1) + ["'C3','M3',-1,'es_food',0"], header=IMPORTANCE_HEADER)
    write_csv(inbox / "tx.csv", rows(3))
    ingest(make_settings(BATCH_SIZE="2"))

    rec = file_record(pg_conn, "weights.csv")
    assert (rec["kind"], rec["status"], rec["rows_ingested"], rec["rows_quarantined"]) == ("importance", "done", 3, 1)
    assert chunk_records(pg_conn, rec["file_id"]) == []
    got = query(pg_conn, "SELECT source, target, weight, type_trans, fraud FROM customer_importance")
    assert sorted(got) == sorted((s, t, Decimal(w).quantize(Decimal("0.01")), c, f) for s, t, w, c, f in v1)
    q = query(pg_conn, "SELECT line_no, reason FROM quarantine WHERE file_id = %s", (rec["file_id"],))
    assert q == [(5, "negative Weight -1")]
    assert query(pg_conn, "SELECT file_id, rows_loaded, version FROM importance_state") == [(rec["file_id"], 3, 1)]
    assert file_record(pg_conn, "tx.csv")["kind"] == "transactions"

    v2 = [("C9", "M9", "1.25", "es_travel", 1), ("C8", "M1", "2", "es_food", 0)]
    write_csv(inbox / "weights.csv", importance_lines(v2), header=IMPORTANCE_HEADER, newline="\r\n")
    ingest(make_settings(BATCH_SIZE="2"))
    got = query(pg_conn, "SELECT source, target, weight, type_trans, fraud FROM customer_importance")
    assert sorted(got) == sorted((s, t, Decimal(w).quantize(Decimal("0.01")), c, f) for s, t, w, c, f in v2)
    assert query(pg_conn, "SELECT rows_loaded, version FROM importance_state") == [(2, 2)]
    assert query(pg_conn, "SELECT count(*) FROM quarantine WHERE file_id = %s", (rec["file_id"],)) == [(0,)]
    assert len(events(pg_conn, "importance_loaded", rec["file_id"])) == 2
    assert file_record(pg_conn, "weights.csv")["status"] == "done"


def test_importance_reload_is_atomic_for_readers(make_settings, inbox, pg_server, pg_db, pg_conn):
    """A reader in another session sees the old table or the new one, never an empty or mixed one."""
    import threading

    import psycopg2

    old = [(f"C{i}", f"M{i % 7}", "1.00", "es_food", 0) for i in range(3000)]
    new = [(f"N{i}", f"M{i % 5}", "2.00", "es_food", 0) for i in range(2000)]
    path = inbox / "CustomerImportance.csv"
    write_csv(path, importance_lines(old), header=IMPORTANCE_HEADER)
    ingest(make_settings())
    seen: set[tuple[int, int]] = set()
    done = threading.Event()

    def reader() -> None:
        conn = psycopg2.connect(pg_server.dsn_for(pg_db))
        conn.autocommit = True
        with conn.cursor() as cur:
            while not done.is_set():
                cur.execute("SELECT count(*) FILTER (WHERE source LIKE 'C%%'), count(*) FROM customer_importance")
                seen.add(cur.fetchone())
        conn.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        write_csv(path, importance_lines(new), header=IMPORTANCE_HEADER)
        ingest(make_settings())
        time.sleep(0.1)
    finally:
        done.set()
        t.join()
    assert seen <= {(3000, 3000), (0, 2000)}
    assert (0, 2000) in seen


def test_chunks_wait_for_the_importance_file_loaded_beside_them(make_settings, inbox, lake, pg_server, pg_db, pg_conn):
    """X parses a transactions file while the importance file of the same poll loads on another connection,
    but records no chunk of it until that load has committed: Y never evaluates one against older weights."""
    import psycopg2

    settings = make_settings(BATCH_SIZE="2")
    ingest(settings)  # the schema, on an empty inbox
    write_csv(
        inbox / "CustomerImportance.csv",
        importance_lines([("C1000", "M200", "3.50", "es_food", 0)]),
        header=IMPORTANCE_HEADER,
    )
    data = write_csv(inbox / "tx.csv", rows(7))
    blocker = psycopg2.connect(pg_server.dsn_for(pg_db))  # a reader inside a transaction holds the load back
    blocker.cursor().execute("SELECT count(*) FROM customer_importance")
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(run_worker(settings, drain=True)))
    worker.start()
    try:
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE customer_importance%%'"
        deadline = time.monotonic() + 120
        while query(pg_conn, waiting) != [(1,)]:
            assert time.monotonic() < deadline, "the importance load never reached its table lock"
            time.sleep(0.05)
        started = "SELECT count(*) FROM source_files WHERE name = 'tx.csv' AND status = 'ingesting'"
        while query(pg_conn, started) != [(1,)]:
            assert time.monotonic() < deadline, "the transactions file was not started beside the importance load"
            time.sleep(0.05)
        for _ in range(20):  # the transactions file is under way: it must not record a chunk yet
            assert _ledger_chunks(pg_conn) == 0
            time.sleep(0.05)
    finally:
        blocker.rollback()
        blocker.close()
        worker.join(timeout=120)
    assert result == [0]
    assert query(pg_conn, "SELECT rows_loaded, version FROM importance_state") == [(1, 1)]
    assert_chunks_match(pg_conn, lake, "tx.csv", data, 2)


# ----------------------------------------------------------------------------- 4. exactly once


def _ledger_chunks(conn) -> int:
    if query(conn, "SELECT to_regclass('chunks')") == [(None,)]:
        return 0  # X has not applied the schema yet
    return query(conn, "SELECT count(*) FROM chunks")[0][0]


def test_resume_after_sigkill_has_no_duplicate_and_no_gap(product_env, inbox, lake, pg_conn, tmp_path):
    generate(tmp_path / "sample", rows=6000, seed=7)
    data = bytearray((tmp_path / "sample" / "transactions.csv").read_bytes())
    # a few bad rows, so quarantine is part of the exactly-once bookkeeping too
    text = data.decode().split("\n")
    for i in (40, 777, 3001, 5990):
        text[i] = text[i].replace("'M'", "'Q'").replace("'F'", "'Q'").replace("'E'", "'Q'").replace("'U'", "'Q'")
    data = "\n".join(text).encode()
    (inbox / "transactions.csv").write_bytes(data)
    expected = expected_rows(data)
    bad = {ln for ln, r in expected.items() if r["gender"] not in "MFEU" or len(r["gender"]) != 1}
    assert len(bad) == 4

    env = dict(product_env, BATCH_SIZE="250", CHUNK_INTERVAL_SECONDS="0.05", LOG_LEVEL="WARNING")
    cmd = [sys.executable, "-m", "src.mechanism_x.data_ingestion", "--drain"]
    kills = 0
    for target, delay in ((3, 0.0), (9, 0.02), (15, 0.045)):
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _ledger_chunks(pg_conn) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)  # land in different steps: before the object is written, during the pause, ...
        assert proc.poll() is None, "X finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        n = _ledger_chunks(pg_conn)
        assert 0 < n < 24
    assert kills == 3
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    rec = file_record(pg_conn, "transactions.csv")
    chunks = chunk_records(pg_conn, rec["file_id"])
    assert rec["status"] == "done" and rec["chunks"] == len(chunks) == 24
    assert all(c["status"] == "written" for c in chunks)
    keys = lake_keys(lake)
    assert keys == sorted(c["object_key"] for c in chunks)
    got_lines: list[int] = []
    for c in chunks:
        t = read_object(lake, c["object_key"])
        got = t.to_pylist()
        assert len(got) == c["rows_valid"]
        for r in got:
            assert produced(r) == expected[r["source_line"]]
            assert r["chunk_seq"] == c["chunk_seq"]
        got_lines += [r["source_line"] for r in got]
    assert len(got_lines) == len(set(got_lines))
    assert sorted(got_lines) == sorted(set(expected) - bad)
    q = query(pg_conn, "SELECT line_no FROM quarantine ORDER BY 1")
    assert [r[0] for r in q] == sorted(bad)
    assert sum(e[3] for e in events(pg_conn, "rows_quarantined")) == 4
    assert len(events(pg_conn, "file_ingested")) == 1

    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert len(chunk_records(pg_conn)) == 24
    assert lake_keys(lake) == keys
    assert len(events(pg_conn, "file_ingested")) == 1


@pytest.mark.parametrize("object_written", [False, True])
def test_pending_chunk_is_rebuilt_byte_identically(make_settings, inbox, lake, pg_conn, object_written):
    r = rows(11)
    lines = [r[0], r[1], r[2], "", "", r[3], r[4], row(gender="Z"), "   ", r[5], r[6], r[7], r[8], "", r[9], r[10]]
    write_csv(inbox / "tx.csv", lines)
    ingest(make_settings(BATCH_SIZE="3"))
    chunks = chunk_records(pg_conn)
    assert len(chunks) == 4
    before = {c["object_key"]: (lake / c["object_key"]).read_bytes() for c in chunks}
    qkey = next(iter(lake_keys(lake, "quarantine/")))
    q_before = (lake / qkey).read_bytes()

    # chunk 1 starts after blank lines and holds the bad row: as if X died before or after writing its object
    target = chunks[1]
    if not object_written:
        (lake / target["object_key"]).unlink()
        (lake / qkey).unlink()
    query(
        pg_conn,
        "UPDATE chunks SET status = 'pending', written_at = NULL, content_md5 = NULL WHERE seq = %s RETURNING seq",
        (target["seq"],),
    )
    ingest(make_settings(BATCH_SIZE="3"))

    after = chunk_records(pg_conn)
    assert [(c["seq"], c["status"]) for c in after] == [(c["seq"], "written") for c in chunks]
    assert after[1]["content_md5"] == target["content_md5"]
    assert {k: (lake / k).read_bytes() for k in before} == before
    assert (lake / qkey).read_bytes() == q_before
    assert source_lines(lake, target["object_key"]) == [7, 8]
    assert query(pg_conn, "SELECT count(*) FROM quarantine") == [(1,)]


def _staged_and_objects(conn, lake: Path) -> tuple[dict, dict]:
    """{seq: (source lines, row count, amount sum)} of the written chunks' staged rows, and the same read from
    their objects with pyarrow."""
    staged: dict[int, tuple] = {}
    lineage = "SELECT count(*) FROM staged_rows s JOIN chunks c USING (seq) WHERE (s.source_file_id, s.chunk_seq) = "
    assert query(conn, lineage + "(c.file_id, c.chunk_seq)") == query(conn, "SELECT count(*) FROM staged_rows")
    for seq, line, amount in query(conn, "SELECT seq, source_line, amount FROM staged_rows ORDER BY seq, source_line"):
        lines, n, total = staged.get(seq, ([], 0, Decimal(0)))
        staged[seq] = ([*lines, line], n + 1, total + amount)
    objects = {}
    for c in chunk_records(conn):
        assert c["status"] == "written", c
        table = read_object(lake, c["object_key"])
        if table.num_rows:
            amounts = table.column("amount").to_pylist()
            objects[c["seq"]] = (sorted(table.column("source_line").to_pylist()), table.num_rows, sum(amounts))
    return staged, objects


def test_every_written_chunk_has_exactly_its_rows_staged_rebuilt_chunks_too(make_settings, inbox, lake, pg_conn):
    """Issue 12: X stages a chunk's rows for Y's commit (on a connection of its own) before it marks the chunk
    written. After X, each written chunk has exactly its object's rows staged, a chunk with no valid row has none;
    and a chunk recovery rebuilds (X stopped after its record, its rows staged or not yet) is staged once."""
    r = rows(12)
    bad = [row(gender="Z"), row(amount="-1.00"), row(fraud="7")]  # chunk 1: no valid row
    write_csv(inbox / "tx.csv", [*r[:3], *bad, *r[3:7], row(gender="Q"), *r[7:]])
    ingest(make_settings(BATCH_SIZE="3"))
    staged, objects = _staged_and_objects(pg_conn, lake)
    assert len(chunk_records(pg_conn)) == 6 and len(objects) == 5
    assert staged == objects
    assert sum(n for _, n, _ in staged.values()) == 12

    # As if X stopped after recording two chunks: one whose staging had not committed yet, one whose had.
    seqs = [c["seq"] for c in chunk_records(pg_conn)]
    unstaged, restaged = seqs[2], seqs[4]
    query(pg_conn, "DELETE FROM staged_rows WHERE seq = %s RETURNING seq", (unstaged,))
    query(
        pg_conn,
        "UPDATE chunks SET status = 'pending', written_at = NULL, content_md5 = NULL WHERE seq = ANY(%s) RETURNING seq",
        ([unstaged, restaged],),
    )
    ingest(make_settings(BATCH_SIZE="3"))
    assert _staged_and_objects(pg_conn, lake) == (objects, objects)


def test_pending_chunk_of_a_changed_file_is_marked_failed_not_rewritten(make_settings, inbox, lake, pg_conn):
    write_csv(inbox / "tx.csv", rows(6))
    ingest(make_settings(BATCH_SIZE="3"))
    chunks = chunk_records(pg_conn)
    (lake / chunks[1]["object_key"]).unlink()
    query(pg_conn, "UPDATE chunks SET status = 'pending' WHERE seq = %s RETURNING seq", (chunks[1]["seq"],))
    write_csv(inbox / "tx.csv", rows(6, start_step=50))
    ingest(make_settings(BATCH_SIZE="3"))
    assert [c["status"] for c in chunk_records(pg_conn)] == ["written", "failed"]
    assert not (lake / chunks[1]["object_key"]).exists()
    lost = events(pg_conn, "chunk_lost")
    assert len(lost) == 1 and lost[0][0] == "ERROR" and "changed" in lost[0][4]


# ----------------------------------------------------------------------------- 5. append, rewrite, delete


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_append_continues_where_it_stopped(make_settings, inbox, lake, pg_conn, newline):
    path = inbox / "tx.csv"
    first = write_csv(path, rows(5), newline=newline)
    ingest(make_settings(BATCH_SIZE="3"))
    old = chunk_records(pg_conn)
    old_bytes = {c["object_key"]: (lake / c["object_key"]).read_bytes() for c in old}
    assert [c["rows_total"] for c in old] == [3, 2]

    more = rows(4, start_step=10)
    with open(path, "ab") as fh:
        fh.write((newline.join(more) + newline + newline).encode())
    ingest(make_settings(BATCH_SIZE="3"))

    data = path.read_bytes()
    assert data.startswith(first)
    chunks = chunk_records(pg_conn)
    assert [c["seq"] for c in chunks[:2]] == [c["seq"] for c in old]
    assert {k: (lake / k).read_bytes() for k in old_bytes} == old_bytes
    assert [(c["chunk_seq"], c["first_line"], c["last_line"], c["rows_total"]) for c in chunks] == [
        (0, 2, 4, 3),
        (1, 5, 6, 2),
        (2, 7, 9, 3),
        (3, 10, 10, 1),
    ]
    expected = expected_rows(data)
    for c in chunks[2:]:
        for r in read_object(lake, c["object_key"]).to_pylist():
            assert produced(r) == expected[r["source_line"]]
    rec = file_record(pg_conn, "tx.csv")
    assert (rec["status"], rec["rows_ingested"], rec["chunks"]) == ("done", 9, 4)
    assert len(events(pg_conn, "file_conflict")) == 0
    assert len(lake_keys(lake)) == 4


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_append_to_a_file_without_final_newline(make_settings, inbox, lake, pg_conn, newline):
    path = inbox / "tx.csv"
    write_csv(path, rows(4), newline=newline, final=False)
    ingest(make_settings(BATCH_SIZE="3"))
    assert [(c["first_line"], c["last_line"]) for c in chunk_records(pg_conn)] == [(2, 4), (5, 5)]

    with open(path, "ab") as fh:
        fh.write((newline + newline.join(rows(2, start_step=20))).encode())  # still no final newline
    ingest(make_settings(BATCH_SIZE="3"))
    with open(path, "ab") as fh:
        fh.write((newline + row(step=99, customer="CLAST") + newline).encode())
    ingest(make_settings(BATCH_SIZE="3"))

    data = path.read_bytes()
    expected = expected_rows(data)
    assert sorted(expected) == list(range(2, 9))
    chunks = chunk_records(pg_conn)
    assert [(c["chunk_seq"], c["first_line"], c["last_line"]) for c in chunks] == [
        (0, 2, 4),
        (1, 5, 5),
        (2, 6, 7),
        (3, 8, 8),
    ]
    got = {}
    for c in chunks:
        for r in read_object(lake, c["object_key"]).to_pylist():
            assert r["source_line"] not in got
            got[r["source_line"]] = produced(r)
    assert got == expected
    assert file_record(pg_conn, "tx.csv")["status"] == "done"
    assert query(pg_conn, "SELECT count(*) FROM quarantine") == [(0,)]


def test_bytes_glued_to_an_unterminated_last_row_are_a_conflict(make_settings, inbox, lake, pg_conn):
    """The last ingested line changed (no line break came first): it must not be taken for a new row."""
    path = inbox / "tx.csv"
    write_csv(path, rows(4), final=False)
    ingest(make_settings(BATCH_SIZE="3"))
    keys = lake_keys(lake)
    with open(path, "ab") as fh:
        fh.write(("5\n" + row(step=99) + "\n").encode())  # line 5's amount/fraud field now reads "...,05"
    ingest(make_settings(BATCH_SIZE="3"))
    rec = file_record(pg_conn, "tx.csv")
    assert rec["status"] == "conflict"
    assert len(chunk_records(pg_conn)) == 2 and lake_keys(lake) == keys
    assert len(events(pg_conn, "file_conflict", rec["file_id"])) == 1


def test_rewrite_in_place_is_a_conflict_reported_once(make_settings, inbox, lake, pg_conn):
    path = inbox / "tx.csv"
    r = rows(7)
    write_csv(path, r)
    ingest(make_settings(BATCH_SIZE="3"))
    keys = lake_keys(lake)
    old_chunks = chunk_records(pg_conn)

    r[2] = row(step=2, customer="CHANGED")
    write_csv(path, r + rows(3, start_step=50))  # an earlier row changed, and rows appended
    for _ in range(3):
        ingest(make_settings(BATCH_SIZE="3"))

    rec = file_record(pg_conn, "tx.csv")
    assert rec["status"] == "conflict" and "rewritten" in rec["reason"]
    ev = events(pg_conn, "file_conflict", rec["file_id"])
    assert len(ev) == 1
    level, _fid, _chunk, _n, message = ev[0]
    assert level == "ERROR" and "tx.csv" in message and "rewritten" in message and "NOT ingested" in message
    assert chunk_records(pg_conn) == old_chunks
    assert lake_keys(lake) == keys
    assert rec["rows_ingested"] == 7
    assert "CHANGED" not in str(pa.concat_tables([read_object(lake, k) for k in keys]).column("customer"))

    # rewritten a second time (other content): reported again, once
    r[3] = row(step=3, customer="AGAIN")
    write_csv(path, r)
    ingest(make_settings(BATCH_SIZE="3"))
    ingest(make_settings(BATCH_SIZE="3"))
    assert len(events(pg_conn, "file_conflict", rec["file_id"])) == 2
    assert chunk_records(pg_conn) == old_chunks


def test_deleted_file_keeps_what_was_ingested(make_settings, inbox, lake, pg_conn):
    path = inbox / "tx.csv"
    data = write_csv(path, rows(5))
    write_csv(inbox / "other.csv", rows(2))
    ingest(make_settings(BATCH_SIZE="3"))
    keys = lake_keys(lake)
    before = {k: (lake / k).read_bytes() for k in keys}
    old_chunks = chunk_records(pg_conn)
    path.unlink()
    ingest(make_settings(BATCH_SIZE="3"))
    ingest(make_settings(BATCH_SIZE="3"))

    rec = file_record(pg_conn, "tx.csv")
    assert rec["status"] == "deleted" and rec["chunks"] == 2 and rec["rows_ingested"] == 5
    assert chunk_records(pg_conn) == old_chunks
    assert {k: (lake / k).read_bytes() for k in lake_keys(lake)} == before
    ev = events(pg_conn, "file_deleted", rec["file_id"])
    assert len(ev) == 1 and "tx.csv" in ev[0][4]
    assert file_record(pg_conn, "other.csv")["status"] == "done"

    # the same file put back unchanged is not ingested again
    path.write_bytes(data)
    ingest(make_settings(BATCH_SIZE="3"))
    assert file_record(pg_conn, "tx.csv")["status"] == "done"
    assert chunk_records(pg_conn) == old_chunks


def test_stop_between_chunks_resumes_in_process(make_settings, inbox, lake, pg_conn):
    """A stop request (SIGTERM) leaves the ledger consistent; the next run continues with no gap."""
    import threading

    from src.mechanism_x.data_ingestion import Ingestor
    from src.utils.db import Database
    from src.utils.object_store import LocalObjectStore
    from src.utils.sources import LocalInboxSource

    data = write_csv(inbox / "tx.csv", rows(20))
    settings = make_settings(BATCH_SIZE="3")
    db = Database(settings)
    db.apply_schema()
    stop = threading.Event()
    ingestor = Ingestor(settings, db, LocalObjectStore(lake), LocalInboxSource(inbox), stop)
    emitted = 0
    real = ingestor._emit_chunk

    def emit_then_stop(*args, **kwargs):
        nonlocal emitted
        out = real(*args, **kwargs)
        emitted += 1
        if emitted == 2:
            stop.set()
        return out

    ingestor._emit_chunk = emit_then_stop
    ingestor.run(drain=True)
    db.close()
    assert file_record(pg_conn, "tx.csv")["status"] == "ingesting"
    assert len(chunk_records(pg_conn)) == 2
    ingest(settings)
    assert_chunks_match(pg_conn, lake, "tx.csv", data, 3)


def test_help_and_drain_exit_codes(product_env, inbox, pg_conn):
    out = subprocess.run(
        [sys.executable, "-m", "src.mechanism_x.data_ingestion", "--help"],
        env=product_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--drain" in out.stdout
    write_csv(inbox / "tx.csv", rows(3))
    env = dict(product_env, BATCH_SIZE="2")
    run = subprocess.run(
        [sys.executable, "-m", "src.mechanism_x.data_ingestion", "--drain"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert query(pg_conn, "SELECT count(*) FROM chunks WHERE status = 'written'") == [(2,)]


def test_rewritten_file_restored_to_what_was_ingested_resumes(make_settings, inbox, lake, pg_conn):
    path = inbox / "tx.csv"
    r = rows(5)
    original = write_csv(path, r)
    ingest(make_settings(BATCH_SIZE="3"))
    write_csv(path, [row(customer="OTHER"), *r[1:]])
    ingest(make_settings(BATCH_SIZE="3"))
    assert file_record(pg_conn, "tx.csv")["status"] == "conflict"

    path.write_bytes(original)  # put back as it was
    ingest(make_settings(BATCH_SIZE="3"))
    assert file_record(pg_conn, "tx.csv")["status"] == "done"
    with open(path, "ab") as fh:
        fh.write(("\n".join(rows(2, start_step=40)) + "\n").encode())
    ingest(make_settings(BATCH_SIZE="3"))
    appended = chunk_records(pg_conn)
    assert [(c["first_line"], c["last_line"]) for c in appended] == [(2, 4), (5, 6), (7, 8)]
    assert file_record(pg_conn, "tx.csv")["status"] == "done"

    # the same rewrite again is a new conflict, reported again
    write_csv(path, [row(customer="OTHER"), *r[1:]])
    ingest(make_settings(BATCH_SIZE="3"))
    assert file_record(pg_conn, "tx.csv")["status"] == "conflict"
    assert len(events(pg_conn, "file_conflict")) == 2


def test_deleted_and_restored_files_get_their_status_back(make_settings, inbox, pg_conn):
    (inbox / "bad.csv").write_bytes(b"\x00\x01binary\n")
    write_csv(inbox / "notes.csv", ["a,b"], header="x,y")
    write_csv(inbox / "tx.csv", rows(2))
    ingest(make_settings())
    saved = {p.name: p.read_bytes() for p in inbox.iterdir()}
    for p in inbox.iterdir():
        p.unlink()
    ingest(make_settings())
    assert {file_record(pg_conn, n)["status"] for n in saved} == {"deleted"}
    for name, data in saved.items():
        (inbox / name).write_bytes(data)
    ingest(make_settings())
    assert {n: file_record(pg_conn, n)["status"] for n in saved} == {
        "bad.csv": "failed",
        "notes.csv": "ignored",
        "tx.csv": "done",
    }
    assert len(chunk_records(pg_conn)) == 1


def test_one_chunk_is_released_per_interval(make_settings, inbox, pg_conn):
    write_csv(inbox / "tx.csv", rows(8))
    started = time.monotonic()
    ingest(make_settings(BATCH_SIZE="2", CHUNK_INTERVAL_SECONDS="0.3"))
    elapsed = time.monotonic() - started
    written = [c["written_at"] for c in chunk_records(pg_conn)]
    assert len(written) == 4
    gaps = [(b - a).total_seconds() for a, b in zip(written, written[1:], strict=False)]
    assert all(g >= 0.25 for g in gaps), gaps
    assert elapsed >= 0.85


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_lines_split_across_read_blocks(make_settings, inbox, lake, pg_conn, monkeypatch, block):
    """Reads in small blocks: lines, CRLF pairs and multi-byte characters cut at block edges stay whole."""
    from src.mechanism_x import csv_parser

    monkeypatch.setattr(csv_parser, "READ_BLOCK", block)
    r = [
        row(step=i, customer=f"C{i}é", category="es_café" if i % 2 else "es_ñandú", amount=f"{i}.5") for i in range(13)
    ]
    lines = [r[0], "", *r[1:6], "\r", *r[6:]]
    data = b"\xef\xbb\xbf" + "\r\n".join([HEADER, *lines]).encode("utf-8")  # no final line break
    (inbox / "tx.csv").write_bytes(data)
    ingest(make_settings(BATCH_SIZE="4"))
    chunks = assert_chunks_match(pg_conn, lake, "tx.csv", data, 4)
    assert query(pg_conn, "SELECT count(*) FROM quarantine") == [(0,)]

    # a pending chunk is rebuilt with the same small blocks
    target = chunks[2]
    original = (lake / target["object_key"]).read_bytes()
    (lake / target["object_key"]).unlink()
    query(pg_conn, "UPDATE chunks SET status = 'pending' WHERE seq = %s RETURNING seq", (target["seq"],))
    ingest(make_settings(BATCH_SIZE="4"))
    assert (lake / target["object_key"]).read_bytes() == original
    assert [c["status"] for c in chunk_records(pg_conn)] == ["written"] * len(chunks)


def test_first_release_waits_for_mechanism_y(make_settings, inbox, pg_conn, monkeypatch, tmp_path):
    """Under the supervisor, X prepares its first chunk but releases it only once Y reports ready."""
    from src.mechanism_x.data_ingestion import run_worker
    from src.utils.runtime import READY_FILE_ENV

    ready = tmp_path / "y-ready"
    monkeypatch.setenv(READY_FILE_ENV, str(ready))
    from src.utils.db import Database

    settings = make_settings(BATCH_SIZE="2")
    db = Database(settings)
    db.apply_schema()  # so the ledger can be watched from the start
    db.close()
    write_csv(inbox / "tx.csv", rows(4))
    codes: list[int] = []
    x = threading.Thread(target=lambda: codes.append(run_worker(settings, drain=True)))
    x.start()
    try:
        deadline = time.monotonic() + 30
        while not chunk_records(pg_conn) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        held = chunk_records(pg_conn)
        assert held and all(c["status"] == "pending" for c in held), held
        assert x.is_alive()
        ready.write_text("1\n")
        x.join(30)
    finally:
        ready.touch()
        x.join(30)
    assert codes == [0]
    assert [c["status"] for c in chunk_records(pg_conn)] == ["written", "written"]


def _pending_again(conn, lake: Path, seq: int) -> bytes:
    """The state a crash leaves between a chunk's ledger commit and its object: pending, no object."""
    (key,) = query(conn, "SELECT object_key FROM chunks WHERE seq = %s", (seq,))[0]
    data = (lake / key).read_bytes()
    (lake / key).unlink()
    with conn.cursor() as cur:
        cur.execute("UPDATE chunks SET status = 'pending', written_at = NULL WHERE seq = %s", (seq,))
    return data


def _ingestor(settings, inbox: Path, lake: Path):
    import threading

    from src.mechanism_x.data_ingestion import Ingestor
    from src.utils.db import Database
    from src.utils.object_store import LocalObjectStore
    from src.utils.sources import LocalInboxSource

    db = Database(settings)
    db.apply_schema()
    return Ingestor(settings, db, LocalObjectStore(lake), LocalInboxSource(inbox), threading.Event()), db


def test_recover_keeps_a_chunk_pending_while_its_file_is_briefly_missing(make_settings, inbox, lake, pg_conn):
    """A pending chunk is rebuilt from its own byte range only: its file missing from one listing keeps it
    pending (not failed), and bytes appended after it that are not even UTF-8 do not stop its rebuild."""
    write_csv(inbox / "tx.csv", rows(6))
    settings = make_settings(BATCH_SIZE="3")
    ingest(settings)
    first = chunk_records(pg_conn)[0]
    original = _pending_again(pg_conn, lake, first["seq"])
    ingestor, db = _ingestor(settings, inbox, lake)
    try:
        away = inbox.parent / "moved-away.csv"
        (inbox / "tx.csv").rename(away)
        ingestor.recover()
        assert query(pg_conn, "SELECT status FROM chunks WHERE seq = %s", (first["seq"],)) == [("pending",)]
        away.rename(inbox / "tx.csv")
        with open(inbox / "tx.csv", "ab") as fh:
            fh.write(b"1,'C9','3','M','28007','M200','28007','es_food',\xff\xfe,0\n")  # appended, not UTF-8
        ingestor.recover()
    finally:
        db.close()
    assert query(pg_conn, "SELECT status FROM chunks WHERE seq = %s", (first["seq"],)) == [("written",)]
    assert (lake / first["object_key"]).read_bytes() == original  # the very same object


def test_giving_up_a_chunk_takes_its_rows_out_of_the_file_counts(make_settings, inbox, lake, pg_conn, monkeypatch):
    """A chunk that cannot be rebuilt (its file gone past the grace period) is failed, and the file's counters
    no longer claim its rows: the ledger never claims rows the lake lacks."""
    from src.mechanism_x import data_ingestion

    write_csv(inbox / "tx.csv", rows(6))
    settings = make_settings(BATCH_SIZE="3")
    ingest(settings)
    before = file_record(pg_conn, "tx.csv")
    first = chunk_records(pg_conn)[0]
    _pending_again(pg_conn, lake, first["seq"])
    (inbox / "tx.csv").unlink()
    monkeypatch.setattr(data_ingestion, "MISSING_FILE_GRACE_SECONDS", 0.0)
    ingestor, db = _ingestor(settings, inbox, lake)
    try:
        ingestor.recover()
    finally:
        db.close()
    status, error = query(pg_conn, "SELECT status, last_error FROM chunks WHERE seq = %s", (first["seq"],))[0]
    assert status == "failed" and "missing" in error
    after = file_record(pg_conn, "tx.csv")
    assert after["rows_ingested"] == before["rows_ingested"] - first["rows_valid"] == 3
    assert after["lines_done"] == before["lines_done"] - first["rows_total"]
    assert "lines 2-4 could not be written" in after["reason"]
    assert events(pg_conn, "chunk_lost")


def test_a_second_mechanism_x_works_beside_the_first(product_env, inbox, pg_conn):
    """Several X may share a database (each file is leased to one at a time: tests/test_failover.py): a second
    one started beside a running one neither waits for it nor ingests again what the first ingested."""
    write_csv(inbox / "tx.csv", rows(3))
    env = dict(product_env, PROCESSING_INTERVAL="0.2", LOG_FORMAT="text")
    cmd = [sys.executable, "-m", "src.mechanism_x.data_ingestion"]
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not query(pg_conn, "SELECT 1 FROM pg_tables WHERE tablename = 'chunks'") or not query(
            pg_conn, "SELECT 1 FROM source_files WHERE status = 'done'"
        ):
            assert first.poll() is None and time.monotonic() < deadline, "the first X did not get going"
            time.sleep(0.2)
        second = subprocess.run([*cmd, "--drain"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        assert first.poll() is None, "the first X is still running beside it"
    finally:
        first.terminate()
        first.wait(60)
    assert "holds the lock" not in second.stdout + second.stderr
    assert query(pg_conn, "SELECT chunk_seq, status FROM chunks") == [(0, "written")], "the file once, by the first"
