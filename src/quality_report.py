"""The validation report in the lake (`pattern-detections/validation/quality_reports.json`).

It counts every reject of the pipeline in one place, so an operator sees what did not make it
into the detections without querying PostgreSQL: rows Mechanism X quarantined (stage `ingest`),
files it failed, chunks it lost, and rows Mechanism Y excluded from its state (stage `detect`).
Both workers rewrite it from the ledger, so it is the same whichever wrote it last.

The top-level keys are the whole pipeline's totals (their names are those of the earlier, Y-only
report); `stages` has one section per stage.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from src import ledger
from src.ledger import Cursor
from src.utils import lake_paths
from src.utils.db import Database
from src.utils.object_store import ObjectStore

log = logging.getLogger(__name__)

# The lake's reports (this one, and X's processing log) are rebuilt from the ledger by whichever worker last
# changed what they show: an X of either daemon, or Y. One writer at a time, under this advisory lock, so an
# older view never lands over a newer one.
LAKE_REPORTS_LOCK = 7261004
TOP_REASONS = 50  # reasons listed per stage; the rest are summed under OTHER_REASONS
LIST_LIMIT = 100  # files and chunks listed (most recent first); the counts cover all of them
OTHER_REASONS = "(other reasons)"
_IST = ZoneInfo("Asia/Kolkata")


def reject_counts(db: Database) -> tuple[int, int]:
    """(rows quarantined by X, files failed): cheap, so X can tell whether a poll changed the report."""
    return db.run(ledger.file_reject_totals, what="count the rejects")


def _reasons_by_stage(cur: Cursor) -> dict[str, dict[str, int]]:
    """The TOP_REASONS most frequent reasons per stage, plus the rest summed, so each stage's counts add up."""
    cur.execute("SELECT stage, count(*) FROM quarantine GROUP BY stage")
    totals = dict(cur.fetchall())
    cur.execute(
        "SELECT stage, reason, n FROM (SELECT stage, reason, count(*) AS n, "
        "row_number() OVER (PARTITION BY stage ORDER BY count(*) DESC, reason) AS rank "
        "FROM quarantine GROUP BY stage, reason) ranked WHERE rank <= %s ORDER BY stage, n DESC, reason",
        (TOP_REASONS,),
    )
    out: dict[str, dict[str, int]] = {stage: {} for stage in totals}
    for stage, reason, n in cur.fetchall():
        out[stage][reason] = int(n)
    for stage, total in totals.items():
        rest = int(total) - sum(out[stage].values())
        if rest:
            out[stage][OTHER_REASONS] = rest
    return out


def _ingest_section(cur: Cursor, reasons: dict[str, int], chunks: ledger.ChunkTotals) -> dict[str, Any]:
    return {
        "rows_rejected": sum(reasons.values()),
        "rejected_by_reason": reasons,
        "files_failed": ledger.file_counts_by_status(cur).get("failed", 0),
        "chunks_failed": chunks.failed,
        "failed_files": [
            {"file_id": f, "name": n, "kind": k, "reason": r, "updated_at": _utc_seconds(u)}
            for f, n, k, r, u in ledger.failed_files(cur, LIST_LIMIT)
        ],
        "files_with_rejected_rows": [
            {"file_id": f, "name": n, "kind": k, "rows_ingested": int(i), "rows_rejected": int(q)}
            for f, n, k, i, q in ledger.files_with_rejects(cur, LIST_LIMIT)
        ],
    }


def _detect_section(reasons: dict[str, int], chunks: ledger.ChunkTotals) -> dict[str, Any]:
    return {
        "chunks_checked": chunks.processed,
        "rows_clean": chunks.rows_clean,
        "rows_rejected": chunks.rows_rejected,
        "rejected_by_reason": reasons,
    }


def _utc_seconds(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_reasons(*parts: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for part in parts:
        for reason, n in part.items():
            merged[reason] = merged.get(reason, 0) + n
    ranked = sorted(((n, r) for r, n in merged.items() if r != OTHER_REASONS), key=lambda x: (-x[0], x[1]))
    out = {r: n for n, r in ranked[:TOP_REASONS]}
    rest = sum(merged.values()) - sum(out.values())
    if rest:
        out[OTHER_REASONS] = rest
    return out


def build_quality_report(db: Database) -> dict[str, Any]:
    """The report as a dict, from the ledger (quarantine, source_files, chunks), read in one transaction."""
    return db.run(_build, what="build the quality report")


def _build(cur: Cursor) -> dict[str, Any]:
    reasons = _reasons_by_stage(cur)
    chunks = ledger.chunk_totals(cur)
    ingest = _ingest_section(cur, reasons.get("ingest", {}), chunks)
    detect = _detect_section(reasons.get("detect", {}), chunks)
    problems = ledger.chunks_with_problems(cur, LIST_LIMIT)
    return {
        "updated_at": datetime.now(timezone.utc).astimezone(_IST).isoformat(timespec="milliseconds"),
        "rows_rejected": ingest["rows_rejected"] + detect["rows_rejected"],
        "files_failed": ingest["files_failed"],
        "chunks_failed": ingest["chunks_failed"],
        "chunks_checked": detect["chunks_checked"],
        "rows_clean": detect["rows_clean"],
        "rejected_by_reason": _merge_reasons(ingest["rejected_by_reason"], detect["rejected_by_reason"]),
        "chunks_with_problems": [
            {
                "chunk_id": s,
                "file_id": f,
                "chunk_seq": c,
                "rows_quarantined": q,
                "rows_clean": rc,
                "rows_rejected": rr,
            }
            for s, f, c, q, rc, rr in problems
        ],
        "stages": {"ingest": ingest, "detect": detect},
    }


def write_quality_report(db: Database, store: ObjectStore) -> dict[str, Any]:
    """Rewrite the report in the lake, under LAKE_REPORTS_LOCK (the caller may hold it already); returns what
    was written."""
    with db.session_lock(LAKE_REPORTS_LOCK):
        doc = build_quality_report(db)
        data = json.dumps(doc, indent=2).encode()
        store.put_bytes(lake_paths.QUALITY_REPORT_KEY, data, overwrite=True)
    log.debug(
        "quality report: %d row(s) rejected, %d file(s) failed",
        doc["rows_rejected"],
        doc["files_failed"],
        extra={"event": "quality_report_written"},
    )
    return doc
