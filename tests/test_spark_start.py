"""The start of the driver's session (src/utils/spark_utils.py): a stop request during the JVM's start is not held up
by it (`BackgroundSession`), and the class archive is mapped only when it was made for this Java and Spark (and,
end to end, that the command that builds it makes one a real session then maps), and that the driver JVM runs
with the flags of `config.spark_config.DRIVER_JAVA_OPTIONS`.

The JVM start is replaced by a stand-in that blocks until the test lets it finish: what is under test is the
waiting and discarding around it, which must not depend on how long a real start takes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from config.config import Settings
from src.utils import spark_utils


class _Session:
    def __init__(self) -> None:
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopped.set()


@pytest.fixture
def slow_start(monkeypatch, tmp_path):
    """A `start_session` that returns a session only once `release` is set."""
    release = threading.Event()
    made: list[_Session] = []

    def start(settings, app_name, *, extra_conf=None):
        release.wait(60)
        made.append(_Session())
        return made[-1]

    monkeypatch.setattr(spark_utils, "start_session", start)
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, dotenv=Path("/nonexistent"))
    return settings, release, made


def test_wait_returns_on_stop_while_the_jvm_starts_and_discard_stops_it_later(slow_start):
    settings, release, made = slow_start
    background = spark_utils.BackgroundSession(settings)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    assert background.wait(stop) is None
    assert time.monotonic() - t0 < 30  # the start itself would have waited 60 s
    assert not made  # returned before the session existed
    background.discard()  # must not wait for the start either
    release.set()
    background._thread.join(30)
    assert made and made[0].stopped.wait(30)  # the starting thread stopped the session nobody will use


def test_wait_returns_the_session_once_up_and_raises_the_starts_error(slow_start, monkeypatch):
    settings, release, made = slow_start
    release.set()
    background = spark_utils.BackgroundSession(settings)
    session = background.wait(threading.Event())
    assert session is made[0] and not session.stopped.is_set()
    background.discard()
    assert session.stopped.is_set()

    def broken(settings, app_name, *, extra_conf=None):
        raise spark_utils.ProcessorError("no Java here")

    monkeypatch.setattr(spark_utils, "start_session", broken)
    with pytest.raises(spark_utils.ProcessorError, match="no Java here"):
        spark_utils.BackgroundSession(settings).wait()


def test_no_background_build_when_off_built_already_under_way_or_on_a_cluster(tmp_path, caplog):
    """`BackgroundBuild` starts nothing with SPARK_CLASS_ARCHIVE=off, under spark-submit, with a cluster master (the
    archive is the local driver's), when the archive exists, or while another build holds the directory's lock;
    a directory it cannot write to is a warning, not a failure of Y."""
    import fcntl

    from src.mechanism_y.background_archive import BackgroundBuild

    def started(enabled: bool = True, **env: str) -> bool:
        settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data"), **env}, dotenv=Path("/nonexistent"))
        build = BackgroundBuild(settings)
        build.enabled = enabled
        build.run_while_idle()
        try:
            return build.proc is not None
        finally:
            build.stop()

    assert Settings.from_env({}, dotenv=Path("/nonexistent")).spark_class_archive == "auto"
    assert not started(SPARK_CLASS_ARCHIVE="off")
    for setting, how in (("auto", "the first time it has been idle for 30 s"), ("off", "SPARK_CLASS_ARCHIVE=off")):
        settings = Settings.from_env(
            {"DATA_DIR": str(tmp_path / "data"), "SPARK_CLASS_ARCHIVE": setting}, dotenv=Path("/nonexistent")
        )
        with caplog.at_level(logging.INFO, logger="src.mechanism_y.background_archive"):
            caplog.clear()
            BackgroundBuild(settings).log_missing()
        assert [r.getMessage() for r in caplog.records if how in r.getMessage()], caplog.text
    assert not started(False, SPARK_CLASS_ARCHIVE="auto")  # Y's JVM came from spark-submit: nothing would map it
    assert not started(SPARK_CLASS_ARCHIVE="auto", SPARK_MASTER="spark://127.0.0.1:7077", LOCAL_LAKE_SHARED="true")
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data")}, dotenv=Path("/nonexistent"))
    directory = spark_utils.class_archive(settings).parent
    directory.mkdir(parents=True)
    with open(directory / spark_utils.BUILD_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert spark_utils.class_archive_building(directory)
        assert not started(SPARK_CLASS_ARCHIVE="auto")
    assert not spark_utils.class_archive_building(directory)
    (directory / "build.log").mkdir()  # its output cannot be written: Y goes on, says why, and tries no more
    with caplog.at_level(logging.WARNING, logger="src.mechanism_y.background_archive"):
        caplog.clear()
        assert not started(SPARK_CLASS_ARCHIVE="auto")
    assert "the class archive build could not start" in caplog.text and "build.log" in caplog.text
    (directory / "build.log").rmdir()
    spark_utils.class_archive(settings).write_bytes(b"made for this Java and Spark")
    assert not started(SPARK_CLASS_ARCHIVE="auto")
    with caplog.at_level(logging.INFO, logger="src.mechanism_y.background_archive"):
        caplog.clear()
        BackgroundBuild(settings).log_missing()
        spark_utils.class_archive(settings).unlink()
        BackgroundBuild(settings).log_missing()
    assert caplog.text.count("no class archive") == 1  # only once the archive is gone


def test_a_stopped_y_kills_its_background_build_with_the_jvm(tmp_path):
    """`stop` (Y stopping) ends the build's whole process group at once and frees the lock; the outcome is then
    not reported as a failure, since nothing failed."""
    from src.mechanism_y.background_archive import BackgroundBuild

    settings = Settings.from_env(
        {"DATA_DIR": str(tmp_path / "data"), "SPARK_CLASS_ARCHIVE": "auto"}, dotenv=Path("/nonexistent")
    )
    build = BackgroundBuild(settings)
    build.run_while_idle()
    assert build.proc is not None
    pgid = build.proc.pid
    time.sleep(3)  # into the build: the lock held, the JVM starting
    build.pause()
    build.stop()
    assert not _group_states(pgid)
    assert build.poll() is None and build.proc is None
    assert not spark_utils.class_archive_building(spark_utils.class_archive(settings).parent)
    assert not spark_utils.class_archive(settings).exists()


def test_the_class_archive_is_mapped_only_when_built_for_this_java_and_spark(tmp_path):
    """`start_session` adds `-XX:SharedArchiveFile` only for an archive under DATA_DIR whose name is the key of
    this Java, Spark and class path; another key's file (an older Java or Spark) is never passed to the JVM."""
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, dotenv=Path("/nonexistent"))
    archive = spark_utils.class_archive(settings)
    assert archive.parent == tmp_path / "spark" / "class-archive"
    assert spark_utils.class_archive_conf(settings) == {}
    archive.parent.mkdir(parents=True)
    stale = archive.with_name("driver-0000000000000000.jsa")
    stale.write_bytes(b"made for another Java")
    assert spark_utils.class_archive_conf(settings) == {}
    archive.write_bytes(b"stand-in: the JVM checks the content itself and ignores an archive it cannot map")
    conf = spark_utils.class_archive_conf(settings)
    assert conf == {"spark.driver.extraJavaOptions": f"-XX:SharedArchiveFile={archive.resolve()}"}
    other = Settings.from_env({"DATA_DIR": str(tmp_path), "SPARK_JARS": str(archive)}, dotenv=Path("/nonexistent"))
    assert spark_utils.class_archive(other) == archive  # SPARK_JARS only matters with a bucket (driver class path)


def test_the_driver_jvm_compiles_with_c1_only_and_collects_with_the_parallel_collector(spark):
    """The product's session (`start_session`; SPARK_DRIVER_JIT=auto in a session that does not run until stopped)
    hands the driver JVM the flags of `DRIVER_JAVA_OPTIONS` and C1 only, and the JVM runs with them: its collectors
    are the parallel ones, not G1 (the default on a machine this size), and the flags are among its own arguments
    (bench/README.md, "yplan"). The tiered compilers of the daemon's Y: `test_the_background_build_pauses_...` below."""
    from config.spark_config import DRIVER_JAVA_OPTIONS, JAVA_OPTIONS_KEY

    assert "-XX:+UseParallelGC" in DRIVER_JAVA_OPTIONS.split()
    flags = {"-XX:TieredStopAtLevel=1", *DRIVER_JAVA_OPTIONS.split()}
    assert flags <= set(spark.sparkContext.getConf().get(JAVA_OPTIONS_KEY).split())
    management = spark.sparkContext._jvm.java.lang.management.ManagementFactory
    collectors = {bean.getName() for bean in management.getGarbageCollectorMXBeans()}
    assert collectors == {"PS Scavenge", "PS MarkSweep"}
    arguments = set(management.getRuntimeMXBean().getInputArguments())
    assert flags <= arguments and "-XX:+TieredCompilation" not in arguments


_MAPS_THE_ARCHIVE = """
import sys
from pathlib import Path
from config.config import Settings
from src.utils.spark_utils import start_session
log = sys.argv[1]
spark = start_session(
    Settings.from_env(dotenv=Path("/nonexistent")),
    "check",
    extra_conf={"spark.driver.extraJavaOptions": f"-Xlog:class+load=info:file={log}"},
)
spark.range(3).count()
arguments = spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments()
print("jit flags:", " ".join(sorted(a for a in arguments if "Tiered" in a)))
spark.stop()
"""


def _members_of_group(pgid: int, field: int = 0) -> dict[int, str]:
    """{pid: state (R, S, T, ...)} of the live processes of process group `pgid`, from /proc (`field` 16: their nice
    values instead), read once: a process leaving the group between two reads cannot make them disagree."""
    members = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members[int(pid)] = fields[field]
    return members


def _group_states(pgid: int, field: int = 0) -> list[str]:
    return list(_members_of_group(pgid, field).values())


def _builder_state(pgid: int) -> str:
    return Path(f"/proc/{pgid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _jvm_states(pgid: int) -> set[str]:
    """The states of the build's processes other than the builder (the group's leader, `pgid`): its JVM. Empty once
    the build has ended."""
    return {state for pid, state in _members_of_group(pgid).items() if pid != pgid}


_PAUSED_BUILD_OF_A_PARENT = """
import sys, time
from pathlib import Path
from config.config import Settings
from src.mechanism_y.background_archive import BackgroundBuild, _group_members

build = BackgroundBuild(Settings.from_env({"DATA_DIR": sys.argv[1], "SPARK_CLASS_ARCHIVE": "auto"},
                                          dotenv=Path("/nonexistent")))
build.run_while_idle()
while len(_group_members(build.proc.pid)) < 2:
    time.sleep(0.1)
build.pause()
print(build.proc.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_y_leaves_no_paused_build_behind(tmp_path):
    """A Y killed outright (SIGKILL: no `stop`) while its build's JVM is paused: the builder gets its parent-death
    signal and ends its whole group, the stopped JVM included, so nothing is left holding memory and the lock."""
    root = Path(__file__).resolve().parent.parent
    parent = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_BUILD_OF_A_PARENT, str(tmp_path / "data")],
        cwd=root,
        env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pgid = int(parent.stdout.readline())
        time.sleep(0.5)
        assert _jvm_states(pgid) == {"T"}
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while _group_states(pgid):
        assert time.monotonic() < deadline, f"the build outlived its parent: {_group_states(pgid)}"
        time.sleep(0.2)
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data")}, dotenv=Path("/nonexistent"))
    assert not spark_utils.class_archive_building(spark_utils.class_archive(settings).parent)


@pytest.mark.slow
def test_the_background_build_pauses_for_chunks_and_makes_an_archive_that_the_next_session_maps(tmp_path):
    """What an idle Y starts (`BackgroundBuild`, SPARK_CLASS_ARCHIVE=auto): `python -m src.mechanism_y.class_archive`
    (README) in a process group of its own at nice 19. `pause` stops its JVM (the builder waits on it) and
    `run_while_idle` resumes it; the archive lands under its key's name, the outcome is reported once, nothing
    temporary is left, and a session started afterwards loads Spark's classes from it (the JVM's class loading
    log names the archive's top layer as their source), without being told anything but DATA_DIR, whichever its
    compilers (SPARK_DRIVER_JIT: the archive is built under C1 only, the daemon's Y compiles with C1 and C2)."""
    from src.mechanism_y.background_archive import BackgroundBuild

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in {"SPARK_MASTER", "PYSPARK_SUBMIT_ARGS"}}
    env.update(DATA_DIR=str(tmp_path / "data"), SPARK_LOCAL_IP="127.0.0.1", LOG_FORMAT="text")
    settings = Settings.from_env({**env, "SPARK_CLASS_ARCHIVE": "auto"}, dotenv=Path("/nonexistent"))
    archive = spark_utils.class_archive(settings)
    build = BackgroundBuild(settings)
    build.run_while_idle()
    assert build.proc is not None
    pgid = build.proc.pid
    try:
        deadline = time.monotonic() + 300
        while len(_group_states(pgid)) < 2:  # the builder's JVM has started
            assert build.proc.poll() is None, (archive.parent / "build.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert set(_group_states(pgid, 16)) == {"19"}  # nice, the JVM too
        build.pause()
        time.sleep(0.5)
        assert _jvm_states(pgid) == {"T"} and _builder_state(pgid) != "T", _group_states(pgid)
        assert spark_utils.class_archive_building(archive.parent)  # a second Y would not start another build
        build.run_while_idle()
        deadline = time.monotonic() + 1200
        while build.poll() is None:
            assert time.monotonic() < deadline, "the background build did not end in 20 min"
            assert "T" not in _jvm_states(pgid)
            time.sleep(0.5)
    finally:
        build.stop()
    assert build.proc is None and not _group_states(pgid)
    assert "class archive ready: " + str(archive) in (archive.parent / "build.log").read_text()
    assert archive.is_file() and archive.stat().st_size > 10 * 2**20
    assert sorted(p.name for p in archive.parent.iterdir()) == sorted([archive.name, ".build.lock", "build.log"])
    assert not spark_utils.class_archive_building(archive.parent)
    again = BackgroundBuild(settings)
    again.run_while_idle()
    assert again.proc is None  # built: nothing more to do

    loads = tmp_path / "class-load.log"
    mapped = subprocess.run(
        [sys.executable, "-c", _MAPS_THE_ARCHIVE, str(loads)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    sources = loads.read_text(errors="replace")
    assert "source: shared objects file (top)" in sources, "no class came from the dynamic archive"
    assert "org.apache.spark.SparkContext source: shared objects file (top)" in sources
    assert "jit flags: -XX:TieredStopAtLevel=1" in mapped.stdout

    # The archive, built under C1 only, serves the daemon's Y too, which compiles with C1 and C2 (SPARK_DRIVER_JIT).
    loads.unlink()
    tiered = subprocess.run(
        [sys.executable, "-c", _MAPS_THE_ARCHIVE, str(loads)],
        cwd=root,
        env={**env, "SPARK_DRIVER_JIT": "tiered"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert tiered.returncode == 0, tiered.stderr[-3000:]
    assert "jit flags: -XX:+TieredCompilation" in tiered.stdout
    assert "org.apache.spark.SparkContext source: shared objects file (top)" in loads.read_text(errors="replace")
