"""/metrics, /healthz and /readyz of a real supervisor run; the run's JSON log lines (src/observability)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from src.sample_data import generate
from tests.pg_cluster import free_port

ROOT = Path(__file__).resolve().parent.parent


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _scrape(base: str) -> dict[str, list]:
    """Sample name -> [(labels, value)] of one scrape."""
    code, body = _get(base + "/metrics")
    assert code == 200, body[:500]
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _one(scrape: dict, name: str, **labels: str) -> float:
    values = [v for lab, v in scrape.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(values) == 1, (name, labels, scrape.get(name))
    return values[0]


def _ledger(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT coalesce(sum(rows_valid), 0), count(*) FILTER (WHERE written_at IS NOT NULL), "
            "count(*) FILTER (WHERE processed_at IS NOT NULL), "
            "count(*) FILTER (WHERE status = 'written' AND processed_at IS NULL) FROM chunks "
        )
        rows, written, processed, backlog = cur.fetchone()
        cur.execute("SELECT pattern_id, count(*) FROM pattern_detections GROUP BY 1")
        detections = dict(cur.fetchall())
        cur.execute("SELECT stage, count(*) FROM quarantine GROUP BY 1")
        quarantined = dict(cur.fetchall())
        cur.execute("SELECT status, count(*) FROM source_files WHERE kind = 'transactions' GROUP BY 1")
        files = dict(cur.fetchall())
        cur.execute("SELECT term FROM leaders WHERE role = 'mechanism_y'")
        leader = cur.fetchone()  # None until Y leads
        cur.execute("SELECT coalesce(sum(takeovers), 0) FROM file_leases")
        lease_takeovers = cur.fetchone()[0]
    return {
        "rows": int(rows),
        "written": written,
        "processed": processed,
        "backlog": backlog,
        "detections": detections,
        "quarantined": quarantined,
        "files": files,
        "leader_term": leader[0] if leader else None,
        "lease_takeovers": lease_takeovers,
    }


def _wait_log(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> int | None:
    """Wait for `pattern` in the run's log; returns its first group as an int, if it has one."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        match = rx.search(path.read_text(errors="replace"))
        if match:
            return int(match.group(1)) if rx.groups else None
        assert proc.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout}s:\n{path.read_text(errors='replace')[-3000:]}")


def _metric_names_in(path: Path) -> set[str]:
    return set(re.findall(r"\btp_[a-z_]+\b", path.read_text()))


@pytest.mark.slow
def test_a_run_exports_metrics_equal_to_the_ledger_and_logs_joinable_json(tmp_path, product_env, pg_conn):
    inbox = Path(product_env["LOCAL_INBOX_DIR"])
    generate(inbox, rows=24_000, seed=11)
    # A few bad lines, so quarantine counters have something to equal.
    with open(inbox / "transactions.csv", "a", encoding="utf-8") as f:
        f.write("'1','C1','2','M','28007','M1','28007','es_food',-4.5,0\n")
        f.write("'1','C1','2','Q','28007','M1','28007','es_food',4.5,0\n")
        f.write("not,enough,fields\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(
        product_env,
        BATCH_SIZE="2000",
        CHUNK_INTERVAL_SECONDS="0.2",
        METRICS_ADDR=f"127.0.0.1:{port}",
        LOG_FORMAT="json",
        LOG_FILE=str(tmp_path / "logs" / "tp.log"),
    )
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:  # the endpoint comes up before the workers
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if _get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        mid_run = _scrape(base)
        assert "tp_backlog_chunks" in mid_run and "tp_dependency_up" in mid_run

        # Kill X once, early: the supervisor restarts it, and the metric counts it.
        x_pid = _wait_log(log_path, r'"mechanism X started \(pid (\d+)\)"', proc)
        _wait_log(log_path, r"mechanism X: reading", proc)
        os.kill(x_pid, signal.SIGKILL)
        _wait_log(log_path, rf"mechanism X \(pid {x_pid}\) exited with signal 9", proc)

        # Wait for the whole file to be processed (event-driven on the ledger, generous deadline).
        deadline = time.monotonic() + 600
        while True:
            led = _ledger(pg_conn)
            if led["files"].get("done") == 1 and led["written"] == 13 and led["processed"] == led["written"]:
                break
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, (led, log_path.read_text()[-3000:])
            time.sleep(0.5)
        time.sleep(2.5)  # past the ledger cache
        scrape = _scrape(base)
        ready_code, ready_body = _get(base + "/readyz")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log_path.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    led = _ledger(pg_conn)

    # Counters equal the ledger.
    assert _one(scrape, "tp_rows_ingested_total") == led["rows"] == 24_000
    assert _one(scrape, "tp_chunks_written_total") == led["written"]
    assert _one(scrape, "tp_chunks_processed_total") == led["processed"]
    assert _one(scrape, "tp_backlog_chunks") == led["backlog"] == 0
    for pattern in ("PatId1", "PatId2", "PatId3"):
        assert _one(scrape, "tp_detections_total", pattern=pattern) == led["detections"].get(pattern, 0)
    for stage in ("ingest", "detect"):
        total = sum(v for lab, v in scrape["tp_rows_quarantined_total"] if lab["stage"] == stage)
        assert total == led["quarantined"].get(stage, 0)
    assert led["quarantined"]["ingest"] == 3
    reasons = {lab["reason"] for lab, v in scrape["tp_rows_quarantined_total"] if v}
    assert all(re.fullmatch(r"[a-z_]+", r) for r in reasons), reasons  # values stripped from the label
    assert _one(scrape, "tp_files", status="done") == 1
    # One daemon: its Y led from the start (term 1) and its X gave the files back when done. The X killed above
    # may have held leases: its restarted successor took them over, and the counter equals the ledger's.
    assert _one(scrape, "tp_y_leader_term") == led["leader_term"] == 1
    assert _one(scrape, "tp_file_leases_held") == 0
    assert _one(scrape, "tp_file_lease_takeovers_total") == led["lease_takeovers"]

    # Worker-observed histograms have observations, merged from Y's process.
    assert _one(scrape, "tp_chunk_latency_seconds_count") == led["processed"]
    for phase in ("read", "fold", "detect", "commit"):
        assert _one(scrape, "tp_y_batch_seconds_count", phase=phase) >= 1
        assert _one(scrape, "tp_y_batch_seconds_sum", phase=phase) > 0
    assert _one(scrape, "tp_dependency_up", dependency="postgresql") == 1
    assert _one(scrape, "tp_dependency_up", dependency="lake") == 1
    assert _one(scrape, "tp_worker_restarts_total", worker="mechanism_y") == 0
    assert _one(scrape, "tp_worker_restarts_total", worker="mechanism_x") == 1
    # Y's tree includes Spark's JVM: far more memory than a Python process alone.
    assert _one(scrape, "tp_process_resident_memory_bytes", worker="mechanism_y") > 200e6
    assert _one(scrape, "tp_process_cpu_seconds_total", worker="mechanism_y") > 1
    assert _one(scrape, "tp_data_dir_free_bytes") > 0
    assert ready_code == 200, ready_body

    # Every metric the alert rules and the dashboard use exists in the scrape.
    used = _metric_names_in(ROOT / "config" / "alerts.yml") | _metric_names_in(
        ROOT / "config" / "grafana" / "dashboard.json"
    )
    assert used and not sorted(used - set(scrape)), sorted(used - set(scrape))

    # The log: every line JSON with a UTC timestamp; X's chunk ids all appear in Y's lines.
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(
        r["ts"].endswith("Z") and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"]) for r in records
    )
    assert {r["worker"] for r in records} >= {"supervisor", "mechanism_x", "mechanism_y"}
    x_ids = {r["chunk_id"] for r in records if r["worker"] == "mechanism_x" and "chunk_id" in r}
    y_ids = {r["chunk_id"] for r in records if r["worker"] == "mechanism_y" and "chunk_id" in r}
    assert len(x_ids) == led["written"] and x_ids <= y_ids, (sorted(x_ids), sorted(y_ids))
    assert not (Path(product_env["DATA_DIR"]) / "run" / f"prometheus-{proc.pid}").exists()
    # LOG_FILE holds the same lines from all three processes.
    in_file = [json.loads(line) for line in (tmp_path / "logs" / "tp.log").read_text().splitlines()]
    assert {r["worker"] for r in in_file} >= {"supervisor", "mechanism_x", "mechanism_y"}
    assert {r["chunk_id"] for r in in_file if r["worker"] == "mechanism_x" and "chunk_id" in r} == x_ids


def test_readyz_names_the_failed_check_and_healthz_follows_the_loop(make_settings, pg_server):
    from src.observability.server import MetricsServer

    port = free_port()
    settings = make_settings(METRICS_ADDR=f"127.0.0.1:{port}")
    worker = SimpleNamespace(name="mechanism Y", proc=None, restarts=3, starts=4, done=False)
    supervisor = SimpleNamespace(
        stop=threading.Event(),
        y=worker,
        ready_file=settings.data_dir / "run" / "absent-ready-file",
        workers=lambda: [worker],
        beat=time.monotonic(),
    )
    from src.resources import open_lake

    server = MetricsServer(settings, supervisor, open_lake=open_lake)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        code, body = _get(base + "/readyz")
        assert code == 503
        failed = json.loads(body)["failed"]
        assert set(failed) == {"mechanism_y_warm", "workers"}, failed  # PostgreSQL and the lake are fine
        assert "mechanism_y" in failed["workers"]
        assert _get(base + "/healthz")[0] == 200
        scrape = _scrape(base)
        assert _one(scrape, "tp_worker_restarts_total", worker="mechanism_y") == 3
        supervisor.stop.set()
        assert _get(base + "/healthz")[0] == 503
        assert _get(base + "/nope")[0] == 404
    finally:
        server.stop()


def test_metrics_addr_must_be_host_port_or_off():
    from src.errors import SettingsError
    from src.observability.server import parse_addr

    assert parse_addr("off") is None
    assert parse_addr("0.0.0.0:9464") == ("0.0.0.0", 9464)
    with pytest.raises(SettingsError, match="METRICS_ADDR='9464x'"):
        parse_addr("9464x")


def test_reason_buckets_drop_values():
    from src.observability.metrics import reason_bucket

    assert reason_bucket("amount '-3' is not a number") == "amount_is_not_a_number"
    assert reason_bucket("expected 10 fields, found 3") == "expected_fields_found"
    assert reason_bucket("unknown gender 'Q' (expected M, F, E or U)") == "unknown_gender"
    assert reason_bucket("negative amount -4.50") == "negative_amount"
    assert reason_bucket("whole chunk (lines 2-10001) rejected: bad schema") == "whole_chunk_rejected"


def test_retry_listener_counts_by_dependency_and_outcome():
    from prometheus_client import REGISTRY

    from src.observability.metrics import install_worker_metrics, record_retry

    install_worker_metrics()
    labels = {"dependency": "postgresql", "outcome": "gave_up"}
    before = REGISTRY.get_sample_value("tp_retries_total", labels)
    assert before is not None  # created at 0 by install_worker_metrics, so it is scraped before any retry
    record_retry("PostgreSQL", "gave_up")
    assert REGISTRY.get_sample_value("tp_retries_total", labels) == before + 1
