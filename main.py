"""The daemon: a supervisor that runs Mechanism X (ingest) and Mechanism Y (detect) as two processes.

    python main.py            run until SIGINT/SIGTERM
    python main.py --drain    exit 0 once everything now in the source is ingested and processed
    python main.py status     the pipeline's summary from PostgreSQL (exit 1 when something is failing)
    python main.py psql       psql on the daemon's database (--print-url: its URL, password masked)

Settings come from the environment and `.env` (see `.env.template`). With none of S3_BUCKET_NAME,
POSTGRES_HOST and GDRIVE_FOLDER_ID set, everything is embedded: a local inbox (filled with a generated
sample when empty), a local lake and an embedded PostgreSQL under DATA_DIR.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config.config import Settings, redact_url  # noqa: E402
from src.errors import ProcessorError  # noqa: E402
from src.observability.server import MetricsServer  # noqa: E402
from src.utils.runtime import READY_FILE_ENV  # noqa: E402

log = logging.getLogger("supervisor")

EXIT_CONFIG = 2  # a worker exiting with this code has a settings problem: restarting will not help
STOP_TIMEOUT = 8.0
MAX_BACKOFF = 60.0
HEALTHY_AFTER = 60.0  # a worker up this long has its restart backoff reset


@dataclass
class Worker:
    name: str
    module: str
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    done: bool = False
    starts: int = 0  # for tp_worker_restarts_total (restarts resets once a worker is healthy)

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], env=env, cwd=str(ROOT))
        self.started_at = time.monotonic()
        self.restart_at = None
        self.starts += 1
        log.info("%s started (pid %d)", self.name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, settings: Settings, *, drain: bool, run_y: bool = True) -> None:
        self.settings = settings
        self.drain = drain
        self.stop = threading.Event()
        self.env = self._child_env()
        self.x = Worker("mechanism X", "src.mechanism_x.data_ingestion", ["--drain"] if drain else [])
        self.y = Worker("mechanism Y", "src.mechanism_y.stream_processor") if run_y else None
        # Y touches this file once its Spark session is up and warm; X gets ready meanwhile (scans files, loads
        # CustomerImportance) but releases its first chunk only then, so chunks are not paced out at
        # CHUNK_INTERVAL_SECONDS into a queue nobody serves during Spark's start-up.
        self.ready_file = settings.data_dir / "run" / f"mechanism-y-ready-{os.getpid()}"
        if self.y is not None:
            self.env[READY_FILE_ENV] = str(self.ready_file)
        self.metrics = MetricsServer(settings, self)  # /metrics, /healthz, /readyz on METRICS_ADDR
        self.env.update(self.metrics.child_env())

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.to_env())
        env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def workers(self) -> list[Worker]:
        return [w for w in (self.x, self.y) if w is not None]

    def run(self) -> int:
        from src.observability.alerts import start_alerts

        alerts = start_alerts(self.settings, self.workers)  # webhook alerts; None without ALERT_WEBHOOK_URL
        self.metrics.start()
        try:
            return self._run()
        finally:
            self.metrics.stop()
            if alerts is not None:
                alerts.stop()
            self.ready_file.unlink(missing_ok=True)

    def _run(self) -> int:
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        for w in self.workers():
            w.start(self.env)
        while not self.stop.wait(0.2):
            self.beat = time.monotonic()  # /healthz: the loop turns
            for w in self.workers():
                if w.done or w.alive():
                    continue
                if w.restart_at is not None:
                    if time.monotonic() >= w.restart_at:
                        w.start(self.env)
                        if w is self.y and self.x.done:
                            self._signal_drain()
                    continue
                code = w.proc.returncode
                if code == 0 and self.drain:
                    w.done = True
                    log.info("%s finished", w.name)
                    if w is self.x and self.y is not None:
                        self._signal_drain()
                    if all(x.done for x in self.workers()):
                        log.info("drain complete: every file ingested and every chunk processed")
                        return 0
                    continue
                if code == EXIT_CONFIG:
                    log.error("%s cannot start with these settings (exit %d); stopping", w.name, code)
                    self.shutdown()
                    return EXIT_CONFIG
                if time.monotonic() - w.started_at >= HEALTHY_AFTER:
                    w.restarts = 0
                delay = min(MAX_BACKOFF, 2.0**w.restarts)
                w.restarts += 1
                w.restart_at = time.monotonic() + delay
                how = f"signal {-code}" if code < 0 else f"code {code}"
                log.warning(
                    "%s (pid %d) exited with %s; restart %d in %.0fs", w.name, w.proc.pid, how, w.restarts, delay
                )
        self.shutdown()
        return 0

    def _signal_drain(self) -> None:
        if self.y is not None and self.y.alive():
            log.info("mechanism X has ingested everything; asking mechanism Y to finish the remaining chunks")
            self.y.proc.send_signal(signal.SIGUSR1)

    def shutdown(self) -> None:
        """SIGTERM -> join(timeout) -> SIGKILL, for every live worker."""
        live = [w for w in self.workers() if w.alive()]
        for w in live:
            log.info("stopping %s (pid %d)", w.name, w.proc.pid)
            w.proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in live:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", w.name, STOP_TIMEOUT)
                w.proc.kill()
                w.proc.wait()
        log.info("all workers stopped")


def describe_setup(settings: Settings) -> None:
    """The first log lines: which parts are embedded, and where everything lives."""
    from src.utils.postgres_utils import describe_target

    embedded = [
        name
        for name, on in (
            ("inbox", settings.local_inbox),
            ("lake", settings.local_lake),
            ("PostgreSQL", settings.embedded_postgres),
        )
        if on
    ]
    log.info("embedded parts: %s", ", ".join(embedded) if embedded else "none")
    if settings.local_inbox:
        log.info(
            "source: local inbox %s (set GDRIVE_FOLDER_ID to watch a Google Drive folder)", settings.local_inbox_dir
        )
    else:
        log.info("source: Google Drive folder %s", settings.gdrive_folder_id)
    if settings.local_lake:
        log.info("lake: local directory %s (set S3_BUCKET_NAME for S3)", settings.local_lake_dir)
    else:
        endpoint = f" via {redact_url(settings.s3_endpoint_url)}" if settings.s3_endpoint_url else ""
        log.info("lake: s3://%s (%s)%s", settings.s3_bucket_name, settings.aws_region, endpoint)
    log.info("database: %s", describe_target(settings))


def prepare(settings: Settings) -> None:
    """Fail fast on what would make both workers crash-loop; start the embedded database once for both."""
    from config.spark_config import check_java
    from src.utils.object_store import open_lake
    from src.utils.postgres_utils import DSN_ENV, Database, start_embedded

    check_java()
    if settings.embedded_postgres and not os.environ.get(DSN_ENV):
        os.environ[DSN_ENV] = start_embedded(settings)
    db = Database(settings)
    try:
        db.apply_schema()
    finally:
        db.close()
    open_lake(settings).check_writable()
    if settings.gdrive_folder_id:
        from src.errors import RetryableError
        from src.mechanism_x.gdrive_source import GoogleDriveSource

        db = Database(settings)
        source = GoogleDriveSource(settings, db)
        try:
            source.check()  # credentials and folder access, before any worker or Spark starts
        except RetryableError as exc:
            log.warning("Google Drive not reachable yet (%s); mechanism X will keep trying", exc)
        finally:
            source.close()
            db.close()
    if settings.local_inbox:
        inbox = settings.local_inbox_dir
        inbox.mkdir(parents=True, exist_ok=True)
        if not any(p.suffix.lower() == ".csv" for p in inbox.iterdir()):
            from src import sample_data

            log.info("the inbox %s is empty: generating the 594,643-row sample there", inbox)
            counts = sample_data.generate(inbox)
            log.info("sample written: %s", counts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python main.py",
        description=(
            "Supervisor of the transaction processor: runs Mechanism X (ingest: source CSVs -> validated "
            "chunks of BATCH_SIZE rows -> Parquet in the lake + ledger in PostgreSQL) and Mechanism Y (PySpark "
            "detection of PatId1/2/3 after every chunk) as two processes, restarts a crashed one with "
            "exponential backoff, and stops both cleanly on SIGINT/SIGTERM. Settings: environment and .env "
            "(see .env.template); with no S3_BUCKET_NAME, POSTGRES_HOST or GDRIVE_FOLDER_ID everything is "
            "embedded under DATA_DIR (default data/)."
        ),
    )
    parser.add_argument(
        "--drain",
        action="store_true",
        help="exit 0 once everything now in the source is ingested and every chunk processed",
    )
    from src.observability.cli import add_commands

    add_commands(parser)  # `status` and `psql`
    return parser


def main(argv: list[str] | None = None) -> int:
    from src.utils.runtime import configure_logging

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command:
        from src.observability.cli import run_command

        return run_command(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        settings = Settings.from_env()
    except ProcessorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format, "supervisor", settings)
    describe_setup(settings)
    try:
        prepare(settings)
    except ProcessorError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    try:
        supervisor = Supervisor(settings, drain=args.drain)
    except ProcessorError as exc:  # METRICS_ADDR not host:port
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: stopping the workers", signal.Signals(signum).name)
        supervisor.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
