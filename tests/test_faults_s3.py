"""`python main.py --drain` with the lake in S3 behind a fault-injecting proxy: a few percent of all requests
answered 503 SlowDown / 500 / dropped, and the server fully down for 90 s from Spark's first chunk read. X's
puts (botocore, through the product's retry policy) and Y's reads (Spark's S3A, through its own retry
settings from `spark_utils.s3a_conf`) both meet the outage; the drain still ends exact: every chunk written
and processed once, nothing failed, and the detections are the reference's.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import psycopg2
import pyarrow.parquet as pq
import pytest

from config.config import Settings
from src.resources import open_lake
from tests.conftest import run_env
from tests.reference import credited_chunks, expected_detections, limits_of, read_importance, read_transactions
from tests.s3_fixtures import *  # noqa: F403
from tests.s3_fixtures import TEST_ACCESS_KEY, TEST_SECRET_KEY, use_shared_ivy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ROWS = 30_000
SEED = 7
BATCH = 5_000
OUTAGE_SECONDS = 90.0
THRESHOLDS = {"PATID1_MIN_MERCHANT_TXNS": "3000", "PATID2_MIN_TXNS": "40", "PATID3_MIN_FEMALE_CUSTOMERS": "5"}


def _second_chunk_put(method: str, path: str) -> bool:
    """X's put of chunk 1: chunk 0 is written and Y (ready, since X released it) is about to read it with
    Spark, so the outage meets both X's puts and Spark's first read."""
    return method == "PUT" and re.search(r"/raw-transactions/year=[^?]*-000001\.parquet", unquote(path)) is not None


def _is_s3a(agent: str) -> bool:
    return "hadoop" in agent.lower() or "aws-sdk-java" in agent.lower()


def test_drain_rides_out_s3_faults_and_a_90s_outage(
    pg_server, pg_db, s3_server, s3_bucket, faulty_s3, hadoop_aws_jars, tmp_path
):
    import subprocess

    from src.sample_data import generate

    generate(tmp_path / "inbox", rows=ROWS, seed=SEED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "GDRIVE_", "TP_", "AWS_"))}
    env.update(run_env(pg_server, pg_db, tmp_path))
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "DATA_DIR": str(use_shared_ivy(tmp_path / "data")),
            "BATCH_SIZE": str(BATCH),
            "CHUNK_INTERVAL_SECONDS": "1",  # X is still writing when the outage starts with Y's first read
            "RETRY_MAX_DELAY_SECONDS": "10",
            "LOG_FORMAT": "text",
            "S3_BUCKET_NAME": s3_bucket,
            "S3_ENDPOINT_URL": faulty_s3.endpoint,  # X, Y and Spark's S3A all go through the proxy
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            **THRESHOLDS,
        }
    )

    def chunk_put(path: str) -> bool:
        return "/raw-transactions/year=" in unquote(path) and "-000000.parquet" in unquote(path)

    # Each kind of fault at least once on the first chunk (the dice may not deal all of them), a random 4 % of
    # every request, then the outage.
    faulty_s3.inject("PUT", 500, 1, path=chunk_put)
    faulty_s3.inject("PUT", "reset", 1, path=chunk_put)
    faulty_s3.inject("PUT", "reset_after", 1, path=chunk_put)  # stored, answer lost: the retry finds it (412)
    faulty_s3.inject("PUT", 503, 1, path=chunk_put)
    faulty_s3.set_flaky(0.04, seed=3)
    faulty_s3.schedule_outage(OUTAGE_SECONDS, starts_on=_second_chunk_put)

    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--drain"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=OUTAGE_SECONDS + 480, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    (tmp_path / "main.log").write_text(output)
    assert proc.returncode == 0, output[-5000:]
    assert TEST_SECRET_KEY not in output

    # The outage happened and lasted; both X's botocore and Spark's S3A met it and the random faults.
    assert faulty_s3.outage_started is not None and faulty_s3.outage_over(), output[-3000:]
    faulted = faulty_s3.requests(faulted=True)
    start = faulty_s3.outage_started
    during = [s for s in faulted if start <= s.at < start + OUTAGE_SECONDS]
    assert any(_is_s3a(s.agent) for s in during), {s.agent for s in during}
    assert any("botocore" in s.agent.lower() and s.method == "PUT" for s in during), {s.agent for s in during}
    spark_reads = [s for s in faulty_s3.requests() if _is_s3a(s.agent) and "/raw-transactions/year=" in unquote(s.path)]
    assert any(start <= s.at < start + OUTAGE_SECONDS for s in spark_reads)  # Spark read a chunk during the outage
    assert any(s.method == "GET" and s.status in (200, 206) for s in spark_reads)  # and got it once the lake was back
    assert {s.fault for s in faulted} >= {503, 500, "reset", "reset_after"}
    assert any(s.method == "PUT" and "/raw-transactions/year=" in unquote(s.path) for s in faulted)
    assert any("waiting for S3 at" in line for line in output.splitlines()), output[-3000:]
    crashes = [line for line in output.splitlines() if re.search(r"exited with .*; restart \d+ in", line)]
    assert not crashes, crashes  # ridden out in place: no worker died of the outage

    # Exact: every chunk written and processed, nothing failed, the chunk objects are those of the ledger.
    conn = psycopg2.connect(pg_server.dsn_for(pg_db))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM source_files GROUP BY status")
            files = dict(cur.fetchall())
            cur.execute(
                "SELECT seq, status, processed_at IS NOT NULL, rows_total, rows_valid, object_key FROM chunks ORDER BY seq"
            )
            chunks = cur.fetchall()
            cur.execute("SELECT pattern_id, customer_name, merchant_id FROM pattern_detections")
            found = cur.fetchall()
        settings = Settings.from_env(env, dotenv=Path("/nonexistent"))
        ref_chunks, txns = read_transactions([tmp_path / "inbox" / "transactions.csv"], settings.batch_size)
        importance = read_importance(tmp_path / "inbox" / "CustomerImportance.csv")
        expected = expected_detections(conn, ref_chunks, txns, importance, limits_of(settings))
        credited = credited_chunks(conn)
    finally:
        conn.close()
    assert files == {"done": 2}, files
    assert chunks and all(status == "written" and processed for _, status, processed, *_ in chunks), chunks
    assert sum(c[3] for c in chunks) == ROWS
    lake = open_lake(Settings.from_env({**env, "S3_ENDPOINT_URL": s3_server}, dotenv=Path("/nonexistent")))
    objects = {k for k in lake.list_keys("raw-transactions/year=") if k.endswith(".parquet")}
    assert objects == {c[5] for c in chunks}
    for _, _, _, _, valid, key in chunks:
        assert pq.read_metadata(io.BytesIO(lake.get_bytes(key))).num_rows == valid

    # The detections are the contract's, each once.
    assert len(found) == len(set(found))
    assert {p for p, _, _ in found} == {"PatId1", "PatId2", "PatId3"}
    assert set(found) == set(expected)
    assert credited == {d: e.chunk for d, e in expected.items()}  # and each credited to the reference's chunk
    sys.stderr.write(
        f"\nS3 drain through a {OUTAGE_SECONDS:.0f} s outage and {len(faulted)} faulted requests: {seconds:.1f} s\n"
    )
