"""The only place a SparkSession is built. Never at import time.

This module knows the settings and Spark; what needs the rest of the product (S3A credentials and jars,
the Java lookup, the JSON log layout) is prepared by `src.utils.spark_utils.start_session`, which passes it
in as `extra_conf`. So `config` imports nothing from `src` but its errors.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Mapping

from config.config import Settings

if TYPE_CHECKING:
    import subprocess

    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

JAVA_OPTIONS_KEY = "spark.driver.extraJavaOptions"
# The driver JVM's compilers (SPARK_DRIVER_JIT), a trade between the start and the steady state.
# - c1, C1 only: C2's compiler thread burns a core for most of a start on a 2-core machine (measured: about half
#   the JVM's CPU to the session up and through the first jobs). Measured on Y's batch of one 10,000-row chunk
#   (bench/README.md, "h-yfast"), driver JVM CPU seconds, C1 only / tiered C1+C2: session up 6.4 / 11.3, session
#   up -> first batch done 13.6 / 26.6, a batch, median of batches 2-30, 1.52 / 2.01. A catch-up of the 594,643-row
#   sample (`main.py --drain`, interval 0) takes 30-34 s with C1 only and 43 s tiered (bench/README.md, "jit").
# - tiered, C1 then C2: once C2 has compiled the hot paths (about 40-50 paced chunks here), a lone batch takes a
#   third less: 0.68-0.85 s against 0.98-1.53 s at the default pace on 2 cores, where C1's code keeps Y at the edge
#   of the pace and C2's leaves it room (latency of the last 10 of 120 chunks 0.45-0.67 s against 1.5-3.5 s).
#   A middle with fewer compiler threads does not exist here: tiered compilation needs at least 2
#   (`-XX:CICompilerCount=1` is refused), which is already the 2-core default.
# So `auto`: tiered for the daemon's Y, whose JVM runs for days, C1 only for `--drain` and the one-off sessions
# (tests, benches' anchors, the class archive's build).
JIT_OPTIONS = {"c1": "-XX:TieredStopAtLevel=1", "tiered": "-XX:+TieredCompilation"}
# The parallel collector instead of G1 (bench/README.md, "yplan"). Per warm lone batch of Y (one
# 10,000-row chunk through Y's own `_scan` + `_single_pass`; driver JVM CPU by thread, medians of batches 6-30;
# four pairs of runs alternated, load 3-4), G1 / parallel: the thread that plans (Py4J) 355-362 / 301-314 ms,
# the C1 compiler threads 159-168 / 71-75 ms (G1 also keeps the code cache sweeper busy, ~60 ms), executor
# tasks 0.49-0.50 / 0.46-0.47 s, the whole JVM 1.05-1.09 / 0.90-0.95 s. Same plans, same results, same peak RSS
# in bench/detect.py (~1.1 GiB for Y). The price: old garbage goes only at a full collection, 0.35-0.87 s once
# every 10-40 warm batches on this loaded machine (G1: no full collection, young pauses up to ~0.1 s), a
# stall that adds to one chunk's latency where the CPU saved shortens every chunk's. A metaspace threshold
# above what the driver's classes take (~155 MB after 30 batches) spares the start the 4 full collections
# (0.3-0.6 s of pauses) that the parallel collector otherwise makes at each "Metadata GC Threshold".
# These are the options every driver JVM gets whatever its compilers (the class archive's key holds them; an
# archive maps under either compiler).
DRIVER_JAVA_OPTIONS = "-XX:+UseParallelGC -XX:MetaspaceSize=256m"


def driver_jit(settings: Settings) -> str:
    """c1 or tiered: SPARK_DRIVER_JIT, with `auto` as C1 only (a session whose caller did not say it runs for long;
    Mechanism Y says so through `resolve_jit`)."""
    return "c1" if settings.spark_driver_jit == "auto" else settings.spark_driver_jit


def resolve_jit(settings: Settings, *, runs_until_stopped: bool) -> Settings:
    """`settings` with SPARK_DRIVER_JIT=auto made concrete: tiered for a process that runs until it is stopped (the
    daemon's Mechanism Y), C1 only for one that ends when its work is done (`--drain`). A value the user set stays."""
    if settings.spark_driver_jit != "auto":
        return settings
    return settings.model_copy(update={"spark_driver_jit": "tiered" if runs_until_stopped else "c1"})


def spark_conf(settings: Settings, app_name: str) -> dict[str, str]:
    """What the settings alone say about the session, as plain strings."""
    scratch = settings.data_dir / "spark"
    conf = {
        "spark.app.name": app_name,
        "spark.master": settings.spark_master,
        "spark.driver.memory": settings.spark_driver_memory,
        "spark.serializer": "org.apache.spark.serializer.KryoSerializer",
        "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2",
        "spark.sql.adaptive.enabled": "false",
        # Mechanism Y keeps its state hash-partitioned by merchant; a join or window keyed by merchant plus
        # more (the weights join on merchant, customer) may then reuse that partitioning instead of a shuffle.
        "spark.sql.requireAllClusterKeysForCoPartition": "false",
        "spark.ui.enabled": "true" if settings.spark_ui_enabled else "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.local.dir": str(scratch / "tmp"),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.driver.bindAddress": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
        "spark.driver.host": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
        "spark.sql.parquet.mergeSchema": "false",
        "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
        "spark.checkpoint.dir": settings.checkpoint_dir,
        "spark.log.level": "WARN",
        JAVA_OPTIONS_KEY: f"{JIT_OPTIONS[driver_jit(settings)]} {DRIVER_JAVA_OPTIONS}",
    }
    return conf


def merged_conf(base: Mapping[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
    """`base` updated with `extra`, except the driver's Java options, which add up (the JVM flags of
    `spark_conf` and, say, the log layout's `-D` options of the caller) instead of replacing each other."""
    conf = {**base, **(extra or {})}
    options = f"{base.get(JAVA_OPTIONS_KEY, '')} {(extra or {}).get(JAVA_OPTIONS_KEY, '')}".split()
    if options:
        conf[JAVA_OPTIONS_KEY] = " ".join(dict.fromkeys(options))  # each once, in order
    return conf


def build_spark_session(
    settings: Settings, app_name: str = "transaction-processor", *, extra_conf: Mapping[str, str] | None = None
) -> "SparkSession":
    """The session, from `spark_conf` plus `extra_conf` (use `src.utils.spark_utils.start_session`)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    conf = merged_conf(spark_conf(settings, app_name), extra_conf)
    (settings.data_dir / "spark" / "tmp").mkdir(parents=True, exist_ok=True)
    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    leave_sigterm_to_python(session)
    session.sparkContext.setLogLevel("WARN")
    session.sparkContext.setCheckpointDir(conf["spark.checkpoint.dir"])
    # Under spark-submit the driver's JVM was started before these options: its compilers are spark-submit's.
    compilers = driver_jit(settings) if launched_jvm(session) is not None else "as spark-submit started it"
    log.info("Spark %s session up (master %s, driver compilers %s)", session.version, settings.spark_master, compilers)
    return session


def launched_jvm(session: "SparkSession") -> "subprocess.Popen | None":
    """The driver JVM PySpark launched for this process; None when the JVM came first (spark-submit runs the
    Python driver as its child, and that JVM is not this process's to manage)."""
    return getattr(session.sparkContext._gateway, "proc", None)


def leave_sigterm_to_python(session: "SparkSession") -> None:
    """Make the driver JVM that PySpark launched for this process ignore SIGTERM.

    A SIGTERM sent to the whole process group (`timeout`, systemd's default control-group stop, `kill -TERM
    -<pgid>`) also reaches the JVM, whose shutdown hooks then stop Spark under the worker's running batch: the
    batch dies with Py4J errors and Spark's ERROR lines, and the worker's last steps (the quality report, the
    final detections flush) find the JVM gone. The worker's own stop handler already turns SIGTERM into a clean
    stop that ends with `session.stop()`, so the JVM need not act on it. The JVM still cannot outlive its
    worker: PySpark's gateway exits when the worker's end of its stdin closes, SIGKILL included. PySpark
    already starts it with SIGINT ignored, for the same reason (Ctrl-C reaches the terminal's whole group).

    Not done when the JVM came first (`launched_jvm` is None): that JVM is the process the operator signals, and
    it must stop on SIGTERM."""
    if launched_jvm(session) is None:
        return
    jvm = session.sparkContext._jvm
    jvm.sun.misc.Signal.handle(jvm.sun.misc.Signal("TERM"), jvm.sun.misc.SignalHandler.SIG_IGN)
