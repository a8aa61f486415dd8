"""The entry point both workers share: settings, logging, metrics, stop signals, and the exit codes the
supervisor reads (0 done, 1 crash: restarted, 2 settings: stop, 3 a drain that cannot finish: final)."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Callable

from src.utils.runtime import install_stop_handlers, watch_parent

log = logging.getLogger(__name__)


def worker_id(name: str) -> str:
    """ "mechanism Y" -> "mechanism_y": the `worker` field of log lines and metrics."""
    return name.strip().lower().replace(" ", "_")


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
    received: list[str] = []
    install_stop_handlers(stop, name, received)  # first: a SIGTERM from the supervisor is never fatal mid-start
    watch_parent(stop, name)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ProcessorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from src.observability.logs import configure_logging
    from src.observability.metrics import install_worker_metrics
    from src.utils import retry

    configure_logging(settings, worker_id(name))
    if received:  # came before the log was set up, so the handler's line went nowhere
        log.info("%s: %s received while starting, stopping after the current step", name, received[0])
    install_worker_metrics()
    retry.configure(max_delay=settings.retry_max_delay_seconds)
    try:
        return run(settings, args, stop)
    except SettingsError as exc:
        log.error("%s cannot start: %s", name, exc)
        return 2
    except ProcessorError as exc:
        if stop.is_set():
            log.info("%s stopped: %s", name, exc)
            return 0
        log.error("%s stopped: %s", name, exc)
        return 1
    except Exception as exc:
        if stop.is_set():  # asked to stop mid-step (a wait, a cancelled Spark job): not a crash
            log.info(
                "%s stopped mid-step: %s", name, str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            )
            return 0
        raise
