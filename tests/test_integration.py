"""End to end: `python main.py --drain` as a user runs it, on a real PostgreSQL, against the local lake and inbox,
an S3 server (moto) behind a fault-injecting proxy, and a fake Google Drive over HTTP.

One local run (local inbox -> local lake) is the baseline; the S3 and Drive runs must produce the same chunks
and the same detections from the same two CSVs. Thresholds are lowered through the environment so that every
pattern fires on a 30,000-row sample.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import psycopg2
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from config.config import Settings
from src.resources import open_lake
from src.utils.object_store import ObjectStore
from tests.fake_drive import FakeDrive
from tests.reference import credited_chunks, expected_detections, limits_of, read_importance, read_transactions
from tests.s3_fixtures import *  # noqa: F403
from tests.s3_fixtures import TEST_ACCESS_KEY, TEST_SECRET_KEY, use_shared_ivy
from tests.test_supervisor import _dead, _launched_workers

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ROWS = 30_000
SEED = 7
BATCH = 5_000
RUN_TIMEOUT = 240
THRESHOLDS = {
    "PATID1_MIN_MERCHANT_TXNS": "3000",
    "PATID2_MIN_TXNS": "40",
    "PATID3_MIN_FEMALE_CUSTOMERS": "5",
}
DATE_PART = re.compile(r"year=\d{4}/month=\d{2}/day=\d{2}/")
DRIVE_EMAIL = "ingest@tp-e2e.iam.gserviceaccount.com"


@dataclass
class Run:
    output: str
    seconds: float
    chunks: list[dict]  # ledger rows in `seq` order
    detections: set[tuple[str, str, str]]
    objects: dict[str, int]  # chunk object key -> rows in the Parquet object
    filed: list[tuple[str, str, str]]  # every row of every detection file in the lake
    keys: list[str]  # everything in the lake


# -------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    from src.sample_data import generate

    out = tmp_path_factory.mktemp("sample")
    generate(out, rows=ROWS, seed=SEED)
    return out


@pytest.fixture(scope="module")
def new_db(pg_server):
    """`new_db()` -> the name of a fresh database on the test server (dropped at the end of the module)."""
    made: list[str] = []

    def make() -> str:
        name = "e2e_" + uuid.uuid4().hex[:12]
        conn = psycopg2.connect(pg_server.admin_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        made.append(name)
        return name

    yield make
    conn = psycopg2.connect(pg_server.admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in made:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def _env(pg_server, db: str, workdir: Path, inbox: Path | None, **overrides: str) -> dict[str, str]:
    """A full process environment for one product run in `workdir` on database `db`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "GDRIVE_", "TP_", "AWS_"))}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "LOCAL_INBOX_DIR": str(inbox or workdir / "inbox"),
            "LOCAL_LAKE_DIR": str(workdir / "lake"),
            "DATA_DIR": str(use_shared_ivy(workdir / "data")),
            "BATCH_SIZE": str(BATCH),
            "CHUNK_INTERVAL_SECONDS": "0",
            "PROCESSING_INTERVAL": "0.5",
            "DETECTIONS_FLUSH_SECONDS": "0.5",
            "SPARK_MASTER": "local[2]",
            "SPARK_LOCAL_IP": "127.0.0.1",
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "text",
            **THRESHOLDS,
        }
    )
    env.update(pg_server.env_for(db))
    env.update(overrides)
    return env


def _copy_inbox(sample: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("CustomerImportance.csv", "transactions.csv"):
        shutil.copy2(sample / name, dest / name)
    return dest


def _main(env: dict[str, str], *args: str, timeout: float = RUN_TIMEOUT) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def _lake(env: dict[str, str]) -> ObjectStore:
    return open_lake(Settings.from_env(env, dotenv=Path("/nonexistent")))


def _collect(pg_server, db: str, lake: ObjectStore, output: str, seconds: float) -> Run:
    conn = psycopg2.connect(pg_server.dsn_for(db))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT seq, file_id, chunk_seq, first_line, last_line, rows_total, rows_valid, object_key, "
                "ingest_date, status, processed_at IS NOT NULL AS processed_at FROM chunks ORDER BY seq"
            )
            cols = [d[0] for d in cur.description]
            chunks = [dict(zip(cols, r)) for r in cur.fetchall()]
            cur.execute("SELECT pattern_id, customer_name, merchant_id FROM pattern_detections")
            found = cur.fetchall()
    finally:
        conn.close()
    detections = set(found)
    assert len(detections) == len(found)
    keys = sorted(lake.list_keys(""))
    objects = {}
    for k in keys:
        if k.startswith("raw-transactions/year="):
            objects[k] = pq.read_metadata(io.BytesIO(lake.get_bytes(k))).num_rows
    filed = []
    for k in keys:
        if k.startswith("pattern-detections/patid") and k.endswith(".parquet") and "/_" not in k:
            t = pq.read_table(io.BytesIO(lake.get_bytes(k)))
            filed += zip(t["patternId"].to_pylist(), t["customerName"].to_pylist(), t["MerchantId"].to_pylist())
    return Run(output, seconds, chunks, detections, objects, filed, keys)


def _assert_complete(run: Run) -> None:
    """Every chunk written and processed, every detection filed exactly once, each pattern present."""
    assert run.chunks, run.output[-3000:]
    assert all(c["status"] == "written" and c["processed_at"] for c in run.chunks), run.chunks
    assert sum(c["rows_total"] for c in run.chunks) == ROWS
    assert [c["chunk_seq"] for c in run.chunks] == list(range(len(run.chunks)))
    assert run.objects == {c["object_key"]: c["rows_valid"] for c in run.chunks}
    for c in run.chunks:
        assert DATE_PART.search(c["object_key"]).group(0) == c["ingest_date"].strftime("year=%Y/month=%m/day=%d/")
    assert {p for p, _, _ in run.detections} == {"PatId1", "PatId2", "PatId3"}
    assert len(run.filed) == len(set(run.filed)) == len(run.detections)
    assert set(run.filed) == run.detections


def _undated(key: str) -> str:
    return DATE_PART.sub("year=*/month=*/day=*/", key)


# -------------------------------------------------------------------- the baseline


@pytest.fixture(scope="module")
def local_run(pg_server, new_db, sample_dir, tmp_path_factory) -> Run:
    """`main.py --drain` on the sample: local inbox, local lake (database A)."""
    work = tmp_path_factory.mktemp("local")
    db = new_db()
    env = _env(pg_server, db, work, _copy_inbox(sample_dir, work / "inbox"))
    code, output, seconds = _main(env, "--drain")
    (work / "output.log").write_text(output)
    assert code == 0, output[-5000:]
    run = _collect(pg_server, db, _lake(env), output, seconds)
    _assert_complete(run)
    assert len(run.chunks) == ROWS // BATCH
    # The detections are the contract's, not just the product's own opinion: the reference parses the CSVs
    # itself and gives the first chunk after which each condition holds; the product must credit the same one.
    settings = Settings.from_env(env, dotenv=Path("/nonexistent"))
    chunks, txns = read_transactions([sample_dir / "transactions.csv"], settings.batch_size)
    importance = read_importance(sample_dir / "CustomerImportance.csv")
    conn = psycopg2.connect(pg_server.dsn_for(db))
    try:
        expected = expected_detections(conn, chunks, txns, importance, limits_of(settings))
        credited = credited_chunks(conn)
    finally:
        conn.close()
    assert credited == {d: e.chunk for d, e in expected.items()}
    assert run.detections == set(expected)
    sys.stderr.write(f"\nlocal drain: {seconds:.1f} s, {len(run.chunks)} chunks, {len(run.detections)} detections\n")
    return run


# -------------------------------------------------------------------- S3


def test_s3_lake_matches_local_lake_despite_put_faults(
    local_run, pg_server, new_db, sample_dir, s3_server, s3_bucket, faulty_s3, hadoop_aws_jars, tmp_path
):
    work = tmp_path / "s3"
    db = new_db()
    env = _env(
        pg_server,
        db,
        work,
        _copy_inbox(sample_dir, work / "inbox"),
        S3_BUCKET_NAME=s3_bucket,
        S3_ENDPOINT_URL=faulty_s3.endpoint,  # every request of X, Y and Spark's S3A goes through the proxy
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
    )

    def chunk_put(path: str) -> bool:
        return "/raw-transactions/year=" in unquote(path) and "uploadId" not in path

    def detection_put(path: str) -> bool:
        return "/pattern-detections/patid" in unquote(path) and "/_summary/" not in unquote(path)

    def chunk_get(path: str) -> bool:
        return "/raw-transactions/year=" in unquote(path) and "list-type" not in path

    faulty_s3.inject("PUT", 503, 2, path=chunk_put)  # SlowDown
    faulty_s3.inject("PUT", "reset", 2, path=chunk_put)  # connection reset, request lost
    faulty_s3.inject("PUT", "reset_after", 1, path=chunk_put)  # stored, answer lost
    faulty_s3.inject("PUT", 503, 1, path=detection_put)
    faulty_s3.inject("PUT", "reset", 1, path=detection_put)
    faulty_s3.inject("GET", 503, 1, path=chunk_get)  # Spark's reads through S3A
    faulty_s3.inject("GET", "reset", 1, path=chunk_get)

    code, output, seconds = _main(env, "--drain")
    assert code == 0, output[-5000:]
    assert TEST_SECRET_KEY not in output
    assert not (work / "lake").exists()  # nothing went to the local lake

    run = _collect(pg_server, db, _lake({**env, "S3_ENDPOINT_URL": s3_server}), output, seconds)
    _assert_complete(run)

    # Every fault was met, and each one was followed by a retry that got through.
    faulted = faulty_s3.requests("PUT", faulted=True)
    assert sorted(str(s.fault) for s in faulted) == sorted(
        ["503", "503", "reset", "reset", "reset_after", "503", "reset"]
    )
    assert sorted(str(s.fault) for s in faulty_s3.requests("GET", faulted=True)) == ["503", "reset"]
    assert not any(rule.count for rule in faulty_s3.rules)
    # The write-once put saw its own earlier write after the lost answer: 412, then compared equal.
    assert any(s.status == 412 for s in faulty_s3.requests("PUT", faulted=False))

    # Same chunks: keys (the date partition is the ingestion day of each run), rows per object.
    assert [_undated(k) for k in sorted(run.objects)] == [_undated(k) for k in sorted(local_run.objects)]
    assert {_undated(k): n for k, n in run.objects.items()} == {_undated(k): n for k, n in local_run.objects.items()}
    assert [(c["file_id"], c["chunk_seq"], c["rows_total"], c["rows_valid"]) for c in run.chunks] == [
        (c["file_id"], c["chunk_seq"], c["rows_total"], c["rows_valid"]) for c in local_run.chunks
    ]
    # Same detections in both databases, and in the bucket.
    assert run.detections == local_run.detections
    assert sorted(run.filed) == sorted(local_run.filed)
    assert {_undated(k) for k in run.keys} >= {
        _undated(k) for k in local_run.keys if not k.startswith("_health")
    }  # processing log, quality report, summaries: the same layout
    sys.stderr.write(f"\nS3 drain (faults injected): {seconds:.1f} s\n")


def test_missing_bucket_stops_start_with_one_line(pg_server, pg_db, s3_server, tmp_path):
    bucket = f"tp-missing-{uuid.uuid4().hex[:8]}"
    env = _env(
        pg_server,
        pg_db,
        tmp_path,
        None,
        S3_BUCKET_NAME=bucket,
        S3_ENDPOINT_URL=s3_server,
        AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
    )
    code, output, _ = _main(env, timeout=120)
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if " ERROR " in line or line.startswith("error")]
    assert len(errors) == 1, output[-3000:]
    assert bucket in errors[0] and "does not exist" in errors[0] and "us-east-1" in errors[0]
    assert "Traceback" not in output and TEST_SECRET_KEY not in output
    # The workers were launched beside the checks (they wait at the start gate); the failed check stops them.
    pids = _launched_workers(output)
    assert len(pids) == 2 and "all workers stopped" in output, output[-3000:]
    assert not [pid for pid in pids if not _dead(pid)], "a worker outlived the failed start"


# -------------------------------------------------------------------- Google Drive


@pytest.fixture(scope="module")
def drive_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def drive(drive_key):
    fake = FakeDrive(page_size=100).start()
    fake.add_account(DRIVE_EMAIL, drive_key.public_key())
    yield fake
    fake.stop()


def _key_file(path: Path, key, token_uri: str, **overrides) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "tp-e2e",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": DRIVE_EMAIL,
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    info.update(overrides)
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return path


def test_drive_source_matches_local_inbox(local_run, pg_server, new_db, sample_dir, drive, drive_key, tmp_path):
    folder = drive.add_folder("banksim inbox")
    ids = {
        name: drive.add_file(name, (sample_dir / name).read_bytes(), folder)
        for name in ("CustomerImportance.csv", "transactions.csv")
    }
    db = new_db()
    env = _env(
        pg_server,
        db,
        tmp_path,
        tmp_path / "unused-inbox",
        GDRIVE_FOLDER_ID=folder,
        GOOGLE_CREDENTIALS_PATH=str(_key_file(tmp_path / "key.json", drive_key, drive.token_uri)),
        GDRIVE_API_ENDPOINT=drive.api_endpoint,
    )
    code, output, seconds = _main(env, "--drain")
    assert code == 0, output[-5000:]
    assert "PRIVATE KEY" not in output and "ya29." not in output

    run = _collect(pg_server, db, _lake(env), output, seconds)
    _assert_complete(run)
    assert {c["file_id"] for c in run.chunks} == {ids["transactions.csv"]}
    assert not (tmp_path / "unused-inbox").exists() or not any((tmp_path / "unused-inbox").iterdir())

    # Same chunks (keys carry the Drive id instead of the local one): sequence, lines, rows.
    def shape(r: Run) -> list[tuple]:
        return [(c["chunk_seq"], c["first_line"], c["last_line"], c["rows_total"], c["rows_valid"]) for c in r.chunks]

    assert shape(run) == shape(local_run)
    assert sorted(run.objects.values()) == sorted(local_run.objects.values())
    assert all(ids["transactions.csv"] in k for k in run.objects)
    assert run.detections == local_run.detections
    assert sorted(run.filed) == sorted(local_run.filed)
    # The real client did the work over HTTP: a token grant, a listing, the media downloads.
    assert drive.count("token") >= 1 and drive.count("files.list") >= 1
    assert drive.count("media", ids["transactions.csv"]) >= 1
    sys.stderr.write(f"\nDrive drain: {seconds:.1f} s\n")


@pytest.mark.parametrize("problem", ["wrong_type", "refused"])
def test_bad_drive_credentials_stop_with_one_clear_line(pg_server, pg_db, drive, drive_key, tmp_path, problem):
    folder = drive.add_folder("banksim inbox")
    key_path = tmp_path / "key.json"
    if problem == "wrong_type":
        _key_file(key_path, drive_key, drive.token_uri, type="authorized_user")
        expect = f"GOOGLE_CREDENTIALS_PATH={key_path} holds a key of type 'authorized_user'"
    else:
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # not the account's key
        _key_file(key_path, other, drive.token_uri)
        expect = f"GOOGLE_CREDENTIALS_PATH={key_path}: the token service refused the key of {DRIVE_EMAIL}"
    env = _env(
        pg_server,
        pg_db,
        tmp_path,
        None,
        GDRIVE_FOLDER_ID=folder,
        GOOGLE_CREDENTIALS_PATH=str(key_path),
        GDRIVE_API_ENDPOINT=drive.api_endpoint,
    )
    code, output, seconds = _main(env, timeout=120)
    assert code == 2, output[-3000:]
    lines = [line for line in output.splitlines() if expect in line]
    assert len(lines) == 1, output[-3000:]
    assert "Traceback" not in output and "PRIVATE KEY" not in output
    assert "cannot start" in output  # X refuses (exit 2) and the supervisor stops everything with 2
    sys.stderr.write(f"\nDrive credentials ({problem}): exit 2 in {seconds:.1f} s\n")
