"""Detections from PostgreSQL to the lake, each exactly once, at most DETECTIONS_PER_FILE per file.

A file is first *assigned* in PostgreSQL (its name and its detections), then written: the
name comes from the first and last detection ids, so a restart rewrites the very same object.
Full files are written as soon as they fill; a partly filled one when no new detection came
for DETECTIONS_FLUSH_SECONDS, and on shutdown.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pyarrow as pa

from config.config import Settings
from src.schemas.transaction_schemas import DETECTION_ARROW_SCHEMA
from src.utils import lake_paths
from src.utils.db import Database
from src.utils.object_store import ObjectStore, parquet_bytes

log = logging.getLogger(__name__)
IST = ZoneInfo("Asia/Kolkata")
PATTERNS = ("PatId1", "PatId2", "PatId3")


def ist(ts: datetime) -> str:
    return ts.astimezone(IST).isoformat(timespec="milliseconds")


class DetectionWriter:
    def __init__(self, settings: Settings, db: Database, store: ObjectStore) -> None:
        self.per_file = settings.detections_per_file
        self.flush_after = settings.detections_flush_seconds
        self.db = db
        self.store = store
        self._last_new = time.monotonic()
        self._unfiled = True  # check at start

    def note_new(self, count: int) -> None:
        if count:
            self._last_new = time.monotonic()
            self._unfiled = True

    def tick(self, *, final: bool = False) -> int:
        """Write what is due; returns the number of files written."""
        if not self._unfiled and not final:
            return 0
        idle = time.monotonic() - self._last_new >= self.flush_after
        written = self._write_assigned()
        for pattern in PATTERNS:
            self._assign(pattern, partial=final or idle)
        written += self._write_assigned()
        remaining = self.db.query("SELECT count(*) FROM pattern_detections WHERE lake_file IS NULL")[0][0]
        self._unfiled = remaining > 0
        return written

    def _assign(self, pattern: str, *, partial: bool) -> None:
        rows = self.db.query(
            "SELECT id, to_char(detection_time AT TIME ZONE 'Asia/Kolkata', 'YYYY-MM') FROM pattern_detections "
            "WHERE pattern_id = %s AND lake_file IS NULL ORDER BY id",
            (pattern,),
        )
        groups: list[tuple[str, list[int]]] = []
        for det_id, month in rows:
            if groups and groups[-1][0] == month and len(groups[-1][1]) < self.per_file:
                groups[-1][1].append(det_id)
            else:
                groups.append((month, [det_id]))
        if not groups:
            return
        # The last group may still fill up; it waits unless this is a flush of partial files.
        if not partial and len(groups[-1][1]) < self.per_file:
            groups.pop()
        self.db.run(lambda cur: self._record_files(cur, pattern, groups), what=f"assign {pattern} detection files")

    @staticmethod
    def _record_files(cur, pattern: str, groups: list[tuple[str, list[int]]]) -> None:
        """Name each group's lake file and file its detections under it (a redo assigns the same names)."""
        for month, ids in groups:
            year, mon = (int(x) for x in month.split("-"))
            key = lake_paths.detection_key(pattern, year, mon, ids[0], ids[-1])
            cur.execute(
                "INSERT INTO detection_files (object_key, pattern_id, rows) VALUES (%s, %s, %s) "
                "ON CONFLICT (object_key) DO NOTHING",
                (key, pattern, len(ids)),
            )
            cur.execute("UPDATE pattern_detections SET lake_file = %s WHERE id = ANY(%s)", (key, ids))

    def _write_assigned(self) -> int:
        files = self.db.query(
            "SELECT object_key, pattern_id FROM detection_files WHERE NOT written ORDER BY object_key"
        )
        touched = set()
        for key, pattern in files:
            rows = self.db.query(
                "SELECT y_start_time, detection_time, pattern_id, action_type, customer_name, merchant_id "
                "FROM pattern_detections WHERE lake_file = %s ORDER BY id",
                (key,),
            )
            table = pa.table(
                {
                    "YStartTime": [ist(r[0]) for r in rows],
                    "detectionTime": [ist(r[1]) for r in rows],
                    "patternId": [r[2] for r in rows],
                    "ActionType": [r[3] for r in rows],
                    "customerName": [r[4] for r in rows],
                    "MerchantId": [r[5] for r in rows],
                },
                schema=DETECTION_ARROW_SCHEMA,
            )
            self.store.put_bytes(key, parquet_bytes(table))
            self.db.execute("UPDATE detection_files SET written = true WHERE object_key = %s", (key,))
            touched.add(pattern)
            log.info("detections file %s written (%d rows)", key, len(rows), extra={"event": "detections_written"})
        for pattern in touched:
            self._write_monthly_stats(pattern)
        return len(files)

    def _write_monthly_stats(self, pattern: str) -> None:
        rows = self.db.query(
            "SELECT to_char(detection_time AT TIME ZONE 'Asia/Kolkata', 'YYYY-MM') AS month, count(*), "
            "count(DISTINCT merchant_id), count(DISTINCT customer_name) FROM pattern_detections "
            "WHERE pattern_id = %s AND lake_file IS NOT NULL GROUP BY 1 ORDER BY 1",
            (pattern,),
        )
        doc = {
            "patternId": pattern,
            "updated_at": ist(datetime.now(timezone.utc)),
            "total_detections": sum(r[1] for r in rows),
            "months": [{"month": m, "detections": n, "merchants": nm, "customers": nc} for m, n, nm, nc in rows],
        }
        key = lake_paths.monthly_stats_key(pattern)
        data = json.dumps(doc, indent=2).encode()
        self.store.put_bytes(key, data, overwrite=True)
