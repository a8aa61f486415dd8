"""An independent reference for SPEC §4, written in plain PostgreSQL over `transactions` and `customer_importance`.

It shares no code with `src.mechanism_y.pattern_detector`: it works from the raw rows (no running state),
takes means with numeric `avg`, and percentiles with `percentile_cont`. Tests compare the two as sets.

Prefixes: `where` is an SQL predicate over the transactions table aliased `t` (with `%s` placeholders filled
from `params`), so a replay can ask "what holds after chunk k" without copying tables, e.g.
`where="t.chunk_seq <= %s", params=(k,)` for one file, or `upto_chunk_id=k` for the product's global chunk
order (`chunks.seq`, from setup/create_missing_tables.sql).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

# Same slack as the product (see PERCENTILE_REL_TOL there): absorbs the few-ulp noise of q * (N - 1).
PERCENTILE_REL_TOL = 1e-13

_SQL = """
WITH tx AS (
    SELECT t.merchant, t.customer, t.gender, t.amount FROM transactions t WHERE {where}
), pairs AS (
    SELECT merchant, customer, count(*) AS n, avg(amount) AS mean_amount,
           bool_or(gender = 'F') AS has_f, bool_or(gender = 'M') AS has_m
    FROM tx GROUP BY merchant, customer
), merchants AS (
    SELECT merchant, sum(n) AS t,
           count(*) FILTER (WHERE has_f) AS f, count(*) FILTER (WHERE has_m) AS m
    FROM pairs GROUP BY merchant
), importance AS (
    SELECT source AS customer, target AS merchant, avg(weight) AS w
    FROM customer_importance GROUP BY source, target
), busy_pairs AS (
    SELECT p.merchant, p.customer, p.n::float8 AS n, i.w::float8 AS w
    FROM pairs p
    JOIN merchants m USING (merchant)
    LEFT JOIN importance i USING (merchant, customer)
    WHERE m.t > %(min_merchant_txns)s
), percentiles AS (
    SELECT merchant,
           percentile_cont(%(count_percentile)s::float8) WITHIN GROUP (ORDER BY n) AS p_n,
           percentile_cont(%(weight_percentile)s::float8) WITHIN GROUP (ORDER BY w) AS p_w
    FROM busy_pairs GROUP BY merchant
)
SELECT 'PatId1', b.customer, b.merchant
FROM busy_pairs b JOIN percentiles p USING (merchant)
WHERE b.n >= p.p_n - %(tol)s::float8 * abs(p.p_n) AND b.w <= p.p_w + %(tol)s::float8 * abs(p.p_w)
UNION ALL
SELECT 'PatId2', customer, merchant FROM pairs
WHERE mean_amount < %(max_avg_amount)s::numeric AND n >= %(min_txns)s
UNION ALL
SELECT 'PatId3', '', merchant FROM merchants
WHERE f < m AND f > %(min_female_customers)s
"""


def reference_detections(
    conn: Any,
    *,
    min_merchant_txns: int = 50_000,
    count_percentile: float = 0.9,
    weight_percentile: float = 0.1,
    max_avg_amount: float = 23,
    min_txns: int = 80,
    min_female_customers: int = 100,
    where: str | None = None,
    params: Sequence[Any] = (),
    upto_chunk_id: int | None = None,
) -> set[tuple[str, str, str]]:
    """{(pattern_id, customer_name, merchant_id)} whose §4 condition holds over the selected transactions."""
    predicates, args = ["TRUE"], []
    if where:
        predicates.append(f"({where})")
        args.extend(params)
    if upto_chunk_id is not None:
        predicates.append(
            "(t.source_file_id, t.chunk_seq) IN (SELECT c.file_id, c.chunk_seq FROM chunks c WHERE c.seq <= %s)"
        )
        args.append(upto_chunk_id)
    named = {
        "min_merchant_txns": min_merchant_txns,
        "count_percentile": float(count_percentile),
        "weight_percentile": float(weight_percentile),
        "max_avg_amount": Decimal(str(max_avg_amount)),
        "min_txns": min_txns,
        "min_female_customers": min_female_customers,
        "tol": PERCENTILE_REL_TOL,
    }
    # psycopg2 takes either positional or named placeholders, not both: inline the positional ones first.
    with conn.cursor() as cur:
        where_sql = cur.mogrify(" AND ".join(predicates), args).decode() if args else " AND ".join(predicates)
        sql = _SQL.format(where=where_sql.replace("%", "%%"))
        cur.execute(sql, named)
        return {(p, c, m) for p, c, m in cur.fetchall()}
