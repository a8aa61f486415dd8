"""Mechanism Y's background build of the driver JVM's class archive (SPARK_CLASS_ARCHIVE=auto).

The archive and the command that builds it are `src.mechanism_y.class_archive`; this is how Y runs that command
in the time it would spend idle, never beside a batch or the start-up the archive is there to shorten.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from config.config import Settings
from src.utils.spark_utils import class_archive, class_archive_building

log = logging.getLogger(__name__)

BUILD_LOG = "build.log"  # the background build's output, beside the archive
BUILD_DRIVER_MEMORY = "512m"  # the build runs a 1,000-row made-up chunk: a small heap, beside Y's own JVM
IDLE_BEFORE_BUILD_S = 30.0  # Y idle this long (nothing waiting): the build may take the machine's spare time


class BackgroundBuild:
    """The class archive built by a child process in the time Y would spend idle (SPARK_CLASS_ARCHIVE=auto).

    `run_while_idle` is called once Y has had nothing to do for `IDLE_BEFORE_BUILD_S`: it starts the build the
    first time (unless the archive exists, another build holds the directory's lock, the setting is off, or the
    master is not local: the archive is the driver's, and a cluster's driver is wherever spark-submit runs),
    and resumes a paused one after that. `pause` (a chunk is waiting) stops the build's JVM (and whatever else
    the builder started) with SIGSTOP, so the build never takes CPU from a batch or from the start-up it is
    there to shorten; the builder's own Python process keeps running, waiting on its JVM.

    The builder (`python -m src.mechanism_y.class_archive --background`) runs at nice 19 in a process group of
    its own with a 512 MB driver, its output in `build.log` beside the archive, and ends its whole group, a
    stopped JVM included, when its parent dies (a Y killed outright leaves nothing behind). `poll` logs the
    outcome once; `stop` (Y stopping) kills the group: a build cut short leaves a `_tmp-<pid>.jsa` that the
    next build removes, and a later idle spell builds again."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # False when Y's JVM was not launched by Y (spark-submit): nothing Y could build would be mapped.
        self.enabled = True
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self._started = 0.0
        self._asked = False

    def log_missing(self) -> None:
        """At Y's start: say so when there is no archive for this Java and Spark yet, and how one comes."""
        if not self.enabled or not self.settings.spark_local or class_archive(self.settings).is_file():
            return
        how = (
            f"Y builds one the first time it has been idle for {IDLE_BEFORE_BUILD_S:.0f} s"
            if self.settings.spark_class_archive == "auto"
            else "SPARK_CLASS_ARCHIVE=off"
        )
        log.info(
            "no class archive for this Java and Spark yet, so this start loaded Spark's classes from the jars "
            "(seconds on a small machine): %s; `python -m src.mechanism_y.class_archive` builds one now",
            how,
            extra={"event": "class_archive_missing"},
        )

    def run_while_idle(self) -> None:
        """Y is idle: start the build (the first time one is wanted) or resume a paused one."""
        if self.proc is not None:
            self._signal(signal.SIGCONT, paused=False)
        elif not self._asked:
            self._asked = True
            self._start()

    def pause(self) -> None:
        """A chunk is waiting: stop the build where it is until Y is idle again."""
        self._signal(signal.SIGSTOP, paused=True)

    def _signal(self, sig: int, *, paused: bool) -> None:
        """`sig` to every process of the build's group but the builder itself (its JVM, stopped or continued)."""
        if self.paused == paused or self.proc is None:
            return
        for pid in _group_members(self.proc.pid):
            if pid != self.proc.pid:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        self.paused = paused

    def _start(self) -> None:
        if not self.enabled or self.settings.spark_class_archive != "auto" or not self.settings.spark_local:
            return
        if not Path("/proc/self/stat").is_file():  # pausing finds the build's JVM through /proc (Linux)
            return
        target = class_archive(self.settings)
        try:
            if not (target.is_file() or class_archive_building(target.parent)):
                self._spawn(target)
        except OSError as exc:  # DATA_DIR read-only or full, no Python to run: Y goes on without the archive
            log.warning(
                "the class archive build could not start (%s); Y runs without it. `python -m "
                "src.mechanism_y.class_archive` builds it by hand",
                exc,
                extra={"event": "class_archive_failed"},
            )

    def _spawn(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "SPARK_DRIVER_MEMORY": BUILD_DRIVER_MEMORY,
            "DATA_DIR": str(self.settings.data_dir.resolve()),
        }
        root = Path(__file__).resolve().parents[2]
        with open(target.parent / BUILD_LOG, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "src.mechanism_y.class_archive", "--background"],
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


def _group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (from /proc)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members
