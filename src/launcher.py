"""`python -m src.launcher NAME MODULE [ARGS...]`: how the supervisor starts each worker.

It runs MODULE as `python -m MODULE ARGS...` would, with one difference: SIGTERM and SIGINT are handled from the
process's first instruction, not from the moment the worker's own handlers are in (`runtime.install_stop_handlers`,
called by `worker.worker_main` after MODULE's imports: pyarrow, pydantic, PySpark; a second or more on a busy machine).

A stop that comes during those imports (the supervisor stopping, or dying: its parent-death signal is SIGTERM, see
`runtime.child_of`) ends the start: the worker logs which signal stopped it, then ends by that signal, as it did
before it could log at all. Once the worker's own handlers are in, they replace these and a stop is a clean one.
"""

from __future__ import annotations

import logging
import os
import runpy
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopWhileStarting(BaseException):  # noqa: N818 - not an error: a stop, like KeyboardInterrupt
    """A stop signal that came before the worker installed its own handlers."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_while_starting(signum: int, _frame: object) -> None:
    for sig in STOP_SIGNALS:  # one stop is enough; a second signal must not interrupt the report of the first
        signal.signal(sig, signal.SIG_IGN)
    raise StopWhileStarting(signum)


def _report(name: str, signum: int) -> None:
    """One log line in the worker's own format; plain stderr when even that cannot be set up."""
    from src.worker import worker_id

    message = f"{name}: {signal.Signals(signum).name} received while starting; exiting"
    try:
        from config.config import Settings
        from src.observability.logs import configure_logging

        configure_logging(Settings.from_env(), worker_id(name))
        logging.getLogger("src.worker").info(message)
        logging.shutdown()
    except Exception:  # noqa: BLE001 - the import that was stopped may be half done; say it plainly instead
        print(message, file=sys.stderr, flush=True)


def launch(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m src.launcher NAME MODULE [ARGS...]", file=sys.stderr)
        return 2
    name, module, args = argv[0], argv[1], argv[2:]
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_while_starting)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except StopWhileStarting as stop:
        _report(name, stop.signum)
        signal.signal(stop.signum, signal.SIG_DFL)
        os.kill(os.getpid(), stop.signum)  # end as the signal's default action would have
        signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
