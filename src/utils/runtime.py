"""What every long-running process here shares: logging set-up, a stop flag wired to signals, capped retries."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from typing import Callable, TypeVar

from src.errors import RetryableError

T = TypeVar("T")

# Under the supervisor (main.py), Mechanism Y creates the file named here once its Spark session is up and
# warm, and Mechanism X holds its first chunk release until then (or CONSUMER_READY_TIMEOUT at most).
READY_FILE_ENV = "TP_Y_READY_FILE"
CONSUMER_READY_TIMEOUT = 180.0
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
    stops instead of restarting); exit 1 is any other failure (restarted with backoff).
    """
    import sys

    from config.config import Settings
    from src.errors import ProcessorError, SettingsError

    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ProcessorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    install_stop_handlers(stop, name)
    try:
        return run(settings, args, stop)
    except SettingsError as exc:
        log.error("%s cannot start: %s", name, exc)
        return 2
    except ProcessorError as exc:
        log.error("%s stopped: %s", name, exc)
        return 1


def drain_parser(prog: str, description: str, *, drain_help: str) -> argparse.ArgumentParser:
    """The command line every entry point shares: a description and `--drain`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--drain", action="store_true", help=drain_help)
    return parser
