"""Settings for a Spark cluster (SPEC §9): what executors on other machines touch must be shared storage, and a
configuration that cannot work there is refused at start with one line naming the variable and the fix."""

from __future__ import annotations

import pytest

from config.config import PROJECT_ROOT
from tests.test_config import build, clean_env, run, settings_error

CLUSTER = "spark://spark-master:7077"
S3_LAKE = {"S3_BUCKET_NAME": "lake-bucket"}


def test_defaults_keep_todays_local_checkpoints():
    s = build()
    assert s.spark_checkpoint_dir is None and s.local_lake_shared is False
    assert s.checkpoint_dir == str(PROJECT_ROOT / "data" / "spark" / "checkpoints")
    assert build(DATA_DIR="/srv/tp").checkpoint_dir == "/srv/tp/spark/checkpoints"
    assert build(SPARK_CHECKPOINT_DIR="cp").checkpoint_dir == str(PROJECT_ROOT / "cp")  # relative to the project
    assert build(SPARK_CHECKPOINT_DIR="s3a://lake-bucket/cp").checkpoint_dir == "s3a://lake-bucket/cp"


@pytest.mark.parametrize("master", ["local", "local[*]", "local[2]", "local-cluster[2,1,1024]"])
def test_local_masters_take_local_paths(master):
    assert build(SPARK_MASTER=master).spark_local


@pytest.mark.parametrize("master", [CLUSTER, "yarn", "k8s://https://10.0.0.1:6443"])
def test_cluster_master_refuses_the_local_lake(master):
    message = settings_error(SPARK_MASTER=master, LOCAL_LAKE_DIR="/srv/lake")
    assert message.startswith("LOCAL_LAKE_DIR=/srv/lake "), message
    assert f"SPARK_MASTER={master}" in message and "S3_BUCKET_NAME" in message and "LOCAL_LAKE_SHARED=true" in message


@pytest.mark.parametrize("where", [None, "/var/tp/checkpoints", "file:///var/tp/checkpoints", "relative/cp"])
def test_cluster_master_refuses_local_checkpoints(where):
    env = {"SPARK_MASTER": CLUSTER, **S3_LAKE, **({"SPARK_CHECKPOINT_DIR": where} if where else {})}
    message = settings_error(**env)
    assert message.startswith("SPARK_CHECKPOINT_DIR="), message
    assert "local path" in message and "s3a://" in message and "LOCAL_LAKE_SHARED=true" in message


@pytest.mark.parametrize("where", ["s3a://lake-bucket/checkpoints", "hdfs://nn:8020/tp/cp", "gs://b/cp"])
def test_cluster_master_takes_shared_checkpoints(where):
    s = build(SPARK_MASTER=CLUSTER, **S3_LAKE, SPARK_CHECKPOINT_DIR=where)
    assert not s.spark_local and s.checkpoint_dir == where


def test_shared_mount_is_the_users_statement():
    s = build(
        SPARK_MASTER=CLUSTER,
        LOCAL_LAKE_DIR="/mnt/nfs/lake",
        SPARK_CHECKPOINT_DIR="/mnt/nfs/cp",
        LOCAL_LAKE_SHARED="true",
    )
    assert s.local_lake and s.checkpoint_dir == "/mnt/nfs/cp"
    assert build(**s.to_env()) == s  # a child process (X, Y) gets the same settings


def test_mechanism_y_refuses_a_local_lake_on_a_cluster_with_one_line(tmp_path):
    env = clean_env(SPARK_MASTER=CLUSTER, DATA_DIR=str(tmp_path / "data"), LOCAL_LAKE_DIR=str(tmp_path / "lake"))
    out = run(["-m", "src.mechanism_y.stream_processor", "--drain"], env)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
    assert len(lines) == 1 and "LOCAL_LAKE_DIR" in lines[0] and "LOCAL_LAKE_SHARED=true" in lines[0], lines
    assert not (tmp_path / "data").exists()
