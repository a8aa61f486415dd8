"""One logging set-up for the supervisor, Mechanism X and Mechanism Y (SPEC §8).

JSON lines (`LOG_FORMAT=json`, the default when stderr is not a terminal) carry `ts` (UTC, ms, `Z`), `level`,
`worker`, `pid`, `logger`, `event`, `message` and, as fields of their own, the correlation ids a record was
logged with (`extra={"file_id": ..., "chunk_id": ...}`), so one chunk can be followed from X to Y with a
JSON query alone. Text lines escape control characters, so a hostile file name cannot forge a line.

In JSON mode a worker's stdout/stderr file descriptors are pipes read by a thread: the JVM that PySpark
starts inherits them, and any line that is not already JSON (the JVM's own warnings, a banner, a C
library's complaint) is wrapped into a JSON record instead of reaching the terminal raw.
"""

from __future__ import annotations

import atexit
import gzip
import json
import logging
import logging.handlers
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from src.packaging import project_file_uri

CORRELATION_FIELDS = ("file_id", "chunk_id", "chunk_seq", "batch_id", "detection_id")
NOISY_LOGGERS = (
    "py4j",
    "botocore",
    "boto3",
    "urllib3",
    "s3transfer",
    "googleapiclient",
    "google",
    "pgserver",
    "filelock",
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# What configure_logging decided in this process; spark_logging_conf reads it.
_state: dict[str, Any] = {"format": None, "worker": None}


def utc_timestamp(created: float) -> str:
    """`created` (seconds since the epoch) as ISO-8601 UTC with milliseconds and `Z`."""
    seconds, millis = divmod(int(created * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def escape_control(text: str) -> str:
    """Control characters (newlines included) as visible escapes: one record stays one line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _field(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `ensure_ascii` escapes every non-ASCII character, line separators included."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        raw = getattr(record, "raw_json", None)
        if raw is not None:  # a line already in JSON (Spark's JVM): passed on as it is
            return raw
        out = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname,
            "worker": self.worker,
            "pid": record.process,
            "logger": record.name,
            "event": getattr(record, "event", None) or (self.worker if record.name == "__main__" else record.name),
            "message": record.getMessage(),
        }
        for name in CORRELATION_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = _field(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["exc"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=True, default=str)


class TextFormatter(logging.Formatter):
    """`ts pid worker LEVEL logger: message [ids]`; a traceback follows on indented lines."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(
            f"{name}={escape_control(str(getattr(record, name)))}"
            for name in CORRELATION_FIELDS
            if getattr(record, name, None) is not None
        )
        line = (
            f"{utc_timestamp(record.created)} {record.process} {self.worker} {record.levelname} {record.name}: "
            f"{escape_control(record.getMessage())}"
        )
        if ids:
            line += f" [{ids}]"
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "\n" + "\n".join("    " + escape_control(t) for t in trace.splitlines())
        return line


def resolve_format(fmt: str, stream: TextIO | None = None) -> str:
    """`auto` -> text on a terminal, json otherwise."""
    if fmt != "auto":
        return fmt
    stream = stream or sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def _gzip_rotator(source: str, dest: str) -> None:
    with open(source, "rb") as src, gzip.open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    os.remove(source)


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated file that the supervisor and both workers append to at once.

    Rotation happens under an exclusive flock; a process whose file was rotated by another one notices
    (the path names a new inode) and reopens, so no line lands in a file already being gzipped.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self.rotator = _gzip_rotator
        self.namer = lambda name: name + ".gz"
        self._lock_fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_RDWR, 0o644)

    def emit(self, record: logging.LogRecord) -> None:
        import fcntl

        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._reopen_if_rotated()
            super().emit(record)
            if self.stream is not None:
                self.stream.flush()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _reopen_if_rotated(self) -> None:
        if self.stream is None:
            return
        try:
            moved = os.stat(self.baseFilename).st_ino != os.fstat(self.stream.fileno()).st_ino
        except FileNotFoundError:
            moved = True
        if moved:
            self.stream.close()
            self.stream = self._open()


class _StrayOutput:
    """Reads a pipe that replaced fd 1 or 2 and turns each line into a log record (JSON lines pass as they are)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.saved = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, args=(read_end, name), name=f"stray-{name}", daemon=True)
        self.thread.start()

    @staticmethod
    def _pump(read_end: int, name: str) -> None:
        root = logging.getLogger()
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                text = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
                if not text.strip():
                    continue
                record = _stray_record(text, name)
                try:
                    root.handle(record)
                except Exception:  # noqa: BLE001, S110 - a log line must never kill the pump
                    pass

    def restore(self, timeout: float = 0.3) -> None:
        """Put the real descriptor back; the pump drains what is left once every writer has closed the pipe."""
        os.dup2(self.saved, self.fd)
        self.thread.join(timeout)


def _stray_record(text: str, name: str) -> logging.LogRecord:
    parsed = None
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
    if isinstance(parsed, dict):
        level = logging.getLevelName(str(parsed.get("level", "WARNING")))
        record = logging.LogRecord(
            "spark.jvm", level if isinstance(level, int) else logging.WARNING, "", 0, text, None, None
        )
        record.raw_json = text
        return record
    level = logging.WARNING if re.search(r"\b(WARN|WARNING|ERROR|Exception)\b", text) else logging.INFO
    record = logging.LogRecord(name, level, "", 0, "%s", (text,), None)
    record.event = "stray_output"
    return record


def _stream_handler(stream: TextIO, formatter: logging.Formatter) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    return handler


def configure_logging(settings_or_params: Any, worker: str) -> str:
    """Configure this process's root logger once; returns the resolved format (text | json).

    `settings_or_params` is a `Settings`, or a mapping with `log_level`, `log_format`, and optionally
    `log_file`, `log_file_max_bytes`, `log_file_backups`. `worker` names the process in every line
    (supervisor, mechanism_x, mechanism_y).
    """
    params = _params(settings_or_params)
    fmt = resolve_format(params["log_format"])
    formatter = JsonFormatter(worker) if fmt == "json" else TextFormatter(worker)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    stream = _state.get("real_stderr") or sys.stderr  # once fd 2 is a pipe, never log into it (a loop)
    if fmt == "json" and worker != "supervisor" and _state.get("stray") is None:
        # Workers: the JVM and native libraries write to the inherited fds; wrap whatever is not JSON.
        err = _StrayOutput(2, "stderr")
        out = _StrayOutput(1, "stdout")
        _state["stray"] = (out, err)
        stream = os.fdopen(os.dup(err.saved), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        _state["real_stderr"] = stream
        atexit.register(_restore_stray)
        # A handler that cannot write (the terminal is gone) would report it on fd 2, i.e. into the pump,
        # which would hand it to the same handler again: stay quiet instead.
        logging.raiseExceptions = False
    handlers = [_stream_handler(stream, formatter)]
    if params.get("log_file"):
        file_handler = SharedRotatingFileHandler(
            Path(params["log_file"]),
            int(params.get("log_file_max_bytes", 50 << 20)),
            int(params.get("log_file_backups", 5)),
        )
        file_handler.setFormatter(JsonFormatter(worker) if fmt == "json" else TextFormatter(worker))
        handlers.append(file_handler)
    root.handlers[:] = handlers
    root.setLevel(str(params["log_level"]).upper())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    _install_excepthook()
    _state.update(format=fmt, worker=worker)
    return fmt


def _restore_stray() -> None:
    stray = _state.pop("stray", None)
    if stray:
        for s in stray:
            s.restore()


def _install_excepthook() -> None:
    """An uncaught exception becomes one log record (a JSON line with `exc`), not raw traceback lines."""

    def hook(kind, value, tb) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        logging.getLogger("uncaught").critical("uncaught %s: %s", kind.__name__, value, exc_info=(kind, value, tb))

    sys.excepthook = hook


def _params(source: Any) -> dict[str, Any]:
    if isinstance(source, dict):
        out = dict(source)
    else:
        out = {
            name: getattr(source, name)
            for name in ("log_level", "log_format", "log_file", "log_file_max_bytes", "log_file_backups")
            if hasattr(source, name)
        }
    out.setdefault("log_level", "INFO")
    out.setdefault("log_format", "auto")
    return out


def current_worker() -> str | None:
    return _state.get("worker")


def spark_logging_conf(settings: Any) -> dict[str, str]:
    """Spark conf that makes the JVM log like the Python side: WARN and above, to stderr, JSON in JSON mode.

    Spark 4's structured logging (`spark.log.structuredLogging.enabled`) puts its context in the MDC; the
    log4j2 file shipped in config/ lays each event out with our field names (ts, level, worker, pid,
    logger, event, message) and a root level of WARN, which also keeps PySpark's "Setting default log
    level" banner quiet. `-Dlog4j2.configurationFile` must be given at JVM launch, hence extraJavaOptions.
    """
    fmt = _state.get("format") or resolve_format(getattr(settings, "log_format", "auto"))
    worker = _state.get("worker") or "spark"
    props = project_file_uri(f"config/log4j2-{fmt}.properties")
    java = f"-Dlog4j2.configurationFile={props} -Dtp.worker={worker} -Dtp.pid={os.getpid()}"
    return {
        "spark.log.structuredLogging.enabled": "true" if fmt == "json" else "false",
        # The driver only: in local mode the executors live in its JVM; a cluster's executors log where
        # the cluster keeps their logs, and this file's path means nothing on their machines.
        "spark.driver.extraJavaOptions": java,
    }
