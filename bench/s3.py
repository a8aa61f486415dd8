"""Chunk objects written per second to an S3 server by `S3ObjectStore`, in parallel and one by one.

    python -m bench.s3 [--objects 48] [--rows 10000] [--workers MAX_WORKERS] [--endpoint URL --bucket NAME]

Without --endpoint it starts moto's S3 server on 127.0.0.1 (a free port) as a child process and
stops it at the end. Objects are chunk-shaped Parquet (the chunk schema, BankSim-like values,
~300 KB for 10,000 rows). Prints one line per mode and, with --json, a JSON summary.
"""

from __future__ import annotations

import argparse
import decimal
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyarrow as pa
import pyarrow.parquet as pq

from config.config import Settings
from src.schemas.transaction_schemas import CHUNK_ARROW_SCHEMA
from src.utils.s3_utils import S3ObjectStore

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


def run(objects: int, rows: int, workers: int, endpoint: str | None, bucket: str | None) -> dict:
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
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON")
    args = parser.parse_args(argv)
    if args.endpoint and not args.bucket:
        parser.error("--endpoint needs --bucket")
    result = run(args.objects, args.rows, args.workers, args.endpoint, args.bucket)
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
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
