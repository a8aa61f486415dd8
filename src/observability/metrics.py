"""Prometheus metrics (SPEC §8): what the workers observe, and what the supervisor derives at scrape time.

Two sources, one endpoint (served by the supervisor, src/observability/server.py):
- the workers observe timings and retries into prometheus-client's multiprocess files: the supervisor
  sets PROMETHEUS_MULTIPROC_DIR for its children, and a MultiProcessCollector merges them at scrape;
- the ledger counters (rows, chunks, detections, files) are computed from PostgreSQL at scrape, behind a
  short cache, so they EQUAL the ledger (no second bookkeeping that could drift after a crash or replay),
  and the supervisor adds dependency probes, restarts, CPU/memory per worker tree and free disk.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from src import ledger

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PHASES = ("read", "fold", "detect", "commit")
DEPENDENCIES = ("postgresql", "s3", "drive", "lake")
OUTCOMES = ("retry", "recovered", "gave_up")
PATTERNS = ("PatId1", "PatId2", "PatId3")
FILE_STATUSES = ("ingesting", "done", "failed", "ignored", "conflict", "deleted")
MAX_REASONS = 30  # distinct quarantine reason buckets per stage; the rest is "other"

# ------------------------------------------------------------------ worker side (multiprocess-safe)

CHUNK_LATENCY = Histogram(
    "tp_chunk_latency_seconds",
    "Time from a chunk's object being written by X to its processed mark committed by Y.",
    buckets=LATENCY_BUCKETS,
)
Y_BATCH = Histogram(
    "tp_y_batch_seconds",
    "Mechanism Y's time per batch, by phase (read, fold, detect, commit).",
    ["phase"],
    buckets=PHASE_BUCKETS,
)
RETRIES = Counter(
    "tp_retries_total",
    "Retries of calls to a dependency, by outcome (retry: one wait; recovered; gave_up).",
    ["dependency", "outcome"],
)
# 1 while a worker waits for a dependency (between a failed call and its recovery): how the supervisor knows
# Drive's health without talking to Drive itself (Mechanism X is the one that does).
WAITING = Gauge(
    "tp_worker_waiting_for",
    "1 while a worker is waiting out a fault of this dependency.",
    ["dependency"],
    multiprocess_mode="livemax",
)
_installed = False


def observe_batch(read_s: float, fold_s: float, detect_s: float, commit_s: float) -> None:
    """Mechanism Y, once per batch: the four phases of its time."""
    for phase, seconds in zip(PHASES, (read_s, fold_s, detect_s, commit_s)):
        Y_BATCH.labels(phase).observe(max(0.0, seconds))


def observe_chunk_latency(seconds: float) -> None:
    """Mechanism Y, once per chunk committed: written -> committed (Y skips a chunk without `written_at`)."""
    CHUNK_LATENCY.observe(max(0.0, seconds))


def record_retry(dependency: str, outcome: str) -> None:
    """The retry listener (src.utils.retry.add_listener): one call per wait, recovery or give-up."""
    dependency = dependency.strip().lower()
    RETRIES.labels(dependency, outcome).inc()
    WAITING.labels(dependency).set(1 if outcome == "retry" else 0)


def install_worker_metrics() -> None:
    """Once per worker: listen to retries, and create every labelled series at 0 so each one is scraped
    from the start (a rate over a series that appears only with its first event misses that event)."""
    global _installed
    if _installed:
        return
    _installed = True
    for dep in DEPENDENCIES:
        for outcome in OUTCOMES:
            RETRIES.labels(dep, outcome)
    for phase in PHASES:
        Y_BATCH.labels(phase)
    try:
        from src.utils.retry import add_listener
    except ImportError:  # the retry policy module is not there (older tree): no retry metrics then
        log.debug("src.utils.retry.add_listener not available; tp_retries_total stays at 0")
        return
    add_listener(record_retry)


# ------------------------------------------------------------------ supervisor side: the ledger


def reason_bucket(reason: str) -> str:
    """A quarantine reason without its values ('amount '-3' is not a number' -> 'amount_is_not_a_number'),
    so the label set stays small whatever the data holds."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\([^)]*\)|:.*$", " ", reason)
    words = [w for w in re.findall(r"[a-z][a-z_-]*", text.lower()) if not any(c.isdigit() for c in w)]
    return "_".join(words[:5])[:48].replace("-", "_") or "other"


QUARANTINE_SQL = "SELECT stage, reason, count(*) FROM quarantine GROUP BY stage, reason"
DETECTIONS_SQL = "SELECT pattern_id, count(*) FROM pattern_detections GROUP BY pattern_id"


@dataclass(frozen=True)
class LedgerReading:
    """What one scrape reads from PostgreSQL, in one transaction."""

    chunks: ledger.ChunkTotals
    files_by_status: dict[str, int]  # transactions files only
    detections: dict[str, int]
    quarantined: list[tuple[str, str, int]]  # (stage, reason, rows)
    leadership: ledger.Leadership


def read_ledger(cur: Any) -> LedgerReading:
    cur.execute(DETECTIONS_SQL)
    detections = dict(cur.fetchall())
    cur.execute(QUARANTINE_SQL)
    quarantined = cur.fetchall()
    return LedgerReading(
        ledger.chunk_totals(cur),
        ledger.file_counts_by_status(cur, kind="transactions"),
        detections,
        quarantined,
        ledger.leadership(cur),
    )


class LedgerCollector(Collector):
    """Counters read from PostgreSQL at scrape (cached `ttl` seconds); nothing is exported when it is down.

    `read(fn)` runs `fn(cursor)` in one transaction and returns its result."""

    def __init__(self, read: Callable[[Callable[[Any], LedgerReading]], LedgerReading], ttl: float = 2.0) -> None:
        self._read = read
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, list] | None = None
        self._warned_at = 0.0

    def collect(self) -> Iterable[Any]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self._ttl:
                try:
                    self._cached = (now, list(self._families()))
                except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the ledger cannot
                    if now - self._warned_at > 60:
                        log.warning("ledger metrics unavailable: %s", str(exc).strip().splitlines()[0][:200])
                        self._warned_at = now
                    return []
            return self._cached[1]

    def _families(self) -> Iterable[Any]:
        reading = self._read(read_ledger)
        c = reading.chunks
        yield _counter(
            "tp_rows_ingested", "Rows in chunk objects X has written to the lake.", float(c.rows_ever_written)
        )
        yield _counter("tp_chunks_written", "Chunks X has written to the lake.", c.ever_written)
        yield _counter("tp_chunks_processed", "Chunks Y has committed.", c.processed)
        yield _counter("tp_chunks_failed", "Chunks marked failed (unreadable object, too many attempts).", c.failed)
        yield _gauge("tp_backlog_chunks", "Chunks written by X and not yet processed by Y.", c.backlog)
        yield _gauge(
            "tp_oldest_unprocessed_chunk_age_seconds",
            "Age of the oldest written chunk Y has not processed (0 when none waits).",
            c.oldest_waiting_seconds or 0.0,
        )
        yield _quarantined(reading.quarantined)
        detections = CounterMetricFamily("tp_detections", "Detections emitted, by pattern.", labels=["pattern"])
        yield _every_label(detections, PATTERNS, reading.detections)
        files = GaugeMetricFamily("tp_files", "Transaction files in the ledger, by status.", labels=["status"])
        yield _every_label(files, FILE_STATUSES, reading.files_by_status)
        who = reading.leadership
        yield _gauge(
            "tp_y_leader_term",
            "Term of Mechanism Y's active leader: +1 at every change of leader (0 before any Y has led).",
            who.leader["term"] if who.leader else 0,
        )
        yield _gauge("tp_file_leases_held", "Source files leased to a live Mechanism X now.", len(who.leases))
        yield _counter(
            "tp_file_lease_takeovers", "File leases taken from a Mechanism X that stopped renewing.", who.takeovers
        )


def _every_label(family: Any, labels: tuple[str, ...], counts: dict[str, int]) -> Any:
    """`family` with one sample per label, 0 for those absent from `counts` (a series must not appear late)."""
    for label, n in sorted({**dict.fromkeys(labels, 0), **counts}.items()):
        family.add_metric([label], n)
    return family


def _quarantined(rows: list[tuple[str, str, int]]) -> CounterMetricFamily:
    family = CounterMetricFamily(
        "tp_rows_quarantined",
        "Rows quarantined, by stage (ingest: X, detect: Y) and reason (values stripped).",
        labels=["stage", "reason"],
    )
    totals: dict[tuple[str, str], int] = {("ingest", "none"): 0, ("detect", "none"): 0}
    per_stage: dict[str, set[str]] = {}
    for stage, reason, n in rows:
        bucket = reason_bucket(reason)
        seen = per_stage.setdefault(stage, set())
        if bucket not in seen and len(seen) >= MAX_REASONS:
            bucket = "other"
        seen.add(bucket)
        totals[(stage, bucket)] = totals.get((stage, bucket), 0) + n
    for (stage, bucket), n in sorted(totals.items()):
        family.add_metric([stage, bucket], n)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


# ------------------------------------------------------------------ supervisor side: processes, disk, probes


class ProcessCollector(Collector):
    """CPU and resident memory per worker, each including its children (Y's JVM is Y's child).

    `workers()` returns {worker name: pid or None}; the supervisor's own line excludes the worker trees
    (it keeps the embedded PostgreSQL, its child, when there is one). CPU of exited children is not kept:
    the counter resets with a restart, which Prometheus' rate() handles.
    """

    def __init__(self, workers: Callable[[], dict[str, int | None]], supervisor_pid: int) -> None:
        self._workers = workers
        self._supervisor_pid = supervisor_pid

    def collect(self) -> Iterable[Any]:
        import psutil

        cpu = CounterMetricFamily(
            "tp_process_cpu_seconds", "CPU time (user + system) of a worker and its children.", labels=["worker"]
        )
        mem = GaugeMetricFamily(
            "tp_process_resident_memory_bytes", "Resident memory of a worker and its children.", labels=["worker"]
        )
        claimed: set[int] = set()
        for name, pid in sorted(self._workers().items()):
            procs = _tree(pid)
            claimed.update(p.pid for p in procs)
            seconds, rss = _usage(procs)
            cpu.add_metric([name], seconds)
            mem.add_metric([name], rss)
        try:
            own = [p for p in _tree(self._supervisor_pid) if p.pid not in claimed]
        except psutil.Error:
            own = []
        seconds, rss = _usage(own)
        cpu.add_metric(["supervisor"], seconds)
        mem.add_metric(["supervisor"], rss)
        return [cpu, mem]


def _tree(pid: int | None) -> list[Any]:
    import psutil

    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _usage(procs: list[Any]) -> tuple[float, float]:
    import psutil

    seconds = rss = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            seconds += t.user + t.system
            rss += p.memory_info().rss
        except psutil.Error:
            continue  # exited between listing and reading
    return seconds, rss


class SupervisorCollector(Collector):
    """Restarts per worker, dependency probes and the free space of DATA_DIR."""

    def __init__(self, restarts: Callable[[], dict[str, int]], probes: Callable[[], dict[str, bool]], data_dir) -> None:
        self._restarts = restarts
        self._probes = probes
        self._data_dir = data_dir

    def collect(self) -> Iterable[Any]:
        restarts = CounterMetricFamily(
            "tp_worker_restarts", "Times the supervisor restarted a worker after it exited.", labels=["worker"]
        )
        for name, n in sorted(self._restarts().items()):
            restarts.add_metric([name], n)
        up = GaugeMetricFamily(
            "tp_dependency_up", "1 when the supervisor's last probe of the dependency succeeded.", labels=["dependency"]
        )
        for name, ok in sorted(self._probes().items()):
            up.add_metric([name], 1.0 if ok else 0.0)
        free = GaugeMetricFamily("tp_data_dir_free_bytes", "Free space of the file system holding DATA_DIR.")
        try:
            free.add_metric([], float(shutil.disk_usage(self._data_dir).free))
        except OSError:
            pass
        return [restarts, up, free]
