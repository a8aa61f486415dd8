"""An independent reference for SPEC §2-§4: from the source CSV files to the chunk each detection belongs to.

It imports nothing from `src`, so a bug in the product's parsing, validation, lineage, chunk order or
pattern logic cannot pass on both sides. It parses the CSVs itself (quotes stripped, rows validated as
SPEC §2 says, in file order), cuts each file into chunks of BATCH_SIZE data rows in file order (a
quarantined row still takes its place in its chunk's row range, as X counts it), and computes the
detections with one plain SQL query in PostgreSQL over those rows: for every chunk boundary k in the
ledger order (files in the order given, then chunks), the conditions of §4 over all valid rows of chunks
<= k; a detection belongs to the first k where it holds.

    chunks, txns = read_transactions([inbox / "transactions.csv"], batch_size=250)
    importance = read_importance(inbox / "CustomerImportance.csv")
    found = expected_detections(conn, chunks, txns, importance, limits_of(settings))
    found[("PatId2", "C1", "M1")].chunk  # -> Chunk(position=3, file="transactions.csv", seq=3)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from psycopg2.extras import execute_values

TRANSACTION_HEADER = ("step", "customer", "age", "gender", "zipcodeOri", "merchant", "zipMerchant", "category")
TRANSACTION_HEADER += ("amount", "fraud")
IMPORTANCE_HEADER = ("Source", "Target", "Weight", "typeTrans", "fraud")
GENDERS = frozenset("MFEU")

# Both engines place a percentile at q * (N - 1) computed in doubles; for some q that lands a few ulps off an
# integer and a value sitting exactly on the percentile would fall out by one ulp. This slack absorbs it.
PERCENTILE_REL_TOL = 1e-13


@dataclass(frozen=True)
class Chunk:
    position: int  # in the ledger order: files in the order given, then chunks in file order
    file: str  # the source file's name
    seq: int  # the chunk's index within its file


@dataclass(frozen=True)
class Txn:
    chunk: int  # Chunk.position
    line: int
    customer: str
    merchant: str
    gender: str
    amount: Decimal


@dataclass(frozen=True)
class Expected:
    chunk: Chunk  # the first chunk after which the condition holds
    holds_at_end: bool  # whether it still holds after the last chunk


def limits_of(settings: Any) -> dict[str, Any]:
    """The thresholds of SPEC §6 read from a `config.config.Settings` (where their defaults live)."""
    return {
        "min_t": settings.patid1_min_merchant_txns,
        "q_n": float(settings.patid1_count_percentile),
        "q_w": float(settings.patid1_weight_percentile),
        "max_avg": Decimal(str(settings.patid2_max_avg_amount)),
        "min_n": settings.patid2_min_txns,
        "min_f": settings.patid3_min_female_customers,
    }


# ---------------------------------------------------------------- parsing (SPEC §2)


def _data_lines(path: Path, header: Sequence[str]) -> list[tuple[int, list[str]]]:
    """(line number, unquoted fields) of each non-blank data line; the header must match."""
    lines = path.read_bytes().decode("utf-8").removeprefix("\ufeff").split("\n")
    got = tuple(_fields(lines[0]))
    if got != tuple(header):
        raise ValueError(f"{path}: header {got} is not {header}")
    return [(i + 1, _fields(text)) for i, text in enumerate(lines) if i > 0 and text.strip()]


def _fields(line: str) -> list[str]:
    return [f.strip().strip("'").strip() for f in line.rstrip("\r").split(",")]


def _non_negative(text: str) -> Decimal | None:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() and value >= 0 else None


def _valid_transaction(f: list[str]) -> bool:
    if len(f) != len(TRANSACTION_HEADER):
        return False
    step, customer, _age, gender, _zo, merchant, _zm, _cat, amount, fraud = f
    return (
        step.isdigit()
        and customer != ""
        and gender in GENDERS
        and merchant != ""
        and _non_negative(amount) is not None
        and fraud in ("0", "1")
    )


def read_transactions(files: Sequence[Path], batch_size: int) -> tuple[list[Chunk], list[Txn]]:
    """The chunks of `files` (in this order) and their valid rows; invalid rows count in their chunk's range."""
    chunks: list[Chunk] = []
    txns: list[Txn] = []
    for path in files:
        rows = _data_lines(path, TRANSACTION_HEADER)
        first = len(chunks)
        chunks += [Chunk(first + i, path.name, i) for i in range(-(-len(rows) // batch_size))]
        for index, (line, f) in enumerate(rows):
            if _valid_transaction(f):
                txns.append(Txn(first + index // batch_size, line, f[1], f[5], f[3], Decimal(f[8])))
    return chunks, txns


def read_importance(path: Path) -> list[tuple[str, str, Decimal]]:
    """(Source = customer, Target = merchant, Weight) of every valid CustomerImportance row."""
    out = []
    for _line, f in _data_lines(path, IMPORTANCE_HEADER):
        if len(f) != len(IMPORTANCE_HEADER) or not f[0] or not f[1] or f[4] not in ("0", "1"):
            continue
        weight = _non_negative(f[2])
        if weight is not None:
            out.append((f[0], f[1], weight))
    return out


def inbox_files(inbox: Path) -> tuple[list[Path], Path]:
    """(transaction CSVs in ingest order: oldest modification first, then by name; the importance CSV)."""
    csvs = sorted(inbox.glob("*.csv"), key=lambda p: (os.stat(p).st_mtime, p.name))
    headers = {p: tuple(_fields(p.read_text(encoding="utf-8").split("\n", 1)[0].removeprefix("\ufeff"))) for p in csvs}
    (importance,) = [p for p in csvs if headers[p] == IMPORTANCE_HEADER]
    return [p for p in csvs if headers[p] == TRANSACTION_HEADER], importance


# ---------------------------------------------------------------- the patterns (SPEC §4), in PostgreSQL

# n, a, T, F, M, w, P_n, P_w at every chunk boundary k, straight from the rows of chunks <= k.
# Means are numeric `avg` (exact to 16+ decimals: a mean within 1e-16 of a limit needs 10^14 rows),
# percentiles `percentile_cont`, which ignores nulls (customers without an importance row).
_SQL = """
WITH boundary AS (
    SELECT generate_series(0, %(last)s) AS k
), pairs AS (
    SELECT b.k, t.merchant, t.customer, count(*) AS n, avg(t.amount) AS a,
           bool_or(t.gender = 'F') AS is_f, bool_or(t.gender = 'M') AS is_m
    FROM boundary b JOIN ref_transactions t ON t.chunk <= b.k
    GROUP BY b.k, t.merchant, t.customer
), merchants AS (
    SELECT k, merchant, sum(n) AS "T",
           count(*) FILTER (WHERE is_f) AS "F", count(*) FILTER (WHERE is_m) AS "M"
    FROM pairs GROUP BY k, merchant
), importance AS (
    SELECT customer, merchant, avg(weight)::float8 AS w FROM ref_importance GROUP BY customer, merchant
), pair_w AS (
    SELECT p.k, p.merchant, p.customer, p.n::float8 AS n, i.w
    FROM pairs p LEFT JOIN importance i USING (merchant, customer)
), percentiles AS (
    SELECT k, merchant,
           percentile_cont(%(q_n)s::float8) WITHIN GROUP (ORDER BY n) AS "P_n",
           percentile_cont(%(q_w)s::float8) WITHIN GROUP (ORDER BY w) AS "P_w"
    FROM pair_w GROUP BY k, merchant
), holds AS (
    SELECT 'PatId1' AS pattern, customer, merchant, k
    FROM pair_w JOIN merchants USING (k, merchant) JOIN percentiles USING (k, merchant)
    WHERE "T" > %(min_t)s
      AND n >= "P_n" - %(tol)s * abs("P_n") AND w <= "P_w" + %(tol)s * abs("P_w")
    UNION ALL
    SELECT 'PatId2', customer, merchant, k FROM pairs WHERE a < %(max_avg)s AND n >= %(min_n)s
    UNION ALL
    SELECT 'PatId3', '', merchant, k FROM merchants WHERE "F" < "M" AND "F" > %(min_f)s
)
SELECT pattern, customer, merchant, min(k), max(k) = %(last)s FROM holds GROUP BY pattern, customer, merchant
"""


def expected_detections(
    conn: Any,
    chunks: Sequence[Chunk],
    txns: Iterable[Txn],
    importance: Iterable[tuple[str, str, Decimal]],
    limits: Mapping[str, Any],
) -> dict[tuple[str, str, str], Expected]:
    """{(pattern_id, customer_name, merchant_id): its first chunk} over the ledger `chunks` (SPEC §4)."""
    if not chunks:
        return {}
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS ref_transactions, ref_importance")
        cur.execute(
            "CREATE TEMP TABLE ref_transactions (chunk int, line int, customer text, merchant text, gender text,"
            " amount numeric)"
        )
        cur.execute("CREATE TEMP TABLE ref_importance (customer text, merchant text, weight numeric)")
        execute_values(
            cur,
            "INSERT INTO ref_transactions VALUES %s",
            [(t.chunk, t.line, t.customer, t.merchant, t.gender, t.amount) for t in txns],
        )
        execute_values(cur, "INSERT INTO ref_importance VALUES %s", list(importance))
        cur.execute(_SQL, {**limits, "tol": PERCENTILE_REL_TOL, "last": len(chunks) - 1})
        found = {(p, c, m): Expected(chunks[k], end) for p, c, m, k, end in cur.fetchall()}
        cur.execute("DROP TABLE ref_transactions, ref_importance")
    return found


def credited_chunks(conn: Any) -> dict[tuple[str, str, str], Chunk]:
    """What the product credited each of its detections to, in the reference's terms (read from its ledger)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT d.pattern_id, d.customer_name, d.merchant_id, f.name, c.chunk_seq, "
            "(SELECT count(*) FROM chunks e WHERE e.seq < c.seq) FROM pattern_detections d "
            "JOIN chunks c ON c.seq = d.chunk_id JOIN source_files f ON f.file_id = c.file_id"
        )
        return {(p, c, m): Chunk(pos, name, seq) for p, c, m, name, seq, pos in cur.fetchall()}
