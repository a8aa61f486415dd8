"""`python main.py status` and `python main.py psql` against a real PostgreSQL filled by a real Mechanism X run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout
    )


def _ingest(env: dict[str, str], inbox: Path, *, rows: int) -> None:
    """Fill the ledger the way the daemon does: a generated sample ingested by Mechanism X (no Y, no Spark)."""
    sample = _run(["-m", "src.sample_data", "--rows", str(rows), "--seed", "7", "--out", str(inbox)], env)
    assert sample.returncode == 0, sample.stderr
    x = _run(["-m", "src.mechanism_x.data_ingestion", "--drain"], env)
    assert x.returncode == 0, x.stderr[-3000:]


@pytest.fixture
def env(product_env):
    env = dict(product_env)
    env.update({"BATCH_SIZE": "500", "LOG_FORMAT": "text"})
    return env


def test_status_exits_zero_and_prints_every_section_when_nothing_fails(env, base_env, pg_conn):
    inbox = Path(base_env["LOCAL_INBOX_DIR"])
    _ingest(env, inbox, rows=1200)

    result = _run(["main.py", "status"], env)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for title in ("Summary", "Waiting for", "Throughput per minute", "Detections per pattern", "Files"):
        assert f"== {title}" in out
    with pg_conn.cursor() as cur:
        cur.execute("SELECT count(*), sum(rows_valid) FROM chunks WHERE status = 'written'")
        chunks, rows = cur.fetchone()
    assert chunks == 3  # 1,200 rows in chunks of 500
    assert f"{chunks} / 0" in out  # written / processed: no Y ran
    assert f"{rows} / " in out
    assert f"mechanism Y has {chunks} chunk(s) to process" in out
    assert "none: nothing is failing" in out


def test_status_exits_nonzero_on_a_failed_file_and_names_it(env, base_env):
    inbox = Path(base_env["LOCAL_INBOX_DIR"])
    (inbox / "broken.csv").write_bytes(b"step,customer\x00,age\n1,2,3\n")
    _ingest(env, inbox, rows=600)

    result = _run(["main.py", "status"], env)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "file broken.csv is failed: binary content (NUL bytes)" in result.stdout
    assert "file_failed" in result.stdout  # the processing_logs ERROR row, in the failures table
    as_json = _run(["main.py", "status", "--json"], env)
    assert as_json.returncode == 1
    status = json.loads(as_json.stdout)
    assert [f["name"] for f in status["files"] if f["status"] == "failed"] == ["broken.csv"]
    assert status["failures"]["recent_errors"] == 1


def test_status_on_an_empty_database_says_so(env):
    result = _run(["main.py", "status"], env)
    assert result.returncode == 0, result.stderr
    assert "has not run against this database yet" in result.stdout


def test_psql_runs_on_the_daemons_database(env, base_env, pg_conn):
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE marker (v text); INSERT INTO marker VALUES ('here')")
    result = _run(["main.py", "psql", "-At", "-c", "SELECT v FROM marker"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "here"


def test_psql_print_url_masks_the_password(env):
    env = dict(env, POSTGRES_PASSWORD="s3cr3t-value")
    result = _run(["main.py", "psql", "--print-url"], env)
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert "s3cr3t" not in url
    assert url == f"postgresql://postgres:****@127.0.0.1:{env['POSTGRES_PORT']}/{env['POSTGRES_DB']}"


def test_psql_gets_the_password_through_its_environment_only(make_settings):
    from src.observability import cli

    settings = make_settings(POSTGRES_PASSWORD="s3cr3t-value")
    params = cli.connection_params(settings)
    env = cli.psql_env(params, base={})
    assert env["PGPASSWORD"] == "s3cr3t-value"
    assert env["PGHOST"] == "127.0.0.1" and env["PGDATABASE"] == settings.postgres_db
    assert "s3cr3t" not in cli.masked_url(params)
