"""Where Mechanism X finds files: one interface, a local-inbox twin and Google Drive (`gdrive_source`).

A source lists the CSV files it holds, each with a stable id (used in object keys, never the
raw name), an MD5 checksum and a modification time, and fetches one file to a local path
that the caller reads and then releases.
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from src.errors import SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFile:
    file_id: str
    name: str
    size: int
    modified_time: datetime
    checksum: str | None
    mime_type: str = "text/csv"


class Source(ABC):
    kind: str = "source"
    # Whether two files may be fetched and read at once (from two threads): X then loads an importance
    # file while it parses the transaction files after it. A client that is not thread-safe says no.
    concurrent_fetch: bool = False

    @abstractmethod
    def list_files(self) -> list[SourceFile]:
        """The files now in the source (CSV candidates only), in no particular order."""

    @abstractmethod
    @contextmanager
    def fetch(self, f: SourceFile) -> Iterator[Path]:
        """A local, readable path with the file's bytes, valid inside the `with` block."""

    def describe(self) -> str:
        return self.kind

    def close(self) -> None:
        """Release clients and temporary files."""


def local_file_id(name: str) -> str:
    """A stable id for an inbox file: derived from its name, safe in any object key."""
    return "local-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def md5_file(path: Path, *, limit: int | None = None, block: int = 1 << 20) -> str:
    """MD5 of the file, or of its first `limit` bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    remaining = limit
    with open(path, "rb") as fh:
        while remaining is None or remaining > 0:
            want = block if remaining is None else min(block, remaining)
            data = fh.read(want)
            if not data:
                break
            digest.update(data)
            if remaining is not None:
                remaining -= len(data)
    return digest.hexdigest()


class LocalInboxSource(Source):
    """A local folder (only its top level), the embedded default's stand-in for Drive."""

    kind = "local inbox"
    concurrent_fetch = True  # fetch only checks that the file is there

    def __init__(self, inbox: Path) -> None:
        self.inbox = Path(inbox)
        try:
            self.inbox.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SourceError(f"LOCAL_INBOX_DIR={self.inbox} cannot be created: {exc.strerror}") from None
        # (size, mtime_ns) -> md5, so a poll rehashes only files that changed on disk.
        self._md5_cache: dict[str, tuple[int, int, str]] = {}

    def list_files(self) -> list[SourceFile]:
        out = []
        for entry in sorted(os.scandir(self.inbox), key=lambda e: e.name):
            if not entry.is_file() or not entry.name.lower().endswith(".csv") or entry.name.startswith("."):
                continue
            try:
                st = entry.stat()
                cached = self._md5_cache.get(entry.name)
                if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
                    checksum = cached[2]
                else:
                    checksum = md5_file(Path(entry.path))
                    self._md5_cache[entry.name] = (st.st_size, st.st_mtime_ns, checksum)
            except FileNotFoundError:
                continue  # removed while listing
            out.append(
                SourceFile(
                    file_id=local_file_id(entry.name),
                    name=entry.name,
                    size=st.st_size,
                    modified_time=datetime.fromtimestamp(st.st_mtime, tz=timezone.utc),
                    checksum=checksum,
                )
            )
        return out

    @contextmanager
    def fetch(self, f: SourceFile) -> Iterator[Path]:
        path = self.inbox / f.name
        if not path.is_file():
            raise FileNotFoundError(f"{f.name} is no longer in {self.inbox}")
        yield path

    def describe(self) -> str:
        return f"local inbox at {self.inbox}"
