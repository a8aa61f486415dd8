"""The S3 lake against a real S3 server (moto, on 127.0.0.1), with faults injected by a proxy."""

from __future__ import annotations

import base64
import decimal
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from config.config import Settings
from src.errors import LakeError, ObjectConflict, RetryableError
from src.resources import open_lake
from src.schemas.transaction_schemas import CHUNK_ARROW_SCHEMA
from src.utils import lake_paths, retry, s3_utils
from src.utils.object_store import LocalObjectStore
from src.utils.s3_utils import S3ObjectStore
from src.utils.spark_utils import bundled_hadoop_version, s3a_conf, s3a_env
from tests.s3_fixtures import *  # noqa: F403
from tests.s3_fixtures import TEST_SECRET_KEY, use_shared_ivy

ROOT = Path(__file__).resolve().parent.parent


WAIT_LINE = "waiting for S3 at "
DEADLINE = 60.0  # seconds: generous, polled; a healthy run takes well under a second


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch) -> None:
    """The product's policy, started at 10 ms instead of 0.5 s so that a test with several faults is quick."""
    monkeypatch.setattr(retry, "INITIAL_DELAY", 0.01)


@pytest.fixture
def store(s3_settings) -> S3ObjectStore:
    return S3ObjectStore(s3_settings())


@pytest.fixture
def flaky(s3_settings, faulty_s3) -> S3ObjectStore:
    """A store talking to the server through the fault proxy; a hung answer is given up after 5 s (a healthy
    one takes milliseconds, so even a loaded machine never times out by accident)."""
    return S3ObjectStore(s3_settings(faulty_s3.endpoint), read_timeout=5)


def _wait_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(WAIT_LINE)]


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _admin(settings: Settings):
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.aws_region,
        aws_access_key_id=settings.aws_access_key_id.get_secret_value(),
        aws_secret_access_key=settings.aws_secret_access_key.get_secret_value(),
    )


def _chunk(file_id: str, seq: int, rows: int) -> bytes:
    table = pa.table(
        {
            "step": pa.array([i % 180 for i in range(rows)], pa.int32()),
            "customer": [f"C{1000 + i % 37}" for i in range(rows)],
            "age": ["3"] * rows,
            "gender": ["F" if i % 3 else "M" for i in range(rows)],
            "zipcodeOri": ["28007"] * rows,
            "merchant": [f"M{i % 5}" for i in range(rows)],
            "zipMerchant": ["28007"] * rows,
            "category": ["es_transportation"] * rows,
            "amount": pa.array([decimal.Decimal(i % 1000) / 10 for i in range(rows)], pa.decimal128(18, 2)),
            "fraud": pa.array([0] * rows, pa.int8()),
            "source_file_id": [file_id] * rows,
            "chunk_seq": pa.array([seq] * rows, pa.int32()),
            "source_line": pa.array(range(2, rows + 2), pa.int64()),
        },
        schema=CHUNK_ARROW_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# -- writes and reads --------------------------------------------------------------------


def test_put_is_write_once_idempotent_and_checksummed(store, s3_settings):
    key = "raw-transactions/year=2026/month=11/day=26/f1-000001.parquet"
    data = b"PAR1 chunk one"
    assert store.put_bytes(key, data) is True
    assert store.put_bytes(key, data) is False
    with pytest.raises(ObjectConflict, match="different content"):
        store.put_bytes(key, b"PAR1 chunk two")
    assert store.get_bytes(key) == data

    head = _admin(s3_settings()).head_object(Bucket=store.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()

    report = "pattern-detections/validation/quality_reports.json"
    assert store.put_bytes(report, b'{"v": 1}', overwrite=True) is True
    assert store.put_bytes(report, b'{"v": 1}', overwrite=True) is False
    assert store.put_bytes(report, b'{"v": 2}', overwrite=True) is True
    assert store.get_bytes(report) == b'{"v": 2}'

    assert store.exists(key) and not store.exists("raw-transactions/nope.parquet")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("raw-transactions/nope.parquet")
    store.delete(report)
    assert not store.exists(report)
    assert store.spark_uri(key) == f"s3a://{store.bucket}/{key}"
    assert store.bucket in store.describe() and TEST_SECRET_KEY not in store.describe()


def test_large_object_goes_multipart_and_stays_write_once(store, s3_settings):
    key = "raw-transactions/year=2026/month=11/day=26/big-000001.parquet"
    data = os.urandom(9 * 1024 * 1024)
    assert store.put_bytes(key, data) is True
    assert _admin(s3_settings()).head_object(Bucket=store.bucket, Key=key)["ETag"].strip('"').endswith("-2")
    assert store.get_bytes(key) == data
    assert store.put_bytes(key, data) is False
    with pytest.raises(ObjectConflict):
        store.put_bytes(key, data[:-1] + bytes([data[-1] ^ 0xFF]))  # differs whatever the random last byte was
    assert store.get_bytes(key) == data


def test_put_many_keeps_order_and_is_idempotent(store):
    items = [
        (f"raw-transactions/year=2026/month=11/day=26/f2-{i:06d}.parquet", f"chunk {i}".encode()) for i in range(24)
    ]
    assert store.put_many(items) == [True] * 24
    assert store.put_many(items) == [False] * 24
    items[5] = (items[5][0], b"changed")
    new = ("raw-transactions/year=2026/month=11/day=26/f2-000099.parquet", b"chunk 99")
    with pytest.raises(ObjectConflict):
        store.put_many([*items, new])
    assert store.get_bytes(items[5][0]) == b"chunk 5"
    assert store.get_bytes(new[0]) == b"chunk 99"  # the rest of the batch still landed


def test_listing_of_more_than_1000_objects_is_paginated(store, s3_settings, faulty_s3):
    keys = {f"raw-transactions/year=2026/month=11/day=26/f3-{i:06d}.parquet" for i in range(1050)}
    store.put_many([(k, b"x") for k in sorted(keys)])
    store.put_bytes("quarantine/other.json", b"{}")
    flaky = S3ObjectStore(s3_settings(faulty_s3.endpoint))
    faulty_s3.inject("GET", 503, 1, path="continuation-token")
    listed = list(flaky.list_keys("raw-transactions/"))
    assert sorted(listed) == sorted(keys)  # all of them, none twice, a failed page retried
    pages = [s for s in faulty_s3.requests("GET") if "list-type=2" in s.path and s.status == 200]
    assert len(pages) == 2
    assert list(flaky.list_keys("pattern-detections/")) == []


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [503, 500, "reset"])
def test_transient_put_faults_are_retried_and_written_once(flaky, faulty_s3, fault, caplog):
    key = "raw-transactions/year=2026/month=11/day=26/f4-000001.parquet"
    faulty_s3.inject("PUT", fault, 3)
    assert flaky.put_bytes(key, b"chunk") is True
    assert flaky.get_bytes(key) == b"chunk"
    puts = faulty_s3.requests("PUT")
    assert [p.fault for p in puts] == [fault] * 3 + [None]
    assert [p.status for p in puts if p.status is not None] == [200]
    # One wait per faulted request: botocore sent each request once, only our policy retried.
    lines = _wait_lines(caplog)
    assert len(lines) == 3 and all(f"{faulty_s3.endpoint}/{flaky.bucket} (put {key})" in x for x in lines)
    assert [int(x.split("; attempt ")[1].split(",")[0]) for x in lines] == [2, 3, 4]


def test_botocore_sends_each_request_once(s3_settings, faulty_s3):
    """Retries off in botocore: with our policy not waiting at all, one call is exactly one HTTP request."""
    once = S3ObjectStore(s3_settings(faulty_s3.endpoint), give_up_after=0)
    key = "raw-transactions/year=2026/month=11/day=26/f4-000002.parquet"
    for fault, method in ((503, "PUT"), ("reset", "PUT"), (500, "GET")):
        faulty_s3.clear()
        faulty_s3.inject(method, fault, 10)
        with pytest.raises(RetryableError, match=rf"S3 (put|get) {key} at {faulty_s3.endpoint}/{once.bucket}"):
            once.put_bytes(key, b"x") if method == "PUT" else once.get_bytes(key)
        assert len(faulty_s3.requests(method)) == 1, (fault, faulty_s3.requests(method))


def test_lost_answer_then_retry_writes_nothing_twice(flaky, faulty_s3):
    key = "raw-transactions/year=2026/month=11/day=26/f5-000001.parquet"
    faulty_s3.inject("PUT", "reset_after", 1)
    # The first PUT lands but its answer is lost; the retry finds the same bytes there.
    assert flaky.put_bytes(key, b"chunk") is False
    assert [p.status for p in faulty_s3.requests("PUT")] == [200, 412]
    assert flaky.get_bytes(key) == b"chunk"
    assert list(flaky.list_keys("raw-transactions/")) == [key]


def test_transient_get_faults_and_timeouts_are_retried(flaky, store, faulty_s3):
    key = "pattern-detections/patid1/_summary/monthly_stats.json"
    store.put_bytes(key, b'{"n": 3}')
    faulty_s3.hang_seconds = 60.0  # far past the client's 5 s read timeout, even on a loaded machine
    faulty_s3.inject("GET", "reset", 2)
    faulty_s3.inject("GET", 503, 2)
    faulty_s3.inject("GET", "hang", 1)
    assert flaky.get_bytes(key) == b'{"n": 3}'
    assert [g.fault for g in faulty_s3.requests("GET")] == ["reset", "reset", 503, 503, "hang", None]


@pytest.mark.parametrize(("method", "fault"), [("PUT", 503), ("PUT", "reset"), ("GET", 503), ("GET", "reset")])
def test_an_outage_is_waited_out_until_the_server_is_back(s3_settings, store, faulty_s3, caplog, method, fault):
    """Transient is never permanent: the call waits (one log line per wait) for as long as the fault lasts."""
    key = "raw-transactions/year=2026/month=11/day=26/f6-000001.parquet"
    if method == "GET":
        store.put_bytes(key, b"chunk")
    stop = threading.Event()
    flaky = S3ObjectStore(s3_settings(faulty_s3.endpoint), stop=stop)
    caplog.set_level(logging.INFO, logger=retry.__name__)
    faulty_s3.inject(method, fault, 10_000)
    result: list[object] = []

    def call() -> None:
        try:
            result.append(flaky.put_bytes(key, b"chunk") if method == "PUT" else flaky.get_bytes(key))
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            result.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    _until(lambda: len(faulty_s3.requests(method, faulted=True)) >= 6, "six faulted requests")
    assert worker.is_alive() and not result  # still waiting, not failed
    faulty_s3.clear()  # the server is back
    worker.join(DEADLINE)
    assert result == ([True] if method == "PUT" else [b"chunk"])
    lines = _wait_lines(caplog)
    assert len(lines) >= 6 and all(TEST_SECRET_KEY not in x and "\n" not in x for x in lines)
    assert any(r.getMessage().startswith(f"S3 at {faulty_s3.endpoint}/{flaky.bucket} is back") for r in caplog.records)
    assert store.get_bytes(key) == b"chunk"
    assert list(store.list_keys("raw-transactions/")) == [key]


def test_stop_ends_the_wait_with_retryable_error(s3_settings, faulty_s3):
    stop = threading.Event()
    flaky = S3ObjectStore(s3_settings(faulty_s3.endpoint), stop=stop)
    faulty_s3.inject("PUT", 503, 10_000)
    key = "raw-transactions/year=2026/month=11/day=26/f6-000002.parquet"
    errors: list[BaseException] = []

    def call() -> None:
        try:
            flaky.put_bytes(key, b"chunk")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    _until(lambda: len(faulty_s3.requests("PUT")) >= 2, "two attempts")
    stop.set()
    worker.join(DEADLINE)
    assert not worker.is_alive()
    (err,) = errors
    assert isinstance(err, RetryableError) and "SlowDown" in str(err) and "\n" not in str(err)
    assert TEST_SECRET_KEY not in str(err)


def test_server_without_conditional_writes_falls_back_to_compare(flaky, faulty_s3):
    key = "raw-transactions/year=2026/month=11/day=26/f7-000001.parquet"
    faulty_s3.inject("PUT", 501, 1)
    assert flaky.put_bytes(key, b"chunk") is True
    assert flaky.conditional_writes is False
    assert flaky.put_bytes(key, b"chunk") is False
    with pytest.raises(ObjectConflict):
        flaky.put_bytes(key, b"other")
    assert flaky.get_bytes(key) == b"chunk"


# -- start-up checks ---------------------------------------------------------------------


def test_check_writable(store, s3_settings, flaky, faulty_s3):
    store.check_writable()
    assert store.exists(s3_utils.HEALTH_KEY)

    faulty_s3.inject("HEAD", 503, 2)  # the server still starting: waited out, not a settings error
    faulty_s3.inject("PUT", "reset", 1)
    flaky.check_writable()
    assert [s.fault for s in faulty_s3.requests("HEAD")][:3] == [503, 503, None]
    faulty_s3.clear()

    missing = S3ObjectStore(s3_settings(S3_BUCKET_NAME="tp-no-such-bucket"))
    with pytest.raises(LakeError) as err:
        missing.check_writable()
    msg = str(err.value)
    assert "tp-no-such-bucket" in msg and "us-east-1" in msg and "does not exist" in msg and "\n" not in msg

    faulty_s3.inject("PUT", 403, 1)
    with pytest.raises(LakeError) as err:
        flaky.check_writable()
    msg = str(err.value)
    assert f"s3:PutObject on arn:aws:s3:::{flaky.bucket}/*" in msg and "us-east-1" in msg and "\n" not in msg
    assert TEST_SECRET_KEY not in msg


def test_open_lake_follows_the_settings(s3_settings, tmp_path):
    stop = threading.Event()
    lake = open_lake(s3_settings(), stop=stop)
    assert isinstance(lake, S3ObjectStore) and lake.stop is stop
    local = Settings.from_env({"LOCAL_LAKE_DIR": str(tmp_path / "lake")}, dotenv=Path("/nonexistent"))
    lake = open_lake(local)
    assert isinstance(lake, LocalObjectStore) and lake.root == (tmp_path / "lake").resolve()


def test_endpoint_userinfo_never_reaches_logs_or_errors(s3_settings, s3_server, caplog):
    host = s3_server.split("://", 1)[1]
    store = S3ObjectStore(s3_settings(f"http://user:pw-in-url@{host}"), give_up_after=0)
    assert "pw-in-url" not in store.describe() and host in store.describe()
    with pytest.raises(LakeError) as err:  # a missing bucket: the one-line error names the endpoint
        S3ObjectStore(s3_settings(f"http://user:pw-in-url@{host}", S3_BUCKET_NAME="tp-none")).check_writable()
    assert host in str(err.value) and "pw-in-url" not in str(err.value) and "pw-in-url" not in caplog.text


def test_fetch_jars_with_a_bad_setting_prints_one_line_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "SPARK_JARS"))}
    env.update({"PYTHONPATH": str(ROOT), "BATCH_SIZE": "lots", "DATA_DIR": str(tmp_path)})
    proc = subprocess.run(
        [sys.executable, "-m", "src.utils.spark_utils", "fetch-jars"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: BATCH_SIZE=") and "Traceback" not in proc.stderr


def test_s3a_retries_outlast_a_long_outage(s3_settings):
    """Spark's reads retry inside the JVM with Hadoop's exponential backoff, which sleeps
    base * 2^(k+1) * U(0.5, 1.5) before retry k: even its least total must outlast a 90 s outage."""
    conf = s3a_conf(s3_settings())
    p = "spark.hadoop.fs.s3a."
    for kind in ("retry", "retry.throttle"):
        base = float(conf[f"{p}{kind}.interval"].removesuffix("ms")) / 1000
        limit = int(conf[f"{p}{kind}.limit"])
        assert 0 < limit < 63  # Hadoop refuses more
        assert sum(base * 2 ** (k + 1) * 0.5 for k in range(limit)) >= 180, kind
    assert int(conf[p + "attempts.maximum"]) <= 3  # the SDK below S3A barely retries: no deep nesting


# -- Spark through s3a:// ----------------------------------------------------------------


def test_s3a_conf_matches_pyspark_hadoop_and_holds_no_secret(s3_settings, tmp_path):
    version = bundled_hadoop_version()
    assert (Path(__import__("pyspark").__file__).parent / "jars" / f"hadoop-client-api-{version}.jar").is_file()

    conf = s3a_conf(s3_settings(DATA_DIR=str(tmp_path / "fresh")))  # nothing cached: Spark resolves it
    assert conf["spark.jars.packages"] == f"org.apache.hadoop:hadoop-aws:{version}"
    assert conf["spark.jars.ivy"] == str((tmp_path / "fresh" / "ivy").resolve())
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.endpoint.region"] == "us-east-1"
    assert conf["spark.hadoop.fs.s3a.aws.credentials.provider"].endswith("EnvironmentVariableCredentialsProvider")
    assert not any(TEST_SECRET_KEY in v for v in conf.values())
    assert s3a_env(s3_settings())["AWS_SECRET_ACCESS_KEY"] == TEST_SECRET_KEY

    aws = s3_settings(S3_ENDPOINT_URL="", AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_REGION="eu-west-1")
    conf = s3a_conf(aws)
    assert "spark.hadoop.fs.s3a.endpoint" not in conf and "spark.hadoop.fs.s3a.path.style.access" not in conf
    assert conf["spark.hadoop.fs.s3a.aws.credentials.provider"].endswith("DefaultCredentialsProvider")
    assert "AWS_SECRET_ACCESS_KEY" not in s3a_env(aws)

    jars = tmp_path / "jars"
    jars.mkdir()
    for name in ("hadoop-aws-3.5.0.jar", "bundle-2.35.4.jar"):
        (jars / name).write_bytes(b"")
    offline = s3a_conf(s3_settings(SPARK_JARS=f"{jars}/*.jar", S3_ENDPOINT_URL="https://minio.local:9000"))
    assert "spark.jars.packages" not in offline
    assert offline["spark.driver.extraClassPath"] == f"{jars}/bundle-2.35.4.jar:{jars}/hadoop-aws-3.5.0.jar"
    assert offline["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "true"
    cluster = s3a_conf(
        s3_settings(SPARK_JARS=f"{jars}/*.jar", SPARK_MASTER="spark://10.0.0.1:7077", SPARK_CHECKPOINT_DIR="s3a://b/cp")
    )
    assert cluster["spark.jars"] == f"{jars}/bundle-2.35.4.jar,{jars}/hadoop-aws-3.5.0.jar"


SPARK_READER = r"""
import json, os, sys, time
from pathlib import Path
from config.config import Settings
from src.utils.spark_utils import start_session
from src.schemas.transaction_schemas import chunk_spark_schema

settings = Settings.from_env(dotenv=Path(sys.argv[1]))
assert "AWS_SECRET_ACCESS_KEY" not in os.environ  # keys only in .env: start_session exports them
t0 = time.monotonic()
spark = start_session(settings, app_name="s3a-test")
t1 = time.monotonic()
df = spark.read.schema(chunk_spark_schema()).parquet(sys.argv[2])
rows = df.groupBy("day").agg({"amount": "sum", "*": "count"}).orderBy("day").collect()
conf = spark.sparkContext.getConf().getAll()
print("RESULT " + json.dumps({
    "days": {r["day"]: [r["count(1)"], str(r["sum(amount)"])] for r in rows},
    "secret_in_conf": any(settings.aws_secret_access_key.get_secret_value() in v for _, v in conf),
    "packages": dict(conf).get("spark.jars.packages"),
    "seconds": [round(t1 - t0, 1), round(time.monotonic() - t1, 1)],
}))
spark.stop()
"""


def _spark_read(settings_env: dict[str, str], dotenv: Path, uri: str) -> dict:
    dotenv.write_text("".join(f"{k}={v}\n" for k, v in settings_env.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "SPARK_JARS"))}
    env.update({"PYTHONPATH": str(ROOT), "SPARK_LOCAL_IP": "127.0.0.1"})
    proc = subprocess.run(
        [sys.executable, "-c", SPARK_READER, str(dotenv), uri],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert TEST_SECRET_KEY not in output
    assert proc.returncode == 0, output[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    sys.stderr.write(f"spark session start / read: {result['seconds']} s\n")
    return result


def _write_chunks(store: S3ObjectStore) -> dict[str, list]:
    expected = {}
    for day, rows in (("26", 1500), ("27", 700)):
        data = _chunk(f"f{day}", 1, rows)
        store.put_bytes(f"raw-transactions/year=2026/month=11/day={day}/f{day}-000001.parquet", data)
        total = sum(decimal.Decimal(i % 1000) / 10 for i in range(rows)).quantize(decimal.Decimal("0.01"))
        expected[day] = [rows, str(total)]
    store.put_bytes("raw-transactions/_summary/ingest.json", b"{}")  # names with _ are not data
    return expected


def _settings_env(settings: Settings, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in settings.to_env().items() if v}
    env.update({"DATA_DIR": str(data_dir), "SPARK_MASTER": "local[1]"})
    return env


def test_spark_reads_store_objects_through_s3a(s3_settings, hadoop_aws_jars, tmp_path):
    """The product's raw layout on S3, its processing log at the product's own key, reads at the root."""
    settings = s3_settings()
    store = S3ObjectStore(settings)
    expected = _write_chunks(store)
    assert lake_paths.PROCESSING_LOG_KEY == "raw-transactions/_log/processing_log.json"
    store.put_bytes(lake_paths.PROCESSING_LOG_KEY, json.dumps({"files": []}).encode(), overwrite=True)
    fs = pafs.S3FileSystem(
        access_key=settings.aws_access_key_id.get_secret_value(),
        secret_key=settings.aws_secret_access_key.get_secret_value(),
        endpoint_override=settings.s3_endpoint_url,
        region=settings.aws_region,
    )
    table = ds.dataset(
        f"{settings.s3_bucket_name}/raw-transactions", filesystem=fs, format="parquet", partitioning="hive"
    ).to_table()
    by_day = table.group_by("day").aggregate([("amount", "sum"), ("amount", "count")]).to_pylist()
    assert {f"{r['day']:02d}": [r["amount_count"], str(r["amount_sum"])] for r in by_day} == expected
    data_dir = use_shared_ivy(tmp_path / "data")
    result = _spark_read(
        _settings_env(settings, data_dir), tmp_path / ".env", f"s3a://{settings.s3_bucket_name}/raw-transactions/"
    )
    assert result["days"] == expected
    assert result["secret_in_conf"] is False
    assert result["packages"] is None  # the cached jars were used, nothing resolved at start


@pytest.mark.slow
def test_first_start_fetches_hadoop_aws_into_data_dir(s3_settings, hadoop_aws_jars, tmp_path):
    """Nothing resolved in DATA_DIR yet: the session start fetches the jars (here from the shared Ivy cache)."""
    settings = s3_settings()
    expected = _write_chunks(S3ObjectStore(settings))
    data_dir = tmp_path / "data"
    (data_dir / "ivy").mkdir(parents=True)
    (data_dir / "ivy" / "cache").symlink_to(use_shared_ivy(tmp_path / "shared") / "ivy" / "cache")
    result = _spark_read(
        _settings_env(settings, data_dir), tmp_path / ".env", f"s3a://{settings.s3_bucket_name}/raw-transactions/"
    )
    assert result["days"] == expected
    assert result["packages"] is None  # files on the class path, not Spark's per-start resolution
    manifest = data_dir / "ivy" / f"hadoop-aws-{bundled_hadoop_version()}.classpath"
    assert any(Path(j).name.startswith("hadoop-aws-") for j in manifest.read_text().split(os.pathsep))


def _imports(module: str) -> set[str]:
    """Every module `module` imports, at its top or inside a function (a lazy import is still an edge)."""
    import ast

    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_lake_and_spark_modules_have_no_import_cycle():
    assert "src.utils.s3_utils" not in _imports("src.utils.object_store")
    assert "src.utils.object_store" in _imports("src.utils.s3_utils")  # the one direction
    assert not {m for m in _imports("config.spark_config") if m.startswith("src")}  # config never imports src
    assert "config.spark_config" in _imports("src.utils.spark_utils")  # the one direction
    assert "src.resources" not in _imports("src.utils.s3_utils") | _imports("src.utils.gdrive_source")
