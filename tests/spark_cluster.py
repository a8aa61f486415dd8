"""The loopback Spark standalone cluster as a pytest fixture, and the product runs the cluster tests share.

The cluster itself (a master and N workers on 127.0.0.1 from the installed pyspark) is
`tests/spark_standalone.py`, which the benchmarks start too. Use the `spark_cluster` fixture
(`from tests.spark_cluster import spark_cluster  # noqa: F401`).

    cluster.master_url        # spark://127.0.0.1:<port>
    cluster.alive_workers()   # ids of the workers the master sees ALIVE
    cluster.kill_worker(0)    # SIGKILL worker 0 and its executors

`product_env(...)` is the environment of a run on the cluster (the lake on the moto bucket, checkpoints on s3a://,
hadoop-aws installed at the same path "on every machine"), on the sample of ROWS rows in chunks of BATCH;
`assert_exact(...)` judges a drained run against tests/reference.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_env
from tests.reference import credited_chunks, expected_detections, limits_of, read_importance, read_transactions
from tests.s3_fixtures import TEST_ACCESS_KEY, TEST_SECRET_KEY, use_shared_ivy
from tests.spark_standalone import SparkCluster, free_port, processes, spark_home

__all__ = [
    "BATCH",
    "ROWS",
    "SEED",
    "THRESHOLDS",
    "SparkCluster",
    "assert_exact",
    "free_port",
    "processes",
    "product_env",
    "spark_home",
]

# The sample of the cluster runs: 60 chunks of 1,000 rows, thresholds scaled down so every pattern fires. Spark's
# per-batch cost on a cluster does not depend on the rows, and the tests must stay within minutes on 2 cores.
ROWS, SEED, BATCH = 60_000, 11, 1_000
THRESHOLDS = {"PATID1_MIN_MERCHANT_TXNS": "3000", "PATID2_MIN_TXNS": "40", "PATID3_MIN_FEMALE_CUSTOMERS": "5"}


@pytest.fixture
def spark_cluster() -> Iterator[SparkCluster]:
    """A master and two 1-core workers on 127.0.0.1, stopped after the test."""
    cluster = SparkCluster(Path(tempfile.mkdtemp(prefix="tp-spark-cluster-")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def product_env(
    cluster: SparkCluster, pg_server, pg_db: str, s3_server: str, s3_bucket: str, jars: list[Path], root: Path
) -> dict[str, str]:
    """The environment of a product run on `cluster` under `root` (inbox `root/inbox`), without PYTHONPATH: the
    lake on the moto bucket, Y's checkpoints on s3a://, the hadoop-aws jars `local:` (installed at the same path on
    every machine, here this one: never copied to the executors), executors sized for the 1-core workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "GDRIVE_", "TP_", "AWS_"))}
    env.pop("PYTHONPATH", None)
    env.update(run_env(pg_server, pg_db, root))
    env.update(
        {
            "DATA_DIR": str(use_shared_ivy(root / "data")),
            "BATCH_SIZE": str(BATCH),
            "SPARK_JARS": ",".join(f"local:{jar}" for jar in jars),
            "METRICS_ADDR": "off",
            **THRESHOLDS,
            "LOG_FORMAT": "text",
            "S3_BUCKET_NAME": s3_bucket,
            "S3_ENDPOINT_URL": s3_server,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "SPARK_MASTER": cluster.master_url,
            "SPARK_CHECKPOINT_DIR": f"s3a://{s3_bucket}/_spark-checkpoints",
            "SPARK_CONF_DIR": str(cluster.conf_dir),
        }
    )
    return env


def assert_exact(conn, inbox: Path, settings) -> tuple[list[tuple], list[tuple]]:
    """A drained run gave exactly the reference: every chunk written and processed, every row once in
    `transactions`, each detection once and credited to the reference's chunk. Returns (chunks, detections)."""
    with conn.cursor() as cur:
        cur.execute("SELECT status, processed_at IS NOT NULL, rows_total FROM chunks ORDER BY seq")
        chunks = cur.fetchall()
        cur.execute("SELECT pattern_id, customer_name, merchant_id FROM pattern_detections")
        found = cur.fetchall()
        cur.execute("SELECT count(*) FROM transactions")
        stored_rows = cur.fetchone()[0]
    ref_chunks, txns = read_transactions([inbox / "transactions.csv"], settings.batch_size)
    importance = read_importance(inbox / "CustomerImportance.csv")
    expected = expected_detections(conn, ref_chunks, txns, importance, limits_of(settings))
    credited = credited_chunks(conn)
    assert len(chunks) == len(ref_chunks) == ROWS // BATCH
    assert all(status == "written" and processed for status, processed, _ in chunks), chunks
    assert sum(c[2] for c in chunks) == ROWS == stored_rows  # every row once in `transactions`
    assert len(found) == len(set(found)) and set(found) == set(expected)
    assert {p for p, _, _ in found} == {"PatId1", "PatId2", "PatId3"}
    assert credited == {d: e.chunk for d, e in expected.items()}
    return chunks, found
