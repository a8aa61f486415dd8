"""Two daemons on one database and one lake (issue 11 item 5, SPEC §9): files leased to one Mechanism X at a
time, one active Mechanism Y with a standby that takes over.

The lease statements and the standby's lock are tested directly on the real PostgreSQL (seconds); two
Ingestors race for one file with the first one's session cut mid-file; and, marked slow, two `python main.py
--drain` daemons share the database, the inbox and the lake while the active one is SIGKILLed mid-run.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from config.config import Settings
from src import ledger
from src.sample_data import generate
from src.utils.db import Database, LockLost
from tests.conftest import run_env
from tests.reference import credited_chunks, expected_detections, limits_of, read_importance, read_transactions

ROOT = Path(__file__).resolve().parent.parent


def _query(conn, sql: str, params: tuple = ()) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def _until(predicate, what: str, timeout: float = 60.0, step: float = 0.05):
    """Poll `predicate` until it returns something truthy (generous deadline: a busy machine is slow)."""
    end = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(step)


# ---------------------------------------------------------------------------------------- the lease SQL


def test_a_file_lease_is_held_by_one_x_skipped_while_locked_and_taken_over_when_its_holder_stops(
    make_settings, pg_conn
):
    settings = make_settings()
    a, b = Database(settings), Database(settings)
    a.apply_schema()
    try:
        assert ledger.claim_file(a, "f1", "A", seconds=60).got
        held = ledger.claim_file(b, "f1", "B", seconds=60)
        assert not held.got and held.holder == "A"
        assert ledger.claim_file(a, "f1", "A", seconds=60).got, "the holder may claim its own file again"

        # A holds the row locked (its fenced ledger transaction is under way): B skips it instead of waiting.
        with a.transaction() as cur:
            ledger.fence_file(cur, "f1", "A", seconds=60)
            answer: list[ledger.Claim] = []
            t = threading.Thread(target=lambda: answer.append(ledger.claim_file(b, "f1", "B", seconds=60)))
            t.start()
            t.join(20)
            assert answer == [ledger.Claim(False, None)], "SKIP LOCKED: the claim neither waited nor took it"
        with pytest.raises(ledger.LeaseLost), b.transaction() as cur:
            ledger.fence_file(cur, "f1", "B", seconds=60)

        # A stops renewing: once its lease expires (the database's clock), B takes the file over.
        assert ledger.claim_file(a, "f1", "A", seconds=2).got
        assert not ledger.claim_file(b, "f1", "B", seconds=60).got
        taken = _until(lambda: _got(ledger.claim_file(b, "f1", "B", seconds=60)), "the lease to expire", timeout=30)
        assert taken.taken_over_from == "A"
        with pytest.raises(ledger.LeaseLost), a.transaction() as cur:
            ledger.fence_file(cur, "f1", "A", seconds=60)
        assert ledger.renew_leases(a, "A", seconds=60) == set()
        assert ledger.renew_leases(b, "B", seconds=60) == {"f1"}

        # B's renewing session ends (its process was killed): A takes over at once, long before expiry.
        _query(pg_conn, "SELECT pg_terminate_backend(%s)", (b.conn.get_backend_pid(),))
        t0 = time.monotonic()
        taken = _until(lambda: _got(ledger.claim_file(a, "f1", "A", seconds=60)), "a dead holder's lease", timeout=10)
        assert taken.taken_over_from == "B" and time.monotonic() - t0 < 10
        assert _query(pg_conn, "SELECT holder, takeovers FROM file_leases WHERE file_id = 'f1'") == [("A", 2)]

        # Released: the next X claims it without a takeover.
        ledger.release_file(a, "f1", "A")
        again = ledger.claim_file(b, "f1", "B", seconds=60)
        assert again.got and again.taken_over_from is None
    finally:
        a.close()
        b.close()


def test_status_shows_the_y_leader_and_the_leases_of_live_x_only(make_settings, pg_conn):
    from src.observability.cli import render_status
    from src.observability.status import collect_from

    settings = make_settings()
    a, b = Database(settings), Database(settings)
    a.apply_schema()
    try:
        before = collect_from(pg_conn)["leadership"]
        assert before == {"y_leader": None, "leases": [], "lease_takeovers": 0}
        assert "none yet" in render_status(collect_from(pg_conn))

        assert ledger.claim_file(a, "f1", "host-a:1:aa", seconds=60).got
        assert ledger.claim_file(b, "f2", "host-b:2:bb", seconds=60).got
        with b.transaction() as cur:
            term, _ = ledger.take_leadership(cur, ledger.Y_ROLE, "host-b:2:bb")
        who = collect_from(pg_conn)["leadership"]
        assert who["y_leader"]["holder"] == "host-b:2:bb" and who["y_leader"]["term"] == term == 1
        assert [(x["file_id"], x["holder"]) for x in who["leases"]] == [("f1", "host-a:1:aa"), ("f2", "host-b:2:bb")]
        assert all(50 < x["expires_in_seconds"] <= 60 for x in who["leases"]), who["leases"]
        text = render_status(collect_from(pg_conn))
        assert "host-b:2:bb" in text and "term 1" in text and "f1, renewal due within" in text

        # A's session ends (its process was killed): its lease is no longer held, though not yet expired.
        _query(pg_conn, "SELECT pg_terminate_backend(%s)", (a.conn.get_backend_pid(),))
        _until(lambda: len(collect_from(pg_conn)["leadership"]["leases"]) == 1, "the dead holder's lease to drop")
        assert [x["file_id"] for x in collect_from(pg_conn)["leadership"]["leases"]] == ["f2"]
        assert ledger.claim_file(b, "f1", "host-b:2:bb", seconds=60).taken_over_from == "host-a:1:aa"
        assert collect_from(pg_conn)["leadership"]["lease_takeovers"] == 1
    finally:
        a.close()
        b.close()


def test_a_standby_takes_the_lock_when_the_leader_ends_and_a_leader_cut_off_meanwhile_stops(
    make_settings, pg_conn, caplog
):
    key = 7261999
    settings = make_settings()
    leader, standby, third = Database(settings), Database(settings), Database(settings)
    polls: list[int] = []
    try:
        leader.hold_lock(key, who="test role")
        caplog.set_level(logging.INFO, logger="src.utils.db")
        took = threading.Event()

        def stand_by() -> None:
            standby.hold_lock(key, who="test role", while_waiting=lambda conn: polls.append(1))
            took.set()

        t = threading.Thread(target=stand_by, daemon=True)
        t.start()
        _until(lambda: len(polls) >= 2, "the standby to poll the lock")
        assert not took.is_set()
        leader.close()  # the leader's session ends, as when its process is killed
        t0 = time.monotonic()
        assert took.wait(30), "the standby did not take over"
        assert time.monotonic() - t0 < 30
        t.join(5)
        events = [getattr(r, "event", None) for r in caplog.records]
        assert "standby_waiting" in events and "standby_takeover" in events

        # The new leader's connection is cut and, meanwhile, a third process takes the lock: on reconnecting
        # it does not carry on from its stale memory.
        _query(pg_conn, "SELECT pg_terminate_backend(%s)", (standby.conn.get_backend_pid(),))
        _until(lambda: _try_lock(third, key), "the third process to take the free lock", timeout=30)
        third.hold_lock(key, who="test role")
        with pytest.raises(LockLost):
            standby.query("SELECT 1")
    finally:
        for db in (leader, standby, third):
            db.close()


def _got(claim: ledger.Claim) -> ledger.Claim | None:
    return claim if claim.got else None


def _try_lock(db: Database, key: int) -> bool:
    got = db.query("SELECT pg_try_advisory_lock(%s)", (key,))[0][0]
    if got:
        db.query("SELECT pg_advisory_unlock(%s)", (key,))
    return got


# ---------------------------------------------------------------- two Ingestors on one file


def test_a_file_taken_over_mid_ingest_is_ingested_once_with_nothing_lost(make_settings, pg_conn, base_env, caplog):
    """X "A" ingests a paced file; its database session is cut mid-file (as when its process dies) and X "B"
    takes the file over at the recorded offset while A, reconnected, tries to go on: A's next ledger write is
    refused (its lease is B's), and the file ends as one contiguous run of chunks, each once in ledger and lake."""
    from src.mechanism_x.data_ingestion import Ingestor
    from src.utils.object_store import LocalObjectStore
    from src.utils.sources import LocalInboxSource

    inbox, lake = Path(base_env["LOCAL_INBOX_DIR"]), Path(base_env["LOCAL_LAKE_DIR"])
    generate(inbox, rows=600, seed=5)
    (inbox / "CustomerImportance.csv").unlink()  # only the transactions file matters here
    settings = make_settings(BATCH_SIZE="25", CHUNK_INTERVAL_SECONDS="0.15", RETRY_MAX_DELAY_SECONDS="1")

    def ingestor() -> tuple[Ingestor, Database]:
        db = Database(settings)
        db.apply_schema()
        return Ingestor(settings, db, LocalObjectStore(lake), LocalInboxSource(inbox), threading.Event()), db

    x_a, db_a = ingestor()
    x_b, db_b = ingestor()
    caplog.set_level(logging.INFO, logger="src.mechanism_x")
    errors: list[BaseException] = []

    def run_a() -> None:
        try:
            x_a.poll_once()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    try:
        a_thread = threading.Thread(target=run_a, daemon=True)
        a_thread.start()
        _until(lambda: _query(pg_conn, "SELECT count(*) FROM chunks")[0][0] >= 3, "A's first chunks")
        _query(pg_conn, "SELECT pg_terminate_backend(%s)", (db_a.conn.get_backend_pid(),))
        end = time.monotonic() + 120
        while _query(pg_conn, "SELECT status FROM source_files WHERE name = 'transactions.csv'") != [("done",)]:
            assert time.monotonic() < end, "B did not finish the file"
            x_b.poll_once()
        a_thread.join(60)
        assert not a_thread.is_alive() and not errors, errors
    finally:
        db_a.close()
        db_b.close()

    chunks = _query(
        pg_conn, "SELECT chunk_seq, first_line, last_line, rows_total, status, object_key FROM chunks ORDER BY seq"
    )
    assert [c[0] for c in chunks] == list(range(24)), "every chunk once, in file order"
    assert all(c[4] == "written" for c in chunks)
    assert chunks[0][1] == 2 and chunks[-1][2] == 601
    assert all(nxt[1] == cur[2] + 1 for cur, nxt in zip(chunks, chunks[1:])), "no gap, no overlap"
    assert sum(c[3] for c in chunks) == 600
    assert sorted(p.relative_to(lake).as_posix() for p in (lake / "raw-transactions").rglob("*.parquet")) == sorted(
        c[5] for c in chunks
    )
    assert _query(pg_conn, "SELECT rows_ingested, chunks FROM source_files WHERE name = 'transactions.csv'") == [
        (600, 24)
    ]
    holder, takeovers = _query(pg_conn, "SELECT holder, takeovers FROM file_leases")[0]
    assert takeovers == 1 and holder is None, "B took the file over from A once, and released it when done"
    assert (lake / "raw-transactions" / "_log" / "processing_log.json").exists()
    lost = [r for r in caplog.records if getattr(r, "event", None) == "lease_lost"]
    assert lost and all(r.thread == a_thread.ident for r in lost), "A stopped on its lease, B never did"
    assert any(getattr(r, "event", None) == "lease_taken_over" for r in caplog.records)


# ---------------------------------------------------------------- two daemons, the active one killed

ROWS, SEED, BATCH = 60_000, 11, 1_000  # the 60-chunk sample of the other end-to-end tests
THRESHOLDS = {"PATID1_MIN_MERCHANT_TXNS": "3000", "PATID2_MIN_TXNS": "40", "PATID3_MIN_FEMALE_CUSTOMERS": "5"}
KILL_AFTER_CHUNKS = 2  # processed by the active daemon before it is killed
DEADLINE = 420.0  # generous: two Spark JVMs on a busy 2-core machine


class _Daemon:
    """`python main.py --drain` in a process group of its own, so the whole group (supervisor, X, Y and Y's JVM)
    can be SIGKILLed at once, as when its machine dies."""

    def __init__(self, name: str, env: dict[str, str], root: Path, **settings: str) -> None:
        self.name = name
        self.log = root / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "main.py", "--drain"],
                cwd=ROOT,
                env=dict(env, DATA_DIR=str(root / name), **settings),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def owns(self, holder: str | None) -> bool:
        """Is `holder` (host:pid:token, see ledger.holder_id) a process of this daemon?"""
        if not holder:
            return False
        try:
            return os.getpgid(int(holder.split(":")[-2])) == self.proc.pid
        except (ProcessLookupError, ValueError):
            return False

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_daemons_the_active_one_killed_mid_run_the_standby_finishes_exactly(pg_server, pg_db, tmp_path):
    """Daemon A leads (its Y holds the lock, its X the transactions file); daemon B, on the same database, inbox
    and lake with a DATA_DIR of its own, stands by with its Spark session up and warmed. A is SIGKILLed, whole process
    group, mid-run: B's Y takes the lead, B's X takes the file over at its recorded offset, and B's drain ends
    with exactly the reference detections, every chunk written once and processed once."""
    generate(tmp_path / "inbox", rows=ROWS, seed=SEED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "GDRIVE_", "TP_", "AWS_"))}
    env.update(run_env(pg_server, pg_db, tmp_path))  # one inbox, one lake
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "BATCH_SIZE": str(BATCH),
            "PROCESSING_INTERVAL": "0.5",
            "METRICS_ADDR": "off",
            "LOG_FORMAT": "text",
            **THRESHOLDS,
        }
    )
    conn = psycopg2.connect(pg_server.dsn_for(pg_db))
    conn.autocommit = True

    def one(sql: str):
        try:
            rows = _query(conn, sql)
        except psycopg2.Error:  # the schema is not there yet
            return None
        return rows[0][0] if rows else None

    end = time.monotonic() + DEADLINE

    def wait_for(predicate, what: str, *daemons: _Daemon):
        while not predicate():
            for d in daemons:
                assert d.proc.poll() is None, f"daemon {d.name} exited while waiting for {what}:\n{d.text()[-4000:]}"
            assert time.monotonic() < end, f"timed out waiting for {what}"
            time.sleep(0.1)

    # A's X releases a chunk every 3 s, so it is still in the file when A's Y, slower to start, has processed
    # a few and B's standby is warm; B's X, once it has taken over, goes faster.
    a = _Daemon("a", env, tmp_path, CHUNK_INTERVAL_SECONDS="3")
    b: _Daemon | None = None
    try:
        tx_file = "(SELECT file_id FROM source_files WHERE name = 'transactions.csv')"
        wait_for(lambda: a.owns(one("SELECT holder FROM leaders")), "A's Y to lead", a)
        wait_for(lambda: a.owns(one(f"SELECT holder FROM file_leases WHERE file_id = {tx_file}")), "A's X", a)
        b = _Daemon("b", env, tmp_path, CHUNK_INTERVAL_SECONDS="0.3")
        wait_for(lambda: "standing by" in b.text() and "Spark warmed up" in b.text(), "B's warm standby", a, b)
        processed = "SELECT count(*) FROM chunks WHERE processed_at IS NOT NULL"
        wait_for(lambda: (one(processed) or 0) >= KILL_AFTER_CHUNKS, "A's first chunks processed", a, b)
        assert a.owns(one("SELECT holder FROM leaders")), "A still leads"
        assert a.owns(one(f"SELECT holder FROM file_leases WHERE file_id = {tx_file}")), "A's X still has the file"

        a.kill()
        killed = time.monotonic()
        killed_at = one(processed)
        assert killed_at < ROWS // BATCH, "chunks were still to do when A died"
        wait_for(lambda: b.owns(one("SELECT holder FROM leaders")), "B's Y to lead", b)
        y_takeover = time.monotonic() - killed
        wait_for(lambda: (one(f"SELECT takeovers FROM file_leases WHERE file_id = {tx_file}") or 0) >= 1, "B's X", b)
        x_takeover = time.monotonic() - killed
        wait_for(lambda: one(processed) > killed_at, "B's first chunk processed", b)
        first_chunk = time.monotonic() - killed
        code = b.proc.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        for d in (a, b):
            if d is not None:
                d.kill()
    assert code == 0, b.text()[-5000:]
    assert y_takeover < 30, f"the standby took {y_takeover:.1f} s to lead"

    settings = Settings.from_env(env, dotenv=Path("/nonexistent"))
    try:
        chunks = _query(
            conn,
            "SELECT chunk_seq, first_line, last_line, rows_total, status, processed_at IS NOT NULL, y_batch_id, "
            "object_key FROM chunks ORDER BY seq",
        )
        found = _query(conn, "SELECT pattern_id, customer_name, merchant_id FROM pattern_detections")
        stored_rows = _query(conn, "SELECT count(*) FROM transactions")[0][0]
        ref_chunks, txns = read_transactions([tmp_path / "inbox" / "transactions.csv"], settings.batch_size)
        importance = read_importance(tmp_path / "inbox" / "CustomerImportance.csv")
        expected = expected_detections(conn, ref_chunks, txns, importance, limits_of(settings))
        credited = credited_chunks(conn)
    finally:
        conn.close()
    assert [c[0] for c in chunks] == list(range(60)) and len(ref_chunks) == 60, "every chunk recorded once, in order"
    assert all(nxt[1] == cur[2] + 1 for cur, nxt in zip(chunks, chunks[1:])), "no line lost or taken twice"
    assert all(c[4] == "written" and c[5] and c[6] for c in chunks), "every chunk written and processed"
    objects = sorted(p.relative_to(tmp_path / "lake").as_posix() for p in (tmp_path / "lake").rglob("*.parquet"))
    assert [o for o in objects if o.startswith("raw-transactions/")] == sorted(c[7] for c in chunks)
    assert sum(c[3] for c in chunks) == ROWS == stored_rows, "every row once in `transactions`: processed once"
    assert len(found) == len(set(found)) and set(found) == set(expected)
    assert {p for p, _, _ in found} == {"PatId1", "PatId2", "PatId3"}
    assert credited == {d: e.chunk for d, e in expected.items()}
    assert re.search(r"taking over after [\d.]+ s as standby", b.text()), b.text()[-3000:]
    sys.stderr.write(
        f"\nfailover: A killed after {killed_at} of {len(chunks)} chunks processed; B's Y led after {y_takeover:.1f} s, "
        f"B's X took the file over after {x_takeover:.1f} s, B's first chunk processed after {first_chunk:.1f} s\n"
    )
