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

from src.utils import lake_paths
from src.utils.db import Database
from src.utils.object_store import ObjectStore

log = logging.getLogger(__name__)

TOP_REASONS = 50  # reasons listed per stage; the rest are summed under OTHER_REASONS
LIST_LIMIT = 100  # files and chunks listed (most recent first); the counts cover all of them
OTHER_REASONS = "(other reasons)"
_IST = ZoneInfo("Asia/Kolkata")


def reject_counts(db: Database) -> tuple[int, int]:
    """(rows quarantined by X, files failed): cheap, so X can tell whether a poll changed the report."""
    rows, failed = db.query(
        "SELECT coalesce(sum(rows_quarantined), 0), count(*) FILTER (WHERE status = 'failed') FROM source_files"
    )[0]
    return int(rows), int(failed)


def _reasons_by_stage(db: Database) -> dict[str, dict[str, int]]:
    """The TOP_REASONS most frequent reasons per stage, plus the rest summed, so each stage's counts add up."""
    totals = dict(db.query("SELECT stage, count(*) FROM quarantine GROUP BY stage"))
    top = db.query(
        "SELECT stage, reason, n FROM (SELECT stage, reason, count(*) AS n, "
        "row_number() OVER (PARTITION BY stage ORDER BY count(*) DESC, reason) AS rank "
        "FROM quarantine GROUP BY stage, reason) ranked WHERE rank <= %s ORDER BY stage, n DESC, reason",
        (TOP_REASONS,),
    )
    out: dict[str, dict[str, int]] = {stage: {} for stage in totals}
    for stage, reason, n in top:
        out[stage][reason] = int(n)
    for stage, total in totals.items():
        rest = int(total) - sum(out[stage].values())
        if rest:
            out[stage][OTHER_REASONS] = rest
    return out


def _ingest_section(db: Database, reasons: dict[str, int]) -> dict[str, Any]:
    failed = db.query(
        "SELECT file_id, name, kind, reason, to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') "
        "FROM source_files WHERE status = 'failed' ORDER BY updated_at DESC, file_id LIMIT %s",
        (LIST_LIMIT,),
    )
    with_rejects = db.query(
        "SELECT file_id, name, kind, rows_ingested, rows_quarantined FROM source_files "
        "WHERE rows_quarantined > 0 ORDER BY updated_at DESC, file_id LIMIT %s",
        (LIST_LIMIT,),
    )
    files_failed, chunks_failed = db.query(
        "SELECT (SELECT count(*) FROM source_files WHERE status = 'failed'), "
        "(SELECT count(*) FROM chunks WHERE status = 'failed')"
    )[0]
    return {
        "rows_rejected": sum(reasons.values()),
        "rejected_by_reason": reasons,
        "files_failed": int(files_failed),
        "chunks_failed": int(chunks_failed),
        "failed_files": [
            {"file_id": f, "name": n, "kind": k, "reason": r, "updated_at": u} for f, n, k, r, u in failed
        ],
        "files_with_rejected_rows": [
            {"file_id": f, "name": n, "kind": k, "rows_ingested": int(i), "rows_rejected": int(q)}
            for f, n, k, i, q in with_rejects
        ],
    }


def _detect_section(db: Database, reasons: dict[str, int]) -> dict[str, Any]:
    checked, clean, rejected = db.query(
        "SELECT count(*) FILTER (WHERE processed_at IS NOT NULL), coalesce(sum(y_rows_clean), 0), "
        "coalesce(sum(y_rows_rejected), 0) FROM chunks"
    )[0]
    return {
        "chunks_checked": int(checked),
        "rows_clean": int(clean),
        "rows_rejected": int(rejected),
        "rejected_by_reason": reasons,
    }


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
    """The report as a dict, from the ledger (quarantine, source_files, chunks)."""
    reasons = _reasons_by_stage(db)
    ingest = _ingest_section(db, reasons.get("ingest", {}))
    detect = _detect_section(db, reasons.get("detect", {}))
    problems = db.query(
        "SELECT seq, file_id, chunk_seq, rows_quarantined, y_rows_clean, y_rows_rejected FROM chunks "
        "WHERE rows_quarantined > 0 OR y_rows_rejected > 0 OR status = 'failed' ORDER BY seq DESC LIMIT %s",
        (LIST_LIMIT,),
    )
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
    """Rewrite the report in the lake; returns what was written."""
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
