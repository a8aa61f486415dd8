"""The three patterns of SPEC §4 as pure DataFrame transforms over Mechanism Y's running state.

The state holds one row per (merchant, customer) seen so far (`state_spark_schema`): the patterns only
need n(c,m), the amount sum and whether c ever paid m as gender F or M, so a chunk is folded into the state
with `chunk_delta` + `merge_state` and the whole history is never re-read. Nothing here reads, writes,
collects or talks to a database: the caller owns I/O and decides what is new.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pyspark.sql import Window
from pyspark.sql import functions as F

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

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


def chunk_delta(chunk: DataFrame) -> DataFrame:
    """Clean chunk rows (customer, merchant, gender, amount) -> their contribution to the state."""
    return chunk.groupBy(*_STATE_KEYS).agg(
        F.count(F.lit(1)).alias("n"),
        F.sum("amount").cast("decimal(38,2)").alias("amount_sum"),
        F.max(F.col("gender") == "F").alias("has_f"),
        F.max(F.col("gender") == "M").alias("has_m"),
    )


def merge_state(state: DataFrame, delta: DataFrame) -> DataFrame:
    """Fold a chunk's delta into the state; associative, so the order of merges does not matter."""
    cols = [*_STATE_KEYS, "n", "amount_sum", "has_f", "has_m"]
    return (
        state.select(*cols)
        .unionByName(delta.select(*cols))
        .groupBy(*_STATE_KEYS)
        .agg(
            F.sum("n").alias("n"),
            F.sum("amount_sum").cast("decimal(38,2)").alias("amount_sum"),
            F.bool_or("has_f").alias("has_f"),
            F.bool_or("has_m").alias("has_m"),
        )
    )


def _merchant_totals(state: DataFrame) -> DataFrame:
    """T(m), F(m) and M(m) in one aggregate, so PatId1 and PatId3 share its shuffle within `detect_all`."""
    return state.groupBy("merchant").agg(
        F.sum("n").alias("t"),
        F.count_if(F.col("has_f")).alias("f"),
        F.count_if(F.col("has_m")).alias("m"),
    )


def _mean_weight() -> Column:
    """w(c,m) as a double, via a 20-decimal exact quotient.

    Dividing doubles would give two customers with the same mean (0.90/3 and 0.30/1) values one ulp apart,
    and a tie at the percentile would then split. The decimal quotient is rounded once, at a fixed scale,
    so equal means become equal doubles.
    """
    return (F.col("weight_sum").cast("decimal(20,2)") / F.col("weight_count").cast("decimal(20,0)")).cast("double")


def patid1_upgrade(
    state: DataFrame,
    weights: DataFrame,
    *,
    min_merchant_txns: int = 50_000,
    count_percentile: float = 0.9,
    weight_percentile: float = 0.1,
) -> DataFrame:
    """PatId1: at merchants with T(m) > min, customers in the top decile by count and bottom decile by weight.

    Merchants are filtered on T before anything else, so the weights join and the percentile window only
    touch the (few) large merchants. Percentiles are Spark's exact, linearly interpolated `percentile` over
    the customers of the merchant; a customer without an importance row has a null w, which the weight
    percentile ignores and which never satisfies `w <= P`.
    """
    busy = F.broadcast(_merchant_totals(state).where(F.col("t") > F.lit(min_merchant_txns)).select("merchant"))
    # State and weights meet through a union grouped on (merchant, customer) after one shuffle by merchant,
    # which the window reuses: a join would shuffle on (merchant, customer) and the window again on merchant.
    pairs = (
        state.join(busy, "merchant", "left_semi")
        .select("merchant", "customer", "n", F.lit(None).cast("double").alias("w"))
        .unionByName(
            weights.join(busy, "merchant", "left_semi").select(
                "merchant", "customer", F.lit(None).cast("long").alias("n"), _mean_weight().alias("w")
            )
        )
        .repartition("merchant")
        .groupBy("merchant", "customer")
        .agg(F.max("n").alias("n"), F.max("w").alias("w"))
        .where(F.col("n").isNotNull())
    )
    by_merchant = Window.partitionBy("merchant")
    scored = pairs.select(
        "merchant",
        "customer",
        "n",
        "w",
        F.percentile(F.col("n").cast("double"), F.lit(count_percentile)).over(by_merchant).alias("p_n"),
        F.percentile(F.col("w"), F.lit(weight_percentile)).over(by_merchant).alias("p_w"),
    )
    tol = F.lit(PERCENTILE_REL_TOL)
    return scored.where(
        (F.col("n") >= F.col("p_n") - tol * F.abs(F.col("p_n")))
        & (F.col("w") <= F.col("p_w") + tol * F.abs(F.col("p_w")))
    ).select(F.col("customer").alias("customer_name"), F.col("merchant").alias("merchant_id"))


def patid2_child(state: DataFrame, *, max_avg_amount: float = 23, min_txns: int = 80) -> DataFrame:
    """PatId2: mean amount below the limit with at least `min_txns` transactions, compared exactly in decimal."""
    limit = F.lit(Decimal(str(max_avg_amount)))
    return state.where(
        (F.col("n") >= F.lit(min_txns)) & (F.col("amount_sum") < limit * F.col("n").cast("decimal(20,0)"))
    ).select(F.col("customer").alias("customer_name"), F.col("merchant").alias("merchant_id"))


def patid3_dei_needed(state: DataFrame, *, min_female_customers: int = 100) -> DataFrame:
    """PatId3: merchants with more than `min_female_customers` female customers, yet fewer female than male."""
    return (
        _merchant_totals(state)
        .where((F.col("f") < F.col("m")) & (F.col("f") > F.lit(min_female_customers)))
        .select(F.lit("").alias("customer_name"), F.col("merchant").alias("merchant_id"))
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
    """Every (pattern, customer, merchant) whose condition holds on this state; deciding what is new is the caller's."""
    parts = {
        PATID1: patid1_upgrade(
            state,
            weights,
            min_merchant_txns=min_merchant_txns,
            count_percentile=count_percentile,
            weight_percentile=weight_percentile,
        ),
        PATID2: patid2_child(state, max_avg_amount=max_avg_amount, min_txns=min_txns),
        PATID3: patid3_dei_needed(state, min_female_customers=min_female_customers),
    }
    out = None
    for pattern_id, df in parts.items():
        tagged = df.select(
            F.lit(pattern_id).alias("pattern_id"),
            F.lit(ACTION_TYPES[pattern_id]).alias("action_type"),
            "customer_name",
            "merchant_id",
        )
        out = tagged if out is None else out.unionByName(tagged)
    return out
