"""What every long-running process here shares: logging set-up, a stop flag wired to signals, capped retries."""

from __future__ import annotations

import argparse
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


def configure_logging(level: str = "INFO", fmt: str = "text", worker: str = "supervisor", settings=None) -> None:
    """Configure the root logger once per process (src/observability/logs.py); `settings` adds LOG_FILE."""
    from src.observability.logs import configure_logging as configure

    params = {"log_level": level, "log_format": fmt}
    if settings is not None:
        params.update(
            log_file=settings.log_file,
            log_file_max_bytes=settings.log_file_max_bytes,
            log_file_backups=settings.log_file_backups,
        )
    configure(params, worker)


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


def worker_id(name: str) -> str:
    """ "mechanism Y" -> "mechanism_y": the `worker` field of log lines and metrics."""
    return name.strip().lower().replace(" ", "_")


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
    configure_logging(settings.log_level, settings.log_format, worker_id(name), settings)
    from src.observability.metrics import install_worker_metrics

    install_worker_metrics()
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
