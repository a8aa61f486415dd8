"""Shared fixtures: a real PostgreSQL server started by the tests, fresh databases, settings, Spark.

The server is the machine's PostgreSQL (initdb + pg_ctl on 127.0.0.1, a free port, as the
`postgres` user when we are root); where no such binaries exist, the embedded pgserver.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from tests.pg_cluster import PgCluster, pg_bindir

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# Every product run a test starts serves /metrics on a port of its own (0: the kernel picks a free one), so runs
# side by side (pytest-xdist's workers, another checkout's tests) never fight over the default 127.0.0.1:9464.
# Tests of the metrics server set METRICS_ADDR themselves.
FREE_METRICS_ADDR = "127.0.0.1:0"
os.environ.setdefault("METRICS_ADDR", FREE_METRICS_ADDR)
# No product run a test starts builds the driver's class archive while idle (a JVM of a minute's CPU beside the
# suite's own); tests/test_spark_start.py runs that build itself.
os.environ.setdefault("SPARK_CLASS_ARCHIVE", "off")


@dataclass
class PgServer:
    host: str
    port: int | None
    user: str
    admin_dsn: str

    def env_for(self, db: str) -> dict[str, str]:
        """POSTGRES_* (or the embedded DSN) that point the product at database `db`."""
        if self.port is None:
            base, _, query = self.admin_dsn.partition("?")
            return {"TP_DATABASE_URL": base.rsplit("/", 1)[0] + "/" + db + (f"?{query}" if query else "")}
        return {
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_DB": db,
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": "",
        }

    def dsn_for(self, db: str) -> str:
        if self.port is None:
            return self.env_for(db)["TP_DATABASE_URL"]
        return f"host={self.host} port={self.port} dbname={db} user={self.user}"


@pytest.fixture(scope="session")
def pg_server():
    bindir = pg_bindir()
    if bindir is None:
        import pgserver

        tmp = Path(tempfile.mkdtemp(prefix="tp-pgserver-"))
        server = pgserver.get_server(tmp, cleanup_mode="delete")
        yield PgServer(host="", port=None, user="postgres", admin_dsn=server.get_uri())
        server.cleanup()
        return

    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="tp-pg-")), bindir)
    cluster.start()
    try:
        yield PgServer(host="127.0.0.1", port=cluster.port, user="postgres", admin_dsn=cluster.admin_dsn)
    finally:
        cluster.destroy()


@pytest.fixture
def pg_db(pg_server):
    """A fresh, empty database for one test; returns its name."""
    name = "t_" + uuid.uuid4().hex[:12]
    conn = psycopg2.connect(pg_server.admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    yield name
    conn = psycopg2.connect(pg_server.admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture
def pg_conn(pg_server, pg_db):
    conn = psycopg2.connect(pg_server.dsn_for(pg_db))
    conn.autocommit = True
    yield conn
    conn.close()


def run_env(pg_server: PgServer, db: str, root: Path) -> dict[str, str]:
    """Settings environment for a product run under `root` (local inbox and lake) on database `db`."""
    env = {
        "LOCAL_INBOX_DIR": str(root / "inbox"),
        "LOCAL_LAKE_DIR": str(root / "lake"),
        "DATA_DIR": str(root / "data"),
        "CHUNK_INTERVAL_SECONDS": "0",
        "PROCESSING_INTERVAL": "0.2",
        "DETECTIONS_FLUSH_SECONDS": "0.5",
        "SPARK_MASTER": "local[2]",
        "SPARK_LOCAL_IP": "127.0.0.1",
        "LOG_LEVEL": "INFO",
        "METRICS_ADDR": FREE_METRICS_ADDR,
    }
    env.update(pg_server.env_for(db))
    return env


@pytest.fixture
def base_env(tmp_path, pg_server, pg_db) -> dict[str, str]:
    """Environment for a product run in `tmp_path` on a fresh database (local inbox and lake)."""
    env = run_env(pg_server, pg_db, tmp_path)
    (tmp_path / "inbox").mkdir()
    return env


@pytest.fixture
def make_settings(base_env):
    from config.config import Settings

    def make(**overrides: str):
        env = dict(base_env)
        env.update({k: str(v) for k, v in overrides.items()})
        return Settings.from_env(env, dotenv=Path("/nonexistent"))

    return make


@pytest.fixture
def product_env(base_env) -> dict[str, str]:
    """A full process environment (for subprocess runs of the product)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "GDRIVE_", "TP_"))}
    env.update(base_env)
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="session")
def spark():
    from config.config import Settings
    from src.utils.spark_utils import start_session

    data_dir = tempfile.mkdtemp(prefix="tp-spark-")
    settings = Settings.from_env({"SPARK_MASTER": "local[2]", "DATA_DIR": data_dir}, dotenv=Path("/nonexistent"))
    session = start_session(settings, app_name="tests")
    yield session
    session.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Modules with a slow test first, the others after them, each in its own order.

    Under pytest-xdist (pyproject: two workers, a module whole on one worker, modules handed out in this order)
    the minutes-long modules start at once and the many short ones fill the other worker meanwhile, instead of
    a slow module starting last and running alone.
    """
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)
