"""The three patterns of SPEC §4 as pure DataFrame transforms over Mechanism Y's running state.

The state holds one row per (merchant, customer) seen so far (`state_spark_schema`): the patterns only
need n(c,m), the amount sum and whether c ever paid m as gender F or M, so chunks are folded into the state
with `fold_batch` (one or several chunks at once, each keeping its own boundary) and the whole history is
never re-read. Nothing here reads, writes, collects or talks to a database: the caller owns I/O and
decides what is new.

Reading guide: `_DETECT_SQL` names the contract's quantities as columns (n, a, w, T, F, M, P_n, P_w) in
CTEs that say where each is computed, and its `conditions` CTE holds one boolean column per pattern,
written like §4's table. `_DETECT_WIDE_SQL` finds the same detections for large batches, in a shape whose work
grows less with the state (`WIDE_BATCH_CUTS`). Every statement is one `spark.sql` call: frames are passed as DataFrame
arguments (`{versions}`), thresholds as named parameters (`:min_t`), never pasted into the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pyspark.sql import DataFrame

PATID1, PATID2, PATID3 = "PatId1", "PatId2", "PatId3"
ACTION_TYPES = {PATID1: "UPGRADE", PATID2: "CHILD", PATID3: "DEI-NEEDED"}

# Floating-point noise allowance when comparing with a percentile. Both Spark and PostgreSQL place the
# percentile at position q * (N - 1) computed in doubles; for some q (0.7, 0.55, ...; never 0.9 or 0.1 below
# two million customers) that lands a few ulps off an integer, the engines then interpolate with a fraction
# of ~1e-16 and a customer exactly at the percentile falls out by one ulp. A relative slack of 1e-13 is
# hundreds of ulps above that noise and far below any real gap between two distinct values of n or w.
PERCENTILE_REL_TOL = 1e-13


@dataclass(frozen=True)
class Thresholds:
    """The numbers of SPEC §4's table. Their defaults live in `config.config.Settings` alone."""

    min_merchant_txns: int  # PatId1: T(m) > this
    count_percentile: float  # PatId1: n(c,m) >= P_q(n over m)
    weight_percentile: float  # PatId1: w(c,m) <= P_q(w over m)
    max_avg_amount: Decimal  # PatId2: a(c,m) < this (compared exactly, in decimal: amount_sum < this * n)
    min_txns: int  # PatId2: n(c,m) >= this
    min_female_customers: int  # PatId3: F(m) > this

    def __post_init__(self) -> None:
        for name in ("count_percentile", "weight_percentile"):
            q = getattr(self, name)
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
                raise ValueError(f"Thresholds.{name} must be a number in [0, 1], got {q!r}")
        if not isinstance(self.max_avg_amount, Decimal):
            raise TypeError(f"Thresholds.max_avg_amount must be a Decimal, got {self.max_avg_amount!r}")

    @classmethod
    def from_settings(cls, settings: Any) -> Thresholds:
        """The thresholds of `config.config.Settings` (SPEC §6), the amount limit as an exact decimal."""
        return cls(
            min_merchant_txns=settings.patid1_min_merchant_txns,
            count_percentile=settings.patid1_count_percentile,
            weight_percentile=settings.patid1_weight_percentile,
            max_avg_amount=Decimal(str(settings.patid2_max_avg_amount)),
            min_txns=settings.patid2_min_txns,
            min_female_customers=settings.patid3_min_female_customers,
        )

    def sql_args(self) -> dict[str, Any]:
        """The named parameters of `_DETECT_SQL`."""
        return {
            "min_t": int(self.min_merchant_txns),
            "q_n": float(self.count_percentile),
            "q_w": float(self.weight_percentile),
            "tol": PERCENTILE_REL_TOL,
            "max_avg": self.max_avg_amount,
            "min_n": int(self.min_txns),
            "min_f": int(self.min_female_customers),
        }


# A batch of K chunks (cuts 0..K-1, in ledger order) is folded and judged as if the chunks had come one
# by one. `versions` holds per (merchant, customer) the base row (cut -1) and one row per cut that touched
# the pair, each with the pair's cumulative values from its cut until the next (`cut_to`, exclusive). A
# condition on a pair or a merchant can only change at a cut where it has a version, so judging every
# version valid at some cut >= 0 judges every cut. Only PatId1 needs whole merchants per cut: the versions
# of a merchant whose T(m) exceeds the minimum by the end of the batch are expanded to the cuts they are
# valid at, then windowed by (merchant, cut); T only grows, so no other merchant can qualify.
#
# The fold exchanges the batch's rows alone: they are distributed by merchant and aggregated per (cut, merchant,
# customer), and the state (one row per pair, already hash-partitioned by merchant: checkpointed by
# `by_merchant` or by the previous fold) is united with them without a shuffle. Every later window and join is
# keyed by merchant plus something, so detection needs no shuffle either (the checkpointed versions keep their
# partitioning, and the weights are checkpointed the same way). Two things in Spark decide whether that holds
# (bench/README.md, "yfold"), both comparing attributes with `==`, which includes the qualifier (the name of the
# view or subquery an attribute was last read through), not just the id:
#   - a union keeps its children's partitioning only if each child's, mapped onto the first child's output,
#     equals the first child's own. The state's partitioning carries the qualifier of the statement that made it,
#     its output the qualifier of this one: so the rows come first, partitioned and read under one name.
#   - a checkpoint re-instanced with fresh ids (when its ids meet another relation of the same statement, as the
#     versions do the rows in Y's summary) keeps its partitioning only if the partitioning's attributes equal its
#     output's. Every subquery of the fold is named `fold`, so they do.
# Nested subqueries, not a WITH: Spark inlines CTEs with fresh attribute ids after analysis, and the
# checkpoint then records its partitioning under ids its output does not have (so it is lost).
#
# The pair windows lead with `pair_key`, a 64-bit hash of (merchant, customer): the same partitions (merchant
# and customer still decide them, so a collision changes nothing), but Spark's sort compares an 8-byte prefix of
# its first key before whole rows, and with merchant first (~50 values) that prefix tied on nearly every
# comparison, each then reading and comparing strings. The versions come out sorted by (pair_key, merchant,
# customer, cut), which the detection's join to the weights (`by_pair`) reuses (bench/README.md, "ysort").
_VERSIONS_SQL = """
SELECT merchant, customer, cut, pair_key,
       lead(cut, 1, :k) OVER pair_in_order AS cut_to,
       n AS dn,
       sum(n) OVER pair_so_far AS n,
       CAST(sum(amount_sum) OVER pair_so_far AS DECIMAL(38,2)) AS amount_sum,
       bool_or(has_f) OVER pair_so_far AS has_f,
       bool_or(has_m) OVER pair_so_far AS has_m,
       coalesce(bool_or(has_f) OVER pair_before, false) AS had_f,
       coalesce(bool_or(has_m) OVER pair_before, false) AS had_m
FROM (
  (SELECT cut, merchant, customer, xxhash64(merchant, customer) AS pair_key, count(*) AS n,
          CAST(sum(amount) AS DECIMAL(38,2)) AS amount_sum,
          bool_or(gender = 'F') AS has_f, bool_or(gender = 'M') AS has_m
   FROM (SELECT * FROM {rows} AS fold DISTRIBUTE BY merchant) AS fold
   GROUP BY cut, merchant, customer)
  UNION ALL
  SELECT -1 AS cut, merchant, customer, xxhash64(merchant, customer) AS pair_key, n, amount_sum, has_f, has_m
  FROM {state}
) AS fold
WINDOW pair_in_order AS (PARTITION BY pair_key, merchant, customer ORDER BY cut),
       pair_so_far AS (PARTITION BY pair_key, merchant, customer ORDER BY cut
                       ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
       pair_before AS (PARTITION BY pair_key, merchant, customer ORDER BY cut
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
"""

# One pass over the versions, without a shuffle. A version row is a pair (c, m) with its cumulative n(c,m) from `cut`
# until `cut_to`.
#   v_w    w(c,m) through a co-partitioned join (`by_pair` computed it when the weights were loaded). Keyed by
#          (pair_key, merchant, customer) on both sides, first: the versions and the weights are already sorted
#          that way, so this join sorts nothing.
#   F_M    windows by merchant in (cut, pair_key, customer) order: F(m), M(m) after each row (a step's last row,
#          `last_of_step`, holds the step's F and M), and T_end, T(m) after the batch. Any total order within a
#          cut would do; pair_key decides it without comparing the customer strings.
#   at_cut j, the cuts a row is judged at: every cut it is valid at for a merchant with T_end > min
#          (PatId1 judges whole merchants per cut), else once (j = -1).
#   T_P    windows by (merchant, j): T(m), P_n = P_q(n over m), P_w = P_q(w over m) at cut j.
#   conditions  SPEC §4's table, one column per pattern. PatId2's a(c,m) < x is decided as amount_sum < x * n
#          (n >= 1): exact in decimal, without a division per row.
# Each row then yields the hits it proves: PatId1 at j, PatId2 and PatId3 at the row's own cut
# (`j <= greatest(cut, 0)` picks one copy of an expanded row); conditions already holding on the base
# state count at cut 0. The merchant windows share one ordering, so they cost one sort; their frames grow
# from the partition start (Spark re-aggregates a frame that ends at UNBOUNDED FOLLOWING for every row).
_DETECT_SQL = """
WITH v_w AS (
  SELECT /*+ MERGE(importance) */ v.*, importance.w
  FROM {versions} v LEFT JOIN {weights} importance
    ON importance.pair_key = v.pair_key AND importance.merchant = v.merchant AND importance.customer = v.customer
),
F_M AS (
  SELECT merchant, customer, cut, cut_to, n, amount_sum, w,
         sum(CASE WHEN cut_to = :k THEN n ELSE 0 END) OVER merchant_whole AS T_end,
         sum(CASE WHEN has_f AND NOT had_f THEN 1 ELSE 0 END) OVER merchant_so_far AS F,
         sum(CASE WHEN has_m AND NOT had_m THEN 1 ELSE 0 END) OVER merchant_so_far AS M,
         coalesce(lead(cut, 1) OVER merchant_in_order, :k) > greatest(cut, 0) AS last_of_step
  FROM v_w
  WINDOW merchant_in_order AS (PARTITION BY merchant ORDER BY cut, pair_key, customer),
         merchant_so_far AS (PARTITION BY merchant ORDER BY cut, pair_key, customer
                             ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
         merchant_whole AS (PARTITION BY merchant ORDER BY cut, pair_key, customer
                            ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
),
at_cut AS (
  SELECT *, explode(CASE WHEN T_end > :min_t THEN sequence(greatest(cut, 0), cut_to - 1) ELSE array(-1) END) AS j
  FROM F_M WHERE cut_to > 0
),
T_P AS (
  SELECT *,
         sum(CASE WHEN j >= 0 THEN n END) OVER merchant_at_j AS T,
         percentile(CASE WHEN j >= 0 THEN CAST(n AS DOUBLE) END, :q_n) OVER merchant_at_j AS P_n,
         percentile(CASE WHEN j >= 0 THEN w END, :q_w) OVER merchant_at_j AS P_w
  FROM at_cut
  WINDOW merchant_at_j AS (PARTITION BY merchant, j)
),
conditions AS (
  SELECT merchant, customer, cut, j, last_of_step,
         T > :min_t AND n >= P_n - :tol * abs(P_n) AND w <= P_w + :tol * abs(P_w) AS PatId1,
         amount_sum < :max_avg * n AND n >= :min_n AS PatId2,
         F < M AND F > :min_f AS PatId3
  FROM T_P
),
hits AS (
  SELECT merchant, explode(filter(array(
           named_struct('p', 'PatId1', 'c', customer, 'cut', j, 'ok', j >= 0 AND PatId1),
           named_struct('p', 'PatId2', 'c', customer, 'cut', greatest(cut, 0), 'ok',
                        j <= greatest(cut, 0) AND PatId2),
           named_struct('p', 'PatId3', 'c', '', 'cut', greatest(cut, 0), 'ok',
                        j <= greatest(cut, 0) AND last_of_step AND PatId3)
         ), x -> x.ok)) AS h
  FROM conditions
)
SELECT h.p AS pattern_id, h.c AS customer_name, merchant AS merchant_id, h.cut AS cut FROM hits
"""

# The same detections for a large batch (`WIDE_BATCH_CUTS` cuts or more: Y catching up on a backlog), in a shape
# whose work grows less with the state. `_DETECT_SQL` sorts every version by merchant, then every row of the
# expansion by (merchant, j): with 100k pairs and 20 cuts that is over a million wide rows sorted per batch. Here
# nothing the size of the state or of the expansion is sorted; aggregates and joins are hashed, only rows of a few
# per merchant are windowed, and only the expansion is exchanged (`cells`). Its fixed cost (more branches, hash
# tables, tasks) makes it slower on small batches, so lone chunks keep the one pass (bench/README.md, "ydetect",
# "ywide"). Branches, each reading the versions (re-instanced with their partitioning, see the fold's note) without
# a shuffle:
#   steps       per merchant and step j (a cut; the base state, cut -1, joins step 0, which judges what already held
#               on it): T(m), F(m), M(m) after the step, cumulated over a hash aggregate of a few rows per merchant.
#               T adds up the versions' increments `dn` (a base row's is its n); F and M count the pairs whose first
#               F (M) payment falls in the step. T_end is T(m) after the batch; `first_step` picks one row per merchant.
#   qualifying  the merchants with T_end > min (T only grows: no other merchant can qualify at any cut).
#   big         their versions valid at some cut, with w(c,m) (through the same join that sorts nothing).
#   cells       `big` expanded to the cuts j each version is valid at, and distributed by (merchant, j): the only
#               exchange of the statement (each of its two readers exchanges the columns it reads). The versions are
#               partitioned by merchant, and a few merchants hold most of them (the qualifying ones, by definition):
#               without it one task did all of PatId1's work while the other cores waited (bench/README.md, "ywide").
#   P           per (merchant, j), hashed: T(m), P_n, P_w at cut j; joined back to `cells` on (merchant, j).
# PatId2 is judged on every version at its own cut, PatId3 on every step; a base row replaced at cut 0 (`cut_to` =
# 0) is never judged, its cut-0 version is.
_DETECT_WIDE_SQL = """
WITH steps AS (
  SELECT merchant, j,
         sum(dT) OVER merchant_so_far AS T,
         sum(dF) OVER merchant_so_far AS F,
         sum(dM) OVER merchant_so_far AS M,
         sum(dT) OVER merchant AS T_end,
         j = min(j) OVER merchant AS first_step
  FROM (SELECT merchant, greatest(cut, 0) AS j, sum(dn) AS dT,
               count_if(has_f AND NOT had_f) AS dF, count_if(has_m AND NOT had_m) AS dM
        FROM {versions} GROUP BY merchant, greatest(cut, 0))
  WINDOW merchant_so_far AS (PARTITION BY merchant ORDER BY j), merchant AS (PARTITION BY merchant)
),
big AS (
  SELECT /*+ MERGE(importance), SHUFFLE_HASH(qualifying) */ v.merchant, v.customer, v.cut, v.cut_to, v.n,
         importance.w
  FROM {versions} v
  LEFT JOIN {weights} importance
    ON importance.pair_key = v.pair_key AND importance.merchant = v.merchant AND importance.customer = v.customer
  JOIN (SELECT merchant FROM steps WHERE first_step AND T_end > :min_t) qualifying
    ON qualifying.merchant = v.merchant
  WHERE v.cut_to > 0
),
cells AS (
  SELECT /*+ REPARTITION(merchant, j) */ merchant, customer, n, w,
         explode(sequence(greatest(cut, 0), cut_to - 1)) AS j
  FROM big
),
P AS (
  SELECT merchant, j, sum(n) AS T, percentile(CAST(n AS DOUBLE), :q_n) AS P_n, percentile(w, :q_w) AS P_w
  FROM cells
  GROUP BY merchant, j
)
SELECT /*+ SHUFFLE_HASH(P) */ 'PatId1' AS pattern_id, cells.customer AS customer_name, cells.merchant AS merchant_id,
       cells.j AS cut
FROM cells JOIN P ON P.merchant = cells.merchant AND P.j = cells.j
WHERE P.T > :min_t AND cells.n >= P.P_n - :tol * abs(P.P_n) AND cells.w <= P.P_w + :tol * abs(P.P_w)
UNION ALL
SELECT 'PatId2', customer, merchant, greatest(cut, 0)
FROM {versions}
WHERE cut_to > 0 AND amount_sum < :max_avg * n AND n >= :min_n
UNION ALL
SELECT 'PatId3', '', merchant, j
FROM steps
WHERE F < M AND F > :min_f
"""

# From this many cuts a batch takes `_DETECT_WIDE_SQL`. Measured, detection alone (bench/README.md, "ywide"): at 2
# cuts the one pass is faster (0.51-0.56 s against 0.59-1.0 s at 20k pairs; its fixed cost is lower); at 5 cuts both
# take 0.68-0.77 s at 20k pairs, and the wide shape 1.34-1.51 s against 1.83-2.30 s at 80k pairs; at 10 and 20 cuts
# the wide shape is faster at every size measured. Paced chunks come in batches of 1-4.
WIDE_BATCH_CUTS = 5

_LATEST_SQL = "SELECT merchant, customer, n, amount_sum, has_f, has_m FROM {versions} WHERE cut_to = :k"

_BY_MERCHANT_SQL = "SELECT * FROM {frame} DISTRIBUTE BY merchant SORT BY merchant, customer"

# w(c,m), a 20-decimal exact quotient (0.90/3 and 0.30/1 must tie) turned into a double, computed once per load of
# the weights rather than for every version the detection joins them to, batch after batch.
_BY_PAIR_SQL = """
SELECT *, xxhash64(merchant, customer) AS pair_key,
       CAST(CAST(weight_sum AS DECIMAL(20,2)) / CAST(weight_count AS DECIMAL(20,0)) AS DOUBLE) AS w
FROM {frame}
DISTRIBUTE BY merchant SORT BY pair_key, merchant, customer
"""


def fold_batch(state: DataFrame, rows: DataFrame, cuts: int) -> DataFrame:
    """The versions of every (merchant, customer) over a batch of `cuts` chunks.

    `state` holds one row per (merchant, customer) (`state_spark_schema`), partitioned by merchant (`by_merchant`
    over `arrow_frame`, or `latest_state` of a checkpointed fold) so that only `rows` are shuffled; a state
    partitioned otherwise gives the same versions, at the cost of a shuffle of the whole state. `rows` are clean
    chunk rows (merchant, customer, gender, amount) with `cut` in [0, cuts): the position of their chunk in the
    batch. Feed the result to `detect_batch` and `latest_state`; checkpoint it first when both are wanted, so the
    fold is computed once.
    """
    if cuts < 1:
        raise ValueError(f"a batch has at least one cut, got {cuts}")
    return state.sparkSession.sql(_VERSIONS_SQL, args={"k": int(cuts)}, state=state, rows=rows)


def latest_state(versions: DataFrame, cuts: int) -> DataFrame:
    """The state after the last cut of the batch (one row per pair, `state_spark_schema` columns)."""
    return versions.sparkSession.sql(_LATEST_SQL, args={"k": int(cuts)}, versions=versions)


def detect_batch(
    versions: DataFrame,
    weights: DataFrame,
    cuts: int,
    thresholds: Thresholds,
    *,
    around: tuple[str, DataFrame] | None = None,
) -> DataFrame:
    """Every (pattern, customer, merchant, cut) where a condition holds at a cut at which it may have changed.

    `weights` are (customer, merchant, weight_sum, weight_count) through `by_pair`, so the join needs no shuffle
    and no sort. Columns: pattern_id, customer_name, merchant_id, cut. A key's first detection is its
    smallest cut (`first_hits`); conditions already holding on the base state are reported at cut 0. Which
    detections are new is the caller's decision.

    `around=(statement, rows)`: instead, the result of `statement`, in which `{hits}` stands for the detections
    and `{rows}` for the frame `rows`, built in the same `spark.sql` call. Each call parses and analyses its
    whole statement on the driver and registers a temporary view per frame argument: one call, not two.

    A batch of `WIDE_BATCH_CUTS` cuts or more is judged by `_DETECT_WIDE_SQL`, the others by `_DETECT_SQL`: the
    same detections, credited to the same cuts (`first_hits`), either way.
    """
    args = {**thresholds.sql_args(), "k": int(cuts)}
    detect = _DETECT_WIDE_SQL if cuts >= WIDE_BATCH_CUTS else _DETECT_SQL
    if around is None:
        return versions.sparkSession.sql(detect, args=args, versions=versions, weights=weights)
    statement, rows = around
    sql = statement.replace("{hits}", f"({detect})")
    return versions.sparkSession.sql(sql, args=args, versions=versions, weights=weights, rows=rows)


def by_merchant(df: DataFrame) -> DataFrame:
    """`df` hash-partitioned by merchant, as the fold leaves the versions: checkpoint the state through this so
    that the fold shuffles only the batch's rows."""
    return df.sparkSession.sql(_BY_MERCHANT_SQL, frame=df)


def by_pair(df: DataFrame) -> DataFrame:
    """The weights `df` (customer, merchant, weight_sum, weight_count) plus their `pair_key` and w(c,m), hash-partitioned
    by merchant and sorted by (pair_key, merchant, customer), as the fold leaves the versions: checkpoint the weights
    through this so that joining them to the versions needs neither a shuffle nor a sort, and w is computed once per
    load of the weights, not for every version the detection joins them to."""
    return df.sparkSession.sql(_BY_PAIR_SQL, frame=df)


def arrow_frame(spark: Any, table: Any, schema: Any) -> DataFrame:
    """The Arrow `table` as a DataFrame of `schema`, to go through `by_merchant` or `by_pair`: an empty one is an
    empty RDD, not an empty local relation. The optimiser drops a repartition over a relation it knows to be empty,
    so the checkpoint of an empty state (every fresh start) or of empty weights would carry no merchant partitioning:
    the detection would then shuffle them, and the fold's versions, partitioned by its windows' (pair_key, merchant,
    customer) instead, would make every later batch shuffle the whole state (bench/README.md, "yfold")."""
    if table.num_rows:
        return spark.createDataFrame(table, schema=schema)
    return spark.createDataFrame(spark.sparkContext.emptyRDD(), schema=schema)


def first_hits(found: Iterable[Any]) -> dict[tuple[str, str, str], int]:
    """Collected `detect_batch` rows -> {(pattern_id, customer_name, merchant_id): first cut}."""
    first: dict[tuple[str, str, str], int] = {}
    for row in found:
        key = (row["pattern_id"], row["customer_name"], row["merchant_id"])
        if key not in first or row["cut"] < first[key]:
            first[key] = row["cut"]
    return first
