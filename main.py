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
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config.config import PROJECT_ROOT, Settings, redact_url  # noqa: E402
from src.errors import ProcessorError  # noqa: E402
from src.observability.server import MetricsServer  # noqa: E402
from src.resources import open_lake  # noqa: E402
from src.utils.db import DSN_ENV, Database  # noqa: E402
from src.utils.runtime import (  # noqa: E402
    EXIT_DRAIN_IMPOSSIBLE,
    READY_FILE_ENV,
    START_GATE_ENV,
    SUPERVISOR_PID_ENV,
    X_DONE_FILE_ENV,
    child_of,
)

if TYPE_CHECKING:
    from src.utils.embedded_postgres import EmbeddedWatch

log = logging.getLogger("supervisor")

EXIT_CONFIG = 2  # a worker exiting with this code has a settings problem: restarting will not help
EXIT_FAILED = 1  # main.py's exit code when a drain cannot finish
STOP_TIMEOUT = (
    20.0  # a worker still running this long after SIGTERM is killed (Spark's stop can take a while on 2 busy cores)
)
MAX_BACKOFF = 60.0
HEALTHY_AFTER = 60.0  # a worker up this long has its restart backoff reset
TICK = 0.2  # seconds between two looks at the workers


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
        """Start the worker tied to this process: it gets SIGTERM if the supervisor dies (see runtime.child_of).

        Through `src.launcher`, which handles that SIGTERM while the worker still imports its modules."""
        self.proc = subprocess.Popen(  # noqa: S603 - our own worker module; argv from constants
            [sys.executable, "-m", "src.launcher", self.name, self.module, *self.args],
            env=env,
            cwd=str(ROOT),
            preexec_fn=child_of(os.getpid()),  # only a prctl call between fork and exec (runtime.child_of)
        )
        self.started_at = time.monotonic()
        self.restart_at = None
        self.starts += 1
        log.info("%s started (pid %d)", self.name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Runs the workers, restarts a crashed one with backoff, and keeps the embedded PostgreSQL up.

    Drain hand-off: when X exits 0 under `--drain`, the supervisor creates the file named by X_DONE_FILE_ENV;
    Y (running, slow to start, or restarted later) finishes the chunks in the ledger once it sees it.
    """

    max_backoff = MAX_BACKOFF
    healthy_after = HEALTHY_AFTER

    def __init__(
        self, settings: Settings, *, drain: bool, run_y: bool = True, database_watch: EmbeddedWatch | None = None
    ) -> None:
        self.settings = settings
        self.drain = drain
        self.stop = threading.Event()
        self.database_watch = database_watch  # an EmbeddedWatch when this process runs the embedded server
        self.env = self._child_env()
        self.x = Worker("mechanism X", "src.mechanism_x.data_ingestion", ["--drain"] if drain else [])
        self.y = Worker("mechanism Y", "src.mechanism_y.stream_processor") if run_y else None
        run_dir = settings.data_dir / "run"
        # Y touches this file once its Spark session is up; X gets ready meanwhile (scans files, loads
        # CustomerImportance) but releases its first chunk only then, so chunks are not paced out at
        # CHUNK_INTERVAL_SECONDS into a queue nobody serves during Spark's start-up.
        self.ready_file = run_dir / f"mechanism-y-ready-{os.getpid()}"
        self.x_done_file = run_dir / f"mechanism-x-done-{os.getpid()}"
        # Workers launched before the database is ready wait for this file (`launch`, `open_gate`).
        self.start_gate = run_dir / f"start-gate-{os.getpid()}"
        self.env[START_GATE_ENV] = str(self.start_gate)
        self.launched = False
        if self.y is not None:
            self.env[READY_FILE_ENV] = str(self.ready_file)
            self.env[X_DONE_FILE_ENV] = str(self.x_done_file)
        # /metrics, /healthz, /readyz on METRICS_ADDR
        self.metrics = MetricsServer(settings, self, open_lake=open_lake)
        self.env.update(self.metrics.child_env())

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.to_env())
        env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        if self.drain and self.settings.spark_driver_jit == "auto":
            env["SPARK_DRIVER_JIT"] = "c1"  # a finite run: C1 only (config.spark_config.JIT_OPTIONS)
        return env

    def workers(self) -> list[Worker]:
        return [w for w in (self.x, self.y) if w is not None]

    def run(self) -> int:
        from src.observability.alerts import start_alerts

        # webhook alerts; None without ALERT_WEBHOOK_URL
        alerts = start_alerts(self.settings, self.workers, open_lake=open_lake)
        self.metrics.start()
        try:
            return self._run()
        finally:
            self.metrics.stop()
            if alerts is not None:
                alerts.stop()
            self._clear_marks()

    def launch(self) -> None:
        """Start the workers (once). Until `open_gate`, each waits at its start gate (runtime.wait_for_start)."""
        if self.launched:
            return
        self.launched = True
        private_dir(self.ready_file.parent)
        self._clear_marks()
        self.metrics.prepare_workers_dir()
        for w in self.workers():
            w.start(self.env)

    def open_gate(self, database_watch: EmbeddedWatch | None = None) -> None:
        """The start-up is done: launched workers go on, with the database's URL when their environment had none
        (the embedded server's, which exists only now; a URL the user set is in their environment already and never
        written here). Workers started from now on find the gate open and the URL in their environment. The file is
        written whole, then renamed into place: a worker never reads half."""
        self.database_watch = database_watch
        url = os.environ.get(DSN_ENV, "")
        handed = url if self.env.get(DSN_ENV) != url else ""
        if url:
            self.env[DSN_ENV] = url
        tmp = self.start_gate.with_name(self.start_gate.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(handed)
        os.replace(tmp, self.start_gate)

    def _run(self) -> int:
        self.launch()  # done already by main(), beside the start-up checks
        if not self.start_gate.exists():
            self.open_gate(self.database_watch)
        while not self.stop.wait(TICK):
            self.beat = time.monotonic()  # /healthz: the loop turns
            self._watch_database()
            for w in self.workers():
                code = self._check(w)
                if code is not None:
                    return code
        self.shutdown()
        return 0

    def _clear_marks(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        self.x_done_file.unlink(missing_ok=True)
        self.start_gate.unlink(missing_ok=True)

    def _watch_database(self) -> None:
        if self.database_watch is None:
            return
        self.database_watch.check()
        if self.env.get(DSN_ENV) != self.database_watch.uri:
            # a restarted server on another socket: workers started from now on use it
            self.env[DSN_ENV] = self.database_watch.uri

    def _check(self, w: Worker) -> int | None:
        """Restart, finish or give up on one worker; the supervisor's exit code when it must end now."""
        if w.done or w.alive():
            return None
        if w.restart_at is not None:
            if time.monotonic() >= w.restart_at:
                w.start(self.env)
            return None
        code = w.proc.returncode
        if code == 0 and self.drain:
            return self._finished(w)
        if code == EXIT_CONFIG:
            log.error("%s cannot start with these settings (exit %d); stopping", w.name, code)
            self.shutdown()
            return EXIT_CONFIG
        if code == EXIT_DRAIN_IMPOSSIBLE:
            log.error("%s cannot finish the drain (exit %d, reason above); stopping", w.name, code)
            self.shutdown()
            return EXIT_FAILED
        self._schedule_restart(w, code)
        return None

    def _finished(self, w: Worker) -> int | None:
        w.done = True
        log.info("%s finished", w.name)
        if w is self.x and self.y is not None:
            self.x_done_file.touch()
            log.info("mechanism X has ingested everything; mechanism Y finishes the chunks in the ledger")
        if all(x.done for x in self.workers()):
            log.info("drain complete: every file ingested and every chunk processed")
            return 0
        return None

    def _schedule_restart(self, w: Worker, code: int) -> None:
        if time.monotonic() - w.started_at >= self.healthy_after:
            w.restarts = 0
        delay = min(self.max_backoff, 2.0**w.restarts)
        w.restarts += 1
        w.restart_at = time.monotonic() + delay
        how = f"signal {-code}" if code < 0 else f"code {code}"
        log.warning("%s (pid %d) exited with %s; restart %d in %.0fs", w.name, w.proc.pid, how, w.restarts, delay)

    def abandon(self) -> None:
        """The start-up failed after `launch`: stop the workers waiting at the gate, remove what `launch` made."""
        self.shutdown()
        self.metrics.stop()
        self._clear_marks()

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


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) readable by this user only: it holds data, downloads and sockets."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def warn_if_readable(path: Path, what: str) -> None:
    """One warning when a file holding secrets can be read by the group or by others."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s %s is readable by other users (mode %04o): run chmod 600 %s", what, path, mode, path)


def describe_setup(settings: Settings) -> None:
    """The first log lines: which parts are embedded, and where everything lives."""
    from src.utils.db import describe_target

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


def prepare_host(settings: Settings) -> None:
    """Fail fast on what would make both workers crash-loop, before they start: Java, and DATA_DIR private (a
    worker would otherwise create it with the default mode). `prepare_services` does the rest once they run."""
    from src.utils.spark_utils import check_java

    check_java()
    private_dir(settings.data_dir)
    private_dir(settings.data_dir / "run")
    warn_if_readable(PROJECT_ROOT / ".env", ".env")
    warn_if_readable(settings.google_credentials_path, "GOOGLE_CREDENTIALS_PATH")


def prepare_services(settings: Settings) -> EmbeddedWatch | None:
    """The database (the embedded server started once for both workers, the schema), the lake, the Drive folder
    and the inbox: workers launched already wait for this at their start gate (`Supervisor.open_gate`).

    Returns the embedded server's watch when this process started it (for the Supervisor), else None."""
    from src.utils.embedded_postgres import EmbeddedWatch, start_embedded

    watch = None
    if settings.embedded_postgres and not os.environ.get(DSN_ENV):
        os.environ[DSN_ENV] = start_embedded(settings)
        watch = EmbeddedWatch(settings, os.environ[DSN_ENV])
    db = Database(settings)
    try:
        db.apply_schema()
    finally:
        db.close()
    open_lake(settings).check_writable()
    if settings.gdrive_folder_id:
        _check_drive(settings)
    if settings.local_inbox:
        inbox = settings.local_inbox_dir
        inbox.mkdir(parents=True, exist_ok=True)
        if not any(p.suffix.lower() == ".csv" for p in inbox.iterdir()):
            from src import sample_data

            log.info("the inbox %s is empty: generating the 594,643-row sample there", inbox)
            counts = sample_data.generate(inbox)
            log.info("sample written: %s", counts)
    return watch


def _check_drive(settings: Settings, wait: float = 30.0) -> None:
    """The Drive key and folder, before any worker or Spark starts: a wrong key or folder is a one-line
    settings error; Drive being away is waited for `wait` seconds, then left to Mechanism X, which waits on."""
    from src.errors import is_retryable
    from src.resources import open_source

    given_up = threading.Event()
    timer = threading.Timer(wait, given_up.set)
    timer.start()
    db = Database(settings)
    try:
        open_source(settings, db, stop=given_up).close()
    except Exception as exc:
        if not is_retryable(exc):
            raise
        log.warning("Google Drive not reachable yet (%s); mechanism X will keep trying", exc)
    finally:
        timer.cancel()
        db.close()


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
    from src.observability.logs import configure_logging

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
    configure_logging(settings, "supervisor")
    describe_setup(settings)
    try:
        prepare_host(settings)
        supervisor = Supervisor(settings, drain=args.drain)  # ProcessorError: METRICS_ADDR not host:port
    except ProcessorError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    # The workers start now, beside the database's start: their imports and Y's JVM are most of a start-up. They
    # wait at the start gate before they open the database.
    supervisor.launch()
    try:
        started = time.monotonic()
        database_watch = prepare_services(settings)
    except ProcessorError as exc:
        log.error("cannot start: %s", exc)
        supervisor.abandon()
        return EXIT_CONFIG
    except BaseException:  # Ctrl-C mid-start: the launched workers go too
        supervisor.abandon()
        raise
    supervisor.open_gate(database_watch)
    log.info("database, lake and source ready in %.2f s; the workers go on", time.monotonic() - started)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: stopping the workers", signal.Signals(signum).name)
        supervisor.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
