"""Webhook alerts for installations without Prometheus (`ALERT_WEBHOOK_URL`).

The supervisor's AlertManager looks at a snapshot of the pipeline every few seconds (the ledger summary
of `status.py`, PostgreSQL and lake reachability, the workers' restart counts, the free space of
DATA_DIR's file system), keeps the set of open incidents, and POSTs one message when an incident starts
and one when it resolves. The same incidents as `config/alerts.yml`, under the same names. Messages go
through a bounded queue to a sender thread that retries with capped backoff: the pipeline never waits
for the receiver, and a receiver that is down costs nothing but that thread's time.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import queue
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

FILE_FAILED = "FileFailed"
DEPENDENCY_DOWN = "DependencyDown"
BACKLOG_GROWING = "BacklogGrowing"
WORKER_RESTARTING = "WorkerRestarting"
NO_CHUNK_PROCESSED = "NoChunkProcessed"
QUARANTINE_RATE_HIGH = "QuarantineRateHigh"
DATA_DIR_FILLING_UP = "DataDirFillingUp"

# Labels as in tp_dependency_up (src/observability/server.py), names as a person reads them.
DEPENDENCY_NAMES = {"postgresql": "PostgreSQL", "lake": "the lake", "drive": "Google Drive"}
QUEUE_SIZE = 1000
POST_TIMEOUT = 10.0
SEND_ATTEMPTS = 8


@dataclass(frozen=True)
class Thresholds:
    """When a condition becomes an incident (the defaults match config/alerts.yml)."""

    dependency_down_seconds: float = 120.0
    backlog_growing_seconds: float = 300.0
    stalled_seconds: float = 600.0
    restarts: int = 3
    worker_healthy_seconds: float = 60.0
    quarantine_ratio: float = 0.05
    quarantine_min_rows: int = 1000
    # DataDirFillingUp: the free space of DATA_DIR's file system, fitted over `disk_window_seconds` and projected
    # `disk_horizon_seconds` ahead (Prometheus' predict_linear), below zero for `disk_for_seconds`.
    disk_window_seconds: float = 6 * 3600.0
    disk_horizon_seconds: float = 24 * 3600.0
    disk_for_seconds: float = 3600.0
    disk_sample_seconds: float = 60.0  # one sample a minute is kept for the fit, as Prometheus would scrape


@dataclass
class Incident:
    alert: str
    key: tuple
    text: str
    labels: dict[str, str]
    started_at: float = field(default_factory=time.time)


class AlertManager:
    """Open incidents and their webhook messages; `evaluate` only compares and enqueues, never waits."""

    def __init__(
        self,
        settings: Any,
        *,
        snapshot: Callable[[], dict[str, Any]] | None = None,
        interval: float = 5.0,
        thresholds: Thresholds | None = None,
        url: str | None = None,
        post_timeout: float = POST_TIMEOUT,
        store: "IncidentStore | None" = None,
    ) -> None:
        self.url = url or settings.alert_webhook_url.get_secret_value()  # a Slack webhook URL is a secret
        self.snapshot = snapshot
        self.interval = interval
        self.thresholds = thresholds or Thresholds(quarantine_ratio=settings.alert_quarantine_ratio)
        self.max_delay = float(getattr(settings, "retry_max_delay_seconds", 30.0))
        self.post_timeout = post_timeout
        self.open: dict[tuple, Incident] = {}
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue(QUEUE_SIZE)
        self.stop_event = threading.Event()
        self._down_since: dict[str, float] = {}
        self._backlog: collections.deque[tuple[float, int]] = collections.deque()
        self._free: collections.deque[tuple[float, float]] = collections.deque()
        self._filling_since: float | None = None
        self._threads: list[threading.Thread] = []
        self.store = store
        self._dirty = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "AlertManager":
        """Start the sender thread, and the evaluator thread when a snapshot function was given."""
        targets = [("alert-sender", self._send_loop)]
        if self.snapshot is not None:
            targets.append(("alert-evaluator", self._evaluate_loop))
        for name, target in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("webhook alerts on: incidents are posted to %s", _safe_url(self.url), extra={"event": "alerts_on"})
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop evaluating; give the sender `timeout` seconds to deliver what is queued, then let it go."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        left = self.queue.qsize()
        if left:
            log.warning("%d alert message(s) not delivered at shutdown", left, extra={"event": "alerts_undelivered"})

    def _evaluate_loop(self) -> None:
        loaded = self.store is None
        while not self.stop_event.wait(self.interval):
            try:
                if not loaded:
                    # Incidents a previous run left open are taken over: a restart does not announce them again.
                    previous = self.store.load()
                    loaded = previous is not None
                    for key, incident in (previous or {}).items():
                        self.open.setdefault(key, incident)
                if self.evaluate(self.snapshot()):
                    self._dirty = True
                if self._dirty and self.store is not None:
                    self._dirty = not self.store.save(self.open)  # PostgreSQL down: saved on a later turn
            except Exception:  # an alerting bug must not take the supervisor down; it says so
                log.exception("alert evaluation failed", extra={"event": "alert_evaluation_failed"})

    # ------------------------------------------------------------ incidents

    def evaluate(self, snapshot: dict[str, Any]) -> list[dict[str, Any]]:
        """Open and resolve incidents from one snapshot; returns the messages queued (already on their way)."""
        now = snapshot.get("time", time.time())
        found = {i.key: i for i in self._incidents(snapshot, now)}
        kept = self._unknowable(snapshot)
        messages = []
        for key, incident in found.items():
            if key not in self.open:
                incident.started_at = now
                self.open[key] = incident
                messages.append(self._message(incident, "firing", now))
        for key in [k for k in self.open if k not in found and k[0] not in kept]:
            messages.append(self._message(self.open.pop(key), "resolved", now))
        for m in messages:
            self._enqueue(m)
        return messages

    def _unknowable(self, snapshot: dict[str, Any]) -> set[str]:
        """Alerts that cannot be judged from this snapshot: they stay as they are, neither fired nor resolved."""
        out: set[str] = set()
        if snapshot.get("status") is None:
            out |= {FILE_FAILED, BACKLOG_GROWING, NO_CHUNK_PROCESSED, QUARANTINE_RATE_HIGH}
        if snapshot.get("workers") is None:
            out.add(WORKER_RESTARTING)
        if snapshot.get("data_dir_free_bytes") is None or len(self._free) < 2:  # no rate to fit yet
            out.add(DATA_DIR_FILLING_UP)
        return out

    def _incidents(self, snapshot: dict[str, Any], now: float) -> Iterable[Incident]:
        yield from self._dependencies(snapshot, now)
        yield from self._workers(snapshot.get("workers") or [])
        yield from self._data_dir(snapshot.get("data_dir_free_bytes"), now)
        status = snapshot.get("status")
        if status is not None:
            yield from self._files(status)
            yield from self._backlog_growing(status, now)
            yield from self._stalled(status)
            yield from self._quarantine(status)

    def _dependencies(self, snapshot: dict[str, Any], now: float) -> Iterable[Incident]:
        for dep, up in (snapshot.get("dependencies") or {}).items():
            if up is None:
                continue  # not checked this time
            if up:
                self._down_since.pop(dep, None)
                continue
            since = self._down_since.setdefault(dep, now)
            if now - since >= self.thresholds.dependency_down_seconds:
                yield Incident(
                    DEPENDENCY_DOWN,
                    (DEPENDENCY_DOWN, dep),
                    f"{DEPENDENCY_NAMES.get(dep, dep)} has been unreachable for more than {self.thresholds.dependency_down_seconds:.0f}s; "
                    "the workers are retrying",
                    {"dependency": dep},
                )

    def _workers(self, workers: list[dict[str, Any]]) -> Iterable[Incident]:
        t = self.thresholds
        for w in workers:
            healthy = w.get("alive") and w.get("up_seconds", 0.0) >= t.worker_healthy_seconds
            if w.get("restarts", 0) >= t.restarts and not healthy:
                yield Incident(
                    WORKER_RESTARTING,
                    (WORKER_RESTARTING, w["name"]),
                    f"{w['name']} keeps crashing: restarted {w['restarts']} times in a row",
                    {"worker": w["name"]},
                )

    def _files(self, status: dict[str, Any]) -> Iterable[Incident]:
        for f in status["files"]:
            if f["status"] in ("failed", "conflict"):
                yield Incident(
                    FILE_FAILED,
                    (FILE_FAILED, f["file_id"]),
                    f"file {f['name']!r} {f['status']}: {f['reason'] or 'no reason recorded'}",
                    {"file_id": f["file_id"], "file": f["name"], "file_status": f["status"]},
                )

    def _backlog_growing(self, status: dict[str, Any], now: float) -> Iterable[Incident]:
        window = self.thresholds.backlog_growing_seconds
        backlog = int(status["totals"]["backlog_chunks"])
        samples = self._backlog
        samples.append((now, backlog))
        while len(samples) > 2 and samples[1][0] <= now - window:
            samples.popleft()  # keep one sample at or before the window's start
        start_t, start_v = samples[0]
        values = [v for _, v in samples]
        growing = all(b >= a for a, b in zip(values, values[1:])) and backlog > start_v
        if now - start_t >= window and growing:
            yield Incident(
                BACKLOG_GROWING,
                (BACKLOG_GROWING,),
                f"the backlog has grown for {window / 60:.0f} min: {start_v} -> {backlog} chunks waiting for "
                "mechanism Y",
                {},
            )

    def _stalled(self, status: dict[str, Any]) -> Iterable[Incident]:
        t = status["totals"]
        limit = self.thresholds.stalled_seconds
        idle = t["seconds_since_last_processed"]
        if t["backlog_chunks"] and (t["oldest_waiting_seconds"] or 0) >= limit and (idle is None or idle >= limit):
            yield Incident(
                NO_CHUNK_PROCESSED,
                (NO_CHUNK_PROCESSED,),
                f"no chunk processed for {limit / 60:.0f} min while {t['backlog_chunks']} chunk(s) wait: "
                f"{'; '.join(status['waiting_for'])}",
                {},
            )

    def _quarantine(self, status: dict[str, Any]) -> Iterable[Incident]:
        q = status.get("quarantine_recent") or {}
        rows, bad = q.get("rows") or 0, q.get("quarantined") or 0
        limit = self.thresholds.quarantine_ratio
        if rows >= self.thresholds.quarantine_min_rows and bad / rows > limit:
            yield Incident(
                QUARANTINE_RATE_HIGH,
                (QUARANTINE_RATE_HIGH,),
                f"{bad / rows:.1%} of the rows ingested in the last {q.get('minutes')} min were quarantined "
                f"({bad} of {rows}; the limit is ALERT_QUARANTINE_RATIO={limit})",
                {},
            )

    def _data_dir(self, free: float | None, now: float) -> Iterable[Incident]:
        if free is None:
            return
        t = self.thresholds
        samples = self._free
        if not samples or now - samples[-1][0] >= t.disk_sample_seconds:
            samples.append((now, float(free)))
        while samples and samples[0][0] < now - t.disk_window_seconds:
            samples.popleft()
        predicted = _predict_linear(samples, now, t.disk_horizon_seconds)
        if predicted is None:
            return  # not judged yet (see _unknowable): an incident a restart took over stays open meanwhile
        if predicted >= 0:
            self._filling_since = None
            return
        if self._filling_since is None:
            self._filling_since = now
        # The hour's hold is for opening it; one already open (taken over from before a restart) stays while it holds.
        if now - self._filling_since >= t.disk_for_seconds or (DATA_DIR_FILLING_UP,) in self.open:
            yield Incident(
                DATA_DIR_FILLING_UP,
                (DATA_DIR_FILLING_UP,),
                f"the disk holding DATA_DIR fills up within {_span(t.disk_horizon_seconds)} at the rate of the last "
                f"{_span(t.disk_window_seconds)} ({free / 2**30:.1f} GiB free now)",
                {},
            )

    # ------------------------------------------------------------ delivery

    def _message(self, incident: Incident, state: str, now: float) -> dict[str, Any]:
        tag = "FIRING" if state == "firing" else "RESOLVED"
        text = f"[{tag}] {incident.alert}: {incident.text}"
        if state == "resolved":
            text += f" (resolved after {now - incident.started_at:.0f}s)"
        message = {
            "text": text,
            "status": state,
            "alert": incident.alert,
            "labels": incident.labels,
            "started_at": _iso(incident.started_at),
        }
        if state == "resolved":
            message["resolved_at"] = _iso(now)
        level = logging.WARNING if state == "firing" else logging.INFO
        log.log(level, "alert %s", text, extra={"event": f"alert_{state}", "alert": incident.alert})
        return message

    def _enqueue(self, message: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(message)
        except queue.Full:
            log.error(
                "alert queue full (%d messages; the receiver is down?): dropping %s",
                QUEUE_SIZE,
                message["text"],
                extra={"event": "alert_dropped"},
            )

    def _send_loop(self) -> None:
        while True:
            try:
                message = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.stop_event.is_set():
                    return
                continue
            self._deliver(message)

    def _deliver(self, message: dict[str, Any]) -> bool:
        body = json.dumps(message).encode()
        delay = 1.0
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                self._post(body)
                return True
            except (OSError, urllib.error.URLError) as exc:
                if attempt == SEND_ATTEMPTS or self.stop_event.is_set():
                    log.error(
                        "alert not delivered to %s after %d attempt(s): %s (%s)",
                        _safe_url(self.url),
                        attempt,
                        exc,
                        message["text"],
                        extra={"event": "alert_undelivered"},
                    )
                    return False
                log.warning(
                    "alert webhook %s failed (attempt %d/%d, retry in %.0fs): %s",
                    _safe_url(self.url),
                    attempt,
                    SEND_ATTEMPTS,
                    delay,
                    exc,
                    extra={"event": "alert_retry"},
                )
                if self.stop_event.wait(delay):
                    continue  # stopping: one last immediate attempt, then give up
                delay = min(delay * 2, self.max_delay)
        return False

    def _post(self, body: bytes) -> None:
        # ALERT_WEBHOOK_URL is refused at start unless it is https (http only to this machine): no file: URLs.
        request = urllib.request.Request(  # noqa: S310
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.post_timeout) as response:  # noqa: S310
            response.read()


# ---------------------------------------------------------------- snapshots


class LedgerProbe:
    """The snapshot's facts that come from outside the supervisor: the ledger summary, PostgreSQL and lake
    reachability. Keeps one connection, reopened after a failure; probes the lake every `lake_every` s."""

    def __init__(self, settings: Any, *, lake_every: float = 30.0, open_lake: Callable[..., Any] | None = None) -> None:
        self.settings = settings
        self.lake_every = lake_every
        self.open_lake = open_lake  # src.resources.open_lake, handed in by the supervisor
        self._db = None
        self._lake = None
        self._lake_checked = float("-inf")

    def __call__(self) -> dict[str, Any]:
        status, pg_up = self._status()
        return {"time": time.time(), "status": status, "dependencies": {"postgresql": pg_up, "lake": self._lake_up()}}

    def _status(self) -> tuple[dict[str, Any] | None, bool]:
        import psycopg2

        from src.errors import RetryableError
        from src.observability.status import Database, collect_from

        try:
            if self._db is None:
                self._db = Database(self.settings, attempts=1)
            return collect_from(self._db.conn), True
        except (psycopg2.OperationalError, psycopg2.InterfaceError, RetryableError) as exc:
            log.debug("PostgreSQL unreachable for the alert probe: %s", exc)
            self.close()
            return None, False

    def _lake_up(self) -> bool | None:
        if time.monotonic() - self._lake_checked < self.lake_every:
            return None
        self._lake_checked = time.monotonic()
        from src.errors import ProcessorError

        if self.open_lake is None:
            return None
        try:
            if self._lake is None:
                once = threading.Event()
                once.set()  # one attempt per probe: report an outage, never wait it out here
                self._lake = self.open_lake(self.settings, stop=once)
            self._lake.put_bytes("_health/alert-probe", b"ok", overwrite=True)
            self._lake.delete("_health/alert-probe")
            return True
        except (ProcessorError, OSError) as exc:
            log.debug("lake not writable for the alert probe: %s", exc)
            return False

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except Exception:  # noqa: S110 - a dead connection may fail to close; it is dropped either way
                pass
            self._db = None


class IncidentStore:
    """The open incidents, kept in the ledger's `kv_state` so that "once per incident" holds across restarts
    of the daemon: a file that failed before a restart is not announced again after it."""

    KEY = "alerts.open_incidents"

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def load(self) -> dict[tuple, Incident] | None:
        """The incidents left open; None when they cannot be read yet (PostgreSQL down, no schema yet)."""
        rows = self._run("SELECT value FROM kv_state WHERE key = %s", (self.KEY,))
        if rows is None:
            return None
        if not rows:
            return {}
        try:
            items = json.loads(rows[0][0])
            return {
                tuple(i["key"]): Incident(i["alert"], tuple(i["key"]), i["text"], i["labels"], i["started_at"])
                for i in items
            }
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(
                "open incidents in kv_state unreadable (%s); starting afresh", exc, extra={"event": "alerts_reset"}
            )
            return {}

    def save(self, open_incidents: dict[tuple, Incident]) -> bool:
        value = json.dumps(
            [
                {"alert": i.alert, "key": list(i.key), "text": i.text, "labels": i.labels, "started_at": i.started_at}
                for i in open_incidents.values()
            ]
        )
        return (
            self._run(
                "INSERT INTO kv_state (key, value, updated_at) VALUES (%s, %s, now()) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
                (self.KEY, value),
            )
            is not None
        )

    def _run(self, sql: str, params: tuple) -> list[tuple] | None:
        """One statement on a short-lived connection; None when PostgreSQL cannot be reached."""
        import psycopg2

        from src.errors import RetryableError
        from src.observability.status import Database

        db = Database(self.settings, attempts=1)
        try:
            return db.query(sql, params)
        except (psycopg2.Error, RetryableError) as exc:  # down, or kv_state not created yet
            log.debug("open incidents not read/saved: %s", exc)
            return None
        finally:
            db.close()


def worker_facts(workers: Iterable[Any]) -> list[dict[str, Any]]:
    """What the alerts need to know about the supervisor's workers (main.Worker objects)."""
    now = time.monotonic()
    return [
        {
            "name": w.name,
            "restarts": w.restarts,
            "alive": w.alive(),
            "up_seconds": now - w.started_at if w.alive() else 0.0,
        }
        for w in workers
        if not w.done
    ]


def data_dir_free_bytes(settings: Any) -> int | None:
    """Free bytes of the file system holding DATA_DIR (as tp_data_dir_free_bytes), None if it cannot be read."""
    try:
        return shutil.disk_usage(settings.data_dir).free
    except OSError:
        return None


def start_alerts(
    settings: Any, workers: Callable[[], Iterable[Any]], *, open_lake: Callable[..., Any] | None = None
) -> AlertManager | None:
    """The supervisor's hook: an evaluating AlertManager when ALERT_WEBHOOK_URL is set, else None."""
    if not settings.alert_webhook_url:
        return None
    probe = LedgerProbe(settings, open_lake=open_lake)

    def snapshot() -> dict[str, Any]:
        snap = probe()
        snap["workers"] = worker_facts(workers())
        snap["data_dir_free_bytes"] = data_dir_free_bytes(settings)
        return snap

    return AlertManager(settings, snapshot=snapshot, store=IncidentStore(settings)).start()


def _predict_linear(samples: Iterable[tuple[float, float]], now: float, ahead: float) -> float | None:
    """The least-squares line through `samples` (time, value), read `ahead` seconds after `now`, as Prometheus'
    predict_linear does; None with fewer than two samples or all at one time."""
    points = list(samples)
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(p[0] for p in points) / n
    mean_v = sum(p[1] for p in points) / n
    var = sum((p[0] - mean_t) ** 2 for p in points)
    if var == 0:
        return None
    slope = sum((p[0] - mean_t) * (p[1] - mean_v) for p in points) / var
    return mean_v + slope * (now + ahead - mean_t)


def _span(seconds: float) -> str:
    """A duration as a person reads it in a message: "24 h", "10 min"."""
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _safe_url(url: str | None) -> str:
    """The receiver without its path: webhook URLs often carry a token in the path or query."""
    if not url:
        return "(none)"
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].rsplit('@', 1)[-1]}/..."
