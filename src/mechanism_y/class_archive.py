"""Build the driver JVM's class archive (AppCDS) for Mechanism Y, once per Java, Spark and class path.

    python -m src.mechanism_y.class_archive

A cold JVM spends most of a session's start and of the first batch loading, parsing and verifying Spark's
classes from the jars. With the archive, `start_session` maps them instead (measured on the 2-core machine:
the session up in about half the time; bench/README.md). The archive (~190 MB) lives under
DATA_DIR/spark/class-archive, is keyed by what it was made for, and is written by the JVM only at its exit,
so it is made by a JVM of its own, never by Y's: a worker's JVM is often killed, and writing the archive
would slow every clean stop by seconds.

With SPARK_CLASS_ARCHIVE=auto (the default) Mechanism Y runs this command itself once its first batch is
committed, as a child at the lowest CPU priority (`BackgroundBuild`); run by hand, it builds the archive at
install time, so that even the first start maps it.
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
from pathlib import Path
from typing import TYPE_CHECKING

from config.config import Settings
from src.errors import ProcessorError, command_failed
from src.mechanism_y import pattern_detector as patterns
from src.schemas.transaction_schemas import (
    STATE_ARROW_SCHEMA,
    WEIGHTS_ARROW_SCHEMA,
    state_spark_schema,
    weights_spark_schema,
)
from src.utils.spark_utils import build_class_archive, class_archive, class_archive_building

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def exercise(spark: SparkSession, settings: Settings) -> None:
    """Mechanism Y's Spark path on a made-up chunk (`StreamProcessor.warm_up`), so the archive holds the classes
    a batch loads, plus the Arrow hand-over of the state and the weights at start."""
    from src.mechanism_y.stream_processor import StreamProcessor

    processor = StreamProcessor(settings, None, None, spark, threading.Event())
    weights = patterns.arrow_frame(spark, WEIGHTS_ARROW_SCHEMA.empty_table(), weights_spark_schema())
    processor.weights = patterns.by_pair(weights).localCheckpoint(eager=False)
    spark.createDataFrame(STATE_ARROW_SCHEMA.empty_table(), schema=state_spark_schema()).count()
    if not processor.warm_up():
        raise ProcessorError(f"SPARK_MASTER {settings.spark_master!r}: the class archive is built on a local master")


BUILD_LOG = "build.log"  # the background build's output, beside the archive
BUILD_DRIVER_MEMORY = "512m"  # the build runs a 1,000-row made-up chunk: a small heap, beside Y's own JVM
IDLE_BEFORE_BUILD_S = 30.0  # Y idle this long (nothing waiting): the build may take the machine's spare time


class BackgroundBuild:
    """The class archive built by a child process in the time Y would spend idle (SPARK_CLASS_ARCHIVE=auto).

    `run_while_idle` is called once Y has had nothing to do for `IDLE_BEFORE_BUILD_S`: it starts the build the
    first time (unless the archive exists, another build holds the directory's lock, the setting is off, or the
    master is not local: the archive is the driver's, and a cluster's driver is wherever spark-submit runs),
    and resumes a paused one after that. `pause` (a chunk is waiting) stops the child's process group with
    SIGSTOP, so the build never takes CPU from a batch or from the start-up it is there to shorten. The child
    runs at nice 19 in a process group of its own with a 512 MB driver, its output in `build.log` beside the
    archive. `poll` logs the outcome once; `stop` (Y stopping) kills the group: a build cut short leaves a
    `_tmp-<pid>.jsa` that the next build removes, and a later idle spell builds again. When Y is killed
    outright, the kernel wakes a paused build (its group is orphaned) and it finishes or ends on its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self._started = 0.0
        self._asked = False

    def run_while_idle(self) -> None:
        """Y is idle: start the build (the first time one is wanted) or resume a paused one."""
        if self.proc is not None:
            self._signal(signal.SIGCONT, paused=False)
            return
        if not self._asked:
            self._asked = True
            self._start()

    def pause(self) -> None:
        """A chunk is waiting: stop the build where it is until Y is idle again."""
        if self.proc is not None and not self.paused:
            self._signal(signal.SIGSTOP, paused=True)

    def _signal(self, sig: int, *, paused: bool) -> None:
        if self.paused == paused or self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        self.paused = paused

    def _start(self) -> bool:
        if self.settings.spark_class_archive != "auto" or not self.settings.spark_local:
            return False
        target = class_archive(self.settings)
        if target.is_file() or class_archive_building(target.parent):
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "SPARK_DRIVER_MEMORY": BUILD_DRIVER_MEMORY,
            "DATA_DIR": str(self.settings.data_dir.resolve()),
        }
        root = Path(__file__).resolve().parents[2]
        with open(target.parent / BUILD_LOG, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "src.mechanism_y.class_archive", "--low-priority"],
                cwd=root if (root / "src").is_dir() else None,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own group: paused, resumed and killed with its JVM. No preexec_fn: Python code run in the
                # forked child can collect Py4J proxies there, whose finalizers then write to Y's own gateway
                # socket (seen: the JVM reset Y's connection right after the fork).
                start_new_session=True,
            )
        self._started = time.monotonic()
        log.info(
            "Mechanism Y is idle: building the driver JVM's class archive in the background (pid %d, lowest CPU "
            "priority, paused while chunks wait; about a minute of CPU), once for this Java and Spark: later "
            "starts of Y map it. Output: %s",
            self.proc.pid,
            target.parent / BUILD_LOG,
            extra={"event": "class_archive_build"},
        )
        return True

    def poll(self) -> int | None:
        """Log the build's outcome once it has ended; its exit code then (None while it runs or if none ran)."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        took = time.monotonic() - self._started
        self.proc = None
        self.paused = False
        target = class_archive(self.settings)
        if code == 0 and target.is_file():
            log.info(
                "class archive built in %.0f s: %s; the next start of Mechanism Y maps it",
                took,
                target,
                extra={"event": "class_archive_built"},
            )
        else:
            log.warning(
                "the class archive build exited %d after %.0f s; Y runs without it (see %s; "
                "`python -m src.mechanism_y.class_archive` builds it by hand)",
                code,
                took,
                target.parent / BUILD_LOG,
                extra={"event": "class_archive_failed"},
            )
        return code

    def stop(self) -> None:
        """Kill a build still running, with its JVM (Y is stopping; the next start builds again)."""
        proc, self.proc = self.proc, None
        self.paused = False
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # its JVM too: gone once reaped (it is the child of the dead builder)
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        log.info("class archive build stopped with Mechanism Y; the next start builds it again")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.mechanism_y.class_archive",
        description="Build the driver JVM's class archive under DATA_DIR/spark/class-archive (once per Java, Spark "
        "and class path; takes about a minute): Mechanism Y's Spark session then starts in about half the time.",
    )
    parser.add_argument(
        "--low-priority",
        action="store_true",
        help="run at nice 19, the JVM too (what Mechanism Y asks for when it builds the archive while idle)",
    )
    args = parser.parse_args(argv)
    if args.low_priority:
        os.nice(19)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    try:
        settings = Settings.from_env()
        path = build_class_archive(settings, lambda spark: exercise(spark, settings))
    except ProcessorError as exc:
        return command_failed(exc)
    log.info("class archive ready: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
