"""The supervisor's HTTP endpoint on METRICS_ADDR: /metrics, /healthz, /readyz, the status page and /api/status.

Observability must never hold up the pipeline: the server runs in daemon threads, dependency probes run
in their own threads and only publish their last result, and a port already taken is one ERROR line,
not a stopped daemon.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from src.errors import SettingsError
from src.observability.metrics import LedgerCollector, ProcessCollector, SupervisorCollector

log = logging.getLogger(__name__)
T = TypeVar("T")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PROBE_INTERVAL = 15.0
RESTART_LOOP = 3  # consecutive quick restarts (the supervisor's backoff counter) that make a worker "looping"


def parse_addr(value: str) -> tuple[str, int] | None:
    """METRICS_ADDR: `host:port`, or `off` -> None."""
    text = value.strip()
    if text.lower() in ("off", "none", "false", "0", ""):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: a free port, as Settings accepts
        raise SettingsError(f"METRICS_ADDR={value!r} is not host:port (e.g. 127.0.0.1:9464) or off")
    return host.strip("[]") or "127.0.0.1", int(port)


class Probes:
    """Each dependency probed in its own daemon thread; readers see the last result and its age."""

    def __init__(self, checks: dict[str, Callable[[], None]], stop: threading.Event, interval: float) -> None:
        self._checks = checks
        self._stop = stop
        self._interval = interval
        self._results: dict[str, tuple[bool, float, str]] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        for name in self._checks:
            threading.Thread(target=self._loop, args=(name,), name=f"probe-{name}", daemon=True).start()

    def _loop(self, name: str) -> None:
        while not self._stop.is_set():
            self.run_once(name)
            self._stop.wait(self._interval)

    def run_once(self, name: str) -> bool:
        try:
            self._checks[name]()
            ok, why = True, ""
        except Exception as exc:  # noqa: BLE001 - any failure means "down"; the reason is reported
            ok, why = False, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        with self._lock:
            was = self._results.get(name)
            self._results[name] = (ok, time.monotonic(), why)
        if was is not None and was[0] != ok:
            (log.info if ok else log.warning)(
                "dependency %s is %s%s",
                name,
                "up" if ok else "down",
                f": {why}" if why else "",
                extra={"event": "dependency_up" if ok else "dependency_down"},
            )
        return ok

    def state(self) -> dict[str, bool]:
        with self._lock:
            return {name: r[0] for name, r in self._results.items()}

    def detail(self, name: str) -> tuple[bool, str] | None:
        with self._lock:
            r = self._results.get(name)
        return None if r is None else (r[0], r[2])


class MetricsServer:
    """Started and stopped by the Supervisor (main.py); reads its workers, restarts and ready file."""

    def __init__(self, settings: Any, supervisor: Any, *, open_lake: Callable[..., Any] | None = None) -> None:
        """`open_lake(settings, stop=...)` builds the lake for the writable check (`src.resources.open_lake`,
        handed in by main.py so that this package depends on no worker)."""
        self.settings = settings
        self.supervisor = supervisor
        self.open_lake = open_lake
        self.addr = parse_addr(settings.metrics_addr)
        self.multiproc_dir = Path(settings.data_dir) / "run" / f"prometheus-{os.getpid()}"
        self._dir_ready = False
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._db = None
        self._db_lock = threading.Lock()
        self.probes = Probes(self._checks(), self._stop, PROBE_INTERVAL)
        self.registry = CollectorRegistry()

    @property
    def enabled(self) -> bool:
        return self.addr is not None

    def child_env(self) -> dict[str, str]:
        """The workers write their metrics where the server merges them (prometheus-client multiprocess mode)."""
        return {MULTIPROC_ENV: str(self.multiproc_dir)} if self.enabled else {}

    # ---------------------------------------------------------------- life cycle

    def prepare_workers_dir(self) -> None:
        """The fresh directory the workers write their metrics to (`child_env`): before any worker starts (a
        worker's metrics cannot be made without it), once per run."""
        if not self.enabled or self._dir_ready:
            return
        _remove_stale_dirs(self.multiproc_dir.parent)
        shutil.rmtree(self.multiproc_dir, ignore_errors=True)  # counters of an earlier run must not add up
        self.multiproc_dir.mkdir(parents=True, exist_ok=True)
        self._dir_ready = True

    def start(self) -> None:
        if not self.enabled:
            log.info("metrics endpoint off (METRICS_ADDR=off)")
            return
        self.prepare_workers_dir()
        MultiProcessCollector(self.registry, path=str(self.multiproc_dir))
        self.registry.register(LedgerCollector(self._read))
        self.registry.register(ProcessCollector(self._worker_pids, os.getpid()))
        self.registry.register(SupervisorCollector(self._restarts, self.probes.state, self.settings.data_dir))
        host, port = self.addr
        try:
            self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:
            log.error(
                "cannot serve metrics on METRICS_ADDR=%s:%d (%s): set METRICS_ADDR to a free host:port, or off; "
                "the pipeline runs on without /metrics",
                host,
                port,
                exc.strerror or exc,
            )
            return
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True).start()
        self.probes.start()
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz, /)", host, self._httpd.server_address[1])

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        shutil.rmtree(self.multiproc_dir, ignore_errors=True)

    @property
    def port(self) -> int | None:
        return self._httpd.server_address[1] if self._httpd is not None else None

    # ---------------------------------------------------------------- what the collectors read

    def _read(self, fn: Callable[[Any], T]) -> T:
        """`fn(cursor)` in one transaction, on a connection of its own (never the workers'), short timeouts."""
        from src.utils.db import Database, connection_kwargs

        with self._db_lock:
            if self._db is None:
                kwargs = connection_kwargs(self.settings)
                kwargs.setdefault("connect_timeout", 5)
                kwargs["options"] = "-c statement_timeout=5000"
                kwargs["application_name"] = "transaction-processor-metrics"
                self._db = Database(self.settings, kwargs=kwargs, attempts=1)
            try:
                return self._db.run(fn, what="read the ledger")
            except Exception:
                self._db.close()
                raise

    def _workers(self) -> list[Any]:
        return list(self.supervisor.workers())

    def _worker_pids(self) -> dict[str, int | None]:
        return {
            _name(w): (w.proc.pid if w.proc is not None and w.proc.poll() is None else None) for w in self._workers()
        }

    def _restarts(self) -> dict[str, int]:
        return {_name(w): max(0, getattr(w, "starts", 1) - 1) for w in self._workers()}

    def _checks(self) -> dict[str, Callable[[], None]]:
        checks: dict[str, Callable[[], None]] = {"postgresql": self._check_postgres, "lake": self._check_lake}
        if getattr(self.settings, "gdrive_folder_id", None):
            checks["drive"] = self._check_drive
        return checks

    def _check_postgres(self) -> None:
        self._read(lambda cur: cur.execute("SELECT 1"))

    def _check_lake(self) -> None:
        if self.open_lake is None:
            raise RuntimeError("no lake probe configured")
        once = threading.Event()
        once.set()  # one attempt: a probe reports an outage, it does not wait it out
        self.open_lake(self.settings, stop=once).check_writable()

    def _check_drive(self) -> None:
        """Mechanism X is the one that talks to Drive: it is down while X waits out a Drive fault."""
        for family in MultiProcessCollector(None, path=str(self.multiproc_dir)).collect():
            if family.name != "tp_worker_waiting_for":
                continue
            for sample in family.samples:
                if sample.labels.get("dependency") == "drive" and sample.value >= 1:
                    raise RuntimeError("mechanism X is waiting for Google Drive (see its 'waiting for Drive' lines)")

    # ---------------------------------------------------------------- health

    def healthz(self) -> tuple[int, dict]:
        """Alive: the supervisor loop has turned recently (or, without a heartbeat, is not stopping)."""
        beat = getattr(self.supervisor, "beat", None)
        stopping = self.supervisor.stop.is_set()
        fresh = beat is None or time.monotonic() - beat < 30
        ok = fresh and not stopping
        return (200 if ok else 503), {"status": "ok" if ok else "failing", "stopping": stopping}

    def readyz(self) -> tuple[int, dict]:
        """Ready: PostgreSQL reachable, lake writable, Y warmed, no worker in a restart loop."""
        checks = {
            "postgresql": self._probe_check("postgresql"),
            "lake": self._probe_check("lake"),
            "mechanism_y_warm": self._y_warm(),
            "workers": self._workers_steady(),
        }
        failed = {name: why for name, (ok, why) in checks.items() if not ok}
        body = {"status": "ready" if not failed else "not ready", "failed": failed}
        return (200 if not failed else 503), body

    def _probe_check(self, name: str) -> tuple[bool, str]:
        result = self.probes.detail(name)
        if result is None:
            ok = self.probes.run_once(name)
            result = self.probes.detail(name) or (ok, "")
        return result[0], result[1] or ("" if result[0] else f"{name} probe failed")

    def _y_warm(self) -> tuple[bool, str]:
        y = getattr(self.supervisor, "y", None)
        if y is None:
            return True, ""
        if getattr(y, "done", False):
            return True, ""
        ready = Path(self.supervisor.ready_file)
        if not ready.exists():
            return False, "mechanism Y has not reported warm yet (Spark starting)"
        if y.proc is None or y.proc.poll() is not None:
            return False, "mechanism Y is not running"
        return True, ""

    def _workers_steady(self) -> tuple[bool, str]:
        looping = [_name(w) for w in self._workers() if w.restarts >= RESTART_LOOP]
        if looping:
            return False, f"restart loop: {', '.join(looping)}"
        return True, ""


def _remove_stale_dirs(run_dir: Path) -> None:
    """Metric files left by a supervisor that was killed (its pid is gone)."""
    import psutil

    for path in run_dir.glob("prometheus-*"):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _name(worker: Any) -> str:
    return worker.name.strip().lower().replace(" ", "_")


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "transaction-processor"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._json(*server.healthz())
                elif path == "/readyz":
                    self._json(*server.readyz())
                elif path == "/api/status":
                    self._status()
                elif path in ("/", "/index.html"):
                    self._page()
                else:
                    self._json(404, {"error": f"no such path {path!r}: try /metrics, /healthz, /readyz or /"})
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the endpoint down
                log.warning("%s failed: %s", path, exc)
                self._json(500, {"error": type(exc).__name__})

        def _status(self) -> None:
            try:
                from src.observability.status import collect_status
            except ImportError:
                self._json(404, {"error": "the status summary is not part of this build"})
                return
            self._send(200, json.dumps(collect_status(server.settings), default=str).encode(), "application/json")

        def _page(self) -> None:
            try:
                from src.observability.page import PAGE_HTML
            except ImportError:
                self._send(200, b"<p>transaction-processor: see /metrics</p>", "text/html; charset=utf-8")
                return
            body = PAGE_HTML.encode() if isinstance(PAGE_HTML, str) else PAGE_HTML
            self._send(200, body, "text/html; charset=utf-8")

        def _json(self, code: int, body: dict) -> None:
            self._send(code, json.dumps(body).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("http %s", format % args)

    return Handler
