"""Loading a CustomerImportance file into PostgreSQL in memory that does not grow with the file.

The file is validated one read block at a time; good rows go straight into one
`COPY customer_importance ... FROM STDIN` through a file-like object that pulls the next block's
CSV only when PostgreSQL asks for more bytes, and bad rows are spooled (to disk past a few MiB)
and copied into `quarantine` after it. Nothing holds the whole file, its rows or its rejects.

The table's plain indexes are dropped before the COPY and built again after it, in the same
transaction: one sort of the whole table costs a fraction of a B-tree insert per row (5 s of
the 9 s the load took on the 594,643-row sample). The COPY is `FREEZE`, allowed because the
caller truncated the table in this transaction: rows are written frozen, so the first reader
does not rewrite every page to set hint bits.
"""

from __future__ import annotations

import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

import psycopg2.extensions
import pyarrow.csv as pacsv
from psycopg2 import sql

from src.mechanism_x.csv_parser import MAX_LINE_BYTES, iter_row_blocks, parse_importance, scan_file

log = logging.getLogger(__name__)

IMPORTANCE_COLUMNS = ("source", "target", "weight", "type_trans", "fraud")
QUARANTINE_COLUMNS = ("file_id", "line_no", "chunk_seq", "stage", "reason", "raw_line")
COPY_READ_SIZE = 1 << 20  # bytes psycopg2 asks for per read while copying
SPOOL_IN_MEMORY = 4 << 20  # quarantine rows kept in memory before the spool moves to a temp file
_CSV_OPTIONS = pacsv.WriteOptions(include_header=False)
INDEX_BUILD_MEMORY = "256MB"  # maintenance_work_mem for the rebuild: the sample's index sorts in memory
# The table's indexes that are not behind a constraint (those cannot be dropped on their own), as
# (schema, name, CREATE INDEX statement): what is rebuilt is exactly what the schema created.
_PLAIN_INDEXES = """
SELECT n.nspname, c.relname, pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.indrelid = 'customer_importance'::regclass
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
ORDER BY c.relname
"""


@dataclass(frozen=True)
class ImportanceLoad:
    """What one load did: rows loaded and quarantined, the first reject, and the file's md5 and size."""

    rows_loaded: int
    rows_quarantined: int
    first_bad: tuple[int, str] | None
    md5: str
    size: int


class _StreamReader(io.RawIOBase):
    """A read-only file over an iterator of byte strings, for psycopg2's copy_expert."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces: Iterator[bytes] = iter(pieces)
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not len(self._current):
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._current = memoryview(piece)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


@dataclass
class _Rejects:
    """Bad rows of the file, counted and spooled in COPY text format for `quarantine`."""

    file_id: str
    spool: IO[bytes] = field(default_factory=lambda: tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY))
    count: int = 0
    first: tuple[int, str] | None = None

    def add(self, lines: list[int], reasons: list[str], raws: list[str]) -> None:
        if not lines:
            return
        if self.first is None:
            self.first = (lines[0], reasons[0])
        out = []
        for line_no, reason, raw in zip(lines, reasons, raws, strict=True):
            out.append(
                f"{_copy_field(self.file_id)}\t{line_no}\t\\N\tingest\t{_copy_field(reason)}\t{_copy_field(raw)}\n"
            )
        self.spool.write("".join(out).encode("utf-8"))
        self.count += len(lines)


def _copy_field(value: str) -> str:
    """A value in COPY's text format (the quarantine text is already free of NUL and valid UTF-8)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _good_rows_csv(path: Path, data_offset: int, max_line_bytes: int, rejects: _Rejects, counts: list[int]):
    """CSV bytes of the good rows, one read block at a time; bad rows go to `rejects` on the way."""
    for block in iter_row_blocks(path, data_offset, 2, max_line_bytes=max_line_bytes):
        parsed = parse_importance(block)
        rejects.add(parsed.bad_lines, parsed.bad_reasons, parsed.bad_raw)
        if parsed.good.num_rows:
            counts[0] += parsed.good.num_rows
            buf = io.BytesIO()
            pacsv.write_csv(parsed.good, buf, _CSV_OPTIONS)
            yield buf.getvalue()


def copy_importance(
    cur: psycopg2.extensions.cursor,
    path: Path,
    data_offset: int,
    file_id: str,
    *,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> ImportanceLoad:
    """COPY the file's valid rows into customer_importance and its bad rows into quarantine, streamed.

    Runs inside the caller's transaction, which must have truncated the table (so readers see the old
    rows or the new ones, and COPY FREEZE is allowed); returns the counts and the md5 the ledger records.
    """
    scan = scan_file(path, 0)
    rejects = _Rejects(file_id)
    loaded = [0]
    try:
        indexes = _drop_plain_indexes(cur)
        reader = _StreamReader(_good_rows_csv(path, data_offset, max_line_bytes, rejects, loaded))
        cur.copy_expert(
            f"COPY customer_importance ({', '.join(IMPORTANCE_COLUMNS)}) FROM STDIN WITH (FORMAT csv, FREEZE)",
            reader,
            size=COPY_READ_SIZE,
        )
        _build_indexes(cur, indexes)
        if rejects.count:
            rejects.spool.seek(0)
            cur.copy_expert(
                f"COPY quarantine ({', '.join(QUARANTINE_COLUMNS)}) FROM STDIN WITH (FORMAT text)",
                rejects.spool,
                size=COPY_READ_SIZE,
            )
    finally:
        rejects.spool.close()
    return ImportanceLoad(loaded[0], rejects.count, rejects.first, scan.md5, scan.size)


def _drop_plain_indexes(cur: psycopg2.extensions.cursor) -> list[str]:
    """Drop customer_importance's plain indexes (the caller holds the table's exclusive lock); returns
    the statements that build them again."""
    cur.execute(_PLAIN_INDEXES)
    found = cur.fetchall()
    for schema, name, _ in found:
        cur.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, name)))
    return [ddl for _, _, ddl in found]


def _build_indexes(cur: psycopg2.extensions.cursor, statements: list[str]) -> None:
    """Build the dropped indexes over the loaded rows: one sort each, in memory for a file of the sample's size."""
    if not statements:
        return
    cur.execute("SELECT set_config('maintenance_work_mem', %s, true)", (INDEX_BUILD_MEMORY,))
    for ddl in statements:
        cur.execute(ddl)
