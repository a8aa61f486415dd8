"""Pattern logic of SPEC §4, tested on the production path (`fold_batch` -> `detect_batch` -> `first_hits`).

Edge cases run on tiny inline frames (several scenarios per Spark job, one merchant each); then random
data with many ties, folded in batches, against the independent PostgreSQL reference of `tests.reference`.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from pyspark.testing import assertDataFrameEqual

from config.config import Settings
from src.mechanism_y import pattern_detector as pd
from src.schemas.transaction_schemas import (
    STATE_ARROW_SCHEMA,
    WEIGHTS_ARROW_SCHEMA,
    batch_rows_spark_schema,
    state_spark_schema,
    weights_spark_schema,
)
from tests.reference import Chunk, Txn, expected_detections, limits_of

D = Decimal


def settings(**env: object) -> Settings:
    """Settings with these PATID* overrides; every other threshold at its default (config.config)."""
    return Settings.from_env({k: str(v) for k, v in env.items()}, dotenv=Path("/nonexistent"))


def thresholds(**env: object) -> pd.Thresholds:
    return pd.Thresholds.from_settings(settings(**env))


def state_df(spark, rows):
    """rows: (merchant, customer, n, amount_sum, has_f, has_m)."""
    return spark.createDataFrame([(m, c, n, D(str(a)), f, g) for m, c, n, a, f, g in rows], state_spark_schema())


def weights_df(spark, rows):
    """rows: (customer, merchant, mean weight) standing for one importance row each, or (c, m, sum, count)."""
    full = [(r[0], r[1], D(str(r[2])), r[3] if len(r) > 3 else 1) for r in rows]
    return spark.createDataFrame(full, weights_spark_schema())


def batch_rows(spark, rows):
    """rows: (cut, merchant, customer, gender, amount)."""
    return spark.createDataFrame([(k, m, c, g, D(str(a))) for k, m, c, g, a in rows], batch_rows_spark_schema())


def judge(spark, thr: pd.Thresholds, *, state=(), rows=(), weights=(), cuts: int = 1) -> dict:
    """{(pattern_id, customer_name, merchant_id): first cut} as Mechanism Y computes it for one batch."""
    versions = pd.fold_batch(state_df(spark, state), batch_rows(spark, rows), cuts).localCheckpoint()
    found = pd.detect_batch(versions, pd.by_pair(weights_df(spark, weights)), cuts, thr)
    return pd.first_hits(found.collect())


def merchant(name: str, ns: list[int], ws: list | None = None) -> tuple[list, list]:
    """State and weights of one merchant whose customers c0, c1, ... have counts `ns` and mean weights `ws`."""
    state = [(name, f"c{i}", n, "1.00", False, False) for i, n in enumerate(ns)]
    weights = [(f"c{i}", name, w) for i, w in enumerate(ws or []) if w is not None]
    return state, weights


def hits(found: dict, pattern: str) -> set[tuple[str, str]]:
    return {(c, m) for p, c, m in found if p == pattern}


NO_PATID23 = {"PATID2_MIN_TXNS": 10**9, "PATID3_MIN_FEMALE_CUSTOMERS": 10**9}


@pytest.fixture(autouse=True, params=["one_pass", "wide"])
def shape(request, monkeypatch) -> str:
    """Every test here runs with each of the detection's two statements, whatever its batch's size: `_DETECT_SQL`
    (small batches) and `_DETECT_WIDE_SQL` (from `WIDE_BATCH_CUTS` cuts). They must find the same detections, credited
    to the same cuts."""
    monkeypatch.setattr(pd, "WIDE_BATCH_CUTS", 10**9 if request.param == "one_pass" else 1)
    return request.param


# ---------------------------------------------------------------- the fold


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
    expected = [
        ("m1", "c1", 6, "12.00", True, True),
        ("m1", "c2", 1, "5.00", False, True),
        ("m2", "c1", 1, "1.00", False, False),
        ("m3", "c9", 1, "2.00", True, False),
    ]
    assertDataFrameEqual(pd.latest_state(versions, 3), state_df(spark, expected), checkRowOrder=False)


def test_empty_input_gives_empty_state_and_no_detection(spark):
    # Thresholds every state would meet, were there one.
    thr = pd.Thresholds(0, 0.5, 0.5, D("1000"), 0, -1)
    versions = pd.fold_batch(state_df(spark, []), batch_rows(spark, []), 1)
    found = pd.detect_batch(versions, pd.by_pair(weights_df(spark, [])), 1, thr)
    assert found.columns == ["pattern_id", "customer_name", "merchant_id", "cut"]
    assert found.collect() == []
    assert pd.latest_state(versions, 1).collect() == []
    with pytest.raises(ValueError, match="at least one cut, got 0"):
        pd.fold_batch(state_df(spark, []), batch_rows(spark, []), 0)


def _exchanges(plan) -> list[tuple[str, set[str]]]:
    """(Exchange node, the names of the leaves below it) for every Exchange of a JVM executed plan."""

    def children(node) -> list:
        return [node.children().apply(i) for i in range(node.children().size())]

    def leaves(node) -> set[str]:
        below = children(node)
        return set().union(*map(leaves, below)) if below else {node.nodeName().strip()}

    found, todo = [], [plan]
    while todo:
        node = todo.pop()
        if "Exchange" in node.nodeName():
            found.append((node.toString().splitlines()[0], leaves(node)))
        todo.extend(children(node))
    return found


def _sort_keys(plan) -> list[str]:
    """The first sort key of every Sort node of a JVM executed plan, ids stripped ("pair_key", "merchant")."""
    found, todo = [], [plan]
    while todo:
        node = todo.pop()
        if node.nodeName() == "Sort":
            found.append(re.sub(r"#\d+L?", "", node.sortOrder().apply(0).child().toString()))
        todo.extend(node.children().apply(i) for i in range(node.children().size()))
    return sorted(found)


@pytest.mark.parametrize("start", ["pairs", "empty"])
def test_a_batch_exchanges_its_rows_and_never_the_state(spark, tmp_path, start, shape):
    # Mechanism Y's batch: the fold of Parquet rows into the checkpointed state, checkpointed in turn, then the
    # detection inside a statement that reads the rows again (as Y's summary does, so the versions' ids meet
    # the rows'). Only the rows may cross a shuffle: the state is already partitioned by merchant, and so are the
    # versions and the weights, so a shuffle of them would cost O(state) every batch (bench/README.md, "yfold").
    # The wide shape also exchanges its expansion of the qualifying merchants' versions, by (merchant, j).
    # "empty": a fresh start, state and weights handed over as Y does (`arrow_frame`) from empty Arrow tables; an
    # empty local relation loses its partitioning, and the batches after it shuffled the whole state.
    thr = thresholds(PATID1_MIN_MERCHANT_TXNS=3, PATID2_MIN_TXNS=2, PATID3_MIN_FEMALE_CUSTOMERS=0)
    if start == "pairs":
        state = pd.by_merchant(state_df(spark, [("m1", "c1", 3, "0.99", False, True)]))
        weights = pd.by_pair(weights_df(spark, [("c1", "m1", "0.5"), ("c2", "m2", "0.1")]))
    else:
        state = pd.by_merchant(pd.arrow_frame(spark, STATE_ARROW_SCHEMA.empty_table(), state_spark_schema()))
        weights = pd.by_pair(pd.arrow_frame(spark, WEIGHTS_ARROW_SCHEMA.empty_table(), weights_spark_schema()))
    state = state.localCheckpoint(eager=False)
    weights = weights.localCheckpoint(eager=False)
    statement = (
        "SELECT 'hit' AS kind, pattern_id, customer_name, merchant_id, cut FROM {hits} "
        "UNION ALL SELECT 'row', NULL, customer, merchant, cut FROM {rows}"
    )
    found = []
    for b in range(3):
        rows = [(k, f"m{1 + i % 3}", f"c{i % 4}", "FM"[i % 2], f"{b + i}.25") for k in range(2) for i in range(8)]
        path = str(tmp_path / f"batch-{b}")
        batch_rows(spark, rows).write.parquet(path)
        scan = spark.read.schema(batch_rows_spark_schema()).parquet(path)
        fold = pd.fold_batch(state, scan, 2)
        assert [leaves for _, leaves in _exchanges(fold._jdf.queryExecution().executedPlan())] == [{"Scan parquet"}]
        # One sort, led by the pair's 64-bit key: its prefix decides comparisons that merchant strings would tie.
        assert _sort_keys(fold._jdf.queryExecution().executedPlan()) == ["pair_key"]
        versions = fold.localCheckpoint(eager=False)
        detection = pd.detect_batch(versions, weights, 2, thr, around=(statement, scan))
        exchanges = _exchanges(detection._jdf.queryExecution().executedPlan())
        if shape == "one_pass":
            assert exchanges == []
        else:
            # Wide: the expansion of the qualifying merchants' versions to their cuts, by (merchant, j), for each of
            # its two readers (the percentiles and the join back to them); nothing else crosses a shuffle.
            assert [(re.sub(r"#\d+L?|\[plan_id=\d+\]", "", name), leaves) for name, leaves in exchanges] == [
                ("Exchange hashpartitioning(merchant, j, 2), REPARTITION_BY_COL, ", {"Scan ExistingRDD"})
            ] * 2
        # The join to the weights reuses the versions' sort. One pass: the merchant windows' and (merchant, j)'s
        # sorts. Wide: only the steps' windows (a few rows per merchant), sorted for each branch that reads them.
        expected_sorts = {"one_pass": ["merchant", "merchant"], "wide": ["merchant", "merchant", "merchant"]}
        assert _sort_keys(detection._jdf.queryExecution().executedPlan()) == expected_sorts[shape]
        result = detection.collect()
        assert sum(r["kind"] == "row" for r in result) == len(rows)
        found.append(pd.first_hits(r for r in result if r["kind"] == "hit"))
        state = pd.latest_state(versions, 2)
    assert all(found)  # the plans judged something: each batch has detections


# ---------------------------------------------------------------- several cuts in one batch


def test_each_detection_is_credited_to_its_first_cut(spark):
    # PatId2 (min 2 txns, mean < 23) holds after cut 1, stops holding at cut 2 and never again: still found, at 1.
    # PatId3 (F > 1, F < M) holds from cut 3 on; f1 paying again at cut 4 is not a new woman.
    rows = [(0, "m", "c1", "E", "1.00"), (1, "m", "c1", "E", "2.00"), (2, "m", "c1", "E", "99.00")]
    rows += [(0, "m", "f1", "F", "50"), (0, "m", "m1", "M", "50"), (0, "m", "m2", "M", "50")]
    rows += [(3, "m", "f2", "F", "50"), (3, "m", "m3", "M", "50"), (4, "m", "f1", "F", "50")]
    thr = thresholds(PATID2_MIN_TXNS=2, PATID3_MIN_FEMALE_CUSTOMERS=1, PATID1_MIN_MERCHANT_TXNS=10**6)
    assert judge(spark, thr, rows=rows, cuts=5) == {("PatId2", "c1", "m"): 1, ("PatId3", "", "m"): 3}


def test_detection_built_around_another_statement_finds_the_same(spark):
    # Mechanism Y builds the detection inside its summary statement (one spark.sql call): `{hits}` there must be
    # exactly what `detect_batch` alone returns, and `{rows}` the frame given beside it.
    rows = [(0, "m", "c1", "E", "1.00"), (1, "m", "c1", "E", "2.00"), (2, "m", "c1", "E", "99.00")]
    rows += [(0, "m", "f1", "F", "50"), (0, "m", "m1", "M", "50"), (0, "m", "m2", "M", "50")]
    rows += [(3, "m", "f2", "F", "50"), (3, "m", "m3", "M", "50"), (4, "m", "f1", "F", "50")]
    thr = thresholds(PATID2_MIN_TXNS=2, PATID3_MIN_FEMALE_CUSTOMERS=1, PATID1_MIN_MERCHANT_TXNS=10**6)
    frame = batch_rows(spark, rows)
    versions = pd.fold_batch(state_df(spark, []), frame, 5).localCheckpoint()
    weights = pd.by_pair(weights_df(spark, []))
    statement = (
        "SELECT 'hit' AS kind, pattern_id, customer_name, merchant_id, cut FROM {hits} "
        "UNION ALL SELECT 'rows', NULL, NULL, NULL, CAST(count(*) AS INT) FROM {rows}"
    )
    both = pd.detect_batch(versions, weights, 5, thr, around=(statement, frame)).collect()
    alone = pd.detect_batch(versions, weights, 5, thr).collect()
    assert sorted(tuple(r)[1:] for r in both if r["kind"] == "hit") == sorted(tuple(r) for r in alone)
    assert [r["cut"] for r in both if r["kind"] == "rows"] == [len(rows)]
    assert pd.first_hits(r for r in both if r["kind"] == "hit") == {("PatId2", "c1", "m"): 1, ("PatId3", "", "m"): 3}


def test_patid1_merchant_crossing_the_minimum_mid_batch(spark):
    # min T = 10. m: T = 8 after cut 0, 10 after cut 1 (not above), 12 after cut 2 -> PatId1 only at cut 2, for c4:
    # n = [3, 1, 1, 1, 6], P_0.9(n) = 4.8; w = [5, 5, 5, 5, 1], P_0.1(w) = 2.6.
    # m_before is above the minimum in the base state already: its detection counts at cut 0.
    # m_small never crosses, though its top customer has the top count and the lowest weight.
    rows = [(0, "m", f"c{i}", "U", "1") for i in range(4)] + [(0, "m", "c4", "U", "1")] * 4
    rows += [(1, "m", "c4", "U", "1")] * 2 + [(2, "m", "c0", "U", "1")] * 2
    rows += [(1, "m_small", "c1", "U", "1")] * 3 + [(1, "m_small", "c0", "U", "1")]
    state, weights = merchant("m_before", [1, 1, 1, 1, 7], [5, 5, 5, 5, 1])
    weights += [(f"c{i}", "m", w) for i, w in enumerate([5, 5, 5, 5, 1])] + [("c1", "m_small", 1), ("c0", "m_small", 5)]
    found = judge(
        spark, thresholds(PATID1_MIN_MERCHANT_TXNS=10, **NO_PATID23), state=state, rows=rows, weights=weights, cuts=3
    )
    assert found == {("PatId1", "c4", "m"): 2, ("PatId1", "c4", "m_before"): 0}


# ---------------------------------------------------------------- PatId1 on one state


def test_patid1_percentiles_ties_interpolation_and_nulls(spark):
    scenarios = {
        # T = 10 is not above 10, T = 11 is.
        "at_min": ([1, 1, 1, 1, 6], [5, 5, 5, 5, 1]),
        "above_min": ([1, 1, 1, 1, 7], [5, 5, 5, 5, 1]),
        # 11 customers: P_0.9 sits exactly on sorted position 9 (n = 5, shared by c8, c9, c10);
        # P_0.1 on sorted position 1 of w (w = 1.0, shared by c8, c9 and c0).
        "ties": ([1, 1, 1, 1, 1, 1, 1, 2, 5, 5, 5], [1.0, 3, 3, 3, 3, 3, 3, 3, 1.0, 1.0, 2.0]),
        # P_0.9(n) = 9 + 0.5 * (10 - 9) = 9.5; P_0.1(w) = 1 + 0.5 * (2 - 1) = 1.5.
        "interpolated": ([1, 2, 3, 4, 9, 10], [4, 4, 4, 4, 2, 1]),
        "interpolated_w_above": ([1, 2, 3, 4, 9, 10], [4, 4, 4, 4, 1, 2]),  # c5's w = 2.0 > 1.5
        # c5 has the top count but no importance row: null w, never detected, not counted in P_0.1(w): over
        # [1, 2, 3, 4, 5], P_0.1 = 1.4, so c4 (w = 1) qualifies.
        "without_weight": ([1, 1, 1, 1, 20, 20], [2, 3, 4, 5, 1, None]),
        # Nobody has a weight: P_0.1(w) is null (an empty group), nobody is detected.
        "no_weights": ([1, 1, 1, 1, 20, 20], [None] * 6),
    }
    state, weights = [], []
    for name, (ns, ws) in scenarios.items():
        s, w = merchant(name, ns, ws)
        state, weights = state + s, weights + w
    found = judge(spark, thresholds(PATID1_MIN_MERCHANT_TXNS=10, **NO_PATID23), state=state, weights=weights)
    assert hits(found, "PatId1") == {
        ("c4", "above_min"),
        ("c8", "ties"),
        ("c9", "ties"),
        ("c5", "interpolated"),
        ("c4", "without_weight"),
    }
    assert set(found.values()) == {0}


def test_patid1_weight_is_the_exact_mean_over_importance_rows(spark):
    # c1's rows 0.15 / 3 average to 0.05, equal to c0's single 0.05: a tie that must not split by an ulp
    # (in doubles, 0.15 / 3 is 0.049999999999999996). P_0.9(n) = 9; P_0.1(w) = 0.05 (between two 0.05s).
    state, _ = merchant("m", [9, 9, 1, 1, 1, 1])
    weights = [("c0", "m", "0.05", 1), ("c1", "m", "0.15", 3)] + [(f"c{i}", "m", "7.00", 1) for i in range(2, 6)]
    found = judge(spark, thresholds(PATID1_MIN_MERCHANT_TXNS=10, **NO_PATID23), state=state, weights=weights)
    assert hits(found, "PatId1") == {("c0", "m"), ("c1", "m")}


def test_patid1_exact_percentile_position_despite_float_noise(spark):
    # 0.55 * 100 evaluates to 55.00000000000001 and 0.7 * 90 to 62.99999999999999: the engine then interpolates
    # a hair past the exact order statistic, which would drop the customer sitting on it.
    # m_count: 101 customers with counts 1..101, P_0.55(n) is exactly 56 -> c55..c100 (all weights equal).
    # m_weight: 91 customers with equal counts, weights 0.01..0.91, P_0.7(w) is exactly 0.64 -> c0..c63.
    s1, w1 = merchant("m_count", list(range(1, 102)), [1] * 101)
    s2, w2 = merchant("m_weight", [1] * 91, [f"{(i + 1) / 100:.2f}" for i in range(91)])
    thr = thresholds(
        PATID1_MIN_MERCHANT_TXNS=10, PATID1_COUNT_PERCENTILE=0.55, PATID1_WEIGHT_PERCENTILE=0.7, **NO_PATID23
    )
    found = judge(spark, thr, state=s1 + s2, weights=w1 + w2)
    expected = {(f"c{i}", "m_count") for i in range(55, 101)} | {(f"c{i}", "m_weight") for i in range(64)}
    assert hits(found, "PatId1") == expected


# ---------------------------------------------------------------- PatId2 / PatId3 at the contract's defaults


def test_patid2_at_exactly_23_and_exactly_80_transactions(spark):
    state = [
        ("m", "exactly_23", 80, "1840.00", False, False),  # mean 23.00: not below 23
        ("m", "just_below", 80, "1839.99", False, False),  # mean 22.999875 with exactly 80 transactions
        ("m", "n_79", 79, "100.00", False, False),
        ("m", "thirds", 81, "1862.99", False, False),  # mean 22.9998765...: below
        ("m", "tiny_gap", 10**7, str(D(23 * 10**7) - D("0.01")), False, False),  # 23 - 1e-9
    ]
    # "grows": 79 cheap transactions before the batch, the 80th at cut 1 (crossing n >= 80 mid-batch).
    state.append(("m", "grows", 79, "790.00", False, False))
    rows = [(0, "m", "other", "U", "1.00"), (1, "m", "grows", "U", "10.00")]
    found = judge(spark, thresholds(), state=state, rows=rows, cuts=2)
    assert {k: v for k, v in found.items() if k[0] == "PatId2"} == {
        ("PatId2", "just_below", "m"): 0,
        ("PatId2", "thirds", "m"): 0,
        ("PatId2", "tiny_gap", "m"): 0,
        ("PatId2", "grows", "m"): 1,
    }


def test_patid2_threshold_with_seventeen_significant_digits(spark):
    # The setting is a float: 22.999999999999996 reaches the detection as that decimal, 17 significant digits. With
    # n = 10^13, a mean can sit exactly on it or one unit of its last digit below, and only the one below fires.
    assert repr(22.999999999999996) == "22.999999999999996"
    state = [
        ("m", "on_it", 10**13, "229999999999999.96", False, False),  # mean 22.999999999999996 exactly
        ("m", "below", 10**13, "229999999999999.95", False, False),  # mean 22.999999999999995
        ("m", "at_23", 80, "1840.00", False, False),
        ("m", "cheap", 80, "1839.20", False, False),  # mean 22.99
    ]
    found = judge(spark, thresholds(PATID2_MAX_AVG_AMOUNT="22.999999999999996"), state=state)
    assert hits(found, "PatId2") == {("below", "m"), ("cheap", "m")}


def _gender_state(merchant: str, females: int, males: int, both: int = 0) -> list:
    rows = [(merchant, f"f{i}", 1, "100.00", True, False) for i in range(females)]
    rows += [(merchant, f"m{i}", 1, "100.00", False, True) for i in range(males)]
    rows += [(merchant, f"b{i}", 2, "200.00", True, True) for i in range(both)]
    return rows


def test_patid3_at_f_equal_m_and_f_equal_100(spark):
    state = (
        _gender_state("f100", 100, 150)  # F = 100: not above 100
        + _gender_state("f101", 101, 102)
        + _gender_state("equal", 101, 101)  # F == M: not fewer
        + _gender_state("mixed", 1, 2, both=100)  # F = 101, M = 102 through customers with both genders
        + _gender_state("later", 100, 103)  # F = 100, then the 101st woman comes at cut 1
    )
    rows = [(0, "later", "f0", "F", "1.00"), (1, "later", "f_new", "F", "1.00")]
    found = judge(spark, thresholds(), state=state, rows=rows, cuts=2)
    assert found == {("PatId3", "", "f101"): 0, ("PatId3", "", "mixed"): 0, ("PatId3", "", "later"): 1}


# ---------------------------------------------------------------- thresholds


def test_thresholds_come_from_settings():
    thr = thresholds(PATID1_COUNT_PERCENTILE="0.8", PATID2_MAX_AVG_AMOUNT="22.5")
    defaults = settings()
    assert thr == pd.Thresholds(
        min_merchant_txns=defaults.patid1_min_merchant_txns,
        count_percentile=0.8,
        weight_percentile=defaults.patid1_weight_percentile,
        max_avg_amount=D("22.5"),
        min_txns=defaults.patid2_min_txns,
        min_female_customers=defaults.patid3_min_female_customers,
    )
    with pytest.raises(ValueError, match="count_percentile must be a number in \\[0, 1\\], got 1.5"):
        pd.Thresholds(1, 1.5, 0.1, D("23"), 80, 100)
    with pytest.raises(TypeError, match="max_avg_amount must be a Decimal"):
        pd.Thresholds(1, 0.9, 0.1, 23.0, 80, 100)


# ---------------------------------------------------------------- random data against the reference


def _random_data(seed: int, rows: int, chunks: int) -> tuple[list[Txn], list[tuple[str, str, Decimal]]]:
    """Transactions and importance rows with many ties: few distinct counts, amounts near 23, weights on a grid."""
    rnd = random.Random(seed)
    merchants = [f"M{i}" for i in range(8)]
    customers = [f"C{i}" for i in range(150)]
    txns = []
    for line in range(rows):
        m = rnd.choice(merchants[:2]) if rnd.random() < 0.5 else rnd.choice(merchants)
        c = rnd.choice(customers[:40]) if rnd.random() < 0.3 else rnd.choice(customers)
        gender = rnd.choices("MFEU", weights=(5, 4, 1, 1))[0]
        amount = rnd.choice([D("22.99"), D("23.00"), D("23.01"), D("0.00"), D("46.00"), D(rnd.randint(0, 6000)) / 100])
        txns.append(Txn(line * chunks // rows, line, c, m, gender, amount))
    grid = [D("0.05"), D("0.15"), D("0.30"), D("0.90"), D("2.50"), D("3.33")]
    importance = [
        (c, m, rnd.choice(grid))
        for c in customers
        for m in merchants
        if rnd.random() < 0.7
        for _ in range(rnd.choice([1, 1, 2, 3]))
    ]
    return txns, importance


CASES = [
    # seed, batch (chunks folded per pass), PATID* settings
    (1, 2, {"PATID1_MIN_MERCHANT_TXNS": 300, "PATID2_MIN_TXNS": 4, "PATID3_MIN_FEMALE_CUSTOMERS": 20}),
    (2, 3, {"PATID1_MIN_MERCHANT_TXNS": 200, "PATID2_MIN_TXNS": 3, "PATID3_MIN_FEMALE_CUSTOMERS": 30}),
    # q whose positions q * (N - 1) land a few ulps off an integer (0.7 * 90, 0.55 * 100, ...)
    (3, 6, {"PATID1_MIN_MERCHANT_TXNS": 100, "PATID1_COUNT_PERCENTILE": 0.7, "PATID1_WEIGHT_PERCENTILE": 0.55,
            "PATID2_MIN_TXNS": 5}),
]  # fmt: skip


@pytest.mark.parametrize("seed, batch, env", CASES)
def test_batches_credit_the_same_first_chunk_as_the_reference(spark, pg_conn, seed, batch, env):
    """Chunks folded `batch` at a time find each detection at the chunk where the reference first has it."""
    chunks = 6
    txns, importance = _random_data(seed, rows=3000, chunks=chunks)
    ledger = [Chunk(i, "random.csv", i) for i in range(chunks)]
    want = {
        k: e.chunk.position
        for k, e in expected_detections(pg_conn, ledger, txns, importance, limits_of(settings(**env))).items()
    }

    sums: dict[tuple[str, str], list] = defaultdict(lambda: [D(0), 0])
    for c, m, w in importance:
        sums[(c, m)][0] += w
        sums[(c, m)][1] += 1
    weights = pd.by_pair(weights_df(spark, [(c, m, s, n) for (c, m), (s, n) in sums.items()])).localCheckpoint()
    state = pd.by_merchant(state_df(spark, [])).localCheckpoint()
    got: dict[tuple[str, str, str], int] = {}
    for start in range(0, chunks, batch):
        k = min(batch, chunks - start)
        rows = [
            (t.chunk - start, t.merchant, t.customer, t.gender, t.amount) for t in txns if start <= t.chunk < start + k
        ]
        versions = pd.fold_batch(state, batch_rows(spark, rows), k).localCheckpoint()
        for key, cut in pd.first_hits(pd.detect_batch(versions, weights, k, thresholds(**env)).collect()).items():
            got.setdefault(key, start + cut)
        state = pd.latest_state(versions, k)
    assert got == want
    # The data must exercise every pattern, and detections after a batch's first chunk prove per-cut judgement.
    assert {p for p, _, _ in want} == set(pd.ACTION_TYPES)
    assert any(k % batch for k in want.values())
