"""A real Spark standalone cluster on 127.0.0.1: one master and N workers from the installed pyspark.

The standalone cluster manager ships inside the pip `pyspark` package (`bin/spark-class ...deploy.master.Master`
and `...deploy.worker.Worker`), so nothing is downloaded. Each daemon runs in its own process group, so
`kill_worker(i)` takes the worker down with the executor JVM and Python workers it launched, as when a machine
dies. The standard library only, so both the tests (`tests/spark_cluster.py`, its pytest fixture) and the
benchmarks (`bench/detect.py --master loopback`) start it without importing pytest or the tests' conftest.

    cluster = SparkCluster(root)  # root: a directory of its own (logs, work dirs, SPARK_CONF_DIR)
    cluster.start()               # master + WORKERS workers, back when they are ALIVE
    cluster.master_url            # spark://127.0.0.1:<port>
    cluster.alive_workers()       # the workers the master sees ALIVE
    cluster.kill_worker(0)        # SIGKILL worker 0 and its executors
    cluster.stop()
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

WORKERS = 2
WORKER_CORES = 1
WORKER_MEMORY = "768m"  # room for one executor of EXECUTOR_MEMORY
EXECUTOR_MEMORY = "512m"
DAEMON_MEMORY = "256m"  # the master's and workers' own heap
START_TIMEOUT = 180.0  # generous: a busy 2-core machine starts a JVM in seconds, not minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (process group, whole command line) of every process (from /proc: `ps` may cut long lines)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out[int(entry.name)] = (os.getpgid(int(entry.name)), args)
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile
    return out


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


@dataclass
class SparkCluster:
    root: Path
    master_port: int = field(default_factory=free_port)
    master_ui_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    @property
    def conf_dir(self) -> Path:
        """A SPARK_CONF_DIR whose spark-defaults.conf sizes executors for the workers (pass it to drivers)."""
        return self.root / "conf"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SPARK_"))}
        env.update(
            SPARK_HOME=str(spark_home()),
            SPARK_LOCAL_IP="127.0.0.1",
            SPARK_DAEMON_MEMORY=DAEMON_MEMORY,
            SPARK_CONF_DIR=str(self.conf_dir),
            SPARK_LOG_DIR=str(self.root / "logs"),
            SPARK_WORKER_DIR=str(self.root / "work"),
            SPARK_NO_DAEMONIZE="1",
        )
        return env

    def _launch(self, name: str, args: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        try:
            self.procs[name] = subprocess.Popen(
                [str(spark_home() / "bin" / "spark-class"), *args],
                env=self._env(),
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill_worker takes its executors along
            )
        finally:
            log.close()

    def start(self, workers: int = WORKERS) -> None:
        for d in ("logs", "work", "conf"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "spark-defaults.conf").write_text(
            f"spark.executor.memory {EXECUTOR_MEMORY}\n"
            f"spark.executor.cores {WORKER_CORES}\n"
            f"spark.cores.max {workers * WORKER_CORES}\n"
        )
        self._launch(
            "master",
            ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.master_port),
             "--webui-port", str(self.master_ui_port)],
        )  # fmt: skip
        for i in range(workers):
            work = self.root / "work" / f"worker-{i}"
            work.mkdir(parents=True, exist_ok=True)
            self._launch(
                f"worker-{i}",
                ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--port", "0",
                 "--webui-port", str(free_port()), "--cores", str(WORKER_CORES), "--memory", WORKER_MEMORY,
                 "--work-dir", str(work), self.master_url],
            )  # fmt: skip
        self.wait_for_workers(workers)

    def state(self) -> dict:
        """The master's own view (its web UI's JSON)."""
        url = f"http://127.0.0.1:{self.master_ui_port}/json"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)

    def alive_workers(self) -> list[dict]:
        try:
            workers = self.state().get("workers", [])
        except (OSError, ValueError):  # not up yet; or up, but its UI answers /json with the HTML page for a while
            return []
        return [w for w in workers if w.get("state") == "ALIVE"]

    def wait_for_workers(self, n: int, timeout: float = START_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in self.killed:
                    raise AssertionError(f"spark {name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
            if len(self.alive_workers()) >= n:
                return
            time.sleep(0.5)
        raise AssertionError(f"{n} workers not registered within {timeout:.0f}s:\n{self.log('master')[-3000:]}")

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def executor_pids(self, worker: int) -> list[int]:
        """Executor JVMs launched by worker `worker` (in its process group)."""
        pgid = self.procs[f"worker-{worker}"].pid
        return [
            pid
            for pid, (group, args) in processes().items()
            if group == pgid and "CoarseGrainedExecutorBackend" in args
        ]

    def executor_log(self, worker: int) -> str:
        return "\n".join(
            log.read_text(errors="replace")
            for log in sorted((self.root / "work" / f"worker-{worker}").glob("app-*/*/stderr"))
        )

    def running_tasks(self, worker: int) -> dict[int, tuple[int, int]]:
        """Tasks running right now on worker `worker`'s executor, as TID -> (task index, stage), from Spark's own
        INFO lines `Running task 1.0 in stage 7.0 (TID 15)` until `Finished task ... (TID 15)`."""
        running: dict[int, tuple[int, int]] = {}
        for line in self.executor_log(worker).splitlines():
            started = re.search(r"Running task (\d+)\.\d+ in stage (\d+)\.\d+ \(TID (\d+)\)", line)
            if started:
                running[int(started.group(3))] = (int(started.group(1)), int(started.group(2)))
                continue
            tid = re.search(r"\(TID (\d+)\)", line)
            if tid and re.search(r"Finished task|killed task|Exception in task", line, re.IGNORECASE):
                running.pop(int(tid.group(1)), None)
        return running

    def kill_worker(self, i: int) -> None:
        """SIGKILL worker `i` with everything it launched (its executor and Python workers): a machine lost."""
        name = f"worker-{i}"
        self.killed.add(name)
        try:
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[name].wait(timeout=30)

    def stop(self) -> None:
        """Workers first, then the master: TERM, a deadline, then KILL, each process group by its own id."""
        names = [n for n in self.procs if n != "master"] + (["master"] if "master" in self.procs else [])
        for name in names:
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for name in names:
            proc = self.procs[name]
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            try:  # executors left behind by a worker that did not take them down
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
