"""Faults ridden out in place, with the real thing: the real PostgreSQL server restarted under a running
daemon, a poison chunk, a transaction redone after its acknowledgement was lost."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from tests.pg_cluster import PgCluster, pg_bindir
from tests.reference import credited_chunks, expected_detections, limits_of, read_importance, read_transactions

ROOT = Path(__file__).resolve().parent.parent
ROWS, SEED, BATCH = 60_000, 11, 2_500
THRESHOLDS = {"PATID1_MIN_MERCHANT_TXNS": "3000", "PATID2_MIN_TXNS": "40", "PATID3_MIN_FEMALE_CUSTOMERS": "5"}


@pytest.fixture
def own_pg():
    """A PostgreSQL server of this test's own, so restarting it disturbs no other test."""
    bindir = pg_bindir()
    assert bindir is not None, "PostgreSQL server binaries are needed (.ci/run installs them)"
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="tp-own-pg-")), bindir)
    cluster.start()
    conn = psycopg2.connect(cluster.admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE tp")
    conn.close()
    yield cluster
    cluster.destroy()


def _query(cluster: PgCluster, sql: str, params: tuple = ()) -> list[tuple]:
    """One query on a fresh connection; [] while the server is down."""
    try:
        conn = psycopg2.connect(f"host=127.0.0.1 port={cluster.port} dbname=tp user=postgres connect_timeout=3")
    except psycopg2.OperationalError:
        return []
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    except psycopg2.Error:
        return []
    finally:
        conn.close()


def _written(cluster: PgCluster) -> int:
    rows = _query(cluster, "SELECT count(*) FROM chunks WHERE status = 'written'")
    return rows[0][0] if rows else -1


def _wait_for(predicate, deadline: float, what: str, proc: subprocess.Popen) -> None:
    while not predicate():
        assert proc.poll() is None, f"the daemon exited early while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_postgres_restarts_during_a_paced_drain_are_ridden_out_in_place(own_pg, tmp_path):
    """`pg_ctl restart -m fast` twice while X releases chunks (one a second) and Y processes them: no worker exits (the
    supervisor restarts nothing), every chunk is processed once, and the detections and the chunk each is
    credited to are the reference's."""
    from src.sample_data import generate

    inbox = tmp_path / "inbox"
    generate(inbox, rows=ROWS, seed=SEED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "GDRIVE_", "TP_", "AWS_"))}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "LOCAL_INBOX_DIR": str(inbox),
            "LOCAL_LAKE_DIR": str(tmp_path / "lake"),
            "DATA_DIR": str(tmp_path / "data"),
            "BATCH_SIZE": str(BATCH),
            "CHUNK_INTERVAL_SECONDS": "1",
            "PROCESSING_INTERVAL": "0.5",
            "DETECTIONS_FLUSH_SECONDS": "0.5",
            "SPARK_MASTER": "local[2]",
            "SPARK_LOCAL_IP": "127.0.0.1",
            "LOG_FORMAT": "text",
            "RETRY_MAX_DELAY_SECONDS": "2",
            "METRICS_ADDR": "off",
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(own_pg.port),
            "POSTGRES_DB": "tp",
            "POSTGRES_USER": "postgres",
            **THRESHOLDS,
        }
    )
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--drain"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 600
            chunks = ROWS // BATCH
            # X releases one chunk a second, so after either restart chunks are still to come: both workers
            # are at work during both restarts, whatever this machine's speed.
            _wait_for(lambda: _written(own_pg) >= 3, deadline, "three chunks written", proc)
            own_pg.restart("fast")
            _wait_for(lambda: _written(own_pg) >= chunks // 2, deadline, "half the chunks written", proc)
            own_pg.restart("fast")
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log_path.read_text()
    assert code == 0, output[-5000:]
    assert "waiting for PostgreSQL" in output, "the restarts were not noticed: the test proved nothing"
    assert "exited with" not in output, "a worker died and was restarted by the supervisor:\n" + output[-5000:]

    from config.config import Settings

    settings = Settings.from_env(env, dotenv=Path("/nonexistent"))
    ref_chunks, txns = read_transactions([inbox / "transactions.csv"], settings.batch_size)
    conn = psycopg2.connect(f"host=127.0.0.1 port={own_pg.port} dbname=tp user=postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT seq, status, processed_at IS NOT NULL, rows_valid FROM chunks ORDER BY seq")
            ledger = cur.fetchall()
            cur.execute("SELECT count(*) FROM transactions")
            stored = cur.fetchone()[0]
        expected = expected_detections(
            conn, ref_chunks, txns, read_importance(inbox / "CustomerImportance.csv"), limits_of(settings)
        )
        credited = credited_chunks(conn)
    finally:
        conn.close()
    assert len(ledger) == chunks and all(status == "written" and done for _, status, done, _ in ledger)
    assert stored == sum(r[3] for r in ledger) == len(txns), "rows were stored twice or lost"
    assert credited == {d: e.chunk for d, e in expected.items()}
    assert {p for p, _, _ in credited} == {"PatId1", "PatId2", "PatId3"}


def test_a_commit_redone_after_a_lost_acknowledgement_is_not_counted_twice(pg_conn, make_settings):
    """The server commits, then the connection dies before the client hears it: `Database.run` redoes the
    work on a new connection, and the ledger's batch id makes the redo a no-op."""
    from src import ledger
    from src.utils.db import Database

    settings = make_settings()
    db = Database(settings)
    db.apply_schema()
    with pg_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO source_files (file_id, source, name, kind, status) VALUES ('f', 'local', 'f.csv', "
            "'transactions', 'done')"
        )
        cur.execute(
            "INSERT INTO chunks (file_id, chunk_seq, first_line, last_line, rows_total, rows_valid, rows_quarantined, "
            "bytes_start, bytes_end, prefix_md5, object_key, ingest_date, status) VALUES "
            "('f', 0, 2, 3, 2, 2, 0, 10, 20, 'x', 'k0', current_date, 'written') RETURNING seq"
        )
        seq = cur.fetchone()[0]
    attempts = []

    def commit(cur) -> None:
        attempts.append(1)
        cur.execute("SELECT 1 FROM chunks WHERE y_batch_id = 'b1'")
        if cur.fetchone():
            return
        ledger.mark_batch_processed(cur, "b1", [ledger.ChunkMark(seq, 2, 0, 0)])
        if len(attempts) == 1:
            # Commit from the server's side, then lose the connection before the client's commit returns.
            cur.connection.commit()
            with pg_conn.cursor() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (cur.connection.get_backend_pid(),))
            cur.execute("SELECT 1")  # the client finds out: the connection is gone

    db.run(commit, what="test commit")
    db.close()
    assert len(attempts) == 2
    with pg_conn.cursor() as cur:
        cur.execute("SELECT y_batch_id, y_rows_clean FROM chunks WHERE seq = %s", (seq,))
        assert cur.fetchone() == ("b1", 2)


def test_database_waits_for_a_server_that_comes_up_late(own_pg, make_settings):
    """A transient fault at start (the server not up yet) is waited out with one line per wait, not an exit."""
    from src.utils.db import Database

    own_pg.stop()
    settings = make_settings(
        POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(own_pg.port), POSTGRES_DB="tp", RETRY_MAX_DELAY_SECONDS="1"
    )
    db = Database(settings)
    starter = threading.Timer(3.0, own_pg.start)
    starter.start()
    try:
        assert db.query("SELECT 42") == [(42,)]
    finally:
        starter.join()
        db.close()


def test_a_refused_password_is_a_settings_error_naming_the_variables(own_pg, make_settings):
    from src.errors import SettingsError
    from src.utils.db import Database

    settings = make_settings(
        POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(own_pg.port), POSTGRES_DB="no_such_db", POSTGRES_USER="postgres"
    )
    with pytest.raises(SettingsError, match="POSTGRES_DB"):
        Database(settings).query("SELECT 1")
