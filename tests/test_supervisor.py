"""The supervisor (`main.py`): restarts a killed worker with backoff, stops everything cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from src.sample_data import generate

ROOT = Path(__file__).resolve().parent.parent


def _wait_for(log: Path, pattern: str, timeout: float, proc: subprocess.Popen) -> re.Match:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        matches = list(rx.finditer(text))
        if matches:
            return matches[-1]
        if proc.poll() is not None:
            raise AssertionError(f"supervisor exited ({proc.returncode}) before {pattern!r}:\n{text[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.mark.slow
def test_supervisor_restarts_a_killed_worker_and_stops_cleanly(tmp_path, product_env, pg_conn):
    generate(Path(product_env["LOCAL_INBOX_DIR"]), rows=20_000, seed=3)
    env = dict(product_env, BATCH_SIZE="1000", CHUNK_INTERVAL_SECONDS="0.3")
    log = tmp_path / "main.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        first_x = int(_wait_for(log, r"mechanism X started \(pid (\d+)\)", 60, proc).group(1))
        # X holds its first chunk until Y's Spark session is up: minutes on a loaded 2-core machine.
        _wait_for(log, r"chunk \S+-000002 written", 400, proc)
        os.kill(first_x, signal.SIGKILL)
        _wait_for(log, rf"mechanism X \(pid {first_x}\) exited with signal 9; restart 1 in 1s", 30, proc)
        second_x = int(_wait_for(log, rf"mechanism X started \(pid (?!{first_x}\))(\d+)\)", 30, proc).group(1))
        assert second_x != first_x

        _wait_for(log, r"mechanism Y up", 300, proc)
        y_pid = int(re.search(r"mechanism Y started \(pid (\d+)\)", log.read_text()).group(1))
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any(c.pid == y_pid for c in children)

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    # X releases no chunk before Y reports its Spark session up (the warm-up no longer holds it: a Y with nothing
    # to do warms up while idle, which tests/test_mechanism_y.py checks). Two processes' lines reach the log
    # through two pipes, so their order there proves nothing: their own timestamps do.
    session_up = _first_ts(text, "Spark session started in")
    first_write = _first_ts(text, "-000000 written")
    assert session_up <= first_write, (session_up, first_write)
    assert not list((Path(product_env["DATA_DIR"]) / "run").glob("mechanism-y-ready-*")), "ready file left behind"
    assert "did not stop" not in text  # both stopped on SIGTERM within main.STOP_TIMEOUT, none was killed
    assert "all workers stopped" in text
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not [(c.pid, c.name()) for c in alive if c.status() != psutil.STATUS_ZOMBIE]

    # The ledger is consistent with the lake: every chunk recorded as written is there, whole.
    with pg_conn.cursor() as cur:
        cur.execute("SELECT object_key, rows_valid, status FROM chunks ORDER BY seq")
        chunks = cur.fetchall()
    lake = Path(product_env["LOCAL_LAKE_DIR"])
    assert chunks
    for key, rows, status in chunks:
        if status == "written":
            assert pq.read_table(lake / key).num_rows == rows
    assert not list(lake.rglob("_tmp-*")), "a half-written object was left behind"
    assert "Traceback" not in text


def _first_ts(text: str, needle: str) -> str:
    """The `ts` (ISO, UTC, so ordered as text) of the first JSON log line whose message holds `needle`."""
    for line in text.splitlines():
        if needle in line and line.startswith("{"):
            return json.loads(line)["ts"]
    raise AssertionError(f"no log line with {needle!r}")


def _launched_workers(log_text: str) -> list[int]:
    """The pids of the workers the supervisor logged as started."""
    return [int(pid) for pid in re.findall(r"mechanism [XY] started \(pid (\d+)\)", log_text)]


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent to read its exit."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_main_help_is_truthful():
    out = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "--drain" in out.stdout
    assert "SIGTERM" in out.stdout


def test_a_start_up_that_fails_after_the_workers_launched_stops_them(tmp_path, product_env):
    """main.py launches the workers before it checks the lake: when that check fails, it exits 2 with a line naming
    the lake, and the workers waiting at the start gate go with it."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the lake's parent should be")
    env = dict(
        product_env,
        DATA_DIR=str(tmp_path / "data"),
        LOCAL_LAKE_DIR=str(blocker / "lake"),
        LOCAL_INBOX_DIR=str(tmp_path / "inbox"),
        METRICS_ADDR="off",
        LOG_FORMAT="text",
    )
    out = subprocess.run([sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    pids = _launched_workers(text)
    assert len(pids) == 2, text[-3000:]
    assert re.search(r"cannot start: .*" + re.escape(str(blocker)), text), text[-3000:]
    assert "stopping mechanism X" in text and "all workers stopped" in text
    assert not [p for p in pids if not _dead(p)], "a worker outlived the failed start"
    assert not list((tmp_path / "data" / "run").glob("start-gate-*")), "the gate is removed with the workers"


def test_bad_setting_stops_with_one_line_naming_the_variable(tmp_path):
    env = dict(os.environ, BATCH_SIZE="abc", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "BATCH_SIZE" in lines[0] and "abc" in lines[0]
