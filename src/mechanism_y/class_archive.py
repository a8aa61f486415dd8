"""Build the driver JVM's class archive (AppCDS) for Mechanism Y, once per Java, Spark and class path.

    python -m src.mechanism_y.class_archive

A cold JVM spends most of a session's start and of the first batch loading, parsing and verifying Spark's
classes from the jars. With the archive, `start_session` maps them instead (measured on the 2-core machine:
the session up in about half the time; bench/README.md). The archive (~190 MB) lives under
DATA_DIR/spark/class-archive, is keyed by what it was made for, and is written by the JVM only at its exit,
so it is made by a JVM of its own, never by Y's: a worker's JVM is often killed, and writing the archive
would slow every clean stop by seconds.

With SPARK_CLASS_ARCHIVE=auto (the default) Mechanism Y runs this command itself while it is idle, at the
lowest CPU priority (`src.mechanism_y.background_archive`); run by hand, it builds the archive at install
time, so that even the first start maps it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
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
from src.utils.runtime import die_with_parent
from src.utils.spark_utils import build_class_archive

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


def _run_in_background() -> None:
    """Nice 19, and end the whole process group (this builder in a session of its own, its JVM) when the parent
    dies: the parent-death signal reaches this process even while Y has its JVM stopped, and SIGKILL ends a
    stopped JVM too, so a Y killed outright never leaves a paused build behind."""
    os.nice(19)
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the signal was asked for
        os.killpg(0, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.mechanism_y.class_archive",
        description="Build the driver JVM's class archive under DATA_DIR/spark/class-archive (once per Java, Spark "
        "and class path; takes about a minute): Mechanism Y's Spark session then starts in about half the time.",
    )
    parser.add_argument(
        "--background",
        action="store_true",
        help="as Mechanism Y runs it while idle: at nice 19 (the JVM too), and the build's whole process group, "
        "a JVM Y has paused included, ends when the process that started it dies",
    )
    args = parser.parse_args(argv)
    if args.background:
        _run_in_background()
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
