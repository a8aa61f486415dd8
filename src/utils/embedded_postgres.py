"""The embedded PostgreSQL server (pgserver) under DATA_DIR, for the zero-configuration default."""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg2
import psycopg2.extensions

from config.config import Settings

log = logging.getLogger(__name__)


def embedded_pgdata(settings: Settings) -> Path:
    return settings.data_dir / "postgres"


def start_embedded(settings: Settings) -> str:
    """Start (or attach to) the embedded server under DATA_DIR and return its URI."""
    import warnings

    warnings.filterwarnings("ignore", module="platformdirs")
    import pgserver

    pgdata = embedded_pgdata(settings)
    pgdata.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    uri = server.get_uri()
    _ensure_database(uri, settings.postgres_db)
    base, _, query = uri.partition("?")
    return base.rsplit("/", 1)[0] + "/" + settings.postgres_db + (f"?{query}" if query else "")


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
