"""What Mechanism Y's metrics cost per chunk: the observations a worker makes for every chunk, timed in a loop.

Run it with PROMETHEUS_MULTIPROC_DIR set to an empty directory, as the supervisor sets it for its workers
(without it the observations stay in memory and are cheaper still):

    PROMETHEUS_MULTIPROC_DIR=$(mktemp -d) python bench/metrics_cost.py

The ledger counters, backlog and process figures are computed by the supervisor at scrape time, not per
chunk, so they are not part of this figure (see bench/README.md, "Observability on vs off").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from src.observability import metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Microseconds of metric observations per chunk in a worker.")
    parser.add_argument("--rounds", type=int, default=20_000, help="chunks to simulate (default 20000)")
    args = parser.parse_args(argv)
    mode = (
        "multiprocess files"
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        else "in memory (no PROMETHEUS_MULTIPROC_DIR)"
    )
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        metrics.observe_batch(0.1, 0.2, 0.3, 0.1)
        metrics.observe_chunk_latency(0.8)
    per_chunk = (time.perf_counter() - t0) / args.rounds
    print(f"metrics per chunk  {per_chunk * 1e6:.1f} us  ({args.rounds:,} rounds, {mode})")
    print(f"  of a 0.8 s chunk {per_chunk / 0.8 * 100:.4f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
