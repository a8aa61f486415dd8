"""The lake behind one small interface: a local directory twin and S3 (`s3_utils`); `src.resources.open_lake`
picks one from the settings.

Keys are '/'-separated paths relative to the lake root (`raw-transactions/year=2026/...`).
Writes are atomic (a reader never sees half an object) and idempotent: putting the same
bytes again is a no-op, putting different bytes at a key that must not change raises
`ObjectConflict` unless `overwrite=True` (used for mutable metadata such as JSON reports).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from src.errors import LakeError, ObjectConflict, RetryableError, is_retryable
from src.utils.lake_paths import validate_key
from src.utils.retry import brief, call_with_retry

if TYPE_CHECKING:
    pass

T = TypeVar("T")
# A full disk or quota waits for an operator, not for time: the write fails loudly (the worker exits, the
# supervisor restarts it with backoff and the restarts alert) instead of waiting silently in place.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class ObjectStore(ABC):
    """Where the lake lives. Implementations: `LocalObjectStore`, `s3_utils.S3ObjectStore`."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        """Store `data` at `key`; returns False when the same bytes were already there.

        With overwrite=False a key holding different bytes raises ObjectConflict.
        """

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix`, paginated as the backend needs."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def spark_uri(self, key: str) -> str:
        """The URI Spark reads the key with (`file:///...` or `s3a://bucket/...`)."""

    @abstractmethod
    def describe(self) -> str:
        """Where the lake is, for the first log lines (no secrets)."""

    def check_writable(self) -> None:
        """Fail fast at start when the lake cannot be written."""
        probe = "_health/probe"
        self.put_bytes(probe, b"ok", overwrite=True)
        self.delete(probe)


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes: the same rows always give the same object (idempotent rewrites)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", write_statistics=True)
    return sink.getvalue().to_pybytes()


class LocalObjectStore(ObjectStore):
    """The lake as a local directory (the embedded default and the tests).

    Transient OS errors (a network file system timing out, EAGAIN) are waited out by the product's retry
    policy (dependency "lake"); a full disk is not transient (see `_FULL`) and raises `LakeError`.
    """

    def __init__(self, root: Path, *, stop: threading.Event | None = None) -> None:
        self.root = Path(root).resolve()
        self.stop = stop
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LakeError(f"LOCAL_LAKE_DIR={self.root} cannot be created: {exc.strerror}") from None

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return call_with_retry(fn, dependency="lake", what=what, target=str(self.root), stop=self.stop)
        except OSError as exc:
            if exc.errno in _FULL:
                raise LakeError(
                    f"lake directory {self.root} is full ({exc.strerror}) during {what}: free space or move "
                    "LOCAL_LAKE_DIR to a larger disk"
                ) from None
            if is_retryable(exc):  # only when stopping
                raise RetryableError(f"lake {what} at {self.root} not done: {brief(exc)}") from exc
            raise

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        path = self._path(key)
        return self._call(f"put {key}", lambda: self._put_once(key, path, data, overwrite))

    def _put_once(self, key: str, path: Path, data: bytes, overwrite: bool) -> bool:
        if path.exists():
            old = path.read_bytes()
            if old == data:
                return False
            if not overwrite:
                raise ObjectConflict(
                    f"lake object {key} already exists with different content "
                    f"(sha256 {hashlib.sha256(old).hexdigest()[:16]}... != "
                    f"{hashlib.sha256(data).hexdigest()[:16]}...); not overwritten"
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target under a name no dataset reader picks up, then rename:
        # a crash leaves either the old object or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(prefix="_tmp-", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return True

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        return self._call(f"get {key}", path.read_bytes)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return self._call(f"head {key}", path.is_file)

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith("_tmp-"):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def delete(self, key: str) -> None:
        path = self._path(key)
        self._call(f"delete {key}", lambda: path.unlink(missing_ok=True))

    def spark_uri(self, key: str) -> str:
        return "file://" + str(self._path(key))  # Spark/Hadoop want '=' unescaped

    def describe(self) -> str:
        return f"local lake at {self.root}"
