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

from src import ledger
from src.utils.db import Database
from src.utils.sources import Source, SourceFile

log = logging.getLogger(__name__)
COMPONENT = "mechanism_x"


@dataclass(frozen=True)
class FileWork:
    file: SourceFile
    record: dict[str, Any] | None  # the ledger row, None for a new file
    why: str  # new | changed | resume | retry


class FileMonitor:
    def __init__(self, source: Source, db: Database) -> None:
        self.source = source
        self.db = db
        self.source_tag = "gdrive" if "drive" in source.kind.lower() else "local"
        self._last_work = ""

    def records(self) -> dict[str, dict[str, Any]]:
        return ledger.file_records(self.db)

    def poll(self) -> list[FileWork]:
        """List the source and return the files needing work, importance files first."""
        files = self.source.list_files()
        records = self.records()
        work: list[FileWork] = []
        present = set()
        for f in files:
            present.add(f.file_id)
            item = self._classify(f, records.get(f.file_id))
            if item is not None:
                work.append(item)
        for file_id, rec in records.items():
            if file_id not in present and rec["status"] != "deleted" and ledger.mark_file_deleted(self.db, file_id):
                self.db.log_event(
                    COMPONENT,
                    "WARNING",
                    "file_deleted",
                    f"{rec['name']} is no longer in the source; the {rec['chunks']} chunk(s) already ingested stay",
                    file_id=file_id,
                )
                log.warning("file %s (%s) left the source; what was ingested stays", file_id, rec["name"])
        work.sort(key=lambda w: (not looks_like_importance(w), w.file.modified_time, w.file.name))
        described = ", ".join(f"{w.file.name} ({w.why})" for w in work)
        if described:  # said once, not at every poll while another Mechanism X works on the same files
            (log.info if described != self._last_work else log.debug)(
                "poll: %d file(s) need work: %s", len(work), described
            )
        self._last_work = described
        return work

    def recheck(self, f: SourceFile) -> FileWork | None:
        """The work `f` needs by its ledger row as it is now (another Mechanism X may have moved it on since the
        poll read it); None when it needs none."""
        return self._classify(f, ledger.file_records(self.db, f.file_id).get(f.file_id))

    def _classify(self, f: SourceFile, rec: dict[str, Any] | None) -> FileWork | None:
        if rec is None:
            return FileWork(f, None, "new")
        if rec["status"] == "ingesting":
            return FileWork(f, rec, "resume")
        if rec["checksum"] == f.checksum and f.checksum is not None:
            if rec["status"] in ("deleted", "conflict"):
                status = _restored_status(rec)
                ledger.restore_file_status(self.db, f.file_id, status)
                log.info("file %s (%s) is back as it was ingested (%s)", f.file_id, f.name, status)
            return None
        if rec["status"] == "conflict" and rec["conflict_checksum"] == f.checksum:
            return None  # already reported, still rewritten
        return FileWork(f, rec, "changed")

    def start_file(self, f: SourceFile, kind: str) -> None:
        """Mark the file as being ingested (creating its ledger row if new)."""
        ledger.start_file(self.db, f, source=self.source_tag, kind=kind)

    def record_status(self, f: SourceFile, kind: str, status: str, reason: str | None, *, checksum: str | None) -> None:
        """A terminal state for a file that is not ingested (ignored, failed)."""
        ledger.record_file_status(
            self.db, f, source=self.source_tag, kind=kind, status=status, reason=reason, checksum=checksum
        )

    def record_conflict(self, f: SourceFile, new_checksum: str) -> None:
        """The file was rewritten in place: what was ingested no longer matches. Report once per content."""
        reason = "rewritten in place: the rows already ingested changed; new content not ingested"
        seen = ledger.record_conflict(self.db, f.file_id, new_checksum, reason)
        if seen:
            lines, nbytes = seen
            message = (
                f"{f.name} was rewritten in place: its first {nbytes} bytes ({lines} rows already ingested) changed, "
                "so the new content is NOT ingested (that would count rows twice). To ingest it, add it as a new "
                "file; to resume, restore the original rows and only append."
            )
            self.db.log_event(COMPONENT, "ERROR", "file_conflict", message, file_id=f.file_id)
            log.error("file %s: %s", f.file_id, message, extra={"event": "file_conflict", "file_id": f.file_id})


def _restored_status(rec: dict[str, Any]) -> str:
    """The status of a file that is back with the content last recorded (after a deletion or a conflict)."""
    if rec["kind"] == "ignored":
        return "ignored"
    if rec["status"] == "conflict" or rec["conflict_checksum"] is not None or not rec["reason"]:
        return "done"  # the content is what was ingested
    return "failed"


def looks_like_importance(w: FileWork) -> bool:
    """By its ledger kind, or for a new file by its name: the order of a poll's work (importance files first)."""
    if w.record is not None and w.record["kind"] in ("importance", "transactions"):
        return w.record["kind"] == "importance"
    return "importance" in w.file.name.lower()
