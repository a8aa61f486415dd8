"""The three patterns of SPEC §4 as pure DataFrame transforms over Mechanism Y's running state.

The state holds one row per (merchant, customer) seen so far (`state_spark_schema`): the patterns only
need n(c,m), the amount sum and whether c ever paid m as gender F or M, so chunks are folded into the state
with `fold_batch` (one or several chunks at once, each keeping its own boundary) and the whole history is
never re-read. Nothing here reads, writes, collects or talks to a database: the caller owns I/O and
decides what is new.
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


# Each transform is one Spark SQL statement over its input DataFrames (`spark.sql(query, state=df)`): the
# plan is parsed and analysed once, where a chain of DataFrame calls re-analyses the growing plan at every
# step. Per chunk that is the difference between ~50 ms and ~300 ms of planning. Thresholds are bound as
# literals through `_lit`, never pasted from untrusted text.

# w(c,m) as a double via a 20-decimal exact quotient: dividing doubles would give two customers with the
# same mean (0.90/3 and 0.30/1) values one ulp apart, and a tie at the percentile would then split.
_MEAN_WEIGHT = "CAST(CAST(w.weight_sum AS DECIMAL(20,2)) / CAST(w.weight_count AS DECIMAL(20,0)) AS DOUBLE)"

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


def _params(**kw: Any) -> dict[str, str]:
    return {k: _lit(v) for k, v in kw.items()}


def _one_pattern(found: DataFrame, pattern_id: str) -> DataFrame:
    return found.where(F.col("pattern_id") == pattern_id).select("customer_name", "merchant_id")


def patid1_upgrade(
    state: DataFrame,
    weights: DataFrame,
    *,
    min_merchant_txns: int = 50_000,
    count_percentile: float = 0.9,
    weight_percentile: float = 0.1,
) -> DataFrame:
    """PatId1: at merchants with T(m) > min, customers in the top decile by count and bottom decile by weight.

    Percentiles are Spark's exact, linearly interpolated `percentile` over a window partitioned by merchant
    (and cut); a customer without an importance row has a null w, which the weight percentile ignores and
    which never satisfies `w <= P`.
    """
    found = detect_all(
        state,
        weights,
        min_merchant_txns=min_merchant_txns,
        count_percentile=count_percentile,
        weight_percentile=weight_percentile,
    )
    return _one_pattern(found, PATID1)


def patid2_child(state: DataFrame, *, max_avg_amount: float = 23, min_txns: int = 80) -> DataFrame:
    """PatId2: mean amount below the limit with at least `min_txns` transactions, compared exactly in decimal."""
    found = detect_all(state, _no_weights(state), max_avg_amount=max_avg_amount, min_txns=min_txns)
    return _one_pattern(found, PATID2)


def patid3_dei_needed(state: DataFrame, *, min_female_customers: int = 100) -> DataFrame:
    """PatId3: merchants with more than `min_female_customers` female customers, yet fewer female than male."""
    found = detect_all(state, _no_weights(state), min_female_customers=min_female_customers)
    return _one_pattern(found, PATID3)


def _no_weights(state: DataFrame) -> DataFrame:
    from src.schemas.transaction_schemas import weights_spark_schema

    return state.sparkSession.createDataFrame([], schema=weights_spark_schema())


# A batch of K chunks (cuts 0..K-1, in ledger order) is folded and judged as if the chunks had come one
# by one. `versions` holds per (merchant, customer) the base row (cut -1) and one row per cut that touched
# the pair, each with the pair's cumulative values from its cut until the next (`cut_to`, exclusive). A
# condition on a pair or a merchant can only change at a cut where it has a version, so judging every
# version valid at some cut >= 0 judges every cut. Only PatId1 needs whole merchants per cut: the versions
# of a merchant whose T(m) exceeds the minimum by the end of the batch are expanded to the cuts they are
# valid at, then windowed by (merchant, cut); T only grows, so no other merchant can qualify.
#
# Everything is distributed by merchant once, when the rows enter the fold: every later aggregate, window
# and join is keyed by merchant plus something, so the fold costs one shuffle and detection none (the
# checkpointed versions keep their partitioning, and the weights are checkpointed the same way).
# Nested subqueries, not a WITH: Spark inlines CTEs with fresh attribute ids after analysis, and the
# checkpoint then records its partitioning under ids its output does not have (so it is lost).
_VERSIONS_SQL = """
SELECT merchant, customer, cut,
       lead(cut, 1, {k}) OVER (PARTITION BY merchant, customer ORDER BY cut) AS cut_to,
       n AS dn,
       sum(n) OVER (PARTITION BY merchant, customer ORDER BY cut
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS n,
       CAST(sum(amount_sum) OVER (PARTITION BY merchant, customer ORDER BY cut
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS DECIMAL(38,2)) AS amount_sum,
       bool_or(has_f) OVER (PARTITION BY merchant, customer ORDER BY cut
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS has_f,
       bool_or(has_m) OVER (PARTITION BY merchant, customer ORDER BY cut
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS has_m,
       coalesce(bool_or(has_f) OVER (PARTITION BY merchant, customer ORDER BY cut
                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false) AS had_f,
       coalesce(bool_or(has_m) OVER (PARTITION BY merchant, customer ORDER BY cut
                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false) AS had_m
FROM (
  SELECT cut, merchant, customer, sum(n) AS n, CAST(sum(amount_sum) AS DECIMAL(38,2)) AS amount_sum,
         bool_or(has_f) AS has_f, bool_or(has_m) AS has_m
  FROM (
    SELECT * FROM (
      SELECT -1 AS cut, merchant, customer, n, amount_sum, has_f, has_m FROM {state}
      UNION ALL
      SELECT cut, merchant, customer, 1, CAST(amount AS DECIMAL(38,2)), gender = 'F', gender = 'M' FROM {rows}
    ) DISTRIBUTE BY merchant
  ) GROUP BY cut, merchant, customer
)
"""

# One pass over the versions, without a shuffle: windows by merchant give T at the end of the batch and
# F, M at each step of the merchant; busy merchants' versions are expanded to the cuts they are valid at
# (j); the weights join is co-partitioned; a window by (merchant, j) gives T and the percentiles at j.
# Each row then yields the hits it proves: PatId1 at j, PatId2 for its own version, PatId3 once per
# merchant step (on the step's last row in (cut, customer) order, where the running F and M count the
# whole step and the next row's cut is the step's end); `j <= greatest(cut, 0)` picks one copy of an
# expanded row. The merchant windows share one ordering, so they cost one sort; their frames grow from
# the partition start (Spark re-aggregates a frame that ends at UNBOUNDED FOLLOWING for every row).
_BATCH_DETECT_SQL = f"""
WITH marked AS (
  SELECT merchant, customer, cut, cut_to, n, amount_sum,
         sum(CASE WHEN cut_to = {{k}} THEN n ELSE 0 END) OVER (PARTITION BY merchant ORDER BY cut, customer
             ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS t_end,
         sum(CASE WHEN has_f AND NOT had_f THEN 1 ELSE 0 END) OVER (PARTITION BY merchant ORDER BY cut, customer
             ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS f,
         sum(CASE WHEN has_m AND NOT had_m THEN 1 ELSE 0 END) OVER (PARTITION BY merchant ORDER BY cut, customer
             ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS m,
         lead(cut, 1) OVER (PARTITION BY merchant ORDER BY cut, customer) AS next_cut
  FROM {{versions}}
),
expanded AS (
  SELECT *, explode(CASE WHEN t_end > {{min_t}} THEN sequence(greatest(cut, 0), cut_to - 1) ELSE array(-1) END) AS j
  FROM marked WHERE cut_to > 0
),
pairs AS (
  SELECT /*+ MERGE(w) */ v.*, {_MEAN_WEIGHT} AS w
  FROM expanded v LEFT JOIN {{weights}} w ON w.merchant = v.merchant AND w.customer = v.customer
),
scored AS (
  SELECT *,
         sum(CASE WHEN j >= 0 THEN n END) OVER (PARTITION BY merchant, j) AS t,
         percentile(CASE WHEN j >= 0 THEN CAST(n AS DOUBLE) END, {{q_n}}) OVER (PARTITION BY merchant, j) AS p_n,
         percentile(CASE WHEN j >= 0 THEN w END, {{q_w}}) OVER (PARTITION BY merchant, j) AS p_w
  FROM pairs
),
hits AS (
  SELECT merchant, explode(filter(array(
           named_struct('p', '{PATID1}', 'c', customer, 'cut', j,
                        'ok', j >= 0 AND t > {{min_t}} AND {_PATID1_WHERE}),
           named_struct('p', '{PATID2}', 'c', customer, 'cut', greatest(cut, 0),
                        'ok', j <= greatest(cut, 0) AND {_PATID2_WHERE}),
           named_struct('p', '{PATID3}', 'c', '', 'cut', greatest(cut, 0),
                        'ok', j <= greatest(cut, 0) AND coalesce(next_cut, {{k}}) > greatest(cut, 0)
                              AND {_PATID3_WHERE})
         ), x -> x.ok)) AS h
  FROM scored
)
SELECT h.p AS pattern_id, h.c AS customer_name, merchant AS merchant_id, h.cut AS cut FROM hits
"""

_LATEST_SQL = "SELECT merchant, customer, n, amount_sum, has_f, has_m FROM {versions} WHERE cut_to = {k}"


def _thresholds(
    *,
    min_merchant_txns: int = 50_000,
    count_percentile: float = 0.9,
    weight_percentile: float = 0.1,
    max_avg_amount: float = 23,
    min_txns: int = 80,
    min_female_customers: int = 100,
) -> dict[str, str]:
    return _params(
        min_t=min_merchant_txns,
        q_n=float(count_percentile),
        q_w=float(weight_percentile),
        tol=PERCENTILE_REL_TOL,
        min_n=min_txns,
        max_avg=Decimal(str(max_avg_amount)),
        min_f=min_female_customers,
    )


def fold_batch(state: DataFrame, rows: DataFrame, cuts: int) -> DataFrame:
    """The versions of every (merchant, customer) over a batch of `cuts` chunks.

    `rows` are clean chunk rows (merchant, customer, gender, amount) with `cut` in [0, cuts): the position
    of their chunk in the batch. Feed the result to `detect_batch` and `latest_state`; checkpoint it first
    when both are wanted, so the fold is computed once.
    """
    if cuts < 1:
        raise ValueError(f"a batch has at least one cut, got {cuts}")
    return _sql(state, _VERSIONS_SQL.format(rows="{rows}", state="{state}", k=_lit(cuts)), state=state, rows=rows)


def latest_state(versions: DataFrame, cuts: int) -> DataFrame:
    """The state after the last cut of the batch (one row per pair, `state_spark_schema` columns)."""
    return _sql(versions, _LATEST_SQL.format(versions="{versions}", k=_lit(cuts)), versions=versions)


def detect_batch(versions: DataFrame, weights: DataFrame, cuts: int, **thresholds: Any) -> DataFrame:
    """Every (pattern, customer, merchant, cut) where a condition holds at a cut at which it may have changed.

    Columns: pattern_id, customer_name, merchant_id, cut. A key's first detection is its smallest cut
    (`first_hits`); conditions already holding on the base state are reported at cut 0. Which detections
    are new is the caller's decision.
    """
    p = _thresholds(**thresholds)
    query = _BATCH_DETECT_SQL.format(**p, k=_lit(cuts), versions="{versions}", weights="{weights}")
    return _sql(versions, query, versions=versions, weights=weights)


def detect_all(state: DataFrame, weights: DataFrame, **thresholds: Any) -> DataFrame:
    """Every (pattern, customer, merchant) whose condition holds on this state; deciding what is new is the caller's.

    The same statement as a batch, with no new rows and one cut: the state is judged as it stands.
    """
    from src.schemas.transaction_schemas import batch_rows_spark_schema

    spark = state.sparkSession
    no_rows = spark.createDataFrame([], schema=batch_rows_spark_schema())
    found = detect_batch(fold_batch(state, no_rows, 1), weights, 1, **thresholds)
    action = F.create_map(*[F.lit(x) for pair in ACTION_TYPES.items() for x in pair])[F.col("pattern_id")]
    return found.select("pattern_id", action.alias("action_type"), "customer_name", "merchant_id")


def by_merchant(df: DataFrame) -> DataFrame:
    """`df` hash-partitioned by merchant, as the fold leaves the versions: checkpoint the weights through this
    so that joining them to the versions needs no shuffle."""
    return _sql(df, "SELECT * FROM {frame} DISTRIBUTE BY merchant SORT BY merchant, customer", frame=df)


def first_hits(found: Any) -> dict[tuple[str, str, str], int]:
    """Collected `detect_batch` rows -> {(pattern_id, customer_name, merchant_id): first cut}."""
    first: dict[tuple[str, str, str], int] = {}
    for row in found:
        key = (row["pattern_id"], row["customer_name"], row["merchant_id"])
        if key not in first or row["cut"] < first[key]:
            first[key] = row["cut"]
    return first
