"""The supervisor's own behaviour, with tiny real workers (this module, run as `python -m`) instead of X and Y.

The workers are real processes that really exit 1, 2 or 3, sleep, or ignore SIGTERM; the supervisor is the
product's `Supervisor` running its real loop. No Spark here: these run in seconds.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = "tests.test_supervisor_lifecycle"


def _settings(tmp_path: Path, **extra: str):
    from config.config import Settings

    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "LOCAL_LAKE_DIR": str(tmp_path / "lake"),  # never the project's own data/
        "LOCAL_INBOX_DIR": str(tmp_path / "inbox"),
        "METRICS_ADDR": "off",
    }
    return Settings.from_env({**env, **extra}, dotenv=Path("/nonexistent"))


def _supervisor(tmp_path: Path, *workers, drain: bool = False):
    """A real Supervisor whose X and Y are tiny workers: `workers` are (name, args) pairs."""
    from main import Supervisor, Worker

    sup = Supervisor(_settings(tmp_path), drain=drain, run_y=len(workers) > 1)
    sup.x = Worker(workers[0][0], THIS, list(workers[0][1]))
    if len(workers) > 1:
        sup.y = Worker(workers[1][0], THIS, list(workers[1][1]))
    return sup


def _run_in_thread(sup) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(sup.run()), daemon=True)
    thread.start()
    return thread, result


def _records(caplog, pattern: str) -> list[tuple[float, re.Match]]:
    rx = re.compile(pattern)
    return [(r.created, m) for r in caplog.records if r.name == "supervisor" and (m := rx.search(r.getMessage()))]


def _wait_records(caplog, pattern: str, count: int, timeout: float) -> list[tuple[float, re.Match]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _records(caplog, pattern)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    raise AssertionError(f"fewer than {count} {pattern!r} within {timeout}s:\n{messages}")


def test_a_crashing_worker_is_restarted_with_growing_capped_backoff(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="supervisor")
    sup = _supervisor(tmp_path, ("crasher", ["exit", "1"]))
    sup.max_backoff = 4.0
    thread, result = _run_in_thread(sup)
    try:
        exits = _wait_records(caplog, r"crasher \(pid (\d+)\) exited with code 1; restart (\d+) in (\d+)s", 5, 120)
        starts = _wait_records(caplog, r"crasher started \(pid (\d+)\)", 6, 60)
    finally:
        sup.stop.set()
        thread.join(30)
    assert result == [0]
    exits, starts = exits[:5], starts[:6]
    assert [int(m.group(2)) for _, m in exits] == [1, 2, 3, 4, 5]
    assert [int(m.group(3)) for _, m in exits] == [1, 2, 4, 4, 4], "1 s, 2 s, 4 s, then capped"
    pids = [int(m.group(1)) for _, m in starts]
    assert len(set(pids)) == 6, "every restart is a new process"
    for (exit_at, m), (start_at, _) in zip(exits, starts[1:]):
        assert start_at - exit_at >= int(m.group(3)) - 0.05, "restarted before its backoff ran out"


def test_a_worker_up_longer_than_healthy_after_restarts_at_one_second_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="supervisor")
    sup = _supervisor(tmp_path, ("flaky", ["sleep-exit", "1.5", "1"]))
    sup.healthy_after = 1.0  # each run lasts 1.5 s: healthy by this measure, so no backoff builds up
    thread, _ = _run_in_thread(sup)
    try:
        exits = _wait_records(caplog, r"flaky \(pid \d+\) exited with code 1; restart (\d+) in (\d+)s", 3, 120)
    finally:
        sup.stop.set()
        thread.join(30)
    assert [(int(m.group(1)), int(m.group(2))) for _, m in exits[:3]] == [(1, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize(("code", "expected", "line"), [(2, 2, "cannot start with these settings"), (3, 1, "drain")])
def test_final_exit_codes_stop_everything_without_restart(tmp_path, caplog, code, expected, line):
    caplog.set_level(logging.INFO, logger="supervisor")
    sup = _supervisor(tmp_path, ("sleeper", ["sleep"]), ("quitter", ["sleep-exit", "0.5", str(code)]), drain=True)
    thread, result = _run_in_thread(sup)
    thread.join(60)
    assert not thread.is_alive()
    assert result == [expected]
    messages = [r.getMessage() for r in caplog.records if r.name == "supervisor"]
    assert [m for m in messages if "quitter cannot" in m and line in m and f"exit {code}" in m], messages
    assert not [m for m in messages if "restart" in m], messages
    assert len([m for m in messages if re.match(r"quitter started", m)]) == 1
    assert not sup.x.alive() and sup.x.proc.returncode == -signal.SIGTERM, "the other worker was stopped"


def test_x_done_file_reaches_a_worker_started_after_x_finished(tmp_path, caplog):
    """The drain hand-off is a file: a Y that starts (or restarts) long after X finished still sees it."""
    caplog.set_level(logging.INFO, logger="supervisor")
    # Y is still "starting" (sleeping 3 s) when X is long done, then waits for the mark, failing after 60 s.
    sup = _supervisor(tmp_path, ("fast x", ["exit", "0"]), ("late y", ["sleep-then-wait-x-done", "3"]), drain=True)
    thread, result = _run_in_thread(sup)
    thread.join(60)
    assert result == [0]
    messages = [r.getMessage() for r in caplog.records if r.name == "supervisor"]
    assert messages.index("fast x finished") < messages.index("late y finished")
    assert "drain complete: every file ingested and every chunk processed" in messages
    assert not sup.x_done_file.exists(), "the mark is removed when the supervisor ends"


def _wait_files(*paths: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"not all of {[p.name for p in paths]} within {timeout}s"
        time.sleep(0.05)


def test_workers_launched_before_the_database_wait_at_the_gate_then_get_its_url(tmp_path, monkeypatch):
    """main.py launches the workers before it starts the embedded database. They wait at the start gate, then
    go on with the database's URL, which exists only once the server runs; a stop at the gate ends them there."""
    from src.utils.db import DSN_ENV

    monkeypatch.delenv(DSN_ENV, raising=False)
    sup = _supervisor(tmp_path, ("gx", ["gate", "x"]), ("gy", ["gate", "y"]))
    marks = tmp_path / "data"
    sup.launch()
    try:
        _wait_files(marks / "gate-x-waiting", marks / "gate-y-waiting")
        time.sleep(0.5)  # the gate is polled every 20 ms: both had time to pass it, were it open
        assert sup.x.alive() and sup.y.alive()
        assert not list(marks.glob("gate-*-through")), "a worker went on before the database was ready"

        url = "postgresql://postgres:@/tp?host=/nonexistent/socket"
        monkeypatch.setenv(DSN_ENV, url)  # what prepare_services leaves for an embedded server
        sup.open_gate()
        _wait_files(marks / "gate-x-through", marks / "gate-y-through")
        assert (marks / "gate-x-through").read_text() == url
        assert (marks / "gate-y-through").read_text() == url
        assert stat.S_IMODE(sup.start_gate.stat().st_mode) == 0o600
        assert sup.env[DSN_ENV] == url, "a worker restarted later has the URL in its environment"
    finally:
        sup.abandon()
    assert not sup.x.alive() and not sup.y.alive()
    assert not sup.start_gate.exists() and not sup.ready_file.exists()

    # A URL the user set reaches the workers through their environment, never through the gate's file.
    sup = _supervisor(tmp_path, ("gx", ["gate", "u"]))
    sup.launch()
    try:
        sup.open_gate()
        _wait_files(marks / "gate-u-through")
        assert (marks / "gate-u-through").read_text() == url, "from the environment the worker started with"
        assert sup.start_gate.read_text() == ""
    finally:
        sup.abandon()

    # Stopped while waiting (the start-up failed, or a stop signal): the worker ends there, cleanly.
    sup = _supervisor(tmp_path, ("gx", ["gate", "z"]))
    sup.launch()
    try:
        _wait_files(marks / "gate-z-waiting")
    finally:
        sup.abandon()
    assert sup.x.proc.returncode == 0
    assert (marks / "gate-z-stopped").exists() and not (marks / "gate-z-through").exists()


def test_the_gate_never_replaces_a_database_url_the_worker_already_has(tmp_path, monkeypatch):
    """A worker restarted later (or given TP_DATABASE_URL by the user) keeps its own URL; without a gate (a worker
    run on its own) nothing is waited for."""
    from src.utils import runtime
    from src.utils.db import DSN_ENV

    gate = tmp_path / "gate"
    gate.write_text("postgresql://postgres:@/tp?host=/old/socket")
    monkeypatch.setenv(runtime.START_GATE_ENV, str(gate))
    monkeypatch.setenv(DSN_ENV, "postgresql://postgres:@/tp?host=/new/socket")
    assert runtime.wait_for_start(threading.Event(), DSN_ENV)
    assert os.environ[DSN_ENV] == "postgresql://postgres:@/tp?host=/new/socket"

    monkeypatch.delenv(runtime.START_GATE_ENV)
    stop = threading.Event()
    stop.set()
    assert runtime.wait_for_start(stop, DSN_ENV), "no gate: go at once, even with stop set"


_ORPHAN_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from config.config import Settings
from main import Supervisor, Worker
sup = Supervisor(Settings.from_env({"DATA_DIR": sys.argv[2], "METRICS_ADDR": "off"}, dotenv=Path("/nonexistent")), drain=False)
sup.x = Worker("sleeper", "tests.test_supervisor_lifecycle", ["sleep"])
sup.y = Worker("stubborn", "tests.test_supervisor_lifecycle", ["stubborn"])
sys.exit(sup.run())
"""


def test_workers_die_with_a_killed_supervisor(tmp_path):
    """SIGKILL the supervisor: a plain worker dies of the parent-death signal, one that ignores SIGTERM (busy,
    like Y starting Spark) is ended by its watchdog."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(ROOT), str(tmp_path / "data")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        ready = tmp_path / "data" / "stubborn-ready"
        while time.monotonic() < deadline and not ready.exists():
            time.sleep(0.1)
        assert ready.exists(), "the stubborn worker never got going"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 2
    finally:
        proc.kill()
    proc.wait(10)
    started = time.monotonic()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE], "a worker outlived the supervisor"
    assert time.monotonic() - started < 30


def _signal_stub_x(tmp_path: Path, mode: str, sig: int) -> tuple[int, list[str]]:
    """Start the stub worker `mode` as the supervisor starts mechanism X (through `src.launcher`), send it `sig` once
    it marks `<mode>-ready` in DATA_DIR, then mark `signalled`: its exit code and the lines of its text log."""
    from main import Worker

    data = tmp_path / "data"
    data.mkdir()
    log_file = tmp_path / "worker.log"
    env = dict(os.environ, DATA_DIR=str(data), LOG_FORMAT="text", LOG_FILE=str(log_file), METRICS_ADDR="off")
    env["PYTHONPATH"] = str(ROOT)
    worker = Worker("mechanism X", THIS, [mode])
    worker.start(env)
    try:
        deadline = time.monotonic() + 60
        while not (data / f"{mode}-ready").exists():
            assert worker.proc.poll() is None, f"the worker exited with {worker.proc.returncode}"
            assert time.monotonic() < deadline, "the worker never got going"
            time.sleep(0.05)
        worker.proc.send_signal(sig)
        (data / "signalled").touch()
        code = worker.proc.wait(60)
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
    return code, log_file.read_text().splitlines()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_worker_stopped_before_its_handlers_are_in_says_so(tmp_path, sig):
    """The supervisor's stop, or its death (the parent-death signal is SIGTERM), can come while a worker still imports
    its modules, before `worker_main` installs its handlers. The worker then ends by that signal, as before, but it
    says so first: it used to vanish without a line (a race seen in
    test_no_worker_nor_spark_jvm_outlives_a_killed_supervisor)."""
    code, lines = _signal_stub_x(tmp_path, "slow-start", sig)
    assert code == -sig
    said = [line for line in lines if f"mechanism X: {sig.name} received while starting; exiting" in line]
    assert len(said) == 1, lines
    assert " INFO " in said[0] and "mechanism_x" in said[0]


def test_a_stop_before_the_worker_log_is_set_up_is_logged_once_it_is(tmp_path):
    """`worker_main` installs its handlers first, then reads its settings and sets up its log: a SIGTERM in between
    (the supervisor killed while X reads its settings) stopped X cleanly, but its handler's line went nowhere (seen
    once in test_no_worker_nor_spark_jvm_outlives_a_killed_supervisor). The worker logs it once its log is set up."""
    code, lines = _signal_stub_x(tmp_path, "slow-args", signal.SIGTERM)
    assert code == 0  # stopped cleanly: run() saw the stop
    said = [line for line in lines if "mechanism X: SIGTERM received" in line]
    assert len(said) == 1 and "while starting, stopping after the current step" in said[0], lines


def test_the_launcher_runs_the_module_as_python_m_does(tmp_path):
    """Exit codes, arguments and `__name__ == "__main__"` reach the worker module unchanged."""
    env = dict(os.environ, DATA_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    for args, code in ((["exit", "3"], 3), (["sleep-exit", "0", "0"], 0), (["nonsense"], 1)):
        run = subprocess.run(
            [sys.executable, "-m", "src.launcher", "a worker", THIS, *args], cwd=ROOT, env=env, capture_output=True
        )
        assert run.returncode == code, run.stderr
    run = subprocess.run([sys.executable, "-m", "src.launcher", "a worker"], cwd=ROOT, env=env, capture_output=True)
    assert run.returncode == 2 and b"usage: python -m src.launcher NAME MODULE" in run.stderr


def test_prepare_keeps_data_dir_private_and_warns_of_readable_secrets(tmp_path, make_settings, caplog):
    from main import prepare_host

    key = tmp_path / "key.json"
    key.write_text("{}")
    key.chmod(0o644)
    settings = make_settings(GOOGLE_CREDENTIALS_PATH=str(key))
    caplog.set_level(logging.INFO, logger="supervisor")
    prepare_host(settings)
    assert stat.S_IMODE(settings.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((settings.data_dir / "run").stat().st_mode) == 0o700

    def warnings() -> list[str]:  # (a developer's own .env may be readable too: not this test's business)
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "GOOGLE_" in r.getMessage()]

    assert warnings() == [f"GOOGLE_CREDENTIALS_PATH {key} is readable by other users (mode 0644): run chmod 600 {key}"]
    key.chmod(0o600)
    caplog.clear()
    prepare_host(settings)
    assert warnings() == []


def test_the_s3_endpoint_is_logged_without_its_userinfo(tmp_path, caplog):
    from main import describe_setup

    settings = _settings(
        tmp_path, S3_BUCKET_NAME="lake", S3_ENDPOINT_URL="http://alice:s3cr3t@127.0.0.1:9000/base", POSTGRES_HOST="db"
    )
    caplog.set_level(logging.INFO, logger="supervisor")
    describe_setup(settings)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "lake: s3://lake (us-east-1) via http://***@127.0.0.1:9000/base" in text
    assert "s3cr3t" not in text and "alice" not in text


# ---------------------------------------------------------------- the tiny workers (python -m tests.test_supervisor_lifecycle)


def _worker(argv: list[str]) -> int:
    from src.utils import runtime

    mode = argv[0]
    if mode == "exit":
        return int(argv[1])
    if mode == "sleep-exit":
        time.sleep(float(argv[1]))
        return int(argv[2])
    if mode == "sleep":
        time.sleep(3600)
        return 0
    if mode == "slow-start":  # a worker still importing its modules (X: pyarrow, pydantic) when the stop comes
        Path(os.environ["DATA_DIR"], "slow-start-ready").touch()
        time.sleep(3600)
        return 0
    if mode == "slow-args":  # worker_main's handlers are in, its log not yet set up (parsing, settings)
        import argparse

        from src.worker import worker_main

        class SlowParser(argparse.ArgumentParser):
            def parse_args(self, args=None, namespace=None):
                Path(os.environ["DATA_DIR"], "slow-args-ready").touch()
                time.sleep(2)  # the test's SIGTERM comes in here, and ends this sleep at once
                deadline = time.monotonic() + 30
                while not Path(os.environ["DATA_DIR"], "signalled").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                return super().parse_args([], namespace)

        return worker_main("mechanism X", SlowParser(), [], lambda settings, args, stop: 0 if stop.is_set() else 1)
    if mode == "stubborn":  # like a worker busy starting Spark: SIGTERM only sets a flag it does not look at yet
        stop = threading.Event()
        runtime.install_stop_handlers(stop, "stubborn")
        runtime.watch_parent(stop, "stubborn")
        Path(os.environ["DATA_DIR"], "stubborn-ready").touch()
        time.sleep(3600)
        return 0
    if mode == "gate":  # as X and Y start: at the gate until the supervisor's start-up is done
        from src.utils.db import DSN_ENV

        stop = threading.Event()
        runtime.install_stop_handlers(stop, "gate")
        marks = Path(os.environ["DATA_DIR"])
        (marks / f"gate-{argv[1]}-waiting").touch()
        if not runtime.wait_for_start(stop, DSN_ENV):
            (marks / f"gate-{argv[1]}-stopped").touch()
            return 0
        (marks / f"gate-{argv[1]}-through").write_text(os.environ.get(DSN_ENV, ""))
        stop.wait(3600)
        return 0
    if mode == "sleep-then-wait-x-done":
        time.sleep(float(argv[1]))
        deadline = time.monotonic() + 60
        while not runtime.x_finished():
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.1)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
