"""Pattern logic of SPEC §4: edge cases on tiny inline frames, then random data against a PostgreSQL reference."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import pytest
from psycopg2.extras import execute_values
from pyspark.sql import types as T
from pyspark.testing import assertDataFrameEqual

from src.mechanism_y import pattern_detector as pd
from src.schemas.transaction_schemas import batch_rows_spark_schema, state_spark_schema, weights_spark_schema
from tests.reference import reference_detections

ROOT = Path(__file__).resolve().parent.parent
D = Decimal

IMPORTANCE_SCHEMA = T.StructType(
    [
        T.StructField("source", T.StringType(), False),
        T.StructField("target", T.StringType(), False),
        T.StructField("weight", T.DecimalType(18, 2), False),
    ]
)


def state_df(spark, rows):
    """rows: (merchant, customer, n, amount_sum, has_f, has_m); amount_sum may be a number or a string."""
    return spark.createDataFrame([(m, c, n, D(str(a)), f, g) for m, c, n, a, f, g in rows], state_spark_schema())


def weights_df(spark, rows):
    """rows: (customer, merchant, mean weight) with one importance row each."""
    return spark.createDataFrame([(c, m, D(str(w)), 1) for c, m, w in rows], weights_spark_schema())


def pairs(df) -> set[tuple[str, str]]:
    return {(r.customer_name, r.merchant_id) for r in df.collect()}


def merchant_state(spark, merchant, ns, weights=None):
    """One merchant whose customers c0, c1, ... have counts `ns` and (optionally) mean weights."""
    state = state_df(spark, [(merchant, f"c{i}", n, "1.00", False, False) for i, n in enumerate(ns)])
    w = weights_df(spark, [(f"c{i}", merchant, x) for i, x in enumerate(weights or []) if x is not None])
    return state, w


# ---------------------------------------------------------------- state maintenance


def aggregate_weights(importance):
    """Raw importance rows -> (customer, merchant, weight_sum, weight_count), as the product's PostgreSQL query."""
    from pyspark.sql import functions as F

    return importance.groupBy(F.col("source").alias("customer"), F.col("target").alias("merchant")).agg(
        F.sum("weight").cast("decimal(38,2)").alias("weight_sum"), F.count("weight").alias("weight_count")
    )


def batch_rows(spark, rows):
    """rows: (cut, merchant, customer, gender, amount)."""
    return spark.createDataFrame([(k, m, c, g, D(str(a))) for k, m, c, g, a in rows], batch_rows_spark_schema())


def test_fold_batch_versions_and_latest_state(spark):
    previous = state_df(spark, [("m1", "c1", 3, "0.99", False, True), ("m3", "c9", 1, "2.00", True, False)])
    rows = batch_rows(
        spark,
        [
            (0, "m1", "c1", "F", "10.00"),
            (0, "m1", "c1", "E", "0.01"),
            (0, "m1", "c2", "M", "5.00"),
            (2, "m1", "c1", "U", "1.00"),
            (2, "m2", "c1", "U", "1.00"),
        ],
    )
    versions = pd.fold_batch(previous, rows, 3)
    got = {
        (r.merchant, r.customer, r.cut): (r.cut_to, r.dn, r.n, r.amount_sum, r.has_f, r.has_m, r.had_f, r.had_m)
        for r in versions.collect()
    }
    assert got == {
        ("m1", "c1", -1): (0, 3, 3, D("0.99"), False, True, False, False),
        ("m1", "c1", 0): (2, 2, 5, D("11.00"), True, True, False, True),
        ("m1", "c1", 2): (3, 1, 6, D("12.00"), True, True, True, True),
        ("m1", "c2", 0): (3, 1, 1, D("5.00"), False, True, False, False),
        ("m2", "c1", 2): (3, 1, 1, D("1.00"), False, False, False, False),
        ("m3", "c9", -1): (3, 1, 1, D("2.00"), True, False, False, False),
    }
    assertDataFrameEqual(
        pd.latest_state(versions, 3),
        state_df(
            spark,
            [
                ("m1", "c1", 6, "12.00", True, True),
                ("m1", "c2", 1, "5.00", False, True),
                ("m2", "c1", 1, "1.00", False, False),
                ("m3", "c9", 1, "2.00", True, False),
            ],
        ),
        checkRowOrder=False,
    )
    empty = spark.createDataFrame([], state_spark_schema())
    assert pd.latest_state(pd.fold_batch(empty, batch_rows(spark, []), 1), 1).collect() == []
    with pytest.raises(ValueError):
        pd.fold_batch(empty, rows, 0)


def test_detect_batch_credits_each_detection_to_its_first_cut(spark):
    # PatId2 (min 2 txns, mean < 23) holds after cut 1, stops holding at cut 2 and never again: still found, at 1.
    # PatId3 (F > 1, F < M) holds from cut 3 on.
    rows = [(0, "m", "c1", "E", "1.00"), (1, "m", "c1", "E", "2.00"), (2, "m", "c1", "E", "99.00")]
    rows += [(0, "m", "f1", "F", "50"), (0, "m", "m1", "M", "50"), (0, "m", "m2", "M", "50")]
    rows += [(3, "m", "f2", "F", "50"), (3, "m", "m3", "M", "50")]
    empty = spark.createDataFrame([], state_spark_schema())
    weights = spark.createDataFrame([], weights_spark_schema())
    versions = pd.fold_batch(empty, batch_rows(spark, rows), 5)
    found = pd.first_hits(
        pd.detect_batch(versions, weights, 5, min_txns=2, min_female_customers=1, min_merchant_txns=10**6).collect()
    )
    assert found == {("PatId2", "c1", "m"): 1, ("PatId3", "", "m"): 3}


# ---------------------------------------------------------------- PatId1


def test_patid1_merchant_total_must_exceed_threshold(spark):
    # Both merchants have one customer with the most transactions and the lowest weight.
    at, above = [1, 1, 1, 1, 6], [1, 1, 1, 1, 7]
    weights = [5, 5, 5, 5, 1]
    s_at, w_at = merchant_state(spark, "m_at", at, weights)
    s_above, w_above = merchant_state(spark, "m_above", above, weights)
    got = pd.patid1_upgrade(s_at.union(s_above), w_at.union(w_above), min_merchant_txns=10)
    assert pairs(got) == {("c4", "m_above")}


def test_patid1_ties_at_both_percentiles(spark):
    # 11 customers: P_0.9 sits exactly on sorted position 9 (n = 5, shared by c8, c9, c10);
    # P_0.1 on sorted position 1 of w (w = 1.0, shared by c8, c9 and c0).
    ns = [1, 1, 1, 1, 1, 1, 1, 2, 5, 5, 5]
    ws = [1.0, 3, 3, 3, 3, 3, 3, 3, 1.0, 1.0, 2.0]
    state, weights = merchant_state(spark, "m", ns, ws)
    assert pairs(pd.patid1_upgrade(state, weights, min_merchant_txns=10)) == {("c8", "m"), ("c9", "m")}


def test_patid1_interpolated_percentiles(spark):
    # 6 customers: P_0.9(n) = n[4] + 0.5 * (n[5] - n[4]) = 9.5; P_0.1(w) = w[0] + 0.5 * (w[1] - w[0]) = 1.5.
    ns = [1, 2, 3, 4, 9, 10]
    ws = [4, 4, 4, 4, 2, 1]
    state, weights = merchant_state(spark, "m", ns, ws)
    assert pairs(pd.patid1_upgrade(state, weights, min_merchant_txns=10)) == {("c5", "m")}
    ws = [4, 4, 4, 4, 1, 2]  # the top customer's weight (2.0) is now above P_0.1 = 1.5
    state, weights = merchant_state(spark, "m", ns, ws)
    assert pairs(pd.patid1_upgrade(state, weights, min_merchant_txns=10)) == set()


def test_patid1_customer_without_importance_is_ignored_not_detected(spark):
    # c5 has the top count but no importance row: null w, never detected, and not counted in P_0.1(w).
    # Over the 5 non-null weights [1, 2, 3, 4, 5], P_0.1 = 1.4: only c4 (w = 1) qualifies on weight.
    ns = [1, 1, 1, 1, 20, 20]
    ws = [2, 3, 4, 5, 1, None]
    state, weights = merchant_state(spark, "m", ns, ws)
    assert pairs(pd.patid1_upgrade(state, weights, min_merchant_txns=10)) == {("c4", "m")}
    # A merchant where nobody has a weight detects nobody.
    state, weights = merchant_state(spark, "m", ns, [None] * 6)
    assert pairs(pd.patid1_upgrade(state, weights, min_merchant_txns=10)) == set()


def test_patid1_weight_is_the_mean_over_importance_rows(spark):
    # c1's rows 0.15 / 3 average to 0.05, equal to c0's single 0.05: a tie that must not split by an ulp
    # (in doubles, 0.15 / 3 is 0.049999999999999996).
    state = state_df(spark, [("m", f"c{i}", n, "1.00", False, False) for i, n in enumerate([9, 9, 1, 1, 1, 1])])
    weights = spark.createDataFrame(
        [("c0", "m", D("0.05"), 1), ("c1", "m", D("0.15"), 3)] + [(f"c{i}", "m", D("7.00"), 1) for i in range(2, 6)],
        weights_spark_schema(),
    )
    # P_0.9(n) = 9 (position 4.5 between two 9s); P_0.1(w) = position 0.5 between 0.05 and 0.05 = 0.05.
    assert pairs(pd.patid1_upgrade(state, weights, min_merchant_txns=10)) == {("c0", "m"), ("c1", "m")}


# ---------------------------------------------------------------- PatId2 / PatId3


def test_patid2_boundaries(spark):
    state = state_df(
        spark,
        [
            ("m", "exactly_23", 80, "1840.00", False, False),  # mean 23.00: not below 23
            ("m", "just_below", 80, "1839.99", False, False),
            ("m", "n_79", 79, "100.00", False, False),
            ("m", "n_80", 80, "100.00", False, False),
            ("m", "thirds", 81, "1862.99", False, False),  # mean 22.9998765...: below
        ],
    )
    assert pairs(pd.patid2_child(state)) == {("just_below", "m"), ("n_80", "m"), ("thirds", "m")}


def _gender_state(spark, merchant, females, males, both=0):
    rows = [(merchant, f"f{i}", 1, "1.00", True, False) for i in range(females)]
    rows += [(merchant, f"m{i}", 1, "1.00", False, True) for i in range(males)]
    rows += [(merchant, f"b{i}", 2, "2.00", True, True) for i in range(both)]
    return rows


def test_patid3_boundaries(spark):
    rows = (
        _gender_state(spark, "f100", 100, 150)  # F = 100: not above 100
        + _gender_state(spark, "f101", 101, 102)
        + _gender_state(spark, "equal", 101, 101)  # F == M: not fewer
        + _gender_state(spark, "mixed", 1, 2, both=100)  # F = 101, M = 102 through customers with both genders
    )
    got = pd.patid3_dei_needed(state_df(spark, rows))
    assert {r.merchant_id for r in got.collect()} == {"f101", "mixed"}
    assert {r.customer_name for r in got.collect()} == {""}


def test_detect_all_on_empty_state(spark):
    state = spark.createDataFrame([], state_spark_schema())
    weights = spark.createDataFrame([], weights_spark_schema())
    got = pd.detect_all(state, weights, min_merchant_txns=0, min_txns=0, min_female_customers=-1)
    assert got.columns == list(pd.DETECTION_COLUMNS)
    assert got.collect() == []


def test_detect_all_tags_patterns(spark):
    ns, ws = [1, 1, 1, 1, 6, 1], [5, 5, 5, 5, 1, 5]
    state = state_df(spark, [("m", f"c{i}", n, "1.00", i < 5, True) for i, n in enumerate(ns)])
    weights = weights_df(spark, [(f"c{i}", "m", w) for i, w in enumerate(ws)])
    got = pd.detect_all(state, weights, min_merchant_txns=10, min_txns=6, min_female_customers=4)
    assert got.columns == list(pd.DETECTION_COLUMNS)
    assert {tuple(r) for r in got.collect()} == {
        ("PatId1", "UPGRADE", "c4", "m"),
        ("PatId2", "CHILD", "c4", "m"),
        ("PatId3", "DEI-NEEDED", "", "m"),
    }


def test_thresholds_from_settings_match_spec_defaults(make_settings):
    kwargs = pd.thresholds_from_settings(make_settings())
    assert kwargs == {
        "min_merchant_txns": 50_000,
        "count_percentile": 0.9,
        "weight_percentile": 0.1,
        "max_avg_amount": 23,
        "min_txns": 80,
        "min_female_customers": 100,
    }


# ---------------------------------------------------------------- against the PostgreSQL reference


@pytest.fixture
def pg_tables(pg_conn):
    with pg_conn.cursor() as cur:
        cur.execute((ROOT / "setup" / "postgres_setup.sql").read_text())
    return pg_conn


def _random_data(seed: int, rows: int, chunks: int):
    """Transactions and importance rows with many ties: few distinct counts, amounts near 23, weights on a grid."""
    rnd = random.Random(seed)
    merchants = [f"M{i}" for i in range(8)]
    customers = [f"C{i}" for i in range(150)]
    txns = []
    for line in range(1, rows + 1):
        m = rnd.choice(merchants[:2]) if rnd.random() < 0.5 else rnd.choice(merchants)
        c = rnd.choice(customers[:40]) if rnd.random() < 0.3 else rnd.choice(customers)
        gender = rnd.choices("MFEU", weights=(5, 4, 1, 1))[0]
        amount = rnd.choice(
            [D("22.99"), D("23.00"), D("23.01"), D("0.00"), D("46.00")] + [D(rnd.randint(0, 6000)) / 100]
        )
        txns.append((line, (line - 1) * chunks // rows, c, m, gender, amount))
    importance = []
    for c in customers:
        for m in merchants:
            if rnd.random() < 0.7:
                for _ in range(rnd.choice([1, 1, 2, 3])):
                    importance.append(
                        (c, m, rnd.choice([D("0.05"), D("0.15"), D("0.30"), D("0.90"), D("2.50"), D("3.33")]))
                    )
    return txns, importance


def _load_pg(conn, txns, importance):
    with conn.cursor() as cur:
        execute_values(
            cur,
            "INSERT INTO transactions (source_file_id, source_line, chunk_seq, step, customer, gender, merchant, amount,"
            " fraud) VALUES %s",
            [("f1", line, chunk, 0, c, g, m, a, 0) for line, chunk, c, m, g, a in txns],
        )
        execute_values(cur, "INSERT INTO customer_importance (source, target, weight) VALUES %s", importance)


def _by_pattern(found) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {p: set() for p in pd.ACTION_TYPES}
    for pattern, customer, merchant in found:
        out[pattern].add((customer, merchant))
    return out


CASES = [
    (1, {"min_merchant_txns": 300, "min_txns": 4, "max_avg_amount": 23, "min_female_customers": 20}),
    (2, {"min_merchant_txns": 200, "min_txns": 3, "max_avg_amount": 23, "min_female_customers": 30}),
    # q whose positions q * (N - 1) land a few ulps off an integer (0.7 * 90, 0.55 * 100, ...)
    (3, {"min_merchant_txns": 100, "count_percentile": 0.7, "weight_percentile": 0.55, "min_txns": 5}),
]


@pytest.mark.parametrize("seed, thresholds", CASES)
def test_detect_all_matches_postgresql_reference_chunk_by_chunk(spark, pg_tables, seed, thresholds):
    chunks = 4
    txns, importance = _random_data(seed, rows=3000, chunks=chunks)
    _load_pg(pg_tables, txns, importance)
    weights = aggregate_weights(spark.createDataFrame(importance, IMPORTANCE_SCHEMA)).cache()
    state = spark.createDataFrame([], state_spark_schema())
    seen_patid1 = False
    for k in range(chunks):
        rows = batch_rows(spark, [(0, m, c, g, a) for _, ck, c, m, g, a in txns if ck == k])
        state = pd.latest_state(pd.fold_batch(state, rows, 1), 1).localCheckpoint()
        got = _by_pattern(
            (r.pattern_id, r.customer_name, r.merchant_id)
            for r in pd.detect_all(state, weights, **thresholds).collect()
        )
        want = _by_pattern(reference_detections(pg_tables, where="t.chunk_seq <= %s", params=(k,), **thresholds))
        for pattern in pd.ACTION_TYPES:
            assert got[pattern] == want[pattern], f"{pattern} after chunk {k}"
        seen_patid1 = seen_patid1 or bool(want["PatId1"])
    weights.unpersist()
    # The data must exercise every pattern, or the comparison proves little.
    assert seen_patid1 and want["PatId2"] and want["PatId3"]


@pytest.mark.parametrize("seed, thresholds", CASES)
@pytest.mark.parametrize("batch", [2, 3, 6])
def test_batches_credit_the_same_first_chunk_as_the_reference(spark, pg_tables, seed, thresholds, batch):
    """Folding several chunks in one pass finds each detection at the chunk where the reference first has it."""
    chunks = 6
    txns, importance = _random_data(seed, rows=3000, chunks=chunks)
    _load_pg(pg_tables, txns, importance)
    want: dict[tuple[str, str, str], int] = {}
    for k in range(chunks):
        for key in reference_detections(pg_tables, where="t.chunk_seq <= %s", params=(k,), **thresholds):
            want.setdefault(tuple(key), k)
    weights = pd.by_merchant(aggregate_weights(spark.createDataFrame(importance, IMPORTANCE_SCHEMA))).localCheckpoint()
    state = pd.by_merchant(spark.createDataFrame([], state_spark_schema())).localCheckpoint()
    got: dict[tuple[str, str, str], int] = {}
    for start in range(0, chunks, batch):
        k = min(batch, chunks - start)
        rows = batch_rows(spark, [(ck - start, m, c, g, a) for _, ck, c, m, g, a in txns if start <= ck < start + k])
        versions = pd.fold_batch(state, rows, k).localCheckpoint()
        for key, cut in pd.first_hits(pd.detect_batch(versions, weights, k, **thresholds).collect()).items():
            got.setdefault(key, start + cut)
        state = pd.latest_state(versions, k)
    assert got == want
    assert {p for p, _, _ in want} == set(pd.ACTION_TYPES)
    # Detections that appear after the first chunk of a batch prove the per-cut judgement.
    assert any(k % batch for k in want.values())


def test_exact_percentile_position_despite_float_noise(spark, pg_tables):
    # 0.55 * 100 evaluates to 55.00000000000001 and 0.7 * 90 to 62.99999999999999: both engines then interpolate
    # a hair past the exact order statistic, which would drop the customer sitting on it.
    # m_count: 101 customers with counts 1..101, P_0.55(n) is exactly 56 -> c55..c100 qualify (all weights equal).
    # m_weight: 91 customers with equal counts, weights 0.01..0.91, P_0.7(w) is exactly 0.64 -> c0..c63 qualify.
    rows = [("m_count", f"c{i}", i + 1, 1) for i in range(101)] + [
        ("m_weight", f"c{i}", 1, (i + 1) / 100) for i in range(91)
    ]
    state = state_df(spark, [(m, c, n, "1.00", False, False) for m, c, n, _ in rows])
    weights = weights_df(spark, [(c, m, f"{w:.2f}") for m, c, _, w in rows])
    thresholds = {"min_merchant_txns": 10, "count_percentile": 0.55, "weight_percentile": 0.7}
    got = pairs(pd.patid1_upgrade(state, weights, **thresholds))
    expected = {(f"c{i}", "m_count") for i in range(55, 101)} | {(f"c{i}", "m_weight") for i in range(64)}
    assert got == expected
    with pg_tables.cursor() as cur:
        execute_values(
            cur,
            "INSERT INTO transactions (source_file_id, source_line, chunk_seq, step, customer, gender, merchant, amount,"
            " fraud) VALUES %s",
            [(m, 1000 * i + j, 0, 0, c, "U", m, D("1.00"), 0) for i, (m, c, n, _) in enumerate(rows) for j in range(n)],
        )
        execute_values(
            cur,
            "INSERT INTO customer_importance (source, target, weight) VALUES %s",
            [(c, m, D(f"{w:.2f}")) for m, c, _, w in rows],
        )
    want = reference_detections(pg_tables, **thresholds)
    assert {(c, m) for p, c, m in want if p == "PatId1"} == expected
