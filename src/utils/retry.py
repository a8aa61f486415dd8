"""The product's one retry policy: capped exponential backoff with jitter, `Retry-After` honoured, a log
line per wait that names the dependency, the error and the next attempt.

Every call to PostgreSQL, S3, the local lake and Drive that may meet a transient fault goes through
`call_with_retry` exactly once: no layer below it retries on its own (botocore and googleapiclient are
built with their own retries off), so one request is never multiplied by nested loops. By default a
transient fault is waited out for as long as it lasts (an outage delays the work, it never fails a file
or chunk); a stop request ends the wait by re-raising the last error.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, TypeVar

import tenacity

from src.errors import is_retryable, retry_after

T = TypeVar("T")
log = logging.getLogger(__name__)

INITIAL_DELAY = 0.5
_max_delay = 30.0
_listeners: list[Callable[[str, str], None]] = []


def configure(*, max_delay: float) -> None:
    """Set the backoff cap (RETRY_MAX_DELAY_SECONDS) for this process."""
    global _max_delay
    _max_delay = max_delay


def add_listener(fn: Callable[[str, str], None]) -> None:
    """`fn(dependency, outcome)` is called for each wait ("retry"), each success after waiting
    ("recovered") and each give-up ("gave_up"); dependency is lower-case (postgresql, s3, lake, drive)."""
    _listeners.append(fn)


def _notify(dependency: str, outcome: str) -> None:
    for fn in _listeners:
        try:
            fn(dependency.lower(), outcome)
        except Exception:  # noqa: BLE001 - a metrics hook must never break the pipeline
            log.debug("retry listener failed", exc_info=True)


def brief(exc: BaseException) -> str:
    """The first line of an error, for one-line logs."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


class _Wait(tenacity.wait.wait_base):
    """Exponential backoff (0.5 s, 1 s, 2 s, ... capped) with jitter over its upper half, so that workers
    waiting for the same server do not come back in step; a server's Retry-After wins when it asks for
    longer (bounded by four caps, so a bad header cannot stall a worker for hours)."""

    def __init__(self, max_delay: float | None) -> None:
        self._max = max_delay

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        cap = self._max if self._max is not None else _max_delay
        backoff = min(cap, INITIAL_DELAY * 2 ** (retry_state.attempt_number - 1))
        delay = backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not cryptography
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = retry_after(exc) if exc is not None else None
        return max(delay, min(asked, cap * 4)) if asked is not None else delay


def call_with_retry(
    fn: Callable[[], T],
    *,
    dependency: str,
    what: str,
    target: str | None = None,
    stop: threading.Event | None = None,
    give_up_after: float | None = None,
    attempts: int | None = None,
    max_delay: float | None = None,
    retryable: Callable[[BaseException], bool] = is_retryable,
) -> T:
    """Call `fn` until it succeeds or fails permanently.

    A transient error (`retryable`) is retried with backoff until `give_up_after` seconds have passed or
    `attempts` calls were made (None: for as long as it lasts) or `stop` is set; then the last error is
    raised. Any other error is raised at once.
    """
    where = f"{dependency} at {target}" if target else dependency
    started = time.monotonic()

    def should_stop(state: tenacity.RetryCallState) -> bool:
        if stop is not None and stop.is_set():
            return True
        if attempts is not None and state.attempt_number >= attempts:
            return True
        return give_up_after is not None and time.monotonic() - started >= give_up_after

    def before_sleep(state: tenacity.RetryCallState) -> None:
        _notify(dependency, "retry")
        log.warning(
            "waiting for %s (%s): %s; attempt %d, next in %.1f s",
            where,
            what,
            brief(state.outcome.exception()),
            state.attempt_number + 1,
            state.upcoming_sleep,
            extra={"event": "retry_wait", "dependency": dependency.lower()},
        )

    sleep = stop.wait if stop is not None else time.sleep
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(retryable),
        wait=_Wait(max_delay),
        stop=should_stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        result = retrying(fn)
    except BaseException as exc:
        if retrying.statistics.get("attempt_number", 1) > 1 and retryable(exc):
            _notify(dependency, "gave_up")
        raise
    if retrying.statistics.get("attempt_number", 1) > 1:
        _notify(dependency, "recovered")
        log.info("%s is back (%s)", where, what, extra={"event": "retry_recovered", "dependency": dependency.lower()})
    return result
