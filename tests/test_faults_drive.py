"""Mechanism X for real (`python -m src.mechanism_x.data_ingestion --drain`) against a fake Drive that fails a
share of its requests (429, 403 rateLimitExceeded, 500, 503) and is fully down for 30 s from the first download
request: the drain still ends exact, no file fails, and the log says what X is waiting for. The outage is long
against the backoff's cap (RETRY_MAX_DELAY_SECONDS=2: 15 caps) and meets X with more waits than MAX_ATTEMPTS, so
an X that counted waits as failed attempts, or gave up on a long wait, would fail a file here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from config.config import Settings
from src.resources import open_lake
from tests.fake_drive import FakeDrive

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ROWS = 120_000  # transactions.csv ~9.9 MB: two 8 MiB Range requests, so a download can resume mid-file
OUTAGE_SECONDS = 30.0
RETRY_MAX_DELAY_SECONDS = 2.0  # the outage lasts 15 of these caps
EMAIL = "ingest@tp-faults.iam.gserviceaccount.com"
WAIT_LINE = "waiting for Drive at "


def _key_file(path: Path, key, token_uri: str) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    info = {
        "type": "service_account",
        "project_id": "tp-faults",
        "private_key_id": "0123456789abcdef",
        "private_key": pem.decode(),
        "client_email": EMAIL,
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return path


@pytest.fixture
def drive():
    fake = FakeDrive(page_size=100).start()
    yield fake
    fake.stop()


def _lake_lines(settings: Settings) -> list[tuple[str, int]]:
    lake = open_lake(settings)
    lines: list[tuple[str, int]] = []
    for key in lake.list_keys("raw-transactions/"):
        if key.endswith(".parquet") and "/_" not in key:
            table = pq.read_table(io.BytesIO(lake.get_bytes(key)), columns=["source_file_id", "source_line"])
            lines += zip(table["source_file_id"].to_pylist(), table["source_line"].to_pylist())
    return lines


def test_x_rides_out_a_drive_outage_and_flaky_requests(drive, product_env, pg_conn, tmp_path):
    from src.sample_data import generate

    sample = tmp_path / "sample"
    generate(sample, rows=ROWS, seed=11)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    drive.add_account(EMAIL, key.public_key())
    folder = drive.add_folder("banksim inbox")
    ids = {
        name: drive.add_file(name, (sample / name).read_bytes(), folder)
        for name in ("CustomerImportance.csv", "transactions.csv")
    }
    tx = ids["transactions.csv"]

    # Each kind of transient answer at least once, a random 5 % of everything else, and 30 s of 503.
    drive.inject_fault("files.get", 503)
    drive.inject_fault("changes.getStartPageToken", 429)
    drive.inject_fault("files.list", "403rate")
    drive.inject_fault("changes.list", 500)
    drive.set_flaky(0.05, seed=5)
    drive.schedule_outage(OUTAGE_SECONDS, starts_on="media")

    env = dict(product_env)
    env.update(
        {
            "GDRIVE_FOLDER_ID": folder,
            "GOOGLE_CREDENTIALS_PATH": str(_key_file(tmp_path / "key.json", key, drive.token_uri)),
            "GDRIVE_API_ENDPOINT": drive.api_endpoint,
            "BATCH_SIZE": "10000",
            "RETRY_MAX_DELAY_SECONDS": str(RETRY_MAX_DELAY_SECONDS),
            "LOG_FORMAT": "text",
        }
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "src.mechanism_x.data_ingestion", "--drain"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=OUTAGE_SECONDS + 240, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    (tmp_path / "x.log").write_text(output)
    assert proc.returncode == 0, output[-5000:]
    assert "PRIVATE KEY" not in output and "ya29." not in output and "Traceback" not in output

    # The outage happened, lasted its 30 s, and X waited it out with a log line per wait, more waits than a file's
    # attempts: waiting out an outage is no failed attempt.
    assert drive.outage_started is not None and drive.outage_over()
    assert seconds >= OUTAGE_SECONDS
    waits = [line for line in output.splitlines() if WAIT_LINE in line]
    settings = Settings.from_env(env, dotenv=Path("/nonexistent"))
    assert len(waits) > settings.max_attempts, output[-5000:]
    assert all(drive.api_endpoint in w for w in waits)
    assert any("is back" in line and "Drive at" in line for line in output.splitlines())
    assert {k for _, k in drive.chaos} >= {503} and len(drive.chaos) > len(waits) // 2
    assert {r.fault for r in drive.requests if r.fault is not None} >= {429, 500, 503, "403rate"}

    # A download cut by a fault resumed where it was: each byte range of transactions.csv served once.
    served = [r.headers["range"] for r in drive.requests if r.op == "media" and r.file_id == tx and r.fault is None]
    assert len(served) == len(set(served)) == 2, served

    # Exact: every file done, nothing failed, every line of transactions.csv in the lake once.
    with pg_conn.cursor() as cur:
        cur.execute("SELECT file_id, status, reason FROM source_files ORDER BY file_id")
        files = cur.fetchall()
        cur.execute(
            "SELECT status, count(*), sum(rows_total), sum(rows_valid), sum(rows_quarantined) FROM chunks GROUP BY status"
        )
        chunks = cur.fetchall()
    assert sorted((f, s) for f, s, _ in files) == sorted((i, "done") for i in ids.values()), files
    assert len(chunks) == 1 and chunks[0][0] == "written" and chunks[0][2] == ROWS, chunks
    lines = _lake_lines(settings)
    assert len(lines) == len(set(lines)) == chunks[0][3] == ROWS - chunks[0][4]
    assert {f for f, _ in lines} == {tx}

    # No identity in the lake (the processing log describes the source), and the account logged once, at start.
    lake = open_lake(settings)
    assert not [k for k in lake.list_keys("") if EMAIL.encode() in lake.get_bytes(k)]
    assert len([line for line in output.splitlines() if EMAIL in line]) == 1, output[-3000:]
    sys.stderr.write(f"\nX drain through a {OUTAGE_SECONDS:.0f} s Drive outage: {seconds:.1f} s, {len(waits)} waits\n")
