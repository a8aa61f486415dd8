"""The embedded PostgreSQL (pgserver under DATA_DIR): a stale pid file, a SIGKILLed server brought back, and the
embedded default end to end (no POSTGRES_* and no TP_DATABASE_URL at all)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import pytest

from src.sample_data import generate
from tests.test_supervisor import _dead, _wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir():
    """DATA_DIR outside pytest's base temp: as root, pgserver runs the server as its own user, which must traverse
    every parent, and each new pytest session (other tests running at the same time) closes the base temp to 0700."""
    path = Path(tempfile.mkdtemp(prefix="tp-embedded-")) / "data"
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


def _settings(data_dir: Path):
    from config.config import Settings

    return Settings.from_env({"DATA_DIR": str(data_dir)}, dotenv=Path("/nonexistent"))


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])


def _stop_server(pgdata: Path) -> None:
    from pgserver.postgres_server import PostgresServer

    server = PostgresServer._instances.get(pgdata.resolve())
    if server is not None:
        server.cleanup()  # the last handle: pg_ctl stop


def test_a_killed_embedded_server_is_restarted_and_a_stale_pid_file_cleared(data_dir, caplog):
    from src.utils.embedded_postgres import EmbeddedWatch, embedded_pgdata, is_alive, start_embedded

    caplog.set_level(logging.INFO, logger="src.utils.embedded_postgres")
    settings = _settings(data_dir)
    pgdata = embedded_pgdata(settings)
    uri = start_embedded(settings)
    try:
        assert is_alive(uri)
        first = _postmaster_pid(pgdata)
        watch = EmbeddedWatch(settings, uri, interval=0.2)
        assert watch.check() and watch.restarts == 0

        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not _dead(first):
            assert time.monotonic() < deadline, "the postmaster survived SIGKILL"
            time.sleep(0.1)
        assert not is_alive(uri)

        # While the server cannot start (a broken postgresql.conf), each check says why in one line and fails.
        conf = pgdata / "postgresql.conf"
        good = conf.read_bytes()
        conf.write_bytes(good + b"\nthis line is not a setting\n")
        time.sleep(0.3)
        assert watch.check() is False and watch.restarts == 0
        failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embedded PostgreSQL did not")]
        assert len(failed) == 1 and "pg_ctl start exited 1: " in failed[0] and "postgresql.conf" in failed[0], failed
        conf.write_bytes(good)

        deadline = time.monotonic() + 120
        while watch.restarts == 0:
            assert time.monotonic() < deadline, "\n".join(r.getMessage() for r in caplog.records)
            watch.check()
            time.sleep(0.2)
        assert is_alive(watch.uri) and _postmaster_pid(pgdata) != first
        with psycopg2.connect(watch.uri) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            assert cur.fetchone() == (settings.postgres_db,)

        # A clean stop, then a postmaster.pid naming a live process that is not PostgreSQL (a pid reused after a
        # reboot): pgserver alone would take it for the running server and never start one.
        _stop_server(pgdata)
        assert not is_alive(watch.uri)
        (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{pgdata}\n0\n5432\n{pgdata}\n\n0 0\nready\n")
        caplog.clear()
        uri = start_embedded(settings)
        assert is_alive(uri)
        assert _postmaster_pid(pgdata) != os.getpid()
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            f"removed the stale {pgdata / 'postmaster.pid'} (pid {os.getpid()} is not a running PostgreSQL server)"
        ]
        if os.geteuid() == 0:  # pgserver opened DATA_DIR to its system user; listing it stays closed
            assert stat.S_IMODE(settings.data_dir.stat().st_mode) & (stat.S_IRGRP | stat.S_IROTH) == 0
    finally:
        _stop_server(pgdata)


@pytest.mark.slow
def test_embedded_default_drains_and_survives_its_server_being_killed(tmp_path, product_env, data_dir):
    """No POSTGRES_* and no TP_DATABASE_URL: main.py runs pgserver under DATA_DIR. Its server is SIGKILLed mid-run;
    the supervisor brings it back and the drain completes."""
    env = {k: v for k, v in product_env.items() if not k.startswith(("POSTGRES_", "TP_"))}
    env.update(
        DATA_DIR=str(data_dir),
        BATCH_SIZE="5000",
        CHUNK_INTERVAL_SECONDS="2",
        LOG_FORMAT="text",
        SPARK_MASTER="local[2]",
    )
    generate(Path(env["LOCAL_INBOX_DIR"]), rows=30_000, seed=3)
    pgdata = Path(env["DATA_DIR"]) / "postgres"
    log = tmp_path / "main.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--drain"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_for(log, r"chunk \S+-000001 written", 400, proc)
        first = _postmaster_pid(pgdata)
        os.kill(first, signal.SIGKILL)
        _wait_for(log, r"embedded PostgreSQL is back \(restart 1\)", 120, proc)
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    assert "embedded parts: inbox, lake, PostgreSQL" in text
    assert f"database: embedded PostgreSQL (pgserver) in {pgdata}" in text
    # The workers started beside the server's own start, and went on once it was up.
    assert text.index("mechanism Y started") < text.index("database, lake and source ready")
    assert "drain complete: every file ingested and every chunk processed" in text

    # The server was stopped with the supervisor (it held the last handle); look at what the run left in it.
    from src.utils.embedded_postgres import start_embedded

    uri = start_embedded(_settings(Path(env["DATA_DIR"])))
    try:
        with psycopg2.connect(uri) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*), count(*) FILTER (WHERE processed_at IS NOT NULL), sum(rows_valid) FROM chunks"
            )
            assert cur.fetchone() == (6, 6, 30_000)
    finally:
        _stop_server(pgdata)
