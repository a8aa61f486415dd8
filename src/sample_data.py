"""Generate a BankSim-shaped sample: ``transactions.csv`` and a row-aligned ``CustomerImportance.csv``.

The real BankSim files cannot be downloaded here, so the product ships this generator. It keeps what the
pipeline depends on: the header, the single-quoted text values, rows sorted by ``step`` (0-179), and the skew
(at the default 594,643 rows: 4,112 customers, 50 merchants, 15 categories, two merchants above 50,000
transactions). Each customer has a fixed gender, age, spending level and a small set of favourite merchants,
and a few planted groups make every pattern of SPEC section 4 fire tens of times, not thousands:

- "upgrade" customers: among the most frequent at both big merchants and the cheapest there (PatId1);
- "child" customers (age ``'0'``): 80+ cheap rides at the biggest merchant (PatId2);
- a handful of mid-sized merchants whose clientele leans male, with more than 100 female customers (PatId3).

Customers who shop 70+ times at a merchant otherwise spend clearly above 23 per transaction, so the patterns
stay stable while the data streams in chunk by chunk. Only the standard library is used (``random`` is stable
across Python versions), so the same arguments give the same bytes everywhere.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

log = logging.getLogger(__name__)

DEFAULT_ROWS = 594_643
DEFAULT_SEED = 42
DEFAULT_OUT = Path("data/inbox")

TRANSACTIONS_FILE = "transactions.csv"
CUSTOMER_IMPORTANCE_FILE = "CustomerImportance.csv"
TRANSACTIONS_HEADER = "step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud"
CUSTOMER_IMPORTANCE_HEADER = "Source,Target,Weight,typeTrans,fraud"

STEPS = 180
ZIPCODE = "28007"
BANKSIM_ROWS = 594_643
BANKSIM_CUSTOMERS = 4_112
MIN_CUSTOMERS = 300
N_MERCHANTS = 50

# Share of all transactions at the two big transport merchants (BankSim: 299,693 and 205,426 of 594,643).
BIG1_SHARE = (0.46, 0.54)
BIG2_SHARE = (0.31, 0.38)

# Planted groups, per 4,112 customers.
UPGRADE_CUSTOMERS = 20
CHILD_CUSTOMERS = 25

# A customer with this many transactions at one merchant spends like an adult regular (mean well above 23).
HEAVY_COUNT = 70

GENDERS = (("F", 0.5455), ("M", 0.45), ("E", 0.0025), ("U", 0.002))
AGES = (
    ("0", 0.004),
    ("1", 0.098),
    ("2", 0.315),
    ("3", 0.247),
    ("4", 0.184),
    ("5", 0.105),
    ("6", 0.045),
    ("U", 0.002),
)

# category -> (mean amount relative to a transport ride, fraud probability per transaction); BankSim-like.
CATEGORIES: dict[str, tuple[float, float]] = {
    "es_transportation": (1.0, 0.0),
    "es_food": (1.4, 0.0),
    "es_health": (3.8, 0.105),
    "es_wellnessandbeauty": (2.2, 0.048),
    "es_fashion": (2.3, 0.018),
    "es_barsandrestaurants": (1.6, 0.019),
    "es_hyper": (1.5, 0.046),
    "es_sportsandtoys": (3.3, 0.495),
    "es_tech": (4.0, 0.067),
    "es_home": (4.2, 0.152),
    "es_hotelservices": (4.3, 0.314),
    "es_otherservices": (3.0, 0.25),
    "es_contents": (1.7, 0.0),
    "es_travel": (25.0, 0.79),
    "es_leisure": (3.0, 0.95),
}

# The 48 smaller merchants: (category, popularity, gender lean). Lean "m" favours male customers, "f" female.
# Popular male-leaning merchants satisfy PatId3; rare male-leaning ones have too few women for it.
TAIL_MERCHANTS: tuple[tuple[str, float, str], ...] = (
    ("es_food", 16.0, "f"),
    ("es_health", 7.0, "f"),
    ("es_health", 4.5, "m"),
    ("es_health", 3.0, "f"),
    ("es_health", 1.5, "f"),
    ("es_health", 1.0, "f"),
    ("es_health", 0.5, "m"),
    ("es_wellnessandbeauty", 7.0, "f"),
    ("es_wellnessandbeauty", 4.0, "f"),
    ("es_wellnessandbeauty", 2.5, "f"),
    ("es_wellnessandbeauty", 1.5, "f"),
    ("es_wellnessandbeauty", 1.0, "f"),
    ("es_wellnessandbeauty", 0.6, "f"),
    ("es_fashion", 3.0, "f"),
    ("es_fashion", 1.8, "f"),
    ("es_fashion", 1.0, "f"),
    ("es_fashion", 0.8, "f"),
    ("es_fashion", 0.5, "f"),
    ("es_barsandrestaurants", 3.5, "m"),
    ("es_barsandrestaurants", 2.0, "f"),
    ("es_barsandrestaurants", 1.0, "f"),
    ("es_barsandrestaurants", 0.5, "m"),
    ("es_hyper", 3.5, "f"),
    ("es_hyper", 2.0, "m"),
    ("es_hyper", 1.0, "f"),
    ("es_sportsandtoys", 2.5, "m"),
    ("es_sportsandtoys", 2.0, "m"),
    ("es_sportsandtoys", 0.6, "f"),
    ("es_sportsandtoys", 0.4, "m"),
    ("es_sportsandtoys", 0.3, "f"),
    ("es_tech", 2.2, "m"),
    ("es_tech", 0.8, "f"),
    ("es_tech", 0.4, "m"),
    ("es_tech", 0.3, "f"),
    ("es_home", 1.2, "f"),
    ("es_home", 0.6, "f"),
    ("es_home", 0.3, "m"),
    ("es_hotelservices", 1.6, "m"),
    ("es_hotelservices", 0.6, "f"),
    ("es_hotelservices", 0.3, "f"),
    ("es_otherservices", 0.6, "f"),
    ("es_otherservices", 0.3, "m"),
    ("es_contents", 0.6, "f"),
    ("es_contents", 0.3, "f"),
    ("es_travel", 0.5, "f"),
    ("es_travel", 0.3, "m"),
    ("es_leisure", 0.3, "f"),
    ("es_leisure", 0.2, "f"),
)
LEAN = {"m": {"M": 1.6, "F": 0.7}, "f": {"M": 0.85, "F": 1.15}}

NOISE_POINTS = 4096

# Number of favourite small merchants per customer.
FAVOURITES = ((1, 0.15), (2, 0.25), (3, 0.3), (4, 0.2), (5, 0.1))


@dataclass
class _Customer:
    cid: str
    gender: str
    age: str
    total: int
    kind: str  # "regular", "upgrade" or "child"
    share1: float
    share2: float
    level: float = 0.0


def _pick(rng: random.Random, table: tuple[tuple, ...]):
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def _unique_ids(rng: random.Random, prefix: str, n: int, low: int, high: int) -> list[str]:
    seen: set[int] = set()
    out: list[str] = []
    while len(out) < n:
        v = rng.randint(low, high)
        if v not in seen:
            seen.add(v)
            out.append(f"{prefix}{v}")
    return out


def _customer_count(rows: int) -> int:
    scaled = round(BANKSIM_CUSTOMERS * rows / BANKSIM_ROWS)
    return max(1, min(rows, max(scaled, min(MIN_CUSTOMERS, rows // 3))))


def _split_total(rng: random.Random, rows: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of `rows` proportional to `weights`, every part at least 1."""
    n = len(weights)
    spare = rows - n
    total = sum(weights)
    exact = [w * spare / total for w in weights]
    parts = [int(x) for x in exact]
    order = sorted(range(n), key=lambda i: (parts[i] - exact[i], rng.random()))
    for i in order[: spare - sum(parts)]:
        parts[i] += 1
    return [p + 1 for p in parts]


def _make_customers(rng: random.Random, rows: int) -> list[_Customer]:
    n = _customer_count(rows)
    ids = _unique_ids(rng, "C", n, 10**8, 10**10 - 1)
    scale = n / BANKSIM_CUSTOMERS
    n_up = min(n // 10, round(UPGRADE_CUSTOMERS * scale))
    n_child = min(n // 10, round(CHILD_CUSTOMERS * scale))
    kinds = ["upgrade"] * n_up + ["child"] * n_child + ["regular"] * (n - n_up - n_child)
    rng.shuffle(kinds)

    # Relative activity: most customers shop almost daily, a minority only now and then.
    rel: list[float] = []
    for kind in kinds:
        if kind == "upgrade":
            rel.append(rng.uniform(1.9, 2.1))
        elif kind == "child":
            rel.append(rng.uniform(0.68, 0.76))
        elif rng.random() < 0.72:
            rel.append(rng.uniform(0.95, 1.8))
        else:
            rel.append(rng.uniform(0.03, 0.95))
    mean = sum(rel) / n
    totals = _split_total(rng, rows, [r / mean for r in rel])

    customers: list[_Customer] = []
    for cid, kind, total in zip(ids, kinds, totals, strict=True):
        gender = _pick(rng, GENDERS)
        age = "U" if gender == "E" else _pick(rng, AGES)
        if kind == "upgrade":
            share1, share2 = 0.55, 0.40
        elif kind == "child":
            share1, share2, age = 0.9, 0.07, "0"
        else:
            share1, share2 = rng.uniform(*BIG1_SHARE), rng.uniform(*BIG2_SHARE)
        customers.append(_Customer(cid, gender, age, total, kind, share1, share2))

    # Every gender the schema allows appears at least once where there are enough customers.
    if n >= 8:
        regulars = [c for c in customers if c.kind == "regular"]
        for g in ("E", "U", "M", "F"):
            if not any(c.gender == g for c in customers):
                c = rng.choice([c for c in regulars if c.gender in ("M", "F")])
                c.gender = g
                if g == "E":
                    c.age = "U"
    return customers


def _favourites(rng: random.Random, gender: str, count: int, n_tail: int) -> list[int]:
    """Weighted sampling without replacement (Efraimidis-Spirakis keys), most likely first."""
    keys = []
    for j, (_, pop, lean) in enumerate(TAIL_MERCHANTS[:n_tail]):
        w = pop * LEAN[lean].get(gender, 1.0)
        keys.append((rng.random() ** (1.0 / w), j))
    keys.sort(reverse=True)
    return [j + 2 for _, j in keys[:count]]


def _plan(rng: random.Random, customers: list[_Customer], n_merchants: int) -> list[list[int]]:
    """For each customer, the merchant index of each of its transactions (0 and 1 are the big two)."""
    n_tail = max(0, n_merchants - 2)
    plans: list[list[int]] = []
    for c in customers:
        n1 = round(c.total * c.share1)
        n2 = min(c.total - n1, round(c.total * c.share2)) if n_merchants > 1 else 0
        tail = c.total - n1 - n2
        merchants = [0] * n1 + [1] * n2
        if tail and n_tail > 0:
            favs = _favourites(rng, c.gender, min(_pick(rng, FAVOURITES), n_tail), n_tail)
            if tail <= len(favs):
                merchants += favs[:tail]
            else:
                merchants += favs
                weights = [TAIL_MERCHANTS[j - 2][1] for j in favs]
                merchants += rng.choices(favs, weights=weights, k=tail - len(favs))
        else:
            merchants += [0] * tail
        plans.append(merchants)

    # Every merchant appears at least once: move one big-merchant transaction of a busy customer to it.
    present = {m for plan in plans for m in plan}
    for m in range(n_merchants):
        if m not in present:
            busiest = max(range(len(plans)), key=lambda i: plans[i].count(0))
            plan = plans[busiest]
            if 0 not in plan:
                break
            plan[plan.index(0)] = m
    return plans


def _levels(rng: random.Random, customers: list[_Customer], plans: list[list[int]]) -> None:
    """Spending level: a mean transport ride of the customer. Only the planted groups are cheap and busy."""
    for c, plan in zip(customers, plans, strict=True):
        if c.kind == "upgrade":
            c.level = rng.uniform(8.0, 13.0)
        elif c.kind == "child":
            c.level = rng.uniform(10.0, 16.0)
        elif plan and Counter(plan).most_common(1)[0][1] >= HEAVY_COUNT:
            c.level = rng.uniform(30.0, 50.0)
        else:
            c.level = rng.uniform(10.0, 50.0)


def _build_rows(rng: random.Random, rows: int) -> tuple[list[str], list[str], dict]:
    customers = _make_customers(rng, rows)
    n_merchants = min(N_MERCHANTS, rows)
    merchant_ids = _unique_ids(rng, "M", n_merchants, 10**6, 2 * 10**9)
    categories = (["es_transportation"] * 2 + [t[0] for t in TAIL_MERCHANTS])[:n_merchants]
    plans = _plan(rng, customers, n_merchants)
    _levels(rng, customers, plans)

    factor = [CATEGORIES[cat][0] for cat in categories]
    fraud_p = [CATEGORIES[cat][1] for cat in categories]
    cust_txt = [f"'{c.cid}','{c.age}','{c.gender}','{ZIPCODE}'" for c in customers]
    merch_txt = [f"'{m}','{ZIPCODE}','{cat}'" for m, cat in zip(merchant_ids, categories, strict=True)]
    ci_pair = [[f"'{c.cid}','{m}'," for m in merchant_ids] for c in customers]
    cat_txt = [f",'{cat}'," for cat in categories]

    # Per-transaction noise is lognormal with mean 1 (read from a quantile table: one draw instead of a
    # Gaussian), so a customer's mean amount tracks its level.
    sigma = 0.5
    unit = NormalDist()
    noise = [math.exp(-sigma * sigma / 2 + sigma * unit.inv_cdf((i + 0.5) / NOISE_POINTS)) for i in range(NOISE_POINTS)]
    rand = rng.random
    # Each merchant's transactions of a customer are spread evenly over the days (stratified), so running
    # counts grow steadily and the patterns, evaluated chunk by chunk, settle early instead of flickering.
    buckets: list[list[tuple[float, int, int, int, int]]] = [[] for _ in range(STEPS)]
    for ci, (c, plan) in enumerate(zip(customers, plans, strict=True)):
        level = c.level
        for m in sorted(set(plan)):
            cnt = plan.count(m)
            span = STEPS / cnt
            scale = level * factor[m]
            p = fraud_p[m]
            for j in range(cnt):
                amount = scale * noise[int(rand() * NOISE_POINTS)]
                fraud = 1 if p and rand() < p else 0
                if fraud:
                    amount *= 2.5 + 3.5 * rand()
                buckets[int((j + rand()) * span)].append((rand(), ci, m, round(amount * 100), fraud))

    txn_lines = [TRANSACTIONS_HEADER]
    ci_lines = [CUSTOMER_IMPORTANCE_HEADER]
    for step, bucket in enumerate(buckets):
        bucket.sort()
        for _, ci, m, cents, fraud in bucket:
            amt = str(cents / 100)
            txn_lines.append(f"{step},{cust_txt[ci]},{merch_txt[m]},{amt},{fraud}")
            ci_lines.append(f"{ci_pair[ci][m]}{amt}{cat_txt[m]}{fraud}")

    used = {m for plan in plans for m in plan}
    stats = {
        "rows": rows,
        "customers": len(customers),
        "merchants": len(used),
        "categories": len({categories[m] for m in used}),
    }
    return txn_lines, ci_lines, stats


def _write_atomic(path: Path, lines: list[str]) -> None:
    # A dot-prefixed partial file is ignored by the inbox watcher until the rename makes it whole.
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\n".join(lines))
        fh.write("\n")
    os.replace(tmp, path)


def generate(out_dir: Path, rows: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> dict:
    """Write ``transactions.csv`` and ``CustomerImportance.csv`` into `out_dir`; return what was written.

    CustomerImportance is written first so a watcher never sees transactions without their reference data.
    Returns ``{"rows", "customers", "merchants", "categories"}``.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # noqa: S311 - a deterministic sample, not a secret
    txn_lines, ci_lines, stats = _build_rows(rng, rows)
    _write_atomic(out_dir / CUSTOMER_IMPORTANCE_FILE, ci_lines)
    _write_atomic(out_dir / TRANSACTIONS_FILE, txn_lines)
    log.info(
        "generated %s rows (%s customers, %s merchants, seed %s) in %s in %.2fs",
        stats["rows"],
        stats["customers"],
        stats["merchants"],
        seed,
        out_dir,
        time.perf_counter() - started,
    )
    return stats


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.sample_data",
        description=(
            "Write a BankSim-shaped sample: DIR/transactions.csv and a row-aligned DIR/CustomerImportance.csv "
            "(single-quoted text values, rows sorted by step). The same --rows and --seed give the same bytes."
        ),
    )
    parser.add_argument(
        "--rows",
        type=_positive_int,
        default=DEFAULT_ROWS,
        metavar="N",
        help="number of transactions; customers scale with it, at least 300 where rows allow (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        metavar="S",
        help="random seed (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help="output directory, created if missing (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stats = generate(args.out, rows=args.rows, seed=args.seed)
    print(
        f"wrote {stats['rows']} transactions ({stats['customers']} customers, {stats['merchants']} merchants, "
        f"{stats['categories']} categories) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
