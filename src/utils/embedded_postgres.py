"""The embedded PostgreSQL (pgserver) under DATA_DIR, used when neither POSTGRES_HOST nor TP_DATABASE_URL is set.

The supervisor starts it once for both workers (a worker run alone starts or attaches to it itself), then
watches it: an embedded server has no service manager to bring it back after the OOM killer or a stray
`kill -9`, so `EmbeddedWatch` does, clearing the dead server's `postmaster.pid` first.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import psutil
import psycopg2
import psycopg2.extensions

from config.config import Settings

log = logging.getLogger(__name__)

HEALTH_INTERVAL = 5.0  # seconds between two health checks by the supervisor
HEALTH_TIMEOUT = 3  # seconds one check may take to connect


def embedded_pgdata(settings: Settings) -> Path:
    return settings.data_dir / "postgres"


def start_embedded(settings: Settings) -> str:
    """Start (or attach to) the embedded server under DATA_DIR and return the URI of POSTGRES_DB."""
    pgdata = embedded_pgdata(settings)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    pgdata.mkdir(exist_ok=True)
    clear_stale_pid(pgdata)
    _forget_dead_handles(pgdata)
    server = _pgserver().get_server(pgdata, cleanup_mode="stop")
    _close_data_dir_listing(settings.data_dir)
    uri = server.get_uri()
    _ensure_database(uri, settings.postgres_db)
    return _with_database(uri, settings.postgres_db)


def restart_embedded(settings: Settings) -> str:
    """Bring a dead embedded server back (same data, same socket) and return the URI of POSTGRES_DB."""
    pg = _pgserver()
    pgdata = embedded_pgdata(settings).resolve()
    clear_stale_pid(pgdata)
    server = pg.postgres_server.PostgresServer._instances.get(pgdata)
    if server is None:
        return start_embedded(settings)
    with type(server)._lock:  # the inter-process lock pgserver takes around every start
        server.ensure_postgres_running()
    uri = server.get_uri()
    _ensure_database(uri, settings.postgres_db)
    return _with_database(uri, settings.postgres_db)


def clear_stale_pid(pgdata: Path) -> bool:
    """Remove `postmaster.pid` when no postmaster runs under that pid; True if removed.

    After a SIGKILL (or a reboot) the file stays behind. PostgreSQL itself steps over a dead pid, but pgserver
    takes any live process with that pid (reused since) for the server and never starts it.
    """
    pidfile = pgdata / "postmaster.pid"
    try:
        first = pidfile.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].strip()
    except FileNotFoundError:
        return False
    pid = int(first) if first.isdigit() else 0
    if pid > 0 and _is_postmaster(pid):
        return False
    pidfile.unlink(missing_ok=True)
    log.warning("removed the stale %s (pid %s is not a running PostgreSQL server)", pidfile, first or "missing")
    return True


def is_alive(uri: str, timeout: int = HEALTH_TIMEOUT) -> bool:
    """`pg_isready`: can a session be opened and answer within `timeout` seconds?"""
    try:
        conn = psycopg2.connect(uri, connect_timeout=timeout, options=f"-c statement_timeout={timeout * 1000}")
    except psycopg2.Error:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)
    except psycopg2.Error:
        return False
    finally:
        conn.close()


class EmbeddedWatch:
    """The supervisor's health check of the embedded server: restart it when a check fails."""

    def __init__(self, settings: Settings, uri: str, *, interval: float = HEALTH_INTERVAL) -> None:
        self.settings = settings
        self.uri = uri
        self.interval = interval
        self.restarts = 0
        self._down = False
        self._next = time.monotonic() + interval

    def check(self) -> bool:
        """Check when due (cheap otherwise); True if the server is up, restarting it first if it was down."""
        if time.monotonic() < self._next:
            return True
        try:
            if is_alive(self.uri):
                return True
            if not self._down:  # once per outage; each failed restart then says why in its own line
                log.error("embedded PostgreSQL in %s is not answering; restarting it", embedded_pgdata(self.settings))
            self._down = True
            try:
                self.uri = restart_embedded(self.settings)
            except Exception as exc:  # noqa: BLE001 - any failure here is retried at the next check
                server_log = embedded_pgdata(self.settings) / "log"
                log.error(
                    "embedded PostgreSQL did not start (%s); next try in %.0fs (server log %s)",
                    _why(exc, server_log),
                    self.interval,
                    server_log,
                )
                return False
            self.restarts += 1
            self._down = False
            log.info("embedded PostgreSQL is back (restart %d)", self.restarts)
            return True
        finally:
            self._next = time.monotonic() + self.interval


def _why(exc: Exception, server_log: Path) -> str:
    """One line on a failed start: pg_ctl's own error says nothing, the server log's last line says why."""
    import subprocess

    if not isinstance(exc, subprocess.CalledProcessError):
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    try:
        with open(server_log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    return f"pg_ctl start exited {exc.returncode}" + (f": {lines[-1].strip()[:300]}" if lines else "")


def _pgserver():
    import warnings

    warnings.filterwarnings("ignore", module="platformdirs")
    import pgserver
    import pgserver.postgres_server

    # pgserver logs every pg_ctl call, and on a failed start dumps the whole server log: we log one line instead.
    logging.getLogger("pgserver").setLevel(logging.CRITICAL)
    return pgserver


def _is_postmaster(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.name() in ("postgres", "postmaster")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _forget_dead_handles(pgdata: Path) -> None:
    """pgserver stops the server when its last handle exits; a handle SIGKILLed never left the list, so prune it."""
    import json

    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (FileNotFoundError, ValueError):
        return
    live = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p)]
    if live != pids:
        handles.write_text(json.dumps(live))


def _close_data_dir_listing(data_dir: Path) -> None:
    """As root, pgserver opens DATA_DIR to its `pgserver` system user (read + traverse); traversing is all it needs."""
    if os.geteuid() != 0:
        return
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    tight = mode & ~(stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH)
    if tight != mode:
        data_dir.chmod(tight)


def _with_database(uri: str, db: str) -> str:
    base, _, query = uri.partition("?")
    return base.rsplit("/", 1)[0] + "/" + db + (f"?{query}" if query else "")


def _ensure_database(uri: str, db: str) -> None:
    conn = psycopg2.connect(uri)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {psycopg2.extensions.quote_ident(db, cur)}")
    finally:
        conn.close()
