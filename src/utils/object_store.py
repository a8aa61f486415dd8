"""The lake behind one small interface: a local directory twin and S3 (`s3_utils`).

Keys are '/'-separated paths relative to the lake root (`raw-transactions/year=2026/...`).
Writes are atomic (a reader never sees half an object) and idempotent: putting the same
bytes again is a no-op, putting different bytes at a key that must not change raises
`ObjectConflict` unless `overwrite=True` (used for mutable metadata such as JSON reports).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from src.errors import LakeError, ObjectConflict


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


def _validate_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise LakeError(f"invalid lake key {key!r}")
    return key


class LocalObjectStore(ObjectStore):
    """The lake as a local directory (the embedded default and the tests)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LakeError(f"LOCAL_LAKE_DIR={self.root} cannot be created: {exc.strerror}") from None

    def _path(self, key: str) -> Path:
        return self.root / _validate_key(key)

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        path = self._path(key)
        if path.exists():
            old = path.read_bytes()
            if old == data:
                return False
            if not overwrite:
                raise ObjectConflict(
                    f"lake object {key} already exists with different content "
                    f"(md5 {hashlib.md5(old).hexdigest()} != {hashlib.md5(data).hexdigest()}); not overwritten"
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
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

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
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def spark_uri(self, key: str) -> str:
        return "file://" + str(self._path(key))  # Spark/Hadoop want '=' unescaped

    def describe(self) -> str:
        return f"local lake at {self.root}"


def open_lake(settings) -> ObjectStore:
    """The lake the settings name: S3 when S3_BUCKET_NAME is set, else LOCAL_LAKE_DIR."""
    if settings.s3_bucket_name:
        from src.utils.s3_utils import S3ObjectStore

        return S3ObjectStore(settings)
    return LocalObjectStore(settings.local_lake_dir)
