"""A real PostgreSQL server of the test's own, started from the machine's binaries (initdb + pg_ctl as the
`postgres` user when we are root), for the tests that stop, restart or kill it. Shared by `conftest.py`'s
session server."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

START_TRIES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path | None:
    env = os.environ.get("PG_BINDIR")
    candidates = [Path(env)] if env else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    return None


class PgCluster:
    """initdb in `root`, then start/stop/restart a server on 127.0.0.1 at a free port."""

    def __init__(self, root: Path, bindir: Path) -> None:
        self.root = root
        self.bindir = bindir
        self.pgdata = root / "data"
        self.port = free_port()
        self.started = False
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(root, pw.pw_uid, pw.pw_gid)
            os.chmod(root, 0o755)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self._ctl("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8", check=True)

    def _ctl(self, tool: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.prefix + [str(self.bindir / tool), *args],
            check=check,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def options(self) -> str:
        return (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )

    def start(self) -> None:
        """Start the server; its first start moves to another free port if the one picked was taken meanwhile
        (tests running side by side pick ports at the same time), later starts keep the port clients know."""
        log = self.root / "log"
        tries = 1 if self.started else START_TRIES
        for attempt in range(1, tries + 1):
            done = self._ctl("pg_ctl", "-D", str(self.pgdata), "-o", self.options, "-l", str(log), "-w", "start")
            if done.returncode == 0:
                self.started = True
                return
            if attempt < tries:
                self.port = free_port()
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no server log)"
        raise RuntimeError(f"PostgreSQL in {self.pgdata} did not start on 127.0.0.1:{self.port}; its log ends: {tail}")

    def restart(self, mode: str = "fast") -> None:
        log = str(self.root / "log")
        self._ctl(
            "pg_ctl", "-D", str(self.pgdata), "-o", self.options, "-l", log, "-m", mode, "-w", "restart", check=True
        )

    def stop(self, mode: str = "fast") -> None:
        self._ctl("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def admin_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres"
