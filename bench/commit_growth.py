"""Mechanism Y's commit of one chunk as `transactions` grows, and what each row costs on disk.

    python bench/commit_growth.py [--rows 594643] [--seed S] [--sizes 0,3,10,30] [--commits 25]

Nothing in the daemon deletes clean rows from `transactions`, so over days it holds many more rows than Y's
state has pairs. This measures whether that slows the pipeline: an embedded PostgreSQL (pgserver) in a temporary
directory gets the product's schema (setup/*.sql) and `y_state` with the sample's pairs; then, for each size in
`--sizes` (millions of rows), `transactions` is filled up to it with copies of the sample under new file ids (its
key and indexes dropped during the fill and rebuilt after, as a restore would), and `--commits` chunks of 10,000
rows are staged and published the way Y's commit does (`ledger.publish_staged`: the rows into `transactions`, their
fold into `y_state`, the staging emptied, in one transaction). Printed per size: the commit's median (the first 5
left out: they warm the caches) and p90, and the table's heap and index bytes per row; at the end, the last size's
median against the first's (the anchor: the same commit on a small table, same server, same run).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ingest import TRANSACTIONS, sample_dir  # noqa: E402
from src import ledger  # noqa: E402
from src.sample_data import DEFAULT_ROWS, DEFAULT_SEED  # noqa: E402
from src.utils.db import SCHEMA_FILES  # noqa: E402

CHUNK_ROWS = 10_000
WARM = 5  # commits left out of the median
COLUMNS = (
    "source_file_id, source_line, chunk_seq, step, customer, age, gender, zipcode_ori, merchant, zip_merchant, "
    "category, amount, fraud"
)
SAMPLE_COLUMNS = "step, customer, age, gender, zipcode_ori, merchant, zip_merchant, category, amount, fraud"


def file_id(name: str) -> str:
    """An id shaped like a local inbox file's (src/utils/sources.py): its length is part of every row and key."""
    return "local-" + hashlib.sha256(name.encode()).hexdigest()[:16]


class Growth:
    def __init__(self, cur, rows: int) -> None:
        self.cur = cur
        self.sample_rows = rows
        self.filled = 0  # rows in transactions
        self.copies = 0  # copies of the sample loaded by `fill_to`
        self.seq = 0  # chunks published by `commits`

    def fill_to(self, target: int) -> None:
        """`transactions` up to `target` rows, copies of the sample under new file ids."""
        if target <= self.filled:
            return
        cur, started = self.cur, time.perf_counter()
        cur.execute("DROP INDEX IF EXISTS transactions_merchant_idx; DROP INDEX IF EXISTS transactions_customer_idx")
        cur.execute("ALTER TABLE transactions DROP CONSTRAINT IF EXISTS transactions_pkey")
        while self.filled < target:
            n = min(self.sample_rows, target - self.filled)
            cur.execute(
                f"INSERT INTO transactions ({COLUMNS}) SELECT %s, line, (line / {CHUNK_ROWS})::int, {SAMPLE_COLUMNS} "
                "FROM sample WHERE line <= %s",
                (file_id(f"prefill-{self.copies}"), n),
            )
            self.filled += n
            self.copies += 1
            print(f"  filling: {self.filled:,} of {target:,} rows", flush=True)
        # As setup/postgres_setup.sql declares them.
        cur.execute("ALTER TABLE transactions ADD PRIMARY KEY (source_file_id, source_line)")
        cur.execute("CREATE INDEX transactions_merchant_idx ON transactions (merchant)")
        cur.execute("CREATE INDEX transactions_customer_idx ON transactions (customer)")
        cur.execute("VACUUM ANALYZE transactions")
        print(f"  filled to {self.filled:,} rows in {time.perf_counter() - started:.0f} s", flush=True)

    def commits(self, count: int) -> list[float]:
        """Seconds of `count` commits of one chunk each, staged as X stages them."""
        cur, times = self.cur, []
        for _ in range(count):
            self.seq += 1
            first = 1 + (self.seq * CHUNK_ROWS) % (self.sample_rows - CHUNK_ROWS)
            cur.execute(
                "SELECT set_config('tp.staged_seq', %s, false), set_config('tp.staged_file', %s, false), "
                "set_config('tp.staged_chunk', %s, false)",
                (str(self.seq), file_id(f"live-{self.seq}"), str(self.seq)),
            )
            cur.execute(
                f"INSERT INTO staged_rows (source_line, {SAMPLE_COLUMNS}) SELECT line, {SAMPLE_COLUMNS} FROM sample "
                "WHERE line >= %s AND line < %s",
                (first, first + CHUNK_ROWS),
            )
            started = time.perf_counter()
            cur.execute("BEGIN")
            published = ledger.publish_staged(cur, [self.seq], [])
            cur.execute("COMMIT")
            times.append(time.perf_counter() - started)
            if published.get(self.seq, (0, None))[0] != CHUNK_ROWS:
                raise SystemExit(f"chunk {self.seq}: published {published}, expected {CHUNK_ROWS} rows")
            self.filled += CHUNK_ROWS
        return times

    def bytes_per_row(self) -> tuple[float, float]:
        self.cur.execute("SELECT pg_relation_size('transactions'), pg_indexes_size('transactions')")
        heap, indexes = self.cur.fetchone()
        return heap / self.filled, indexes / self.filled


def load_sample(cur, csv_path: Path) -> int:
    """The sample's rows, unquoted, numbered from 1, in an unlogged table `sample`; `y_state` with its pairs."""
    cur.execute(
        "CREATE UNLOGGED TABLE sample (step int, customer text, age text, gender text, zipcode_ori text, "
        "merchant text, zip_merchant text, category text, amount numeric(18,2), fraud smallint)"
    )
    with open(csv_path) as f:
        cur.copy_expert("COPY sample FROM STDIN WITH (FORMAT csv, HEADER true)", f)
    unquote = ", ".join(
        f"{c} = trim(both '''' FROM {c})"
        for c in ("customer", "age", "gender", "zipcode_ori", "merchant", "zip_merchant", "category")
    )
    cur.execute(f"UPDATE sample SET {unquote}")  # noqa: S608 - constant column names
    cur.execute("ALTER TABLE sample ADD COLUMN line bigserial")
    cur.execute(
        "INSERT INTO y_state SELECT merchant, customer, count(*), sum(amount), bool_or(gender = 'F'), "
        "bool_or(gender = 'M') FROM sample GROUP BY merchant, customer"
    )
    cur.execute("SELECT count(*) FROM sample")
    return cur.fetchone()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/commit_growth.py",
        description="Y's commit of one chunk as the transactions table grows (embedded PostgreSQL).",
    )
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="sample size (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sample seed (default %(default)s)")
    parser.add_argument(
        "--sizes", default="0,3,10,30", help="millions of rows in transactions to measure at (default %(default)s)"
    )
    parser.add_argument("--commits", type=int, default=25, help="commits per size (default %(default)s)")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    if args.commits <= WARM:
        parser.error(f"--commits must be above {WARM} (the first {WARM} warm the caches and are left out)")

    import pgserver
    import psycopg2

    sample = sample_dir(args.rows, args.seed)
    work = Path(tempfile.mkdtemp(prefix="tp-bench-growth-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # after pgserver's own handler has stopped it
    server = pgserver.get_server(work / "postgres", cleanup_mode="stop")
    conn = psycopg2.connect(server.get_uri())
    conn.autocommit = True
    results = []
    try:
        with conn.cursor() as cur:
            for name in SCHEMA_FILES:
                cur.execute((ROOT / name).read_text())
            rows = load_sample(cur, sample / TRANSACTIONS)
            if rows <= CHUNK_ROWS:
                raise SystemExit(f"the sample has {rows} rows: more than {CHUNK_ROWS} are needed")
            cur.execute("SELECT count(*) FROM y_state")
            pairs = cur.fetchone()[0]
            print(f"sample {sample / TRANSACTIONS}: {rows:,} rows, {pairs:,} (merchant, customer) pairs", flush=True)
            growth = Growth(cur, rows)
            for millions in sizes:
                growth.fill_to(int(millions * 1_000_000))
                times = growth.commits(args.commits)
                warm = sorted(times[WARM:])
                heap, indexes = growth.bytes_per_row()
                results.append(
                    (growth.filled, statistics.median(warm), warm[int(0.9 * (len(warm) - 1))], heap, indexes)
                )
                print(
                    f"  {growth.filled:>12,} rows: commit median {results[-1][1] * 1000:.0f} ms, "
                    f"p90 {results[-1][2] * 1000:.0f} ms",
                    flush=True,
                )
    finally:
        conn.close()
        server.cleanup()

    lines = [
        f"chunk           {CHUNK_ROWS:,} rows staged, then published in one transaction (ledger.publish_staged)",
        f"commits         {args.commits} per size, the first {WARM} left out of the figures",
    ]
    for filled, median, p90, heap, indexes in results:
        lines.append(
            f"transactions    {filled:>12,} rows: commit median {median * 1000:5.0f} ms, p90 {p90 * 1000:5.0f} ms; "
            f"heap {heap:.0f} B/row, key and indexes {indexes:.0f} B/row"
        )
    if len(results) > 1:
        lines.append(
            f"growth          median at {results[-1][0]:,} rows / at {results[0][0]:,} rows (same run): "
            f"{results[-1][1] / results[0][1]:.2f}x"
        )
    print("\n".join(["", "== bench/commit_growth.py " + "=" * 53, *lines, "=" * 79]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
