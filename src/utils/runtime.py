"""What every long-running process here shares: logging set-up, a stop flag wired to signals, capped retries."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, TypeVar

from src.errors import RetryableError

T = TypeVar("T")

# Under the supervisor (main.py), Mechanism Y creates the file named here once its Spark session is up and
# warm, and Mechanism X holds its first chunk release until then (or CONSUMER_READY_TIMEOUT at most).
READY_FILE_ENV = "TP_Y_READY_FILE"
CONSUMER_READY_TIMEOUT = 180.0
# Under `main.py --drain`, the supervisor creates the file named here once Mechanism X has exited 0 (everything in
# the source is ingested). A file, not a signal: a Y that starts (or restarts) after X finished still sees it.
X_DONE_FILE_ENV = "TP_X_DONE_FILE"
# The supervisor's pid, set in its workers' environment: a worker whose parent is no longer this pid is an orphan.
SUPERVISOR_PID_ENV = "TP_SUPERVISOR_PID"
# A worker whose supervisor is gone stops after its current step, and is ended hard if that takes longer than this.
ORPHAN_GRACE_SECONDS = 8.0
EXIT_DRAIN_IMPOSSIBLE = 3  # `--drain` cannot finish with what the source has: final, the supervisor does not restart
_PR_SET_PDEATHSIG = 1
log = logging.getLogger(__name__)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "pid": record.process,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once per process: every line carries the pid."""
    handler = logging.StreamHandler()
    if fmt == "auto":
        import sys

        fmt = "text" if sys.stderr.isatty() else "json"
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(process)d %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in (
        "py4j",
        "botocore",
        "boto3",
        "urllib3",
        "s3transfer",
        "googleapiclient",
        "google",
        "pgserver",
        "filelock",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def install_stop_handlers(stop: threading.Event, name: str) -> None:
    """SIGTERM and SIGINT set `stop`; the worker finishes its current step and exits cleanly."""

    def handler(signum: int, _frame: object) -> None:
        if not stop.is_set():
            log.info("%s: %s received, stopping after the current step", name, signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def x_finished() -> bool:
    """True once the supervisor has marked Mechanism X finished (main.py --drain; see X_DONE_FILE_ENV)."""
    path = os.environ.get(X_DONE_FILE_ENV)
    return bool(path) and os.path.exists(path)


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


_sleep = time.sleep


def retry_call(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 10.0,
    transient: Callable[[BaseException], bool] = lambda e: isinstance(e, RetryableError),
) -> T:
    """Call `fn`, retrying transient failures with capped exponential backoff and a log line per wait."""
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered by `transient` below
            if not transient(exc) or attempt == attempts:
                raise
            log.warning("%s failed (attempt %d/%d), retrying in %.1fs: %s", what, attempt, attempts, delay, exc)
            _sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


def worker_main(name: str, parser, argv: list[str] | None, run: Callable[..., int]) -> int:
    """Entry point shared by the workers: settings, logging, stop signals, and exit codes the supervisor reads.

    `run(settings, args, stop)` does the work. Exit 2 means "these settings cannot work" (the supervisor
    stops instead of restarting); exit 3 (EXIT_DRAIN_IMPOSSIBLE, returned by `run`) "this drain cannot finish"
    (final too); exit 1 is any other failure (restarted with backoff). Under the supervisor, the worker stops
    when the supervisor dies (`watch_parent`).
    """
    from config.config import Settings
    from src.errors import ProcessorError, SettingsError

    stop = threading.Event()
    install_stop_handlers(stop, name)  # first: a SIGTERM from the supervisor is never fatal mid-start
    watch_parent(stop, name)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ProcessorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        return run(settings, args, stop)
    except SettingsError as exc:
        log.error("%s cannot start: %s", name, exc)
        return 2
    except ProcessorError as exc:
        log.error("%s stopped: %s", name, exc)
        return 1
