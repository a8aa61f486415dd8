"""Mechanism Y launched the way Spark users launch jobs (issue 11, item 4): `spark-submit --master spark://...
--py-files transaction-processor.zip src/mechanism_y/stream_processor.py --drain` against a real standalone master
and two 1-core workers on 127.0.0.1, the lake on the moto S3 server, checkpoints on s3a://.

X alone fills the lake first; then spark-submit runs Y from a directory outside the checkout holding only the zip
(built by `python -m src.packaging`) and the script taken out of it, with no PYTHONPATH: every module, the SQL
schema and the log layout come from the zip. The detections must equal the reference exactly (same sample and
checks as tests/test_cluster.py, shared through tests/spark_cluster.py). Y takes the 60 waiting chunks in batches
of Y_MAX_BATCH_CHUNKS (20), each chunk judged at its own boundary (the credited chunks check it). The time goes to
the cold executors' first batch (S3A and Parquet classes, JIT) and to Spark's fixed cost per batch, not to rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psycopg2
import pytest

from config.config import Settings
from src.packaging import build_zip
from src.sample_data import generate
from tests.s3_fixtures import *  # noqa: F403
from tests.s3_fixtures import TEST_SECRET_KEY
from tests.spark_cluster import ROWS, SEED, assert_exact, free_port, product_env, spark_cluster, spark_home  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # 4-6 minutes on 2 cores shared with other work

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "src/mechanism_y/stream_processor.py"
DEADLINE = 900.0  # generous: a busy 2-core machine; the wait ends as soon as the process does


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Path:
    """A directory outside the checkout with what a driver's machine receives: the zip, and the script from it."""
    where = tmp_path_factory.mktemp("deployed")
    zip_path = build_zip(where / "transaction-processor.zip")
    with zipfile.ZipFile(zip_path) as zf:
        zf.extract(SCRIPT, where)  # = `unzip transaction-processor.zip src/mechanism_y/stream_processor.py`
    return where


def spark_submit(master: str, jars: list[Path], *args: str) -> list[str]:
    """The command of docs/cluster.md: the driver's jars on its class path (its JVM starts before Python runs)."""
    return [
        str(spark_home() / "bin" / "spark-submit"), "--master", master,
        "--driver-class-path", ":".join(str(j) for j in jars),
        "--py-files", "transaction-processor.zip", SCRIPT, *args,
    ]  # fmt: skip


def submit_env(env: dict[str, str]) -> dict[str, str]:
    """The product's settings, SPARK_MASTER left to `--master`; the driver runs this test's Python."""
    out = {k: v for k, v in env.items() if k not in ("SPARK_MASTER", "PYTHONPATH")}
    out.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    return out


def run(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> int:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        return proc.wait(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_spark_submit_from_the_zip_drains_exactly(
    spark_cluster,  # noqa: F811
    pg_server,
    pg_db,
    s3_server,
    s3_bucket,
    hadoop_aws_jars,
    deployed,
    tmp_path,
):
    generate(tmp_path / "inbox", rows=ROWS, seed=SEED)
    env = product_env(spark_cluster, pg_server, pg_db, s3_server, s3_bucket, hadoop_aws_jars, tmp_path)
    settings = Settings.from_env(env, dotenv=Path("/nonexistent"))
    assert not settings.spark_local

    x_log = tmp_path / "x.log"
    x_cmd = [sys.executable, "-m", "src.mechanism_x.data_ingestion", "--drain"]
    assert run(x_cmd, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, log=x_log) == 0, x_log.read_text()[-3000:]

    y_log = tmp_path / "y.log"
    t0 = time.monotonic()
    code = run(
        spark_submit(spark_cluster.master_url, hadoop_aws_jars, "--drain"),
        cwd=deployed,
        env=submit_env(env),
        log=y_log,
    )
    seconds = time.monotonic() - t0
    text = y_log.read_text(errors="replace")
    assert code == 0, text[-5000:]
    assert "mechanism Y: reading" in text and TEST_SECRET_KEY not in text
    assert f"master {spark_cluster.master_url}" in text, "the session is on spark-submit's master"
    assert "driver compilers as spark-submit started it)" in text  # SPARK_DRIVER_JIT cannot reach that JVM
    assert all("Running task" in spark_cluster.executor_log(i) for i in range(2)), "Y's work ran on both executors"

    conn = psycopg2.connect(pg_server.dsn_for(pg_db))
    try:
        chunks, found = assert_exact(conn, tmp_path / "inbox", settings)
    finally:
        conn.close()
    sys.stderr.write(f"\nspark-submit drain of {len(chunks)} chunks: {seconds:.1f} s, {len(found)} detections\n")


def test_spark_submit_refuses_another_spark_master_with_exit_2(deployed, hadoop_aws_jars, tmp_path):
    """spark-submit passes on the worker's exit code; a SPARK_MASTER that contradicts `--master` is a settings
    error (2: not restarted), said in one line, before any session or database is touched."""
    env = submit_env({k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "TP_", "S3_", "AWS_"))})
    env.update(SPARK_MASTER="local[1]", DATA_DIR=str(tmp_path / "data"), SPARK_LOCAL_IP="127.0.0.1")
    # Should the check ever go, Y fails fast on a database nobody serves instead of starting an embedded one.
    env.update(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(free_port()), MAX_ATTEMPTS="1")
    log = tmp_path / "y.log"
    code = run(spark_submit("local[2]", hadoop_aws_jars, "--drain"), cwd=deployed, env=env, log=log)
    text = log.read_text(errors="replace")
    assert code == 2, text[-3000:]
    assert "error: SPARK_MASTER=local[1] differs from spark-submit's --master local[2]" in text
