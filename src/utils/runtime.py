"""What every long-running process here shares: logging set-up, a stop flag wired to signals, capped retries."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

# Under the supervisor (main.py), Mechanism Y creates the file named here as soon as its Spark session is up (no
# warm-up first: the first chunk warms Spark up), and Mechanism X holds its first chunk release until then (or
# CONSUMER_READY_TIMEOUT at most).
READY_FILE_ENV = "TP_Y_READY_FILE"
CONSUMER_READY_TIMEOUT = 180.0
# Under `main.py --drain`, the supervisor creates the file named here once Mechanism X has exited 0 (everything in
# the source is ingested). A file, not a signal: a Y that starts (or restarts) after X finished still sees it.
X_DONE_FILE_ENV = "TP_X_DONE_FILE"
# The supervisor launches its workers before its own start-up work (the embedded PostgreSQL, the schema, the lake
# check), so that their imports and Y's JVM start overlap it. Each worker waits for the file named here before it
# opens the database (`wait_for_start`); the supervisor creates it once that work is done, with the database's URL
# in it when the workers' environment had none (the embedded server's, known only once it runs).
START_GATE_ENV = "TP_START_GATE"
START_GATE_POLL = 0.02  # seconds between two looks for the gate file
# The supervisor's pid, set in its workers' environment: a worker whose parent is no longer this pid is an orphan.
SUPERVISOR_PID_ENV = "TP_SUPERVISOR_PID"
# A worker whose supervisor is gone stops after its current step, and is ended hard if that takes longer than this.
ORPHAN_GRACE_SECONDS = 8.0
EXIT_DRAIN_IMPOSSIBLE = 3  # `--drain` cannot finish with what the source has: final, the supervisor does not restart
_PR_SET_PDEATHSIG = 1
log = logging.getLogger(__name__)


def install_stop_handlers(stop: threading.Event, name: str, received: list[str] | None = None) -> None:
    """SIGTERM and SIGINT set `stop`; the worker finishes its current step and exits cleanly. Each signal's name is
    appended to `received`: one that comes before the worker has set up its log is logged by the worker then
    (`worker.worker_main`), since the handler's own line goes nowhere yet."""

    def handler(signum: int, _frame: object) -> None:
        if received is not None:
            received.append(signal.Signals(signum).name)
        if not stop.is_set():
            log.info("%s: %s received, stopping after the current step", name, signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def x_finished() -> bool:
    """True once the supervisor has marked Mechanism X finished (main.py --drain; see X_DONE_FILE_ENV)."""
    path = os.environ.get(X_DONE_FILE_ENV)
    return bool(path) and os.path.exists(path)


def wait_for_start(stop: threading.Event, dsn_env: str) -> bool:
    """Under the supervisor: wait until its start-up is done (the gate file of START_GATE_ENV exists), then take the
    database URL it holds into `dsn_env` unless the environment already names one (a worker restarted later, or
    a URL the user set). At once without a gate (a worker run on its own). False when `stop` came first."""
    path = os.environ.get(START_GATE_ENV)
    if not path:
        return True
    waited = time.monotonic()
    while True:
        try:
            with open(path) as f:
                url = f.read().strip()
            break
        except FileNotFoundError:
            if stop.wait(START_GATE_POLL):
                return False
    if url and not os.environ.get(dsn_env):
        os.environ[dsn_env] = url
    log.debug("the supervisor's start-up done after %.2f s of waiting", time.monotonic() - waited)
    return True


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved once at import: the supervisor calls it between fork and exec, where loading a library is unsafe.
_prctl = _load_prctl()


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies (PR_SET_PDEATHSIG); False where unsupported."""
    return _prctl is not None and _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def child_of(parent_pid: int) -> Callable[[], None]:
    """A Popen `preexec_fn`: the child gets SIGTERM when the supervisor dies, and exits at once if it already has.

    The parent-death signal is tied to the thread that forks: the supervisor starts workers from its main loop.
    """

    def setup() -> None:
        die_with_parent(signal.SIGTERM)
        if os.getppid() != parent_pid:  # the supervisor died between fork and prctl: no signal will come
            os._exit(1)

    return setup


def watch_parent(stop: threading.Event, name: str, *, interval: float = 1.0) -> threading.Thread | None:
    """Under the supervisor, stop this worker when the supervisor is gone, and end it hard if stopping hangs.

    The parent-death signal (see `child_of`) normally does this at once; this watchdog covers what it cannot
    (a platform without prctl, a signal handler not yet installed) by polling `os.getppid()`.
    """
    raw = os.environ.get(SUPERVISOR_PID_ENV)
    if not raw:
        return None
    supervisor = int(raw)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != supervisor:
        log.error("%s: the supervisor (pid %d) is gone; exiting", name, supervisor)
        os._exit(1)

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(interval)
        log.warning("%s: the supervisor (pid %d) is gone; stopping after the current step", name, supervisor)
        stop.set()
        time.sleep(ORPHAN_GRACE_SECONDS)
        log.error("%s: still running %.0fs after the supervisor died; exiting now", name, ORPHAN_GRACE_SECONDS)
        logging.shutdown()
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def drain_parser(prog: str, description: str, *, drain_help: str) -> argparse.ArgumentParser:
    """The command line every entry point shares: a description and `--drain`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--drain", action="store_true", help=drain_help)
    return parser
