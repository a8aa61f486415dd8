"""Mechanism Y on a real Spark cluster (issue 11): a standalone master and two 1-core workers on 127.0.0.1, the lake
on the moto S3 server, Y's checkpoints on s3a://. `python main.py --drain` on a 60-chunk sample must give exactly
the reference detections although one worker, with its executor, is SIGKILLed mid-run: Spark re-runs the lost
tasks on the other executor, the checkpoints outlive it (files on S3, not executor blocks) and each batch still
commits once. The chunks are 1,000 rows (60,000 in all, thresholds scaled down so every pattern fires): Spark's
per-batch cost on a cluster does not depend on the rows, and the test must stay within minutes on 2 cores.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from config.config import Settings
from src.sample_data import generate
from tests.s3_fixtures import *  # noqa: F403
from tests.s3_fixtures import TEST_SECRET_KEY
from tests.spark_cluster import ROWS, SEED, assert_exact, processes, product_env, spark_cluster  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # minutes on 2 idle cores; generous for a busy machine

ROOT = Path(__file__).resolve().parent.parent
KILL_AFTER_CHUNKS = 1  # committed before the kill: the next batches (up to Y_MAX_BATCH_CHUNKS each) are to come
DEADLINE = 900.0  # generous: the drain takes a few minutes on a busy 2-core machine


def _processed(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM chunks WHERE processed_at IS NOT NULL")
        return cur.fetchone()[0]


def _ps() -> str:
    return "\n".join(args for _, args in processes().values())


def test_drain_on_a_cluster_with_a_worker_killed_is_exact(
    spark_cluster,  # noqa: F811
    pg_server,
    pg_db,
    s3_server,
    s3_bucket,
    hadoop_aws_jars,
    tmp_path,
):
    generate(tmp_path / "inbox", rows=ROWS, seed=SEED)
    env = product_env(spark_cluster, pg_server, pg_db, s3_server, s3_bucket, hadoop_aws_jars, tmp_path)
    env["PYTHONPATH"] = str(ROOT)
    settings = Settings.from_env(env, dotenv=Path("/nonexistent"))
    assert not settings.spark_local

    log = tmp_path / "main.log"
    conn = psycopg2.connect(pg_server.dsn_for(pg_db))
    conn.autocommit = True
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--drain"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        # Kill one worker (and its executor) once Y has processed some chunks on the cluster.
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end and proc.poll() is None:
            try:
                done = _processed(conn)
            except psycopg2.Error:  # the schema is not there yet
                done = 0
            if done >= KILL_AFTER_CHUNKS:
                break
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text(errors="replace")[-5000:]
        executors = spark_cluster.executor_pids(0) + spark_cluster.executor_pids(1)
        assert len(executors) == 2, "Y's work runs on both workers' executors"
        busy: list[int] = []
        for pid in executors:  # the keys reached the executors neither through their environment nor their args
            assert TEST_SECRET_KEY not in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        assert TEST_SECRET_KEY not in _ps()
        # ...in the middle of a task: the worker whose executor is running one goes.
        while time.monotonic() < end and proc.poll() is None:
            busy = [i for i in range(2) if spark_cluster.running_tasks(i)]
            if busy:
                break
            time.sleep(0.02)
        assert busy, "no task ran on the cluster after the first commit:\n" + log.read_text(errors="replace")[-3000:]
        killed_at = _processed(conn)
        lost = set(spark_cluster.running_tasks(busy[0]).values())
        spark_cluster.kill_worker(busy[0])
        code = proc.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - t0
    text = log.read_text(errors="replace")
    assert code == 0, text[-5000:]
    assert TEST_SECRET_KEY not in text
    assert "Lost executor" in text, "Spark noticed the executor die"
    # Spark ran the lost task again on the surviving executor: a retry (task attempt > 0) or its stage resubmitted.
    survivor = spark_cluster.executor_log(1 - busy[0])
    redone = {
        (int(i), int(st))
        for i, a, st, sa in re.findall(r"Running task (\d+)\.(\d+) in stage (\d+)\.(\d+)", survivor)
        if int(a) > 0 or int(sa) > 0
    }
    assert lost and {stage for _, stage in lost} <= {stage for _, stage in redone}, (lost, redone)
    assert len(spark_cluster.alive_workers()) == 1
    assert not list(spark_cluster.root.rglob("bundle-*.jar")), "local: jars are used in place, never copied"
    assert not re.findall(r"mechanism Y \(pid \d+\) exited", text), "Spark rode out the loss: Y never crashed"

    try:
        chunks, found = assert_exact(conn, tmp_path / "inbox", settings)
    finally:
        conn.close()
    assert killed_at < len(chunks), "chunks were still to do when the worker died"
    sys.stderr.write(
        f"\ncluster drain of {len(chunks)} chunks, worker killed after {killed_at}: {seconds:.1f} s, "
        f"{len(found)} detections\n"
    )
