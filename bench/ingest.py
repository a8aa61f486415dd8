"""Mechanism X's ingest speed on the sample, against pyarrow alone reading and writing the same file.

    python bench/ingest.py [--rows 594643] [--seed S] [--batch-size 10000]

The sample is generated once into bench/out/sample-<rows>-<seed>/ (in a child process, so its
memory does not count here) and reused. Mechanism X runs in this process with
CHUNK_INTERVAL_SECONDS=0 against an embedded PostgreSQL (pgserver) and a local lake, both in a
temporary directory. What is timed: `Ingestor.poll_once()` for the poll that finds
transactions.csv, from its start until the file is `done` in the ledger (listing and md5 of the
file, validation, chunking, Parquet writes, ledger commits, processing_log.json). The database
start, the schema and the CustomerImportance file are handled before the clock starts. The
ledger's own view (source_files.first_seen -> finished_at) is printed beside it.

"pyarrow alone" reads the same CSV with pyarrow.csv and explicit column types, strips the single
quotes from the text columns and writes one snappy Parquet file per BATCH_SIZE rows: the least
any ingest producing the same objects has to do, without validation, lineage or ledger.

"floors" (same run) are what any ingest pays here whatever its code: a Python process's start with
pyarrow and psycopg2, and the PostgreSQL server's wall and CPU seconds to COPY each file's rows into
a fresh table shaped like the product's (rolled back). They bound what the drain ratio can reach.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from src.sample_data import DEFAULT_ROWS, DEFAULT_SEED  # noqa: E402
from src.schemas.transaction_schemas import (  # noqa: E402
    AMOUNT_PRECISION,
    AMOUNT_SCALE,
    TRANSACTION_HEADER,
    TRANSACTION_TEXT_COLUMNS,
)

OUT = ROOT / "bench" / "out"
TRANSACTIONS = "transactions.csv"
IMPORTANCE = "CustomerImportance.csv"
# Targets of issue 2.
TARGET_ROWS_PER_S = 500_000
TARGET_RATIO = 1 / 3
# Targets of issue 12: X against pyarrow measured in the same run.
T12_DRAIN_RATIO = 0.5  # whole-process drain (both files) vs pyarrow reading and writing both files
T12_POLL_RATIO = 0.67  # Ingestor.poll_once() on transactions.csv vs pyarrow on that file


def sample_dir(rows: int, seed: int) -> Path:
    """The generated sample for (rows, seed), made once with `python -m src.sample_data` and reused."""
    out = OUT / f"sample-{rows}-{seed}"
    if (out / TRANSACTIONS).is_file() and (out / IMPORTANCE).is_file():
        return out
    print(f"generating the {rows:,}-row sample (seed {seed}) into {out} ...", flush=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "src.sample_data", "--rows", str(rows), "--seed", str(seed), "--out", str(out)],
        cwd=ROOT,
        check=True,
    )
    print(f"  generated in {time.perf_counter() - started:.1f} s", flush=True)
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _x_env(work: Path, batch_size: int) -> dict[str, str]:
    return {
        "LOCAL_INBOX_DIR": str(work / "inbox"),
        "LOCAL_LAKE_DIR": str(work / "lake"),
        "DATA_DIR": str(work / "data"),
        "CHUNK_INTERVAL_SECONDS": "0",
        "BATCH_SIZE": str(batch_size),
        "S3_BUCKET_NAME": "",
        "POSTGRES_HOST": "",
        "GDRIVE_FOLDER_ID": "",
        "LOG_LEVEL": "WARNING",
    }


def bench_drain(sample: Path, work: Path, batch_size: int) -> tuple[dict, str]:
    """`python -m src.mechanism_x.data_ingestion --drain` on both files, from process launch to exit.

    The embedded PostgreSQL is started first, untimed, and handed over through TP_DATABASE_URL, as the
    supervisor does; the schema, the importance load and the chunking are all inside the process's time.
    """
    from config.config import Settings
    from src.utils.db import DSN_ENV, start_embedded

    (work / "inbox").mkdir(parents=True)
    for name in (IMPORTANCE, TRANSACTIONS):
        shutil.copy2(sample / name, work / "inbox" / name)
    xenv = _x_env(work, batch_size)
    settings = Settings.from_env(xenv, dotenv=Path("/nonexistent"))
    dsn = start_embedded(settings)
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "JAVA_HOME", "PYTHONPATH", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep} | xenv | {DSN_ENV: dsn}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "src.mechanism_x.data_ingestion", "--drain"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the drain exited {done.returncode}: {done.stderr[-800:]}")
    return {"seconds": elapsed}, dsn


def _seconds_to_exit(code: str) -> float:
    """Wall seconds from launching `python -c code` (in the project's root) to its exit."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - started


def _timed_copy(dsn: str, setup: list[str], copy: str, payload: bytes, after: list[str]) -> dict:
    """Wall and server-backend CPU seconds of `setup`, a COPY of `payload` and `after` in one transaction, rolled
    back (nothing is left in the database)."""
    import io

    import psutil
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            backend = psutil.Process(cur.fetchone()[0])
            cpu0 = sum(backend.cpu_times()[:2])
            started = time.perf_counter()
            for statement in setup:
                cur.execute(statement)
            cur.copy_expert(copy, io.BytesIO(payload), size=1 << 20)
            for statement in after:
                cur.execute(statement)
            elapsed = time.perf_counter() - started
            cpu = sum(backend.cpu_times()[:2]) - cpu0
        conn.rollback()
    finally:
        conn.close()
    return {"seconds": elapsed, "cpu": cpu}


def bench_floors(sample: Path, dsn: str) -> dict:
    """What any ingest has to pay on this machine, whatever its code: a Python process's start with the two
    libraries it cannot do without, and PostgreSQL's own work to take both files' rows (the importance rows, which
    SPEC 2 has X load before any chunk is evaluated; the transaction rows, which must reach `transactions`,
    whichever process loads them). The rows' CSV is prepared by pyarrow beforehand, untimed; each COPY goes into
    a fresh table shaped like the product's (`LIKE ... INCLUDING ALL`) in a transaction that is rolled back."""
    floors = {
        "start": _seconds_to_exit("import pyarrow.parquet, psycopg2"),
        "x_imports": _seconds_to_exit("import src.mechanism_x.data_ingestion"),
    }
    imp = pacsv.read_csv(
        sample / IMPORTANCE, convert_options=pacsv.ConvertOptions(column_types={"Weight": pa.string()})
    )
    for name in ("Source", "Target", "typeTrans"):
        i = imp.schema.get_field_index(name)
        imp = imp.set_column(i, name, pc.utf8_trim(imp.column(name), characters="'"))
    floors["importance_rows"] = imp.num_rows
    floors["importance"] = _timed_copy(
        dsn,
        ["CREATE TABLE floor_importance (LIKE customer_importance INCLUDING DEFAULTS)"],
        "COPY floor_importance (source, target, weight, type_trans, fraud) FROM STDIN WITH (FORMAT csv, FREEZE)",
        _csv_bytes(imp),
        ["SET LOCAL maintenance_work_mem = '256MB'", "CREATE INDEX ON floor_importance (source, target)"],
    )
    types = {name: pa.string() for name in TRANSACTION_TEXT_COLUMNS} | {"amount": pa.string()}
    tx = pacsv.read_csv(
        sample / TRANSACTIONS,
        read_options=pacsv.ReadOptions(column_names=list(TRANSACTION_HEADER), skip_rows=1),
        convert_options=pacsv.ConvertOptions(column_types=types),
    )
    for name in TRANSACTION_TEXT_COLUMNS:
        i = tx.schema.get_field_index(name)
        tx = tx.set_column(i, name, pc.utf8_trim(tx.column(name), characters="'"))
    n = tx.num_rows
    lineage = pa.table(
        {
            "source_file_id": pa.array(["floor"] * n),
            "source_line": pa.array(range(2, n + 2), pa.int64()),
            "chunk_seq": pa.array([i // 10_000 for i in range(n)], pa.int32()),
        }
    )
    for name in lineage.column_names[::-1]:
        tx = tx.add_column(0, name, lineage.column(name))
    columns = "source_file_id, source_line, chunk_seq, step, customer, age, gender, zipcode_ori, merchant, "
    columns += "zip_merchant, category, amount, fraud"
    floors["transactions_rows"] = n
    floors["transactions"] = _timed_copy(
        dsn,
        ["CREATE TABLE floor_transactions (LIKE transactions INCLUDING ALL)"],
        f"COPY floor_transactions ({columns}) FROM STDIN WITH (FORMAT csv)",
        _csv_bytes(tx),
        [],
    )
    return floors


def _csv_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, write_options=pacsv.WriteOptions(include_header=False))
    return sink.getvalue().to_pybytes()


def bench_mechanism_x(sample: Path, work: Path, batch_size: int) -> dict:
    from config.config import Settings
    from src.mechanism_x.data_ingestion import Ingestor
    from src.resources import open_lake, open_source
    from src.utils.db import DSN_ENV, Database, start_embedded

    inbox = work / "inbox"
    inbox.mkdir(parents=True)
    env = _x_env(work, batch_size)
    settings = Settings.from_env(env, dotenv=Path("/nonexistent"))
    os.environ[DSN_ENV] = start_embedded(settings)
    db = Database(settings)
    db.apply_schema()
    store = open_lake(settings)
    source = open_source(settings, db)
    ingestor = Ingestor(settings, db, store, source, threading.Event())
    try:
        # Reference data first, untimed: chunks of the timed file are then the only work.
        shutil.copy2(sample / IMPORTANCE, inbox / IMPORTANCE)
        ingestor.poll_once()
        shutil.copy2(sample / TRANSACTIONS, inbox / TRANSACTIONS)
        started = time.perf_counter()
        ingestor.poll_once()
        elapsed = time.perf_counter() - started
        (status, rows, quarantined, chunks, ledger_s) = db.query(
            "SELECT status, rows_ingested, rows_quarantined, chunks, "
            "EXTRACT(EPOCH FROM finished_at - first_seen)::float8 FROM source_files WHERE name = %s",
            (TRANSACTIONS,),
        )[0]
        objects = sum(1 for _ in store.list_keys("raw-transactions/year="))
    finally:
        source.close()
        db.close()
    return {
        "status": status,
        "rows": rows + quarantined,
        "rows_ingested": rows,
        "rows_quarantined": quarantined,
        "chunks": chunks,
        "objects": objects,
        "seconds": elapsed,
        "ledger_seconds": ledger_s,
    }


def bench_pyarrow(csv_path: Path, out: Path, batch_size: int) -> dict:
    out.mkdir(parents=True)
    types = {name: pa.string() for name in TRANSACTION_TEXT_COLUMNS}
    types.update({"step": pa.int32(), "amount": pa.decimal128(AMOUNT_PRECISION, AMOUNT_SCALE), "fraud": pa.int8()})
    started = time.perf_counter()
    table = pacsv.read_csv(
        csv_path,
        read_options=pacsv.ReadOptions(column_names=list(TRANSACTION_HEADER), skip_rows=1),
        convert_options=pacsv.ConvertOptions(column_types=types),
    )
    for name in TRANSACTION_TEXT_COLUMNS:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pc.utf8_trim(table.column(name), characters="'"))
    files = 0
    for offset in range(0, table.num_rows, batch_size):
        pq.write_table(table.slice(offset, batch_size), out / f"part-{files:06d}.parquet", compression="snappy")
        files += 1
    elapsed = time.perf_counter() - started
    return {"rows": table.num_rows, "files": files, "seconds": elapsed}


def bench_pyarrow_importance(csv_path: Path, out: Path) -> dict:
    """The importance file the same way: typed read, quotes stripped, one Parquet file (X loads it into PostgreSQL)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    types = {"Source": pa.string(), "Target": pa.string(), "Weight": pa.decimal128(18, 2), "typeTrans": pa.string()}
    table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(column_types=types | {"fraud": pa.int8()}))
    for name in ("Source", "Target", "typeTrans"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pc.utf8_trim(table.column(name), characters="'"))
    pq.write_table(table, out / "importance.parquet", compression="snappy")
    return {"rows": table.num_rows, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/ingest.py",
        description="Rows/s of Mechanism X (CHUNK_INTERVAL_SECONDS=0) on the sample, against pyarrow alone.",
    )
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="sample size (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sample seed (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=10_000, help="rows per chunk (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary lake and database")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    sample = sample_dir(args.rows, args.seed)
    size_mb = (sample / TRANSACTIONS).stat().st_size / 1e6
    work = Path(tempfile.mkdtemp(prefix="tp-bench-ingest-"))
    if not args.keep:
        # Removed at exit, after pgserver has stopped the embedded servers (exit handlers run last-registered
        # first): removed before, their data directories are gone and the servers are left running.
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    rss_start = peak_rss_mib()
    try:
        drain, drain_dsn = bench_drain(sample, work / "drain", args.batch_size)
        floors = bench_floors(sample, drain_dsn)
        x = bench_mechanism_x(sample, work / "x", args.batch_size)
        rss_x = peak_rss_mib()
        arrow = bench_pyarrow(sample / TRANSACTIONS, work / "pyarrow", args.batch_size)
        arrow_imp = bench_pyarrow_importance(sample / IMPORTANCE, work / "pyarrow")
        rss_all = peak_rss_mib()
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            from src.utils.db import DSN_ENV

            os.environ.pop(DSN_ENV, None)

    x_rate = x["rows"] / x["seconds"]
    arrow_rate = arrow["rows"] / arrow["seconds"]
    ratio = x_rate / arrow_rate
    ok_rate = "meets" if x_rate >= TARGET_ROWS_PER_S else "MISSES"
    ok_ratio = "meets" if ratio >= TARGET_RATIO else "MISSES"
    lines = [
        f"sample          {sample / TRANSACTIONS}: {args.rows:,} rows, {size_mb:.1f} MB, batch {args.batch_size:,}",
        "Mechanism X     timed: Ingestor.poll_once() on transactions.csv, start -> file 'done' in the ledger",
        "                (embedded PostgreSQL, local lake, CHUNK_INTERVAL_SECONDS=0, one process)",
        f"  status        {x['status']}: {x['rows_ingested']:,} rows ingested, {x['rows_quarantined']:,} quarantined, "
        f"{x['chunks']} chunks, {x['objects']} objects",
        f"  wall time     {x['seconds']:.2f} s (ledger first_seen -> finished_at: {x['ledger_seconds']:.2f} s)",
        f"  throughput    {x_rate:,.0f} rows/s  (target >= {TARGET_ROWS_PER_S:,}: {ok_rate})",
        "pyarrow alone   pyarrow.csv typed read + quote strip + one Parquet file per batch",
        f"  wall time     {arrow['seconds']:.2f} s for {arrow['rows']:,} rows in {arrow['files']} files",
        f"  throughput    {arrow_rate:,.0f} rows/s",
        f"X / pyarrow     {ratio:.2f}  (target >= {TARGET_RATIO:.2f}: {ok_ratio})",
        f"peak RSS        {rss_start:,.0f} MiB after imports, {rss_x:,.0f} MiB after Mechanism X, "
        f"{rss_all:,.0f} MiB after pyarrow (this process; PostgreSQL not included)",
    ]
    both = arrow["seconds"] + arrow_imp["seconds"]
    drain_ratio, poll_ratio = both / drain["seconds"], ratio
    lines += [
        "issue 12        X against pyarrow in this run (time ratios: pyarrow's time / X's time)",
        f"  drain         python -m src.mechanism_x.data_ingestion --drain, both files, launch -> exit: "
        f"{drain['seconds']:.2f} s",
        f"  pyarrow both  {both:.2f} s (transactions {arrow['seconds']:.2f} s + importance {arrow_imp['seconds']:.2f} s,"
        f" {arrow_imp['rows']:,} rows)",
        f"  drain ratio   {drain_ratio:.2f}  (target >= {T12_DRAIN_RATIO}: {'PASS' if drain_ratio >= T12_DRAIN_RATIO else 'FAIL'})",
        f"  poll_once     {poll_ratio:.2f} of pyarrow on transactions.csv  "
        f"(target >= {T12_POLL_RATIO}: {'PASS' if poll_ratio >= T12_POLL_RATIO else 'FAIL'})",
    ]
    imp, tx = floors["importance"], floors["transactions"]
    cores = os.cpu_count() or 1
    bound = both / (floors["start"] + imp["cpu"] / cores)
    lines += [
        "floors          what any ingest pays on this machine in this run, whatever its code:",
        f"  start         python launch -> import pyarrow.parquet, psycopg2 -> exit: {floors['start']:.2f} s "
        f"(X's own imports: {floors['x_imports']:.2f} s)",
        f"  importance    PostgreSQL COPY FREEZE of its {floors['importance_rows']:,} rows into a fresh table like "
        f"customer_importance, index built after: {imp['seconds']:.2f} s (server CPU {imp['cpu']:.2f} s)",
        f"  transactions  PostgreSQL COPY of its {floors['transactions_rows']:,} rows into a fresh table like "
        f"transactions (key and 2 indexes): {tx['seconds']:.2f} s (server CPU {tx['cpu']:.2f} s)",
        f"  drain bound   pyarrow both / (start + importance COPY's server CPU spread over {cores} cores) = "
        f"{bound:.2f}: the best drain ratio of a process that loads the importance file and does nothing else",
    ]
    print("\n".join(["", "== bench/ingest.py " + "=" * 60, *lines, "=" * 79]))
    return 0 if x["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
