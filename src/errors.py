"""One root exception type for the product, and the one place that decides what is worth retrying."""

from __future__ import annotations

import errno
import socket
import sys


class ProcessorError(Exception):
    """Root of every error this product raises on purpose."""


class SettingsError(ProcessorError):
    """A setting is missing or wrong; the message is one line naming the variable."""


class RetryableError(ProcessorError):
    """A transient fault (network, throttling, a server restarting): retrying may succeed."""


class SourceError(ProcessorError):
    """The source (local inbox or Drive) cannot be used as configured."""


class FileRejected(ProcessorError):
    """A source file cannot be read at all (not CSV, wrong header, not UTF-8)."""


class LakeError(ProcessorError):
    """The lake (local directory or S3 bucket) cannot be used as configured."""


class ObjectConflict(LakeError):
    """An object key already holds different content; it is never overwritten."""


# HTTP answers that mean "not now" rather than "never": timeouts, throttling, server trouble.
RETRYABLE_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Drive answers 403 for quota and rate limits; those reasons are transient, every other 403 is not.
RETRYABLE_403_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "backendError"})
RETRYABLE_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "OperationAborted",
    }
)
RETRYABLE_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EAGAIN,
    }
)


def command_failed(exc: ProcessorError) -> int:
    """A one-shot command's end on `exc`: its one line on stderr, and the exit code the workers use too
    (2: the settings cannot work, 1: any other failure)."""
    sys.stderr.write(f"error: {exc}\n")
    return 2 if isinstance(exc, SettingsError) else 1


def is_retryable(exc: BaseException) -> bool:
    """True when `exc` is a transient fault of PostgreSQL, S3, Drive or the network: waiting may fix it.

    The single classification every retry in the product uses. Whatever is not recognised here is
    permanent: it is reported and, for a file or chunk, counted as a failed attempt.
    """
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, ProcessorError):
        return False
    if isinstance(exc, (socket.timeout, TimeoutError, ConnectionError)):
        return True
    return (
        _postgres_retryable(exc)
        or _boto_retryable(exc)
        or _google_retryable(exc)
        or (isinstance(exc, OSError) and exc.errno in RETRYABLE_ERRNOS)
    )


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (a `Retry-After` header in seconds), if any."""
    headers: dict = {}
    resp = getattr(exc, "resp", None)  # googleapiclient.errors.HttpError
    if resp is not None:
        headers = {str(k).lower(): v for k, v in dict(resp).items()}
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        headers = {str(k).lower(): v for k, v in response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).items()}
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None  # an HTTP date: rare enough to fall back on our own backoff


def _postgres_retryable(exc: BaseException) -> bool:
    try:
        import psycopg2
        import psycopg2.errors
    except ImportError:  # pragma: no cover - psycopg2 is a runtime dependency
        return False
    if isinstance(exc, (psycopg2.errors.SerializationFailure, psycopg2.errors.DeadlockDetected)):
        return True
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return True  # statement_timeout: the server was too slow this time
    # OperationalError covers a lost or refused connection, an admin shutdown, too many connections;
    # InterfaceError a connection psycopg2 already knows is closed.
    return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))


def _boto_retryable(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # pragma: no cover - boto3 is a runtime dependency
        return False
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in RETRYABLE_S3_CODES or status in RETRYABLE_HTTP_STATUS
    return False


def _google_retryable(exc: BaseException) -> bool:
    try:
        from googleapiclient.errors import HttpError
    except ImportError:  # pragma: no cover - the Drive client is a runtime dependency
        return False
    if isinstance(exc, HttpError):
        status = int(getattr(exc.resp, "status", 0) or 0)
        if status in RETRYABLE_HTTP_STATUS:
            return True
        if status == 403:
            reasons = {d.get("reason") for d in (exc.error_details or []) if isinstance(d, dict)}
            return bool(reasons & RETRYABLE_403_REASONS) or "rate limit" in str(exc).lower()
        return False
    try:
        import httplib2
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, httplib2.HttpLib2Error) and not isinstance(exc, httplib2.RedirectLimit)
