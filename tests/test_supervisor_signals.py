"""The whole daemon and its process tree (X, Y, Y's Spark JVM) under SIGINT and under a SIGKILL of the supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from src.sample_data import generate
from tests.test_supervisor import _wait_for

ROOT = Path(__file__).resolve().parent.parent


def _start(product_env: dict[str, str], log: Path, *, own_group: bool = False) -> subprocess.Popen:
    generate(Path(product_env["LOCAL_INBOX_DIR"]), rows=30_000, seed=3)
    env = dict(product_env, BATCH_SIZE="10000", LOG_FORMAT="text", SPARK_MASTER="local[2]")
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "main.py"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,  # a process group of its own, to signal as a whole (not pytest with it)
        )


def _survivors(procs: list[psutil.Process], timeout: float) -> list[str]:
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    out = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _is_java(p: psutil.Process) -> bool:
    try:
        return p.name() == "java"
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [False, True], ids=["sigint-to-the-supervisor", "sigterm-to-the-process-group"])
def test_a_stop_signal_stops_both_workers_and_spark_cleanly(tmp_path, product_env, to_group):
    """SIGINT to the supervisor (Ctrl-C, or `kill -INT`), or SIGTERM to the daemon's whole process group, as
    `timeout` and systemd's default control-group stop send it: then Y's Spark JVM gets it too, and must leave
    the stop to Y (it used to shut Spark down under Y's batch: Py4J tracebacks, Spark ERROR lines, Y's last
    steps failing with "Connection refused")."""
    log = tmp_path / "main.log"
    proc = _start(product_env, log, own_group=to_group)
    try:
        _wait_for(log, r"mechanism Y up", 300, proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = sorted(p.name() for p in tree)
        assert names.count("java") == 1 and len([p for p in tree if p.ppid() == proc.pid]) == 2, names
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert f"{'SIGTERM' if to_group else 'SIGINT'} received: stopping the workers" in text
    assert "mechanism X: SIGTERM received" in text and "mechanism Y: SIGTERM received" in text
    assert "all workers stopped" in text and "did not stop" not in text and "Traceback" not in text
    assert "driver compilers tiered)" in text  # SPARK_DRIVER_JIT=auto: the daemon's Y runs until stopped
    errors = [line for line in text.splitlines() if " ERROR " in line or "stopped mid-step" in line]
    assert not errors, "\n".join(errors)
    assert not _survivors(tree, 30)
    assert not list((Path(product_env["DATA_DIR"]) / "run").iterdir()), "a run file was left behind"


@pytest.mark.slow
def test_no_worker_nor_spark_jvm_outlives_a_killed_supervisor(tmp_path, product_env):
    """SIGKILL while Y is still starting Spark (its stop flag not looked at yet): the hard path."""
    log = tmp_path / "main.log"
    proc = _start(product_env, log)
    try:
        y_pid = int(_wait_for(log, r"mechanism Y started \(pid (\d+)\)", 120, proc).group(1))
        deadline = time.monotonic() + 300
        while not any(_is_java(p) for p in psutil.Process(y_pid).children(recursive=True)):
            assert time.monotonic() < deadline, "Y's Spark JVM never started"
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.wait(10)
    assert len(tree) >= 3 and any(_is_java(p) for p in tree)
    left = _survivors(tree, 30)
    assert not left, f"outlived the supervisor by 30 s: {left}\n{log.read_text(errors='replace')[-3000:]}"
    text = log.read_text(errors="replace")
    # Each worker learnt of it: from the parent-death signal (SIGTERM, at once) or from its watchdog's poll.
    # Which comes first is a race: a worker whose stop ends its start at once (Y's session wait gives way
    # to a stop) exits before the watchdog's next look.
    for name in ("mechanism X", "mechanism Y"):
        told = (f"{name}: SIGTERM received", f"{name}: the supervisor (pid {proc.pid}) is gone")
        assert any(t in text for t in told), f"{name} logged neither {told}:\n{text[-3000:]}"
