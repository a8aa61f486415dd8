"""The three patterns of SPEC §4 as pure DataFrame transforms over Mechanism Y's running state.

The state holds one row per (merchant, customer) seen so far (`state_spark_schema`): the patterns only
need n(c,m), the amount sum and whether c ever paid m as gender F or M, so a chunk is folded into the state
with `chunk_delta` + `merge_state` and the whole history is never re-read. Nothing here reads, writes,
collects or talks to a database: the caller owns I/O and decides what is new.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pyspark.sql import functions as F

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

PATID1, PATID2, PATID3 = "PatId1", "PatId2", "PatId3"
ACTION_TYPES = {PATID1: "UPGRADE", PATID2: "CHILD", PATID3: "DEI-NEEDED"}
DETECTION_COLUMNS = ("pattern_id", "action_type", "customer_name", "merchant_id")

# Floating-point noise allowance when comparing with a percentile. Both Spark and PostgreSQL place the
# percentile at position q * (N - 1) computed in doubles; for some q (0.7, 0.55, ...; never 0.9 or 0.1 below
# two million customers) that lands a few ulps off an integer, the engines then interpolate with a fraction
# of ~1e-16 and a customer exactly at the percentile falls out by one ulp. A relative slack of 1e-13 is
# hundreds of ulps above that noise and far below any real gap between two distinct values of n or w.
PERCENTILE_REL_TOL = 1e-13

_STATE_KEYS = ("merchant", "customer")


def thresholds_from_settings(settings: Any) -> dict[str, Any]:
    """The keyword arguments of `detect_all` taken from `config.config.Settings`."""
    return {
        "min_merchant_txns": settings.patid1_min_merchant_txns,
        "count_percentile": settings.patid1_count_percentile,
        "weight_percentile": settings.patid1_weight_percentile,
        "max_avg_amount": settings.patid2_max_avg_amount,
        "min_txns": settings.patid2_min_txns,
        "min_female_customers": settings.patid3_min_female_customers,
    }


def aggregate_weights(importance: DataFrame) -> DataFrame:
    """Raw CustomerImportance rows (source, target, weight) -> one row per (customer, merchant).

    The file repeats (source, target) once per transaction type, so it must be reduced before any join
    or counts multiply. Sum and count (not the mean) are kept so the mean is taken once, in `_mean_weight`.
    """
    return importance.groupBy(F.col("source").alias("customer"), F.col("target").alias("merchant")).agg(
        F.sum("weight").cast("decimal(38,2)").alias("weight_sum"),
        F.count("weight").alias("weight_count"),
    )


# Each transform is one Spark SQL statement over its input DataFrames (`spark.sql(query, state=df)`): the
# plan is parsed and analysed once, where a chain of DataFrame calls re-analyses the growing plan at every
# step. Per chunk that is the difference between ~50 ms and ~300 ms of planning. Thresholds are bound as
# literals through `_lit`, never pasted from untrusted text.

_DELTA_SQL = """
SELECT merchant, customer, count(1) AS n, CAST(sum(amount) AS DECIMAL(38,2)) AS amount_sum,
       max(gender = 'F') AS has_f, max(gender = 'M') AS has_m
FROM {chunk} GROUP BY merchant, customer
"""

_MERGE_SQL = """
SELECT merchant, customer, sum(n) AS n, CAST(sum(amount_sum) AS DECIMAL(38,2)) AS amount_sum,
       bool_or(has_f) AS has_f, bool_or(has_m) AS has_m
FROM (SELECT merchant, customer, n, amount_sum, has_f, has_m FROM {state}
      UNION ALL
      SELECT merchant, customer, n, amount_sum, has_f, has_m FROM {delta})
GROUP BY merchant, customer
"""

# T(m), F(m), M(m) in one aggregate, shared by PatId1 and PatId3.
_TOTALS = "SELECT merchant, sum(n) AS t, count_if(has_f) AS f, count_if(has_m) AS m FROM {state} GROUP BY merchant"

# w(c,m) as a double via a 20-decimal exact quotient: dividing doubles would give two customers with the
# same mean (0.90/3 and 0.30/1) values one ulp apart, and a tie at the percentile would then split.
_MEAN_WEIGHT = "CAST(CAST(w.weight_sum AS DECIMAL(20,2)) / CAST(w.weight_count AS DECIMAL(20,0)) AS DOUBLE)"

_PATID1_CTE = f"""
totals AS ({_TOTALS}),
busy AS (SELECT merchant FROM totals WHERE t > {{min_t}}),
pairs AS (
  SELECT s.merchant, s.customer, s.n, {_MEAN_WEIGHT} AS w
  FROM {{state}} s
  JOIN busy b ON s.merchant = b.merchant
  LEFT JOIN {{weights}} w ON w.merchant = s.merchant AND w.customer = s.customer
),
scored AS (
  SELECT merchant, customer, n, w,
         percentile(CAST(n AS DOUBLE), {{q_n}}) OVER (PARTITION BY merchant) AS p_n,
         percentile(w, {{q_w}}) OVER (PARTITION BY merchant) AS p_w
  FROM pairs
)"""

_PATID1_WHERE = "n >= p_n - {tol} * abs(p_n) AND w <= p_w + {tol} * abs(p_w)"
_PATID2_WHERE = "n >= {min_n} AND amount_sum < {max_avg} * CAST(n AS DECIMAL(20,0))"
_PATID3_WHERE = "f < m AND f > {min_f}"


def _lit(value: Any) -> str:
    """A numeric threshold as a SQL literal (decimals stay exact)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise TypeError(f"threshold {value!r} is not a number")
    if isinstance(value, int):
        return str(value)
    return f"CAST('{Decimal(str(value))}' AS DECIMAL(38,18))" if isinstance(value, Decimal) else repr(float(value))


def _sql(df: DataFrame, query: str, **frames: DataFrame) -> DataFrame:
    return df.sparkSession.sql(query, **frames)


def chunk_delta(chunk: DataFrame) -> DataFrame:
    """Clean chunk rows (customer, merchant, gender, amount) -> their contribution to the state."""
    return _sql(chunk, _DELTA_SQL, chunk=chunk)


def merge_state(state: DataFrame, delta: DataFrame) -> DataFrame:
    """Fold a chunk's delta into the state; associative, so the order of merges does not matter."""
    return _sql(state, _MERGE_SQL, state=state, delta=delta)


def _params(**kw: Any) -> dict[str, str]:
    return {k: _lit(v) for k, v in kw.items()}


def patid1_upgrade(
    state: DataFrame,
    weights: DataFrame,
    *,
    min_merchant_txns: int = 50_000,
    count_percentile: float = 0.9,
    weight_percentile: float = 0.1,
) -> DataFrame:
    """PatId1: at merchants with T(m) > min, customers in the top decile by count and bottom decile by weight.

    Merchants are filtered on T first, so the weights join and the percentile window only touch the large
    merchants. Percentiles are Spark's exact, linearly interpolated `percentile` over a window partitioned
    by merchant; a customer without an importance row has a null w, which the weight percentile ignores and
    which never satisfies `w <= P`.
    """
    p = _params(
        min_t=min_merchant_txns, q_n=float(count_percentile), q_w=float(weight_percentile), tol=PERCENTILE_REL_TOL
    )
    query = (
        f"WITH {_PATID1_CTE.format(**p, state='{state}', weights='{weights}')} "
        f"SELECT customer AS customer_name, merchant AS merchant_id FROM scored WHERE {_PATID1_WHERE.format(**p)}"
    )
    return _sql(state, query, state=state, weights=weights)


def patid2_child(state: DataFrame, *, max_avg_amount: float = 23, min_txns: int = 80) -> DataFrame:
    """PatId2: mean amount below the limit with at least `min_txns` transactions, compared exactly in decimal."""
    where = _PATID2_WHERE.format(**_params(min_n=min_txns, max_avg=Decimal(str(max_avg_amount))))
    return _sql(
        state, f"SELECT customer AS customer_name, merchant AS merchant_id FROM {{state}} WHERE {where}", state=state
    )


def patid3_dei_needed(state: DataFrame, *, min_female_customers: int = 100) -> DataFrame:
    """PatId3: merchants with more than `min_female_customers` female customers, yet fewer female than male."""
    where = _PATID3_WHERE.format(**_params(min_f=min_female_customers))
    return _sql(
        state, f"SELECT '' AS customer_name, merchant AS merchant_id FROM ({_TOTALS}) WHERE {where}", state=state
    )


def detect_all(
    state: DataFrame,
    weights: DataFrame,
    *,
    min_merchant_txns: int = 50_000,
    count_percentile: float = 0.9,
    weight_percentile: float = 0.1,
    max_avg_amount: float = 23,
    min_txns: int = 80,
    min_female_customers: int = 100,
) -> DataFrame:
    """Every (pattern, customer, merchant) whose condition holds on this state; deciding what is new is the caller's.

    One statement, so the three patterns share one scan of the state and one merchant aggregate.
    """
    p = _params(
        min_t=min_merchant_txns,
        q_n=float(count_percentile),
        q_w=float(weight_percentile),
        tol=PERCENTILE_REL_TOL,
        min_n=min_txns,
        max_avg=Decimal(str(max_avg_amount)),
        min_f=min_female_customers,
    )
    query = f"""
WITH {_PATID1_CTE.format(**p, state="{state}", weights="{weights}")}
SELECT '{PATID1}' AS pattern_id, '{ACTION_TYPES[PATID1]}' AS action_type,
       customer AS customer_name, merchant AS merchant_id
FROM scored WHERE {_PATID1_WHERE.format(**p)}
UNION ALL
SELECT '{PATID2}', '{ACTION_TYPES[PATID2]}', customer, merchant FROM {{state}} WHERE {_PATID2_WHERE.format(**p)}
UNION ALL
SELECT '{PATID3}', '{ACTION_TYPES[PATID3]}', '', merchant FROM totals WHERE {_PATID3_WHERE.format(**p)}
"""
    return _sql(state, query, state=state, weights=weights)
