"""Webhook alerts against real parts: a local HTTP receiver, the supervisor running a real Mechanism X on
a failing file, and a PostgreSQL server of the test's own that is stopped and started again."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy
import psycopg2
import pytest

from tests.pg_cluster import PgCluster, pg_bindir

ROOT = Path(__file__).resolve().parent.parent


class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps every JSON message it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.changed:
                    receiver.messages.append(json.loads(body))
                    receiver.changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0KEN"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of(self, alert: str) -> list[tuple[str, dict]]:
        return [(m["status"], m) for m in list(self.messages) if m["alert"] == alert]

    def wait_for(self, alert: str, status: str, deadline: float) -> dict:
        end = time.monotonic() + deadline
        with self.changed:
            while True:
                for s, m in self.of(alert):
                    if s == status:
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {status} {alert} within {deadline:.0f}s; got {self.messages}")
                self.changed.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _check_message(m: dict, alert: str, status: str) -> None:
    assert m["alert"] == alert and m["status"] == status
    assert m["text"].startswith(f"[{status.upper()}] {alert}: ")
    assert m["started_at"].endswith("Z")
    assert isinstance(m["labels"], dict)


def test_a_failed_file_fires_once_and_resolves_once_when_it_is_removed(make_settings, base_env, receiver):
    """The supervisor (main.py) with ALERT_WEBHOOK_URL, running the real Mechanism X on a broken file."""
    import main
    from src.observability import alerts

    inbox = Path(base_env["LOCAL_INBOX_DIR"])
    (inbox / "good.csv").write_text(
        '"step","customer","age","gender","zipcodeOri","merchant","zipMerchant","category","amount","fraud"\n'
        "0,'C1','4','M','28007','M1','28007','es_transportation',4.55,0\n"
    )
    broken = inbox / "broken.csv"
    broken.write_bytes(b"step,customer\x00,age\n1,2,3\n")
    settings = make_settings(ALERT_WEBHOOK_URL=receiver.url, METRICS_ADDR="off")
    supervisor = main.Supervisor(settings, drain=False, run_y=False)
    runner = threading.Thread(target=supervisor.run, daemon=True)
    runner.start()
    try:
        fired = receiver.wait_for(alerts.FILE_FAILED, "firing", 180)
        _check_message(fired, alerts.FILE_FAILED, "firing")
        assert fired["labels"]["file"] == "broken.csv" and fired["labels"]["file_status"] == "failed"
        assert "binary content (NUL bytes)" in fired["text"]

        broken.unlink()  # the operator removes the bad file: X marks it deleted, the incident is over
        resolved = receiver.wait_for(alerts.FILE_FAILED, "resolved", 120)
        _check_message(resolved, alerts.FILE_FAILED, "resolved")
        assert resolved["labels"] == fired["labels"] and resolved["started_at"] == fired["started_at"]

        time.sleep(3 * 5.0)  # three more evaluations (every 5 s): nothing is sent again
        assert [s for s, _ in receiver.of(alerts.FILE_FAILED)] == ["firing", "resolved"]
    finally:
        supervisor.stop.set()
        runner.join(60)
    assert not runner.is_alive()


@pytest.fixture
def own_postgres():
    """A PostgreSQL server for this test alone, so stopping it disturbs nobody."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.fail("this test needs PostgreSQL's initdb/pg_ctl (apt-get install postgresql)")
    server = PgCluster(Path(tempfile.mkdtemp(prefix="tp-pg-alerts-")), bindir)
    server.start()
    yield server
    server.destroy()


def test_a_postgresql_outage_fires_once_and_resolves_once(make_settings, own_postgres, receiver):
    from src.observability import alerts
    from src.observability.status import Database

    settings = make_settings(
        POSTGRES_HOST="127.0.0.1",
        POSTGRES_PORT=str(own_postgres.port),
        POSTGRES_DB="postgres",
        POSTGRES_USER="postgres",
    )
    db = Database(settings)
    db.apply_schema()
    db.close()
    manager = alerts.AlertManager(
        settings,
        snapshot=alerts.LedgerProbe(settings, lake_every=0.5),
        interval=0.2,
        thresholds=alerts.Thresholds(dependency_down_seconds=2.0),
        url=receiver.url,
    ).start()
    try:
        time.sleep(1.0)
        assert receiver.messages == []  # all is well: nothing to say

        own_postgres.stop("fast")
        fired = receiver.wait_for(alerts.DEPENDENCY_DOWN, "firing", 60)
        _check_message(fired, alerts.DEPENDENCY_DOWN, "firing")
        assert fired["labels"] == {"dependency": "postgresql"}
        assert "PostgreSQL has been unreachable for more than 2s" in fired["text"]

        own_postgres.start()
        resolved = receiver.wait_for(alerts.DEPENDENCY_DOWN, "resolved", 60)
        _check_message(resolved, alerts.DEPENDENCY_DOWN, "resolved")
        time.sleep(2.0)  # ten more evaluations: nothing else is sent
    finally:
        manager.stop()
    assert [(m["alert"], m["status"]) for m in receiver.messages] == [
        (alerts.DEPENDENCY_DOWN, "firing"),
        (alerts.DEPENDENCY_DOWN, "resolved"),
    ]


def _failed_files_snapshot(status: dict, n: int) -> dict:
    """A real ledger summary with `n` failed files in its files table."""
    files = [
        {"file_id": f"f{i}", "name": f"bad-{i}.csv", "status": "failed", "reason": "not a CSV file"} for i in range(n)
    ]
    return {"time": time.time(), "status": {**status, "files": files}, "workers": []}


@pytest.mark.parametrize("kind", ["refusing", "silent"])
def test_a_receiver_that_is_down_does_not_slow_evaluation(make_settings, pg_conn, kind):
    """`evaluate` (called on the supervisor's side) returns at once while the sender is stuck on the receiver."""
    from src.observability import alerts
    from src.observability.status import collect_from

    with pg_conn.cursor() as cur:
        for name in ("postgres_setup.sql", "create_missing_tables.sql"):
            cur.execute((ROOT / "setup" / name).read_text())
    status = collect_from(pg_conn)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if kind == "refusing":
        listener.close()  # nothing listens: every POST is refused
    else:
        listener.listen(0)  # accepts connections into the backlog and never answers
    settings = make_settings(RETRY_MAX_DELAY_SECONDS="30")
    manager = alerts.AlertManager(settings, url=f"http://127.0.0.1:{port}/hook", post_timeout=30.0).start()
    try:
        t0 = time.perf_counter()
        messages = manager.evaluate(_failed_files_snapshot(status, 50))
        elapsed = time.perf_counter() - t0
        assert len(messages) == 50 and all(m["status"] == "firing" for m in messages)
        # A POST that would have to wait for this receiver takes up to 30 s (silent) or retries for minutes
        # (refusing); evaluation did not wait for either.
        assert elapsed < 2.0, elapsed
        t0 = time.perf_counter()
        manager.evaluate(_failed_files_snapshot(status, 0))  # all 50 resolve
        assert time.perf_counter() - t0 < 2.0
        assert manager.open == {}
    finally:
        t0 = time.perf_counter()
        manager.stop(timeout=1.0)
        stop_took = time.perf_counter() - t0
        if kind == "silent":
            listener.close()
    assert stop_took < 5.0, stop_took  # shutdown is not held hostage by the receiver either


def test_webhook_alerts_are_named_as_in_the_prometheus_rules():
    """One name per incident whichever way it is delivered: the webhook's names are alerts.yml's."""
    import re

    from src.observability import alerts

    rules = set(re.findall(r"^\s*- alert: (\w+)", (ROOT / "config" / "alerts.yml").read_text(), re.M))
    webhook = {
        alerts.FILE_FAILED,
        alerts.DEPENDENCY_DOWN,
        alerts.BACKLOG_GROWING,
        alerts.WORKER_RESTARTING,
        alerts.NO_CHUNK_PROCESSED,
        alerts.QUARANTINE_RATE_HIGH,
        alerts.DATA_DIR_FILLING_UP,
    }
    assert webhook == rules


@pytest.fixture
def ledger_status(pg_conn):
    """A real ledger summary (of an empty ledger) whose numbers each test then sets."""
    from src.observability.status import collect_from

    with pg_conn.cursor() as cur:
        for name in ("postgres_setup.sql", "create_missing_tables.sql"):
            cur.execute((ROOT / "setup" / name).read_text())
    return collect_from(pg_conn)


def _manager(make_settings, **thresholds):
    from src.observability import alerts

    return alerts.AlertManager(
        make_settings(), url="http://127.0.0.1:9/unused", thresholds=alerts.Thresholds(**thresholds)
    )


def _snap(status: dict, t: float, workers: list | None = None, **totals) -> dict:
    return {"time": t, "status": {**status, "totals": {**status["totals"], **totals}}, "workers": workers or []}


def _fired(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["alert"], m["status"]) for m in messages]


def test_backlog_growing_needs_the_whole_window_of_growth(make_settings, ledger_status):
    from src.observability.alerts import BACKLOG_GROWING

    m = _manager(make_settings, backlog_growing_seconds=300)
    assert m.evaluate(_snap(ledger_status, 0, backlog_chunks=1)) == []
    assert m.evaluate(_snap(ledger_status, 200, backlog_chunks=5)) == []  # growing, but not for 5 min yet
    assert _fired(m.evaluate(_snap(ledger_status, 300, backlog_chunks=6))) == [(BACKLOG_GROWING, "firing")]
    assert m.evaluate(_snap(ledger_status, 310, backlog_chunks=7)) == []  # still the same incident
    assert _fired(m.evaluate(_snap(ledger_status, 320, backlog_chunks=3))) == [(BACKLOG_GROWING, "resolved")]

    steady = _manager(make_settings, backlog_growing_seconds=300)
    for t, backlog in ((0, 4), (100, 6), (200, 2), (300, 5), (400, 6)):
        assert steady.evaluate(_snap(ledger_status, t, backlog_chunks=backlog)) == []  # it went down on the way


def test_no_chunk_processed_while_chunks_wait(make_settings, ledger_status):
    from src.observability.alerts import NO_CHUNK_PROCESSED

    m = _manager(make_settings, stalled_seconds=600)
    waiting = {"backlog_chunks": 3, "oldest_waiting_seconds": 700, "seconds_since_last_processed": 650}
    assert _fired(m.evaluate(_snap(ledger_status, 0, **waiting))) == [(NO_CHUNK_PROCESSED, "firing")]
    moving = {"backlog_chunks": 3, "oldest_waiting_seconds": 700, "seconds_since_last_processed": 5}
    assert _fired(m.evaluate(_snap(ledger_status, 5, **moving))) == [(NO_CHUNK_PROCESSED, "resolved")]
    idle = {"backlog_chunks": 0, "oldest_waiting_seconds": None, "seconds_since_last_processed": 5000}
    assert m.evaluate(_snap(ledger_status, 10, **idle)) == []  # nothing waits: being idle is fine


def test_worker_restarting_resolves_once_the_worker_stays_up(make_settings, ledger_status):
    from src.observability.alerts import WORKER_RESTARTING

    m = _manager(make_settings, restarts=3, worker_healthy_seconds=60)
    crashing = [{"name": "mechanism Y", "restarts": 3, "alive": False, "up_seconds": 0.0}]
    fired = m.evaluate(_snap(ledger_status, 0, workers=crashing))
    assert _fired(fired) == [(WORKER_RESTARTING, "firing")] and fired[0]["labels"] == {"worker": "mechanism Y"}
    young = [{"name": "mechanism Y", "restarts": 3, "alive": True, "up_seconds": 10.0}]
    assert m.evaluate(_snap(ledger_status, 10, workers=young)) == []
    healthy = [{"name": "mechanism Y", "restarts": 3, "alive": True, "up_seconds": 61.0}]
    assert _fired(m.evaluate(_snap(ledger_status, 61, workers=healthy))) == [(WORKER_RESTARTING, "resolved")]


def test_quarantine_rate_above_the_setting(make_settings, ledger_status):
    from src.observability.alerts import QUARANTINE_RATE_HIGH

    m = _manager(make_settings, quarantine_ratio=0.05, quarantine_min_rows=1000)

    def snap(t: float, rows: int, bad: int) -> dict:
        s = _snap(ledger_status, t)
        s["status"]["quarantine_recent"] = {"minutes": 15, "rows": rows, "quarantined": bad}
        return s

    assert m.evaluate(snap(0, 500, 100)) == []  # too few rows to judge
    assert m.evaluate(snap(1, 10_000, 500)) == []  # exactly 5 %: not above
    fired = m.evaluate(snap(2, 10_000, 501))
    assert _fired(fired) == [(QUARANTINE_RATE_HIGH, "firing")] and "5.0% of the rows" in fired[0]["text"]
    assert _fired(m.evaluate(snap(3, 10_000, 10))) == [(QUARANTINE_RATE_HIGH, "resolved")]


def test_data_dir_filling_up_needs_the_rate_for_the_whole_hold_and_ends_with_it(make_settings):
    """The free space is fitted like Prometheus' predict_linear: a rate that fills the disk within the horizon, held
    for `disk_for_seconds`, fires once; it resolves when the fitted rate no longer fills the disk, and an unreadable
    free space leaves the incident as it was."""
    from src.observability.alerts import DATA_DIR_FILLING_UP

    m = _manager(
        make_settings, disk_window_seconds=600, disk_horizon_seconds=3600, disk_for_seconds=120, disk_sample_seconds=10
    )

    def snap(t: float, free: float | None) -> dict:
        return {"time": t, "status": None, "workers": [], "data_dir_free_bytes": free}

    # 1,000,000 bytes free, 100 bytes/s less: 360,000 bytes an hour, the disk lasts 10,000 s: not within the horizon.
    # From t=300, 1,000 bytes/s less (3.6 MB an hour, 970,000 bytes left): within the hour, once the fit sees it.
    def free_at(t: int) -> int:
        return 1_000_000 - 100 * t if t < 300 else 970_000 - 1_000 * (t - 300)

    # The reference: numpy's least-squares line over the last 600 s of samples, read 3600 s ahead.
    first_below = None
    for t in range(0, 700, 10):
        ts = [u for u in range(0, t + 1, 10) if u >= t - 600]
        slope, intercept = numpy.polyfit(ts, [free_at(u) for u in ts], 1) if len(ts) > 1 else (0.0, 1.0)
        if slope * (t + 3600) + intercept < 0:
            first_below = t
            break
    assert first_below is not None and 300 < first_below < 500, first_below
    fired_at = None
    for t in range(0, 700, 10):
        fired = m.evaluate(snap(t, free_at(t)))
        if fired:
            assert fired_at is None and _fired(fired) == [(DATA_DIR_FILLING_UP, "firing")], fired
            assert "fills up within 1 h at the rate of the last 10 min" in fired[0]["text"], fired[0]["text"]
            fired_at = t
    assert fired_at == first_below + 120, (fired_at, first_below)  # held for disk_for_seconds, not before
    assert m.evaluate(snap(700, None)) == []  # unknown: neither resolved nor fired again
    assert list(m.open) == [(DATA_DIR_FILLING_UP,)]
    # Steady from here: the fit over the 600 s window flattens, and the incident ends.
    resolved = [(t, msg) for t in range(710, 1400, 10) for msg in m.evaluate(snap(t, 570_000))]
    assert [(msg["alert"], msg["status"]) for _, msg in resolved] == [(DATA_DIR_FILLING_UP, "resolved")], resolved
    assert m.open == {}

    slow = _manager(make_settings, disk_window_seconds=600, disk_horizon_seconds=3600, disk_for_seconds=120)
    for t in range(0, 3000, 10):  # 100 bytes/s from 1 MB: 360 kB an hour, never within the horizon
        assert slow.evaluate(snap(t, 1_000_000 - 100 * t)) == []


def test_data_dir_filling_up_taken_over_after_a_restart_stays_open_while_the_rate_holds(make_settings):
    """A restarted daemon takes over the open incident (as `_evaluate_loop` does from IncidentStore) with no samples
    of its own: nothing is announced while it has too few samples to fit, nor while the rate still fills the disk
    (the hour's hold is for opening an incident), and the incident resolves once the rate no longer does."""
    from src.observability.alerts import DATA_DIR_FILLING_UP

    limits = {"disk_window_seconds": 600, "disk_horizon_seconds": 3600, "disk_for_seconds": 120}
    before = _manager(make_settings, disk_sample_seconds=10, **limits)

    def snap(t: float, free: float) -> dict:
        return {"time": t, "status": None, "workers": [], "data_dir_free_bytes": free}

    fired = [msg for t in range(0, 400, 10) for msg in before.evaluate(snap(t, 1_000_000 - 1_000 * t))]
    assert _fired(fired) == [(DATA_DIR_FILLING_UP, "firing")]

    after = _manager(make_settings, disk_sample_seconds=10, **limits)
    after.open.update(before.open)  # the take-over
    filling = [msg for t in range(400, 500, 10) for msg in after.evaluate(snap(t, 1_000_000 - 1_000 * t))]
    assert filling == [] and list(after.open) == [(DATA_DIR_FILLING_UP,)]
    steady = [msg for t in range(500, 1200, 10) for msg in after.evaluate(snap(t, 500_000))]
    assert _fired(steady) == [(DATA_DIR_FILLING_UP, "resolved")]


def test_the_supervisor_snapshot_reads_the_free_space_of_data_dir(make_settings, tmp_path):
    import shutil

    from src.observability.alerts import data_dir_free_bytes

    settings = make_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # the supervisor creates it before the alerts start
    free = data_dir_free_bytes(settings)
    assert free is not None and abs(free - shutil.disk_usage(settings.data_dir).free) < 512 * 2**20
    gone = settings.model_copy(update={"data_dir": tmp_path / "nowhere" / "data"})
    assert data_dir_free_bytes(gone) is None


def test_what_cannot_be_judged_while_postgresql_is_down_stays_as_it_was(make_settings, ledger_status):
    from src.observability.alerts import FILE_FAILED

    m = _manager(make_settings, dependency_down_seconds=120)
    failed = {**ledger_status, "files": [{"file_id": "f", "name": "x.csv", "status": "failed", "reason": "bad"}]}
    assert _fired(m.evaluate({"time": 0, "status": failed, "workers": []})) == [(FILE_FAILED, "firing")]
    down = {"time": 10, "status": None, "workers": [], "dependencies": {"postgresql": False}}
    assert m.evaluate(down) == []  # neither resolved (unknown) nor DependencyDown yet (10 s < 2 min)
    assert list(m.open) == [(FILE_FAILED, "f")]


def test_an_incident_open_before_a_restart_is_not_announced_again(make_settings, pg_conn, base_env, receiver, request):
    """Two AlertManagers in turn on the same ledger (a daemon restart): one firing, one resolved in all."""
    from src.observability import alerts
    from src.observability.status import collect_from

    with pg_conn.cursor() as cur:
        for name in ("postgres_setup.sql", "create_missing_tables.sql"):
            cur.execute((ROOT / "setup" / name).read_text())
        cur.execute(
            "INSERT INTO source_files (file_id, source, name, kind, status, reason) "
            "VALUES ('local-x', 'local', 'x.csv', 'unknown', 'failed', 'not a CSV file')"
        )
    settings = make_settings()
    # The managers' snapshots read on a connection of their own, as the daemon's do: `collect_from` runs a
    # read-only transaction, and on the test's connection an UPDATE of this thread could land inside one.
    reader = psycopg2.connect(pg_conn.dsn)
    reader.autocommit = True
    request.addfinalizer(reader.close)

    def snapshot() -> dict:
        return {"time": time.time(), "status": collect_from(reader), "workers": []}

    def run_manager(until) -> None:
        manager = alerts.AlertManager(
            settings, snapshot=snapshot, interval=0.1, url=receiver.url, store=alerts.IncidentStore(settings)
        ).start()
        try:
            until()
        finally:
            manager.stop()

    run_manager(lambda: receiver.wait_for(alerts.FILE_FAILED, "firing", 30))
    with pg_conn.cursor() as cur:
        cur.execute("SELECT value FROM kv_state WHERE key = %s", (alerts.IncidentStore.KEY,))
        assert "local-x" in cur.fetchone()[0]

    def resolve_later() -> None:
        time.sleep(1.0)  # ten evaluations with the file still failed: it is not announced again
        with pg_conn.cursor() as cur:
            cur.execute("UPDATE source_files SET status = 'deleted' WHERE file_id = 'local-x'")
        receiver.wait_for(alerts.FILE_FAILED, "resolved", 30)

    run_manager(resolve_later)
    assert [s for s, _ in receiver.of(alerts.FILE_FAILED)] == ["firing", "resolved"]
