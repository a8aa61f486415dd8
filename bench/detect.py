"""End-to-end run of `python main.py --drain` on the embedded default: wall time, latency, backlog, memory.

    python bench/detect.py                   # 594,643-row sample, CHUNK_INTERVAL_SECONDS=0
    python bench/detect.py --rows 3000000    # does the latency stay flat as history grows?
    python bench/detect.py --interval 1      # the default pace: does Y keep up?

Everything lives in a temporary directory (DATA_DIR, LOCAL_INBOX_DIR, LOCAL_LAKE_DIR), with the
sample (generated once into bench/out/) copied into its inbox, so the run starts from nothing.
The wall time runs from the start of `python main.py --drain` to its exit: Python and Spark
start-up, the embedded PostgreSQL, X and Y included. Memory (RSS) is sampled every 0.2 s with
psutil for the supervisor, for X's and Y's process trees (Spark's JVM is a child of Y's Python
process) and for the embedded PostgreSQL's processes. Chunk figures come from the ledger after
the run: latency is `chunks.processed_at - chunks.written_at` (recorded by X -> its detections
committed by Y); the backlog is computed from the same timestamps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ingest import IMPORTANCE, TRANSACTIONS, sample_dir  # noqa: E402
from src.sample_data import DEFAULT_ROWS, DEFAULT_SEED  # noqa: E402

SAMPLE_EVERY = 0.2
MIB = 1024 * 1024
# Targets of issue 3 (2-core machine).
TARGET_WALL_S = 40.0
TARGET_P95_S = 1.0
TARGET_DRIFT = 1.3
TARGET_RSS_MIB = 3 * 1024
TARGET_BACKLOG = 2


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class MemorySampler(threading.Thread):
    """Peak RSS per role, and the peak of their sum, sampled every SAMPLE_EVERY seconds."""

    def __init__(self, supervisor: psutil.Process, pgdata: Path) -> None:
        super().__init__(daemon=True)
        self.supervisor = supervisor
        self.pgdata = str(pgdata)
        self.stop = threading.Event()
        self.peak: dict[str, int] = {"supervisor": 0, "mechanism X": 0, "mechanism Y (+ Spark JVM)": 0}
        self.peak["embedded PostgreSQL"] = 0
        self.peak_total = 0
        self.samples = 0

    def _postgres(self) -> list[psutil.Process]:
        """The embedded server's postmaster (found by its data directory) and its children."""
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                if p.info["name"] in ("postgres", "postmaster") and self.pgdata in " ".join(cmd):
                    return [p, *p.children(recursive=True)]
            except psutil.Error:
                continue
        return []

    def sample(self) -> None:
        now = {key: 0 for key in self.peak}
        try:
            now["supervisor"] = self.supervisor.memory_info().rss
            for child in self.supervisor.children():
                cmd = " ".join(child.cmdline())
                if "src.mechanism_x" in cmd:
                    now["mechanism X"] += _tree_rss(child)
                elif "src.mechanism_y" in cmd:
                    now["mechanism Y (+ Spark JVM)"] += _tree_rss(child)
        except psutil.Error:
            return
        for p in self._postgres():
            try:
                now["embedded PostgreSQL"] += p.memory_info().rss
            except psutil.Error:
                pass
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        self.peak_total = max(self.peak_total, sum(now.values()))
        self.samples += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(SAMPLE_EVERY)


def read_ledger(pgdata: Path, db: str) -> list[tuple[int, datetime, datetime | None, int | None]]:
    """(seq, written_at, processed_at, new detections) for every chunk, through pgserver on the run's data."""
    import warnings

    warnings.filterwarnings("ignore", module="platformdirs")
    import pgserver
    import psycopg2

    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    base, _, query = server.get_uri().partition("?")
    conn = psycopg2.connect(base.rsplit("/", 1)[0] + "/" + db + (f"?{query}" if query else ""))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT seq, written_at, processed_at, y_new_detections FROM chunks ORDER BY seq")
            chunks = cur.fetchall()
            cur.execute("SELECT pattern_id, count(*) FROM pattern_detections GROUP BY 1 ORDER BY 1")
            detections = cur.fetchall()
    finally:
        conn.close()
        server.cleanup()
    return chunks, detections


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation, as numpy's default."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def backlog(chunks: list[tuple]) -> tuple[int, int]:
    """Max chunks written and not yet processed: at each processed time, and at each write (incl. that chunk)."""
    written = sorted(c[1] for c in chunks)
    processed = sorted(c[2] for c in chunks)

    def outstanding(t: datetime, *, at_write: bool) -> int:
        n_written = sum(1 for w in written if w <= t)
        n_processed = sum(1 for p in processed if (p < t if at_write else p <= t))
        return n_written - n_processed

    after_processing = max(outstanding(p, at_write=False) for p in processed)
    at_write = max(outstanding(w, at_write=True) for w in written)
    return after_processing, at_write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/detect.py",
        description="Wall time, per-chunk latency, backlog and peak RSS of `python main.py --drain` (embedded).",
    )
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="sample size (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sample seed (default %(default)s)")
    parser.add_argument(
        "--interval", type=float, default=0.0, help="CHUNK_INTERVAL_SECONDS for X (default %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--log", type=Path, help="write the daemon's output here (default: a temp file)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    sample = sample_dir(args.rows, args.seed)
    work = Path(tempfile.mkdtemp(prefix="tp-bench-detect-"))
    inbox, data = work / "inbox", work / "data"
    inbox.mkdir()
    for name in (IMPORTANCE, TRANSACTIONS):
        shutil.copy2(sample / name, inbox / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "GDRIVE_", "AWS_", "TP_"))}
    env.update(
        {
            "DATA_DIR": str(data),
            "LOCAL_INBOX_DIR": str(inbox),
            "LOCAL_LAKE_DIR": str(work / "lake"),
            "CHUNK_INTERVAL_SECONDS": str(args.interval),
            "S3_BUCKET_NAME": "",
            "POSTGRES_HOST": "",
            "GDRIVE_FOLDER_ID": "",
            "SPARK_LOCAL_IP": env.get("SPARK_LOCAL_IP", "127.0.0.1"),
        }
    )
    db_name = env.get("POSTGRES_DB") or "transactions"
    log_path = args.log or work / "daemon.log"
    print(
        f"running python main.py --drain on {args.rows:,} rows, CHUNK_INTERVAL_SECONDS={args.interval:g}, in {work}",
        flush=True,
    )
    try:
        with open(log_path, "wb") as log_file:
            started = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "main.py", "--drain"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
            sampler = MemorySampler(psutil.Process(proc.pid), data / "postgres")
            sampler.start()
            try:
                code = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                code = proc.wait(30)
                print(f"timed out after {args.timeout:.0f} s")
            wall = time.perf_counter() - started
            sampler.stop.set()
            sampler.join()
        if code != 0:
            print(f"python main.py --drain exited with {code}; last lines of {log_path}:")
            print("\n".join(Path(log_path).read_text(errors="replace").splitlines()[-30:]))
            return 1
        chunks, detections = read_ledger(data / "postgres", db_name)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    done = [c for c in chunks if c[1] is not None and c[2] is not None]
    if not done:
        print(f"no processed chunk in the ledger ({len(chunks)} chunks recorded)")
        return 1
    latencies = [(c[2] - c[1]).total_seconds() for c in done]
    med, p95 = statistics.median(latencies), percentile(latencies, 0.95)
    first10, last10 = statistics.median(latencies[:10]), statistics.median(latencies[-10:])
    drift = last10 / first10 if first10 > 0 else float("inf")
    after_processing, at_write = backlog(done)
    # Y commits a batch of chunks at once (one processed_at). Y's own time per batch, queueing left out:
    # from when its last chunk was written and the previous batch committed, to its commit.
    batches: list[list[tuple]] = []
    for c in done:
        if batches and batches[-1][0][2] == c[2]:
            batches[-1].append(c)
        else:
            batches.append([c])
    service = [
        (b[0][2] - max([max(c[1] for c in b)] + ([batches[i - 1][0][2]] if i else []))).total_seconds()
        for i, b in enumerate(batches)
    ]
    sizes = [len(b) for b in batches]
    span = (max(c[2] for c in done) - min(c[1] for c in done)).total_seconds()

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    total = sum(sampler.peak.values())
    # The wall-time and p95 targets of issue 3 are for the 594,643-row sample at full speed.
    reference_run = args.rows == DEFAULT_ROWS and args.interval == 0
    lines = [
        f"run             python main.py --drain, {args.rows:,} rows, CHUNK_INTERVAL_SECONDS={args.interval:g}",
        f"wall time       {wall:.1f} s, Spark start included"
        + (f"  (target <= {TARGET_WALL_S:.0f} s: {verdict(wall <= TARGET_WALL_S)})" if reference_run else ""),
        f"chunks          {len(done)} processed of {len(chunks)} recorded; first write -> last processed {span:.1f} s",
        f"detections      {', '.join(f'{p}: {n}' for p, n in detections) or 'none'}",
        f"latency         written_at -> processed_at: median {med:.3f} s, p95 {p95:.3f} s, max {max(latencies):.3f} s"
        + (f"  (target p95 <= {TARGET_P95_S:.1f} s: {verdict(p95 <= TARGET_P95_S)})" if reference_run else ""),
        f"  first 10      median {first10:.3f} s",
        f"  last 10       median {last10:.3f} s, {drift:.2f}x the first 10"
        + (
            f"  (target <= {TARGET_DRIFT}x: {verdict(drift <= TARGET_DRIFT)})"
            if args.interval > 0
            else "  (at interval 0 this is queueing behind X, not growth: see the batch times)"
        ),
        f"Y batches       {len(batches)} commits of 1-{max(sizes)} chunks (median {statistics.median(sizes):g}); "
        f"time per batch, queueing left out: median {statistics.median(service):.3f} s, "
        f"p95 {percentile(service, 0.95):.3f} s, max {max(service):.3f} s",
        f"  per chunk     {sum(service) / len(done):.3f} s on average (sum of batch times / chunks)",
        f"backlog         max {after_processing} chunk(s) waiting when Y finishes a chunk; "
        f"max {at_write} outstanding right after a write (incl. that chunk)"
        + (
            f"  (target <= {TARGET_BACKLOG}: {verdict(after_processing <= TARGET_BACKLOG)})"
            if args.interval >= 1
            else ""
        ),
        f"peak RSS        sampled every {SAMPLE_EVERY} s ({sampler.samples} samples)",
        *(f"  {name:<26}{value / MIB:>8,.0f} MiB" for name, value in sampler.peak.items()),
        f"  {'sum of the peaks':<26}{total / MIB:>8,.0f} MiB",
        f"  {'peak of the sum':<26}{sampler.peak_total / MIB:>8,.0f} MiB"
        f"  (target < {TARGET_RSS_MIB / 1024:.0f} GiB: {verdict(sampler.peak_total / MIB < TARGET_RSS_MIB)})",
    ]
    print("\n".join(["", "== bench/detect.py " + "=" * 60, *lines, "=" * 79]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
