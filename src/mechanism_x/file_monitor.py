"""Which source files need work: new, changed (by checksum), interrupted; and what became of the rest.

The ledger (`source_files`) is the memory: a file whose checksum matches what was ingested is
left alone; a changed file is handed to ingestion, which tells an append (old bytes unchanged)
from a rewrite (a conflict, never ingested twice); a file gone from the source keeps what was
ingested and is marked `deleted`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from config.config import Settings
from src.mechanism_x.sources import LocalInboxSource, Source, SourceFile
from src.utils.postgres_utils import Database

log = logging.getLogger(__name__)
COMPONENT = "mechanism_x"

_RECORD_COLUMNS = (
    "file_id",
    "name",
    "kind",
    "status",
    "checksum",
    "bytes_done",
    "next_line",
    "prefix_md5",
    "chunks",
    "conflict_checksum",
    "reason",
)


@dataclass(frozen=True)
class FileWork:
    file: SourceFile
    record: dict[str, Any] | None  # the ledger row, None for a new file
    why: str  # new | changed | resume | retry


def make_source(settings: Settings, db: Database) -> Source:
    """The source the settings name: the Drive folder when GDRIVE_FOLDER_ID is set, else the local inbox."""
    if settings.gdrive_folder_id:
        from src.mechanism_x.gdrive_source import GoogleDriveSource

        source = GoogleDriveSource(settings, db)
        source.check()
        return source
    return LocalInboxSource(settings.local_inbox_dir)


class FileMonitor:
    def __init__(self, source: Source, db: Database) -> None:
        self.source = source
        self.db = db
        self.source_tag = "gdrive" if "drive" in source.kind.lower() else "local"

    def records(self) -> dict[str, dict[str, Any]]:
        rows = self.db.query(f"SELECT {', '.join(_RECORD_COLUMNS)} FROM source_files")
        return {r[0]: dict(zip(_RECORD_COLUMNS, r)) for r in rows}

    def poll(self) -> list[FileWork]:
        """List the source and return the files needing work, importance files first."""
        files = self.source.list_files()
        records = self.records()
        work: list[FileWork] = []
        present = set()
        for f in files:
            present.add(f.file_id)
            rec = records.get(f.file_id)
            if rec is None:
                work.append(FileWork(f, None, "new"))
            elif rec["status"] == "ingesting":
                work.append(FileWork(f, rec, "resume"))
            elif rec["checksum"] == f.checksum and f.checksum is not None:
                if rec["status"] in ("deleted", "conflict"):
                    status = _restored_status(rec)
                    self.db.execute(
                        "UPDATE source_files SET status = %s, conflict_checksum = NULL, "
                        "reason = CASE WHEN %s = 'done' THEN NULL ELSE reason END, updated_at = now() "
                        "WHERE file_id = %s",
                        (status, status, f.file_id),
                    )
                    log.info("file %s (%s) is back as it was ingested (%s)", f.file_id, f.name, status)
            elif rec["status"] == "conflict" and rec["conflict_checksum"] == f.checksum:
                continue  # already reported, still rewritten
            else:
                work.append(FileWork(f, rec, "changed"))
        for file_id, rec in records.items():
            if file_id not in present and rec["status"] != "deleted":
                self._set_status(file_id, "deleted")
                self.db.log_event(
                    COMPONENT,
                    "WARNING",
                    "file_deleted",
                    f"{rec['name']} is no longer in the source; the {rec['chunks']} chunk(s) already ingested stay",
                    file_id=file_id,
                )
                log.warning("file %s (%s) left the source; what was ingested stays", file_id, rec["name"])
        work.sort(key=lambda w: (not _looks_like_importance(w), w.file.modified_time, w.file.name))
        if work:
            log.info("poll: %d file(s) need work: %s", len(work), ", ".join(f"{w.file.name} ({w.why})" for w in work))
        return work

    def _set_status(self, file_id: str, status: str) -> None:
        self.db.execute("UPDATE source_files SET status = %s, updated_at = now() WHERE file_id = %s", (status, file_id))

    def start_file(self, f: SourceFile, kind: str) -> None:
        """Mark the file as being ingested (creating its ledger row if new)."""
        self.db.execute(
            "INSERT INTO source_files (file_id, source, name, kind, status, size_bytes, modified_time) "
            "VALUES (%s, %s, %s, %s, 'ingesting', %s, %s) "
            "ON CONFLICT (file_id) DO UPDATE SET name = EXCLUDED.name, kind = EXCLUDED.kind, status = 'ingesting', "
            "size_bytes = EXCLUDED.size_bytes, modified_time = EXCLUDED.modified_time, reason = NULL, updated_at = now()",
            (f.file_id, self.source_tag, f.name, kind, f.size, f.modified_time),
        )

    def record_status(self, f: SourceFile, kind: str, status: str, reason: str | None, *, checksum: str | None) -> None:
        """A terminal state for a file that is not ingested (ignored, failed)."""
        self.db.execute(
            "INSERT INTO source_files (file_id, source, name, kind, status, checksum, size_bytes, modified_time, reason) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (file_id) DO UPDATE SET name = EXCLUDED.name, "
            "kind = CASE WHEN source_files.lines_done > 0 THEN source_files.kind ELSE EXCLUDED.kind END, "
            "status = EXCLUDED.status, checksum = EXCLUDED.checksum, size_bytes = EXCLUDED.size_bytes, "
            "modified_time = EXCLUDED.modified_time, reason = EXCLUDED.reason, updated_at = now()",
            (f.file_id, self.source_tag, f.name, kind, status, checksum, f.size, f.modified_time, reason),
        )

    def record_conflict(self, f: SourceFile, new_checksum: str) -> None:
        """The file was rewritten in place: what was ingested no longer matches. Report once per content."""
        rows = self.db.query(
            "UPDATE source_files SET status = 'conflict', conflict_checksum = %s, updated_at = now(), "
            "reason = %s WHERE file_id = %s AND conflict_checksum IS DISTINCT FROM %s RETURNING lines_done, bytes_done",
            (
                new_checksum,
                "rewritten in place: the rows already ingested changed; new content not ingested",
                f.file_id,
                new_checksum,
            ),
        )
        if rows:
            lines, nbytes = rows[0]
            message = (
                f"{f.name} was rewritten in place: its first {nbytes} bytes ({lines} rows already ingested) changed, "
                "so the new content is NOT ingested (that would count rows twice). To ingest it, add it as a new "
                "file; to resume, restore the original rows and only append."
            )
            self.db.log_event(COMPONENT, "ERROR", "file_conflict", message, file_id=f.file_id)
            log.error("file %s: %s", f.file_id, message)


def _restored_status(rec: dict[str, Any]) -> str:
    """The status of a file that is back with the content last recorded (after a deletion or a conflict)."""
    if rec["kind"] == "ignored":
        return "ignored"
    if rec["status"] == "conflict" or rec["conflict_checksum"] is not None or not rec["reason"]:
        return "done"  # the content is what was ingested
    return "failed"


def _looks_like_importance(w: FileWork) -> bool:
    if w.record is not None and w.record["kind"] in ("importance", "transactions"):
        return w.record["kind"] == "importance"
    return "importance" in w.file.name.lower()
