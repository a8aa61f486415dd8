"""`main.py --drain` end to end, with the orderings that used to race forced: a Y killed after X finished, a
second drain where X is done before Y has started Spark, and a source without CustomerImportance."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from src.sample_data import generate
from tests.test_supervisor import _wait_for

ROOT = Path(__file__).resolve().parent.parent
IMPOSSIBLE = "drain impossible: chunks wait for a CustomerImportance file the source does not have"


def _env(product_env: dict[str, str]) -> dict[str, str]:
    return dict(product_env, BATCH_SIZE="10000", LOG_FORMAT="text", SPARK_MASTER="local[2]")


def _start(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "main.py", "--drain"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 400) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"main.py --drain did not end within {timeout}s:\n{log.read_text()[-4000:]}") from None
    return code, log.read_text(errors="replace")


def _at(text: str, pattern: str) -> float:
    """The time (seconds since the epoch) of the first log line matching `pattern`."""
    for line in text.splitlines():
        if re.search(pattern, line):
            stamp = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z", line)
            assert stamp, f"no timestamp on {line!r}"
            return datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp()
    raise AssertionError(f"no line matching {pattern!r}:\n{text[-3000:]}")


def _chunks(pg_conn) -> list[tuple]:
    with pg_conn.cursor() as cur:
        cur.execute("SELECT seq, status, processed_at IS NOT NULL FROM chunks ORDER BY seq")
        return cur.fetchall()


@pytest.mark.slow
def test_drain_finishes_when_y_dies_after_x_and_a_second_drain_ends_right_after_spark_starts(
    tmp_path, product_env, pg_conn
):
    generate(Path(product_env["LOCAL_INBOX_DIR"]), rows=30_000, seed=3)
    env = _env(product_env)

    # Run 1: freeze Y once it is up, let X ingest everything and finish, then SIGKILL Y. The restarted Y was
    # never told anything by a signal: it must learn from the supervisor's mark that X is done.
    log1 = tmp_path / "run1.log"
    proc = _start(env, log1)
    try:
        y_pid = int(_wait_for(log1, r"mechanism Y started \(pid (\d+)\)", 120, proc).group(1))
        _wait_for(log1, r"mechanism Y up", 240, proc)
        os.kill(y_pid, signal.SIGSTOP)
        _wait_for(log1, r"mechanism X finished", 120, proc)
        os.kill(y_pid, signal.SIGKILL)
        code, text = _finish(proc, log1)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, text[-4000:]
    assert f"mechanism Y (pid {y_pid}) exited with signal 9; restart 1 in 1s" in text
    assert len(re.findall(r"mechanism Y started", text)) == 2, "Y restarted once, and only once"
    assert "signal 10" not in text and IMPOSSIBLE not in text
    assert "drain complete: every file ingested and every chunk processed" in text
    assert "driver compilers c1)" in text and "driver compilers tiered" not in text  # a drain ends: C1 only
    chunks = _chunks(pg_conn)
    assert len(chunks) == 3 and all(status == "written" and done for _, status, done in chunks), chunks

    # Run 2 on the same data: X finds nothing new and finishes before Y's Spark is even up.
    log2 = tmp_path / "run2.log"
    code, text = _finish(_start(env, log2), log2)
    assert code == 0, text[-4000:]
    assert "exited with" not in text, "no worker restarted"
    y_started = _at(text, r"mechanism Y started")
    spark_up = _at(text, r"mechanism Y: reading .* with Spark")
    assert _at(text, r"mechanism X finished") < spark_up, "the ordering that used to kill Y did not happen"
    spark_start = spark_up - y_started
    after_spark = _at(text, r"drain complete") - spark_up
    assert after_spark < 2 * spark_start + 10, f"{after_spark:.1f}s after a Spark start of {spark_start:.1f}s"
    assert _chunks(pg_conn) == chunks, "the second drain found nothing to do"


@pytest.mark.slow
def test_drain_without_importance_file_exits_1_with_one_line_and_no_restart(tmp_path, product_env, pg_conn):
    inbox = Path(product_env["LOCAL_INBOX_DIR"])
    generate(inbox, rows=30_000, seed=3)
    (inbox / "CustomerImportance.csv").unlink()
    log = tmp_path / "main.log"
    code, text = _finish(_start(_env(product_env), log), log)
    assert code == 1, text[-4000:]
    assert text.count(IMPOSSIBLE) == 1, text[-4000:]
    assert "mechanism Y cannot finish the drain (exit 3, reason above); stopping" in text
    assert len(re.findall(r"mechanism Y started", text)) == 1 and "restart" not in text
    assert "Traceback" not in text
    chunks = _chunks(pg_conn)
    assert len(chunks) == 3 and not any(done for *_, done in chunks), "nothing was evaluated without weights"
