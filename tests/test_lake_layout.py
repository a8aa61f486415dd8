"""The raw lake as a reader sees it: Mechanism X's real output read at its root by Spark, pyarrow and DuckDB.

The contract says `raw-transactions/` is one Hive-partitioned Parquet dataset for standard readers, with the
processing log under `_log/` where readers skip it. Mechanism X runs for real on a generated sample with bad
rows mixed in; what each reader returns is compared with what this test reads from the CSV it wrote.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import duckdb
import psycopg2
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from config.config import Settings
from src.mechanism_x.data_ingestion import run_worker
from tests.conftest import run_env

ROOT = Path(__file__).resolve().parent.parent
CSV_COLUMNS = (
    "step",
    "customer",
    "age",
    "gender",
    "zipcodeOri",
    "merchant",
    "zipMerchant",
    "category",
    "amount",
    "fraud",
)
LINEAGE = ("source_file_id", "chunk_seq", "source_line")
PARTITIONS = ("year", "month", "day")
TEXT_COLUMNS = ("customer", "age", "gender", "zipcodeOri", "merchant", "zipMerchant", "category", "source_file_id")
ROWS, BATCH = 2500, 1000

# Inserted after these data-line positions of the generated file; each breaks one rule of SPEC §2.
BAD_ROWS = {
    10: "3,'C1','2','M','28007','M9','28007','es_food',12.50",  # 9 fields
    700: "x,'C1','2','M','28007','M9','28007','es_food',12.50,0",  # step not a number
    1400: "3,'C1','2','M','28007','M9','28007','es_food',-4.00,0",  # negative amount
    1401: "3,'C1','2','Q','28007','M9','28007','es_food',4.00,0",  # unknown gender
    2200: "3,'','2','F','28007','M9','28007','es_food',4.00,0",  # empty customer
}
_STEP = re.compile(r"^[0-9]+$")
_AMOUNT = re.compile(r"^[0-9]+(\.[0-9]{1,2})?$")


def _judge(line: str) -> dict | None:
    """This test's own reading of a data line: the typed row, or None when SPEC §2 says quarantine."""
    fields = [f.strip().strip("'") for f in line.split(",")]
    if len(fields) != len(CSV_COLUMNS):
        return None
    row = dict(zip(CSV_COLUMNS, fields, strict=True))
    ok = (
        _STEP.match(row["step"])
        and _AMOUNT.match(row["amount"])
        and row["gender"] in {"M", "F", "E", "U"}
        and row["customer"]
        and row["merchant"]
        and row["fraud"] in {"0", "1"}
    )
    if not ok:
        return None
    return {**row, "step": int(row["step"]), "amount": Decimal(row["amount"]), "fraud": int(row["fraud"])}


def _write_inbox(inbox: Path) -> tuple[dict[int, dict], set[int], dict[int, int]]:
    """Generate a sample with the product's CLI and mix in the bad rows.

    Returns the valid rows by line number, the bad line numbers, and each line's chunk (every BATCH data lines,
    good or bad, make one chunk, in file order).
    """
    subprocess.run(
        [sys.executable, "-m", "src.sample_data", "--rows", str(ROWS), "--seed", "11", "--out", str(inbox)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    path = inbox / "transactions.csv"
    header, *data = path.read_text().splitlines()
    lines = [header]
    for i, line in enumerate(data):
        lines.append(line)
        if i in BAD_ROWS:
            lines.append(BAD_ROWS[i])
    path.write_text("\n".join(lines) + "\n")
    valid, bad, chunk_of = {}, set(), {}
    for position, line in enumerate(lines[1:]):
        line_no = position + 2
        chunk_of[line_no] = position // BATCH
        judged = _judge(line)
        if judged is None:
            bad.add(line_no)
        else:
            valid[line_no] = judged
    return valid, bad, chunk_of


@pytest.fixture(scope="module")
def lake_run(tmp_path_factory, pg_server):
    """One real Mechanism X drain into a local lake, shared by the reader tests below."""
    root = tmp_path_factory.mktemp("lake-layout")
    db = "t_layout_" + hashlib.sha256(str(root).encode()).hexdigest()[:8]
    _create_db(pg_server, db)
    (root / "inbox").mkdir()
    valid, bad, chunk_of = _write_inbox(root / "inbox")
    env = run_env(pg_server, db, root) | {"BATCH_SIZE": str(BATCH)}
    before = datetime.now(timezone.utc).date()
    assert run_worker(Settings.from_env(env, dotenv=Path("/nonexistent")), drain=True) == 0
    after = datetime.now(timezone.utc).date()
    file_id = "local-" + hashlib.sha256(b"transactions.csv").hexdigest()[:16]
    yield {
        "root": root / "lake" / "raw-transactions",
        "valid": valid,
        "bad": bad,
        "chunk_of": chunk_of,
        "file_id": file_id,
        "dates": {(d.year, d.month, d.day) for d in (before, after)},
    }
    _drop_db(pg_server, db)


def _admin(pg_server, sql: str) -> None:
    conn = psycopg2.connect(pg_server.admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _create_db(pg_server, name: str) -> None:
    _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(pg_server, f'CREATE DATABASE "{name}"')


def _drop_db(pg_server, name: str) -> None:
    _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _check_rows(rows: list[dict], run: dict, reader: str) -> None:
    """Rows a reader returned against the test's own reading of the CSV: same lines, same values, same lineage."""
    assert len(rows) == len(run["valid"]), f"{reader}: {len(rows)} rows, the CSV has {len(run['valid'])} valid ones"
    got = {(r["source_file_id"], r["source_line"]) for r in rows}
    assert got == {(run["file_id"], line) for line in run["valid"]}, f"{reader}: lineage differs from the CSV"
    assert not got & {(run["file_id"], line) for line in run["bad"]}
    for r in rows:
        want = run["valid"][r["source_line"]]
        assert {c: r[c] for c in CSV_COLUMNS} == want, f"{reader}: line {r['source_line']} differs"
        assert r["chunk_seq"] == run["chunk_of"][r["source_line"]], f"{reader}: line {r['source_line']} chunk"
        date = tuple(int(r[p]) for p in PARTITIONS)
        assert date in run["dates"], f"{reader}: partition {date} is not the UTC ingestion date {run['dates']}"


def test_the_raw_folder_holds_only_parquet_in_partitions_and_the_log_under_an_underscore(lake_run):
    root: Path = lake_run["root"]
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    log = [f for f in files if f.startswith("_")]
    data = [f for f in files if not f.startswith("_")]
    assert log == ["_log/processing_log.json"]
    assert '"rows_quarantined": 5' in (root / log[0]).read_text()
    pattern = re.compile(rf"^year=\d{{4}}/month=\d{{2}}/day=\d{{2}}/{lake_run['file_id']}-\d{{6}}\.parquet$")
    assert data and all(pattern.match(f) for f in data), data
    assert not (root / "_metadata").exists()


def test_spark_reads_the_root_as_one_dataset(lake_run, spark):
    from pyspark.sql import types as T

    df = spark.read.parquet(str(lake_run["root"]))
    fields = {f.name: f.dataType for f in df.schema.fields}
    assert set(fields) == {*CSV_COLUMNS, *LINEAGE, *PARTITIONS}
    for name in ("step", "fraud", "chunk_seq", "source_line"):
        assert isinstance(fields[name], T.IntegralType), f"{name} is {fields[name]}"
    # The product's session turns partition type inference off (partition values stay text); a default one infers ints.
    assert all(isinstance(fields[p], (T.IntegralType, T.StringType)) for p in PARTITIONS)
    assert isinstance(fields["amount"], (T.DecimalType, T.DoubleType))
    assert all(isinstance(fields[c], T.StringType) for c in TEXT_COLUMNS)
    _check_rows([r.asDict() for r in df.collect()], lake_run, "Spark")


def test_pyarrow_reads_the_root_as_one_dataset(lake_run):
    table = ds.dataset(str(lake_run["root"]), format="parquet", partitioning="hive").to_table()
    schema = table.schema
    assert set(schema.names) == {*CSV_COLUMNS, *LINEAGE, *PARTITIONS}
    for name in ("step", "fraud", "chunk_seq", "source_line", *PARTITIONS):
        assert pa.types.is_integer(schema.field(name).type), f"{name} is {schema.field(name).type}"
    assert pa.types.is_decimal(schema.field("amount").type) or pa.types.is_floating(schema.field("amount").type)
    assert all(pa.types.is_string(schema.field(c).type) for c in TEXT_COLUMNS)
    _check_rows(table.to_pylist(), lake_run, "pyarrow")


def test_duckdb_reads_the_root_as_one_dataset(lake_run):
    glob = str(lake_run["root"]) + "/**/*.parquet"
    with duckdb.connect() as con:
        rel = con.sql("SELECT * FROM read_parquet('" + glob.replace("'", "''") + "', hive_partitioning = true)")
        types = dict(zip(rel.columns, (str(t) for t in rel.types), strict=True))
        rows = [dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()]
    assert set(types) == {*CSV_COLUMNS, *LINEAGE, *PARTITIONS}
    integers = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT"}
    for name in ("step", "fraud", "chunk_seq", "source_line"):
        assert types[name] in integers, f"{name} is {types[name]}"
    # DuckDB keeps a zero-padded value such as day=02 as text rather than guess; the values are checked below.
    assert all(types[p] in integers | {"VARCHAR"} for p in PARTITIONS), types
    assert types["amount"].startswith("DECIMAL") or types["amount"] == "DOUBLE"
    assert all(types[c] == "VARCHAR" for c in TEXT_COLUMNS)
    _check_rows(rows, lake_run, "DuckDB")
