"""Spark helpers: the S3A settings that let Spark read the lake bucket through `s3a://`.

hadoop-aws must be the exact Hadoop version bundled with pyspark; it pulls in the AWS SDK v2
bundle (~690 MB). Where the jars come from, in order:

1. SPARK_JARS (comma-separated paths or globs): machines without internet; on a cluster an entry
   `local:/path/x.jar` says the jar is installed at that path on every machine, so nothing is copied;
2. the Ivy cache `DATA_DIR/ivy`: `start_session` calls `fetch_hadoop_aws_jars` before the
   JVM starts, which downloads them there from Maven Central the first time only;
3. `spark.jars.packages` (Spark resolving them into the same cache), when `s3a_conf` is used
   without that fetch.

Spark's own resolution is the fallback only: for a Python application Spark also treats
every resolved jar as a Python file, so each start copies the SDK bundle into the scratch
directory and puts it on `sys.path` (+5 s and 660 MB of disk per start, measured). Jars
handed over as files skip that; with a local master they go on the driver class path, where
the executors (same JVM) see them without any copy.

Credentials never go into the Spark conf (it is printed by `spark-submit --verbose`, the
environment tab and our own start-up logs): the JVM reads them from its environment
(`s3a_env`), or from the standard AWS chain when no keys are set. Executors of a cluster do not
inherit that environment: `share_credentials` sets the keys in the driver's Hadoop configuration at
run time, which Spark ships with each job.

`start_session` is how the product gets its SparkSession: it checks Java, exports the S3 credentials,
has the jars local, and hands the S3A and logging settings to `config.spark_config.build_spark_session`
(dependencies run one way: `src` imports `config`, never the reverse).

S3A retries (inside the JVM, where our Python retry policy cannot reach) are set so that a lake
outage of several minutes delays a Spark read instead of failing it: the AWS SDK tries each request
twice (`attempts.maximum`), then S3A retries connection failures, resets and 5xx (`retry.*`) and
throttling (`retry.throttle.*`) with Hadoop's uncapped exponential backoff, which sleeps
interval * 2^(k+1) * U(0.5, 1.5) before retry k: 500 ms and 9 retries wait at least 255 s in all
(about 8.5 min on average), so a 90 s outage is ridden out with a wide margin. The price of an
uncapped backoff: after a long outage a read may sleep on for up to about as long again.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlparse

from config.config import Settings
from src.errors import ProcessorError, SettingsError, command_failed

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

HADOOP_AWS = "org.apache.hadoop:hadoop-aws"
# The v1 names are mapped by S3A; the v2 class names are what hadoop-aws 3.4+ loads natively.
ENV_CREDENTIALS = "software.amazon.awssdk.auth.credentials.EnvironmentVariableCredentialsProvider"
DEFAULT_CREDENTIALS = "software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider"
SIMPLE_CREDENTIALS = "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"  # fs.s3a.access.key / secret.key
REDACTION_REGEX = r"(?i)secret|password|token|access[.]?key|credential"


S3A_RETRY_INTERVAL = "500ms"
S3A_RETRY_LIMIT = 9  # Hadoop refuses 63 or more
S3A_THROTTLE_INTERVAL = "500ms"
S3A_THROTTLE_LIMIT = 9


def find_java() -> str | None:
    """The `java` Spark and Ivy will run: $JAVA_HOME/bin/java, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    return java if java and os.path.exists(java) else None


def pyspark_jars_dir() -> Path:
    """The jars of the Spark that runs: $SPARK_HOME's (under spark-submit pyspark is imported from a zip, and a
    set SPARK_HOME is also what pyspark launches), else those of the pip pyspark."""
    home = os.environ.get("SPARK_HOME")
    if home and (Path(home) / "jars").is_dir():
        return Path(home) / "jars"
    import pyspark

    return Path(pyspark.__file__).resolve().parent / "jars"


def bundled_hadoop_version(jars_dir: Path | None = None) -> str:
    """The Hadoop version inside the installed pyspark; hadoop-aws must match it exactly."""
    jars_dir = jars_dir or pyspark_jars_dir()
    for jar in sorted(jars_dir.glob("hadoop-client-api-*.jar")):
        match = re.fullmatch(r"hadoop-client-api-(\d+\.\d+\.\d+)\.jar", jar.name)
        if match:
            return match.group(1)
    raise ProcessorError(f"no hadoop-client-api-<version>.jar in {jars_dir}: cannot pick the hadoop-aws version")


def hadoop_aws_package(jars_dir: Path | None = None) -> str:
    return f"{HADOOP_AWS}:{bundled_hadoop_version(jars_dir)}"


MAVEN_CENTRAL = "https://repo1.maven.org/maven2/"
_IVY_SETTINGS = f"""<ivysettings>
  <settings defaultResolver="central"/>
  <resolvers><ibiblio name="central" m2compatible="true" root="{MAVEN_CENTRAL}"/></resolvers>
</ivysettings>
"""


def ivy_dir(settings: Settings) -> Path:
    return (settings.data_dir / "ivy").resolve()


def _manifest(settings: Settings) -> Path:
    return ivy_dir(settings) / f"hadoop-aws-{bundled_hadoop_version()}.classpath"


def cached_hadoop_aws_jars(settings: Settings) -> list[Path] | None:
    """The jars resolved by an earlier `fetch_hadoop_aws_jars`, if they are all still there."""
    manifest = _manifest(settings)
    try:
        jars = [Path(p.strip()) for p in manifest.read_text().split(os.pathsep) if p.strip()]
    except OSError:
        return None
    return jars if jars and all(j.is_file() for j in jars) else None


def fetch_hadoop_aws_jars(settings: Settings, *, timeout: float = 1800) -> list[Path]:
    """Resolve hadoop-aws and its AWS SDK from Maven Central into `DATA_DIR/ivy` (once).

    Uses the Ivy that ships with pyspark, so it needs Java and, the first time, internet;
    later calls return the cached jars without a network call.
    """
    jars = cached_hadoop_aws_jars(settings)
    if jars:
        return jars
    java = find_java()
    ivy_jars = sorted(pyspark_jars_dir().glob("ivy-*.jar"))
    if not java or not ivy_jars:
        raise ProcessorError("cannot fetch hadoop-aws: Java or pyspark's ivy jar is missing (or set SPARK_JARS)")
    home = ivy_dir(settings)
    home.mkdir(parents=True, exist_ok=True)
    (home / "ivysettings-central.xml").write_text(_IVY_SETTINGS)
    version = bundled_hadoop_version()
    log.info(
        "fetching hadoop-aws %s and the AWS SDK bundle (~700 MB, once) from %s into %s", version, MAVEN_CENTRAL, home
    )
    fd, tmp = tempfile.mkstemp(prefix="_tmp-", suffix=".classpath", dir=home)
    os.close(fd)
    cmd = [
        java, "-jar", str(ivy_jars[-1]), "-settings", str(home / "ivysettings-central.xml"),
        "-cache", str(home / "cache"), "-dependency", "org.apache.hadoop", "hadoop-aws", version,
        "-confs", "default", "-types", "jar", "-cachepath", tmp,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)  # noqa: S603 - spark-submit of pyspark with our own args
        if proc.returncode != 0 or not Path(tmp).read_text().strip():
            tail = " | ".join(line.strip() for line in (proc.stdout + proc.stderr).splitlines()[-3:])
            raise ProcessorError(
                f"could not fetch org.apache.hadoop:hadoop-aws:{version} from {MAVEN_CENTRAL} (exit "
                f"{proc.returncode}): {tail}; without internet, set SPARK_JARS (docs/s3.md)"
            )
        os.replace(tmp, _manifest(settings))
    except subprocess.TimeoutExpired:
        raise ProcessorError(f"fetching hadoop-aws from {MAVEN_CENTRAL} took over {timeout:.0f}s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    jars = cached_hadoop_aws_jars(settings)
    if not jars:
        raise ProcessorError(f"Ivy reported hadoop-aws jars that are not in {home / 'cache'}")
    return jars


INSTALLED = "local:"  # Spark's scheme for a jar already at this path on every machine: never copied


def _expand(spec: str) -> list[str]:
    """SPARK_JARS as jar paths, globs expanded; an entry `local:<path>` keeps its scheme (see `s3a_conf`)."""
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        scheme = INSTALLED if item.startswith(INSTALLED) else ""
        path = os.path.expanduser(item[len(scheme) :])
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches:
            raise SettingsError(f"SPARK_JARS entry {item!r} matches no file: fix the path or unset SPARK_JARS")
        out += [scheme + m for m in matches]
    return out


def s3a_conf(settings: Settings) -> dict[str, str]:
    """Spark settings for reading `s3a://<S3_BUCKET_NAME>/...`; holds no secret, makes no network call."""
    conf: dict[str, str] = {}
    if settings.spark_jars:
        jars: list[str] | None = _expand(settings.spark_jars)
    else:
        cached = cached_hadoop_aws_jars(settings)
        jars = None if cached is None else [str(j) for j in cached]
    if jars is None:
        conf["spark.jars.packages"] = hadoop_aws_package()
        conf["spark.jars.ivy"] = str(ivy_dir(settings))
    elif settings.spark_local:
        conf["spark.driver.extraClassPath"] = os.pathsep.join(j.removeprefix(INSTALLED) for j in jars)
    else:
        # Shipped by the driver to every executor (the SDK bundle is ~690 MB per executor), unless SPARK_JARS
        # says `local:/path`: installed at that path on every machine, put on each JVM's class path as it is.
        shipped = [j for j in jars if not j.startswith(INSTALLED)]
        installed = os.pathsep.join(j.removeprefix(INSTALLED) for j in jars if j.startswith(INSTALLED))
        if shipped:
            conf["spark.jars"] = ",".join(shipped)
        if installed:
            conf["spark.driver.extraClassPath"] = conf["spark.executor.extraClassPath"] = installed
    prefix = "spark.hadoop.fs.s3a."
    conf.update(
        {
            "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
            prefix + "endpoint.region": settings.aws_region,
            prefix + "aws.credentials.provider": ENV_CREDENTIALS if settings.aws_access_key_id else DEFAULT_CREDENTIALS,
            prefix + "connection.maximum": str(max(32, settings.max_workers * 4)),
            prefix + "threads.max": str(max(16, settings.max_workers * 2)),
            # Ride out a lake outage of minutes (see the module docstring): the SDK tries twice, S3A waits.
            prefix + "attempts.maximum": "2",
            prefix + "retry.interval": S3A_RETRY_INTERVAL,
            prefix + "retry.limit": str(S3A_RETRY_LIMIT),
            prefix + "retry.throttle.interval": S3A_THROTTLE_INTERVAL,
            prefix + "retry.throttle.limit": str(S3A_THROTTLE_LIMIT),
            prefix + "connection.establish.timeout": "5s",
            prefix + "connection.timeout": "60s",
            prefix + "input.stream.type": "classic",
            "spark.redaction.regex": REDACTION_REGEX,
        }
    )
    if settings.s3_endpoint_url:
        url = urlparse(settings.s3_endpoint_url)
        conf[prefix + "endpoint"] = settings.s3_endpoint_url
        conf[prefix + "path.style.access"] = "true"
        conf[prefix + "connection.ssl.enabled"] = "true" if url.scheme == "https" else "false"
    return conf


def s3a_env(settings: Settings) -> dict[str, str]:
    """Environment the Spark JVM needs for S3A credentials; apply before the session starts.

    Keys may come from `.env`, which is not in `os.environ`: the JVM inherits the Python
    process environment at launch, so they must be exported there first.
    """
    env = {"AWS_REGION": settings.aws_region}
    if settings.aws_access_key_id:
        env["AWS_ACCESS_KEY_ID"] = settings.aws_access_key_id.get_secret_value()
        env["AWS_SECRET_ACCESS_KEY"] = settings.aws_secret_access_key.get_secret_value()
    return env


def check_java() -> None:
    """Spark needs a JVM; say what to install instead of a Py4J stack trace."""
    if find_java() is None:
        raise ProcessorError(
            "Java is not installed (Spark needs Java 17 or 21): install it, e.g. "
            "`apt-get install openjdk-17-jre-headless`, or set JAVA_HOME"
        )


def prepare_s3a(settings: Settings) -> None:
    """Before the JVM starts: export the S3 credentials to its environment and have the hadoop-aws jars local.

    The keys go to the environment only (the JVM inherits it at launch), never into the conf, which Spark
    prints. The jars are fetched once into DATA_DIR/ivy so the session starts with files on the class path
    instead of resolving packages on every start; SPARK_JARS skips that.
    """
    os.environ.update(s3a_env(settings))
    if not settings.spark_jars:
        jars = fetch_hadoop_aws_jars(settings)
        log.info("hadoop-aws for s3a://%s: %d jars cached in %s", settings.s3_bucket_name, len(jars), ivy_dir(settings))


def session_conf(settings: Settings, app_name: str) -> dict[str, str]:
    """Everything set on the product's session by the settings: their own conf and S3A's."""
    from config.spark_config import spark_conf

    conf = spark_conf(settings, app_name)
    if settings.s3_bucket_name:
        conf.update(s3a_conf(settings))
    if not settings.spark_local:
        # Reliable checkpoints (see `checkpoint`) are files: delete each once its DataFrame is garbage.
        conf["spark.cleaner.referenceTracking.cleanCheckpoints"] = "true"
    return conf


def share_credentials(spark: "SparkSession", settings: Settings) -> None:
    """Hand the S3 keys to executors on other machines through the driver's Hadoop configuration, set at run time.

    Executors do not inherit the driver's environment, so the environment provider of `s3a_conf` leaves them
    with no credentials (every task fails with NoAuthWithAWSException). Spark ships the driver's Hadoop
    configuration with every file scan and checkpoint job (a broadcast of it), so keys set there reach each
    task without ever entering the Spark conf, which `ps`, the UI's environment tab and logs show. Without
    keys the cluster's own chain (an instance profile, IRSA) is used on every machine: nothing to hand over.
    """
    if settings.spark_local or not settings.s3_bucket_name or not settings.aws_access_key_id:
        return
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()
    hadoop.set("fs.s3a.access.key", settings.aws_access_key_id.get_secret_value())
    hadoop.set("fs.s3a.secret.key", settings.aws_secret_access_key.get_secret_value())
    hadoop.set("fs.s3a.aws.credentials.provider", SIMPLE_CREDENTIALS)
    log.info("S3 credentials set in the driver's Hadoop configuration for the executors of %s", settings.spark_master)


def checkpoint(df: "DataFrame", settings: Settings, *, eager: bool = True) -> "DataFrame":
    """`df` cut from its lineage, partitioning kept (Mechanism Y's state and weights); computed now when `eager`,
    else by the first job that needs it (no job of its own on a cold JVM).

    With a local master, `localCheckpoint`: blocks in this process's executor, the fastest. On a cluster those
    blocks die with their executor and every later batch would fail; a reliable checkpoint writes files under
    SPARK_CHECKPOINT_DIR (shared storage, e.g. s3a://), which outlive any executor.
    """
    return df.localCheckpoint(eager=eager) if settings.spark_local else df.checkpoint(eager=eager)


CLASS_ARCHIVE_DIR = Path("spark") / "class-archive"
BUILD_LOCK = ".build.lock"  # held by the one build under way in a class-archive directory


def class_archive(settings: Settings) -> Path:
    """Where the driver JVM's class archive (AppCDS) for this Java, Spark and class path lives under DATA_DIR.

    The name is a key of what the archive was made for: another Java, pyspark, jar set or driver class path
    names another file, so a stale archive is never used (and the JVM itself ignores one it cannot map)."""
    from config.spark_config import DRIVER_JAVA_OPTIONS

    java = find_java() or ""
    real = os.path.realpath(java) if java else ""
    jars = pyspark_jars_dir()
    parts = [
        real,
        str(os.stat(real).st_mtime_ns) if real else "",
        *sorted(f"{j.name}:{j.stat().st_size}" for j in jars.glob("*.jar")),
        session_conf(settings, "key").get("spark.driver.extraClassPath", ""),
        DRIVER_JAVA_OPTIONS,
    ]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return settings.data_dir / CLASS_ARCHIVE_DIR / f"driver-{key}.jsa"


def class_archive_conf(settings: Settings) -> dict[str, str]:
    """The driver's Java option that maps the class archive, when `build_class_archive` has made one: the JVM then
    loads Spark's classes from it instead of parsing and verifying thousands of them from the jars (the session
    starts in about half the time, bench/README.md). Nothing when there is none (or the path has a space,
    which Spark's option splitting would break)."""
    from config.spark_config import JAVA_OPTIONS_KEY

    archive = class_archive(settings).resolve()
    if not archive.is_file() or " " in str(archive):
        return {}
    return {JAVA_OPTIONS_KEY: f"-XX:SharedArchiveFile={archive}"}


def build_class_archive(
    settings: Settings, exercise: Callable[["SparkSession"], None], *, timeout: float = 900
) -> Path:
    """Make the class archive of `class_archive` once: a session runs `exercise` (the product's Spark path), and
    its JVM writes the classes it loaded as it exits (`-XX:ArchiveClassesAtExit`) to a file of its own, renamed
    into place only once the JVM has exited cleanly. So a reader sees a whole archive or none; a crash leaves a
    `_tmp-<pid>.jsa` that the next build removes. One build at a time per directory (a lock file)."""
    import fcntl  # POSIX: imported here so that the rest of this module imports anywhere

    target = class_archive(settings)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / BUILD_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProcessorError(
                f"another build of the class archive is under way in {target.parent}; it ends on its own"
            ) from None
        if target.is_file():  # the build that held the lock has just made it
            return target
        return _build_class_archive(settings, exercise, target, timeout)


def _build_class_archive(
    settings: Settings, exercise: Callable[["SparkSession"], None], target: Path, timeout: float
) -> Path:
    from config.spark_config import JAVA_OPTIONS_KEY, launched_jvm

    for stale in target.parent.glob("_tmp-*.jsa"):
        if not _pid_alive(stale.stem.removeprefix("_tmp-")):
            stale.unlink(missing_ok=True)
    tmp = (target.parent / f"_tmp-{os.getpid()}.jsa").resolve()
    if " " in str(tmp):
        raise SettingsError(
            f"DATA_DIR {settings.data_dir} has a space, which a JVM option cannot hold: use a DATA_DIR without spaces"
        )
    spark = start_session(
        settings, "class-archive", extra_conf={JAVA_OPTIONS_KEY: f"-XX:ArchiveClassesAtExit={tmp} -Xlog:cds=error"}
    )
    jvm = launched_jvm(spark)
    if jvm is None:  # a JVM this process did not launch (spark-submit): it would write the archive on its own exit
        spark.stop()
        raise ProcessorError("build the class archive with `python -m src.mechanism_y.class_archive`, not spark-submit")
    try:
        exercise(spark)
    finally:
        spark.stop()
        jvm.stdin.close()  # the gateway exits on EOF of its stdin; the JVM writes the archive as it exits
    try:
        code = jvm.wait(timeout)
    except subprocess.TimeoutExpired:
        raise ProcessorError(f"the JVM did not finish writing the class archive {tmp} in {timeout:.0f} s") from None
    if code != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        raise ProcessorError(f"the JVM exited {code} without writing the class archive {tmp}")
    os.replace(tmp, target)
    for old in target.parent.glob("driver-*.jsa"):
        if old != target:
            old.unlink(missing_ok=True)  # made for another Java, Spark or class path: never used again
    return target


def class_archive_building(directory: Path) -> bool:
    """Whether a build of a class archive holds `directory`'s lock now (`build_class_archive`)."""
    import fcntl

    try:
        lock = open(directory / BUILD_LOCK, "rb")
    except FileNotFoundError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def start_session(
    settings: Settings, app_name: str = "transaction-processor", *, extra_conf: dict[str, str] | None = None
) -> "SparkSession":
    """The product's SparkSession (built by `config.spark_config.build_spark_session`); `extra_conf` is what
    the caller adds, e.g. the worker's JSON log layout (`src.observability.logs.spark_logging_conf`). The driver
    JVM maps the class archive of `build_class_archive` when there is one."""
    from config.spark_config import build_spark_session, merged_conf

    check_java()
    if settings.s3_bucket_name:
        prepare_s3a(settings)
    archive = {} if "ArchiveClassesAtExit" in str(extra_conf) else class_archive_conf(settings)
    if archive:
        log.info("the driver JVM maps the class archive %s", class_archive(settings))
    conf = merged_conf(merged_conf(session_conf(settings, app_name), archive), extra_conf)
    session = build_spark_session(settings, app_name, extra_conf=conf)
    share_credentials(session, settings)
    return session


class BackgroundSession:
    """`start_session` on a thread, begun at once: the caller does its own start-up work (PostgreSQL, the lake)
    while the JVM starts, which is most of a worker's start-up. The session is built off the main thread, so
    PySpark leaves the main thread's SIGINT handler (the worker's stop handler) alone."""

    WAIT_SLICE_S = 0.2  # how often `wait` looks at the stop request while the JVM starts

    def __init__(
        self, settings: Settings, app_name: str = "transaction-processor", *, extra_conf: dict[str, str] | None = None
    ) -> None:
        self._session: SparkSession | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._discarded = False
        self._thread = threading.Thread(
            target=self._start, args=(settings, app_name, extra_conf), name="spark-start", daemon=True
        )
        self._thread.start()

    def _start(self, settings: Settings, app_name: str, extra_conf: dict[str, str] | None) -> None:
        t0 = time.perf_counter()
        try:
            session = start_session(settings, app_name, extra_conf=extra_conf)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
            self._error = exc
            return
        with self._lock:
            self._session = session
            discarded = self._discarded
        if discarded:  # the caller gave up while the JVM started: nobody will ever use it
            session.stop()
            return
        log.info("Spark session started in %.1f s, beside the rest of the start-up", time.perf_counter() - t0)

    def started(self) -> bool:
        """Has the start finished (up, or failed: `wait` says which)? Never blocks."""
        return not self._thread.is_alive()

    def wait(self, stop: threading.Event | None = None) -> "SparkSession | None":
        """The session once it is up; None as soon as `stop` is set while the JVM is still starting (a stop
        request must not wait for a whole session start). The start's own error (no Java, bad settings...)
        is raised here."""
        while self._thread.is_alive():
            if stop is not None and stop.is_set():
                return None
            self._thread.join(self.WAIT_SLICE_S)
        if self._error is not None:
            raise self._error
        if self._session is None:
            raise ProcessorError("the Spark session did not start (see the log above)")
        return self._session

    def discard(self) -> None:
        """After the caller's start-up failed or was stopped: stop the session, now if it is up, else as soon as it
        is (by the starting thread), without waiting for it."""
        with self._lock:
            self._discarded = True
            session = self._session
        if session is not None:
            session.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m src.utils.spark_utils",
        description="Fetch hadoop-aws (matching pyspark's Hadoop) and its AWS SDK into DATA_DIR/ivy and print "
        "them as a SPARK_JARS value (copy the files to a machine without internet and point SPARK_JARS at them).",
    )
    parser.add_argument("command", choices=["fetch-jars"])
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        jars = fetch_hadoop_aws_jars(Settings.from_env())
    except ProcessorError as exc:
        return command_failed(exc)
    sys.stdout.write(",".join(str(j) for j in jars) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
