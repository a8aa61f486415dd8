"""The S3 lake measured: chunk objects written per second, and detection latency against the local lake.

    python -m bench.s3 [--objects 48] [--rows 10000] [--workers MAX_WORKERS] [--endpoint URL --bucket NAME]
                       [--latency-rows 100000] [--batch 10000] [--no-latency] [--json]

1. Writes: `S3ObjectStore` puts chunk-shaped Parquet (the chunk schema, BankSim-like values, ~300 KB
   for 10,000 rows), in parallel (MAX_WORKERS) and one by one; also the same-bytes re-put (a no-op).
2. Detection latency: `python main.py --drain` twice on the same generated sample, once with the
   local lake and once with S3_BUCKET_NAME on the server, each on its own embedded PostgreSQL. From
   each ledger: latency `processed_at - written_at` per chunk (X's write -> Y's detections committed;
   under --drain, X usually writes faster than Y reads, so this includes queueing) and Y's time per
   chunk with the queueing left out (from when the chunk was both written and next in line), which is
   where reading through `s3a://` instead of `file://` shows.

Without --endpoint it starts moto's S3 server on 127.0.0.1 (a free port) as a child process and
stops it at the end. The hadoop-aws jars are fetched once into TP_TEST_CACHE_DIR (default
~/.cache/transaction-processor), shared with the tests.
"""

from __future__ import annotations

import argparse
import decimal
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from config.config import Settings  # noqa: E402
from src.schemas.transaction_schemas import CHUNK_ARROW_SCHEMA  # noqa: E402
from src.utils.s3_utils import S3ObjectStore  # noqa: E402

CATEGORIES = [
    "es_transportation",
    "es_food",
    "es_health",
    "es_wellnessandbeauty",
    "es_fashion",
    "es_barsandrestaurants",
]


def make_chunk(file_id: str, seq: int, rows: int, rng: random.Random) -> bytes:
    """One chunk object as Mechanism X writes it: 10,000 rows of the chunk schema, snappy Parquet."""
    merchants = [f"M{rng.randrange(10**8, 10**9)}" for _ in range(50)]
    table = pa.table(
        {
            "step": pa.array([rng.randrange(180) for _ in range(rows)], pa.int32()),
            "customer": [f"C{rng.randrange(10**8, 10**10)}" for _ in range(rows)],
            "age": [str(rng.randrange(7)) for _ in range(rows)],
            "gender": [rng.choice("MFEU") for _ in range(rows)],
            "zipcodeOri": ["28007"] * rows,
            "merchant": [rng.choice(merchants) for _ in range(rows)],
            "zipMerchant": ["28007"] * rows,
            "category": [rng.choice(CATEGORIES) for _ in range(rows)],
            "amount": pa.array(
                [decimal.Decimal(rng.randrange(1, 500_000)) / 100 for _ in range(rows)], pa.decimal128(18, 2)
            ),
            "fraud": pa.array([int(rng.random() < 0.012) for _ in range(rows)], pa.int8()),
            "source_file_id": [file_id] * rows,
            "chunk_seq": pa.array([seq] * rows, pa.int32()),
            "source_line": pa.array(range(seq * rows + 2, (seq + 1) * rows + 2), pa.int64()),
        },
        schema=CHUNK_ARROW_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    return buf.getvalue()


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server in its own process (in-process it would share our GIL), on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_store(endpoint: str, bucket: str, workers: int, create: bool) -> S3ObjectStore:
    env = {
        "S3_BUCKET_NAME": bucket,
        "S3_ENDPOINT_URL": endpoint,
        "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"),
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "AKIABENCH"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "bench-secret"),
        "MAX_WORKERS": str(workers),
        "DATA_DIR": tempfile.mkdtemp(prefix="tp-bench-"),
    }
    store = S3ObjectStore(Settings.from_env(env, dotenv=Path("/nonexistent")))
    if create:
        store._client.create_bucket(Bucket=bucket)
    return store


def measure(store: S3ObjectStore, chunks: list[bytes], *, parallel: bool, tag: str) -> dict[str, float]:
    keys = [f"raw-transactions/year=2026/month=11/day=26/bench-{tag}-{i:06d}.parquet" for i in range(len(chunks))]
    items = list(zip(keys, chunks, strict=True))
    start = time.perf_counter()
    if parallel:
        written = store.put_many(items)
    else:
        written = [store.put_bytes(k, d) for k, d in items]
    seconds = time.perf_counter() - start
    assert all(written), "bench keys must be new"
    start = time.perf_counter()
    again = store.put_many(items) if parallel else [store.put_bytes(k, d) for k, d in items]
    noop_seconds = time.perf_counter() - start
    assert not any(again)
    total = sum(len(c) for c in chunks)
    return {
        "objects": len(chunks),
        "seconds": round(seconds, 3),
        "objects_per_s": round(len(chunks) / seconds, 1),
        "mb_per_s": round(total / seconds / 1e6, 1),
        "noop_reputs_per_s": round(len(chunks) / noop_seconds, 1),
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation, as numpy's default."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def shared_ivy(data_dir: Path) -> None:
    """DATA_DIR/ivy -> the cache the tests use, so the ~700 MB AWS SDK bundle is downloaded once per machine."""
    cache = Path(os.environ.get("TP_TEST_CACHE_DIR") or Path.home() / ".cache" / "transaction-processor") / "ivy"
    cache.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "ivy").symlink_to(cache, target_is_directory=True)


def read_ledger(data_dir: Path, db: str) -> tuple[list[tuple[datetime, datetime]], int]:
    """(written_at, processed_at) of every processed chunk, and the number of detections, from a run's database."""
    import warnings

    warnings.filterwarnings("ignore", module="platformdirs")
    import pgserver
    import psycopg2

    server = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
    base, _, query = server.get_uri().partition("?")
    conn = psycopg2.connect(base.rsplit("/", 1)[0] + "/" + db + (f"?{query}" if query else ""))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT written_at, processed_at FROM chunks WHERE processed_at IS NOT NULL "
                "AND written_at IS NOT NULL ORDER BY seq"
            )
            chunks = cur.fetchall()
            cur.execute("SELECT count(*) FROM pattern_detections")
            detections = cur.fetchone()[0]
    finally:
        conn.close()
        server.cleanup()
    return chunks, detections


def latency_summary(chunks: list[tuple[datetime, datetime]]) -> dict[str, float]:
    latency = [(p - w).total_seconds() for w, p in chunks]
    service = [(p - (w if i == 0 else max(w, chunks[i - 1][1]))).total_seconds() for i, (w, p) in enumerate(chunks)]
    return {
        "chunks": len(chunks),
        "latency_median_s": round(statistics.median(latency), 3),
        "latency_p95_s": round(percentile(latency, 0.95), 3),
        "y_per_chunk_median_s": round(statistics.median(service), 3),
        "y_per_chunk_p95_s": round(percentile(service, 0.95), 3),
    }


def drain_once(work: Path, sample: Path, lake_env: dict[str, str], batch: int, timeout: float) -> dict:
    """`python main.py --drain` on a copy of the sample, on its own embedded PostgreSQL; the ledger's figures."""
    inbox, data = work / "inbox", work / "data"
    inbox.mkdir(parents=True)
    for name in ("CustomerImportance.csv", "transactions.csv"):
        shutil.copy2(sample / name, inbox / name)
    shared_ivy(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "GDRIVE_", "AWS_", "TP_"))}
    env.update(
        {
            "DATA_DIR": str(data),
            "LOCAL_INBOX_DIR": str(inbox),
            "LOCAL_LAKE_DIR": str(work / "lake"),
            "BATCH_SIZE": str(batch),
            "CHUNK_INTERVAL_SECONDS": "0",
            "PROCESSING_INTERVAL": "1",
            "SPARK_LOCAL_IP": env.get("SPARK_LOCAL_IP", "127.0.0.1"),
            **lake_env,
        }
    )
    started = time.perf_counter()
    with open(work / "daemon.log", "wb") as log_file:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "--drain"],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout, check=False,
        )  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join((work / "daemon.log").read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"python main.py --drain exited with {proc.returncode}:\n{tail}")
    chunks, detections = read_ledger(data, "transactions")
    return {"wall_s": round(wall, 1), "detections": detections, **latency_summary(chunks)}


def latency(url: str, rows: int, batch: int, timeout: float) -> dict:
    """The same sample drained with the local lake, then with the S3 lake at `url` (a fresh bucket)."""
    from src import sample_data

    work = Path(tempfile.mkdtemp(prefix="tp-bench-s3-latency-"))
    try:
        sample = work / "sample"
        sample_data.generate(sample, rows=rows, seed=7)
        bucket = f"tp-bench-{uuid.uuid4().hex[:10]}"
        make_store(url, bucket, 4, create=True)
        s3_env = {
            "S3_BUCKET_NAME": bucket,
            "S3_ENDPOINT_URL": url,
            "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"),
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "AKIABENCH"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "bench-secret"),
        }
        return {
            "rows": rows,
            "batch_size": batch,
            "local": drain_once(work / "local", sample, {}, batch, timeout),
            "s3": drain_once(work / "s3", sample, s3_env, batch, timeout),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(
    objects: int,
    rows: int,
    workers: int,
    endpoint: str | None,
    bucket: str | None,
    *,
    latency_rows: int = 0,
    batch: int = 10_000,
    timeout: float = 1800.0,
) -> dict:
    rng = random.Random(7)
    t = time.perf_counter()
    chunks = [make_chunk(f"bench{i // 100:04d}", i % 100, rows, rng) for i in range(objects)]
    gen_s = time.perf_counter() - t
    with moto_endpoint() if endpoint is None else _given(endpoint) as url:
        name = bucket or f"tp-bench-{uuid.uuid4().hex[:10]}"
        store = make_store(url, name, workers, create=bucket is None)
        run_id = uuid.uuid4().hex[:8]
        result = {
            "endpoint": "moto server (own process)" if endpoint is None else url,
            "rows_per_object": rows,
            "mean_object_kb": round(sum(map(len, chunks)) / len(chunks) / 1024, 1),
            "generate_s": round(gen_s, 2),
            "workers": workers,
            "parallel": measure(store, chunks, parallel=True, tag=f"{run_id}-p"),
            "sequential": measure(store, chunks, parallel=False, tag=f"{run_id}-s"),
        }
        if latency_rows:
            result["latency"] = latency(url, latency_rows, batch, timeout)
    return result


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=48, help="chunk objects per mode (default 48)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows per chunk object (default 10000)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("MAX_WORKERS", "4")), help="MAX_WORKERS")
    parser.add_argument("--endpoint", help="an existing S3 endpoint instead of moto (e.g. MinIO)")
    parser.add_argument("--bucket", help="existing bucket at --endpoint (required with it)")
    parser.add_argument(
        "--latency-rows", type=int, default=100_000, help="sample rows for the latency runs (default 100000)"
    )
    parser.add_argument("--batch", type=int, default=10_000, help="BATCH_SIZE for the latency runs (default 10000)")
    parser.add_argument("--no-latency", action="store_true", help="only the write figures (no Spark, no Java)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up a drain after this many seconds")
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON")
    args = parser.parse_args(argv)
    if args.endpoint and not args.bucket:
        parser.error("--endpoint needs --bucket")
    result = run(
        args.objects,
        args.rows,
        args.workers,
        args.endpoint,
        args.bucket,
        latency_rows=0 if args.no_latency else args.latency_rows,
        batch=args.batch,
        timeout=args.timeout,
    )
    print(
        f"S3 chunk writes to {result['endpoint']}: {args.objects} objects x {args.rows} rows "
        f"(mean {result['mean_object_kb']} KB)"
    )
    for mode in ("parallel", "sequential"):
        r = result[mode]
        label = f"{mode} (MAX_WORKERS={args.workers})" if mode == "parallel" else mode
        print(
            f"  {label:<26} {r['objects_per_s']:>7.1f} objects/s  {r['mb_per_s']:>6.1f} MB/s  "
            f"(same-bytes re-put: {r['noop_reputs_per_s']:.1f}/s)"
        )
    lat = result.get("latency")
    if lat:
        print(
            f"Detection latency, python main.py --drain on {lat['rows']:,} rows, BATCH_SIZE={lat['batch_size']}, "
            "CHUNK_INTERVAL_SECONDS=0 (same sample, same machine, one after the other):"
        )
        for lake, label in (("local", "local lake"), ("s3", "S3 lake")):
            r = lat[lake]
            print(
                f"  {label:<11} latency median {r['latency_median_s']:>7.3f} s  p95 {r['latency_p95_s']:>7.3f} s   "
                f"Y per chunk median {r['y_per_chunk_median_s']:.3f} s  p95 {r['y_per_chunk_p95_s']:.3f} s   "
                f"({r['chunks']} chunks, {r['detections']} detections, wall {r['wall_s']:.1f} s)"
            )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
