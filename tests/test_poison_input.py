"""Poison input (issue 9 item 4): Mechanism X as a process, a real PostgreSQL, real files.

Each poison row is built here with the problem the test knows it has; the test numbers the lines
itself (split on LF) and checks that X quarantined exactly those lines with a reason naming the
problem, that PostgreSQL took every quarantine row (no NUL, valid UTF-8, capped text), that the
rest of the file and a later file were ingested, and that the quality report counts it all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADER = b"step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud"
IMPORTANCE_HEADER = b"Source,Target,Weight,typeTrans,fraud"
MIB = 1 << 20
DEFAULT_MAX_LINE = MIB  # MAX_LINE_BYTES's default


def tx(
    step: bytes = b"1",
    customer: bytes = b"C1",
    zip_ori: bytes = b"28007",
    zip_m: bytes = b"28007",
    category: bytes = b"es_food",
    amount: bytes = b"10.50",
) -> bytes:
    return b"%s,'%s','3','F','%s','M1','%s','%s',%s,0" % (step, customer, zip_ori, zip_m, category, amount)


def imp(source: bytes = b"C1", weight: bytes = b"1.50") -> bytes:
    return b"'%s','M1',%s,'es_food',0" % (source, weight)


BIG = 5 * MIB

# (line, None for a good row | words its quarantine reason must contain)
POISON_TX: list[tuple[bytes, list[str] | None]] = [
    (tx(step=b"1", customer=b"C_GOOD1"), None),
    (tx(customer=b"C\x00NUL"), ["NUL", "customer"]),
    (tx(amount=b"1\x000.50"), ["NUL", "amount"]),
    (tx(zip_m=b"28\x0007"), ["NUL", "zipMerchant"]),  # a column no other check looks at
    (
        tx(customer=b"C_" + b"x" * BIG),
        ["line longer than 1048576 bytes", f"({len(tx(customer=b'C_' + b'x' * BIG))} bytes)"],
    ),
    (tx(step=b"2", customer=b"C_GOOD2"), None),
    (tx(category=b"es_\x07bell"), ["BEL", "category"]),
    (tx(category=b"es_\x1bescape"), ["ESC", "category"]),
    (tx(zip_ori=b"280\x7f07"), ["DEL", "zipcodeOri"]),
    (tx(category=b"es_\rfood"), ["CR", "category"]),  # a CR that is not part of a CRLF line break
    (tx(customer=b"M\xfcller"), ["not UTF-8", "0xFC"]),  # Latin-1 inside a UTF-8 file
    (tx(customer=b"C\xe2\x82"), ["not UTF-8"]),  # a multi-byte character cut short
    (b"", None),  # blank: no row
    (tx(step=b"3", customer=b"C_TAB", category=b"es\tfood"), None),  # TAB inside a value is allowed
    (tx(step=b"4", customer=b"C_GOOD\xc3\xa9"), None),  # real UTF-8 passes
    (tx(step=b"5", customer=b"C_LAST"), None),  # the last line, without a line break
]

POISON_IMPORTANCE: list[tuple[bytes, list[str] | None]] = [
    (imp(b"C1"), None),
    (imp(b"C\x00X"), ["NUL", "Source"]),
    (imp(weight=b"2\xff"), ["not UTF-8", "0xFF"]),
    (imp(b"C2", b"0.25"), None),
]


def build(header: bytes, lines: list[tuple[bytes, list[str] | None]], *, final_newline: bool) -> bytes:
    return b"\n".join([header, *(line for line, _ in lines)]) + (b"\n" if final_newline else b"")


def expectations(data: bytes, lines: list[tuple[bytes, list[str] | None]]):
    """Line numbers from the test's own split of the bytes: {line_no: words} for bad ones, [line_no] good."""
    split = data.split(b"\n")
    bad, good = {}, []
    for line, words in lines:
        line_no = split.index(line) + 1
        if words is not None:
            bad[line_no] = words
        elif line:
            good.append(line_no)
    return bad, good


def run_x(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "src.mechanism_x.data_ingestion", "--drain"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows(conn, sql: str, params: tuple = ()) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def file_id(conn, name: str) -> str:
    return rows(conn, "SELECT file_id FROM source_files WHERE name = %s", (name,))[0][0]


def lake_table(lake: Path, prefix: str) -> pa.Table:
    files = sorted((lake / prefix).rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


@pytest.fixture
def inbox(base_env) -> Path:
    return Path(base_env["LOCAL_INBOX_DIR"])


@pytest.fixture
def lake(base_env) -> Path:
    return Path(base_env["LOCAL_LAKE_DIR"])


def test_poison_rows_are_quarantined_and_everything_else_goes_on(product_env, inbox, lake, pg_conn):
    tx_data = build(HEADER, POISON_TX, final_newline=False)
    (inbox / "a_poison.csv").write_bytes(tx_data)
    imp_data = build(IMPORTANCE_HEADER, POISON_IMPORTANCE, final_newline=True)
    (inbox / "CustomerImportance.csv").write_bytes(imp_data)
    (inbox / "c_latin1_header.csv").write_bytes(b"step,customer,\xe2ge\n" + tx())  # not UTF-8 in the header
    env = dict(product_env, BATCH_SIZE="3")

    first = run_x(env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr

    # --- the transactions file: done, every poison line quarantined with its reason
    bad, good = expectations(tx_data, POISON_TX)
    fid = file_id(pg_conn, "a_poison.csv")
    status, ingested, quarantined = rows(
        pg_conn, "SELECT status, rows_ingested, rows_quarantined FROM source_files WHERE file_id = %s", (fid,)
    )[0]
    assert (status, ingested, quarantined) == ("done", len(good), len(bad))
    q = rows(
        pg_conn,
        "SELECT line_no, reason, raw_line FROM quarantine WHERE file_id = %s AND stage = 'ingest' ORDER BY line_no",
        (fid,),
    )
    assert [r[0] for r in q] == sorted(bad)
    split = tx_data.split(b"\n")
    for line_no, reason, raw in q:
        for word in bad[line_no]:
            assert word in reason, (line_no, reason, word)
        assert "\x00" not in raw and len(raw) <= 4096 + 100, (line_no, len(raw))
        source = split[line_no - 1]
        if len(source) > DEFAULT_MAX_LINE:
            assert raw.startswith(source[:200].decode()) and f"{len(source)} bytes" in raw
        elif b"\xfc" in source:
            assert raw == source.decode("latin-1").replace("\xfc", "\\xfc")
        elif b"\x00" in source:
            assert raw == source.decode().replace("\x00", "\\x00")
    by_line = {line_no: reason for line_no, reason, _ in q}
    nul_amount = next(n for n, w in bad.items() if w == ["NUL", "amount"])
    assert by_line[nul_amount] == "control character NUL (0x00) in column amount"

    # the same rows in the lake's quarantine, and the good rows (the unterminated last one too) in chunks
    lake_q = lake_table(lake, f"quarantine/stage=ingest/file_id={fid}")
    assert sorted(lake_q.column("source_line").to_pylist()) == sorted(bad)
    chunks = lake_table(lake, "raw-transactions").to_pylist()
    assert sorted(r["source_line"] for r in chunks) == good
    got = {r["source_line"]: r for r in chunks}
    last, tab = good[-1], split.index(tx(step=b"3", customer=b"C_TAB", category=b"es\tfood")) + 1
    assert (got[last]["customer"], got[last]["step"], got[last]["amount"]) == ("C_LAST", 5, Decimal("10.50"))
    assert got[tab]["category"] == "es\tfood"
    assert "C_GOODé" in {r["customer"] for r in chunks}

    # --- the importance file: loaded without its poison rows
    ifid = file_id(pg_conn, "CustomerImportance.csv")
    ibad, igood = expectations(imp_data, POISON_IMPORTANCE)
    assert sorted(rows(pg_conn, "SELECT source, weight FROM customer_importance")) == [
        ("C1", Decimal("1.50")),
        ("C2", Decimal("0.25")),
    ]
    iq = rows(pg_conn, "SELECT line_no, reason FROM quarantine WHERE file_id = %s ORDER BY line_no", (ifid,))
    assert [n for n, _ in iq] == sorted(ibad)
    for line_no, reason in iq:
        assert all(word in reason for word in ibad[line_no]), (line_no, reason)
    assert len(igood) == rows(pg_conn, "SELECT rows_loaded FROM importance_state")[0][0]

    # --- a header that is not UTF-8 still fails the whole file, with a reason
    failed = rows(pg_conn, "SELECT name, status, reason FROM source_files WHERE name = 'c_latin1_header.csv'")
    assert failed[0][1] == "failed" and "UTF-8" in failed[0][2]

    # --- the quality report in the lake counts every reject
    report = json.loads((lake / "pattern-detections/validation/quality_reports.json").read_text())
    ingest = report["stages"]["ingest"]
    assert ingest["rows_rejected"] == len(bad) + len(ibad) == report["rows_rejected"]
    assert sum(ingest["rejected_by_reason"].values()) == len(bad) + len(ibad)
    assert ingest["rejected_by_reason"]["control character NUL (0x00) in column amount"] == 1
    assert ingest["files_failed"] == report["files_failed"] == 1
    assert [f["name"] for f in ingest["failed_files"]] == ["c_latin1_header.csv"]
    assert "UTF-8" in ingest["failed_files"][0]["reason"]
    assert {f["name"]: f["rows_rejected"] for f in ingest["files_with_rejected_rows"]} == {
        "a_poison.csv": len(bad),
        "CustomerImportance.csv": len(ibad),
    }

    # --- a later file is ingested: nothing is wedged, nothing is redone; a chunk holding the 5 MiB line
    # and left pending (as by a crash) is rebuilt from its byte range to the same object
    long_line = next(n for n in bad if len(split[n - 1]) > DEFAULT_MAX_LINE)
    seq, key = rows(
        pg_conn,
        "UPDATE chunks SET status = 'pending' WHERE file_id = %s AND %s BETWEEN first_line AND last_line "
        "RETURNING seq, object_key",
        (fid, long_line),
    )[0]
    original = (lake / key).read_bytes()
    (lake / key).unlink()
    later = [tx(step=b"%d" % i, customer=b"C_LATER%d" % i) for i in range(4)]
    (inbox / "d_later.csv").write_bytes(b"\n".join([HEADER, *later]) + b"\n")
    second = run_x(env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (lake / key).read_bytes() == original
    assert rows(pg_conn, "SELECT status FROM chunks WHERE seq = %s", (seq,)) == [("written",)]
    lfid = file_id(pg_conn, "d_later.csv")
    assert rows(pg_conn, "SELECT status, rows_ingested FROM source_files WHERE file_id = %s", (lfid,)) == [("done", 4)]
    assert rows(pg_conn, "SELECT count(*) FROM quarantine WHERE stage = 'ingest'") == [(len(bad) + len(ibad),)]
    chunks = lake_table(lake, "raw-transactions").to_pylist()
    assert sorted(r["customer"] for r in chunks if r["source_file_id"] == lfid) == [f"C_LATER{i}" for i in range(4)]
    assert rows(pg_conn, "SELECT count(*) FROM chunks WHERE status <> 'written'") == [(0,)]


def test_max_line_bytes_setting_is_honoured(product_env, inbox, lake, pg_conn):
    """X cuts lines at MAX_LINE_BYTES as set; the unterminated last line is a row."""
    lines = [tx(customer=b"C_SHORT"), tx(customer=b"C_" + b"y" * 3000), tx(customer=b"C_END")]
    data = b"\n".join([HEADER, *lines])  # no final line break
    (inbox / "tx.csv").write_bytes(data)
    run = run_x(dict(product_env, MAX_LINE_BYTES="2048"))
    assert run.returncode == 0, run.stderr[-3000:]
    q = rows(pg_conn, "SELECT line_no, reason FROM quarantine")
    assert q == [(3, f"line longer than 2048 bytes ({len(lines[1])} bytes)")]
    chunks = lake_table(lake, "raw-transactions").to_pylist()
    assert sorted((r["source_line"], r["customer"]) for r in chunks) == [(2, "C_SHORT"), (4, "C_END")]


def test_quality_report_keeps_the_top_reasons_and_sums_the_rest(make_settings, inbox, lake, pg_conn):
    from src.mechanism_x.data_ingestion import run_worker
    from src.quality_report import OTHER_REASONS, TOP_REASONS

    distinct = TOP_REASONS + 10
    lines = [tx(step=b"x%d" % i) for i in range(distinct)] + [tx(step=b"-1")] * 3 + [tx(customer=b"C_OK")]
    (inbox / "many.csv").write_bytes(b"\n".join([HEADER, *lines]) + b"\n")
    assert run_worker(make_settings(BATCH_SIZE="7"), drain=True) == 0

    report = json.loads((lake / "pattern-detections/validation/quality_reports.json").read_text())
    reasons = report["stages"]["ingest"]["rejected_by_reason"]
    assert report["rows_rejected"] == sum(reasons.values()) == distinct + 3
    assert reasons["step '-1' is not a non-negative integer"] == 3  # the most frequent comes first
    assert next(iter(reasons)) == "step '-1' is not a non-negative integer"
    assert len(reasons) == TOP_REASONS + 1 and reasons[OTHER_REASONS] == distinct + 1 - TOP_REASONS
    assert report["rejected_by_reason"] == reasons  # Y has rejected nothing: the totals are X's
    assert report["stages"]["detect"]["rows_rejected"] == 0


def test_quality_report_waits_for_another_writer_of_the_lake_reports(make_settings, lake, pg_conn):
    """X of either daemon and Y rewrite the report from the ledger: one at a time, under LAKE_REPORTS_LOCK, so
    an older view never lands over a newer one."""
    import threading

    from src.quality_report import LAKE_REPORTS_LOCK, write_quality_report
    from src.resources import open_lake
    from src.utils.db import Database

    settings = make_settings()
    db = Database(settings)
    db.apply_schema()
    report = lake / "pattern-detections/validation/quality_reports.json"
    pg_conn.autocommit = True
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (LAKE_REPORTS_LOCK,))
    writer = threading.Thread(target=write_quality_report, args=(db, open_lake(settings)), daemon=True)
    try:
        writer.start()
        writer.join(1.0)
        assert writer.is_alive() and not report.exists(), "the report was written while another writer held the lock"
    finally:
        with pg_conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (LAKE_REPORTS_LOCK,))
    writer.join(60)
    assert not writer.is_alive() and json.loads(report.read_text())["rows_rejected"] == 0
    with pg_conn.cursor() as cur:  # the writer let its lock go: another session takes it at once
        cur.execute("SELECT pg_try_advisory_lock(%s)", (LAKE_REPORTS_LOCK,))
        assert cur.fetchone()[0]
        cur.execute("SELECT pg_advisory_unlock(%s)", (LAKE_REPORTS_LOCK,))
    db.close()
