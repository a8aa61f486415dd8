"""Every lake key the product writes, in one place (SPEC §3). Keys come from ids, never raw file names."""

from __future__ import annotations

import re
from datetime import date

from src.errors import LakeError

RAW_PREFIX = "raw-transactions/"
PROCESSING_LOG_KEY = "raw-transactions/_log/processing_log.json"
DETECTIONS_PREFIX = "pattern-detections/"
QUALITY_REPORT_KEY = "pattern-detections/validation/quality_reports.json"
QUARANTINE_PREFIX = "quarantine/"

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def safe_id(file_id: str) -> str:
    """Ids go into keys verbatim only when they are plainly safe (Drive ids and our local ids are)."""
    if not _SAFE_ID.match(file_id):
        raise ValueError(f"file id {file_id!r} is not safe for an object key")
    return file_id


def chunk_key(ingest_date: date, file_id: str, chunk_seq: int) -> str:
    return (
        f"{RAW_PREFIX}year={ingest_date.year:04d}/month={ingest_date.month:02d}/day={ingest_date.day:02d}/"
        f"{safe_id(file_id)}-{chunk_seq:06d}.parquet"
    )


def quarantine_key(stage: str, file_id: str, chunk_seq: int) -> str:
    return f"{QUARANTINE_PREFIX}stage={stage}/file_id={safe_id(file_id)}/{chunk_seq:06d}.parquet"


def pattern_folder(pattern_id: str) -> str:
    return f"{DETECTIONS_PREFIX}{pattern_id.lower()}/"


def detection_key(pattern_id: str, year: int, month: int, first_id: int, last_id: int) -> str:
    return f"{pattern_folder(pattern_id)}year={year:04d}/month={month:02d}/detections-{first_id:012d}-{last_id:012d}.parquet"


def monthly_stats_key(pattern_id: str) -> str:
    return f"{pattern_folder(pattern_id)}_summary/monthly_stats.json"


def validate_key(key: str) -> str:
    """A lake key is a relative '/'-path without empty, '.' or '..' parts: it can never leave the lake root
    (local directory) or alias another key (S3). Every store checks each key with this one rule."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise LakeError(f"invalid lake key {key!r}: keys are relative paths without empty, '.' or '..' parts")
    return key
