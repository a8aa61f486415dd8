"""What Mechanism Y reads is checked before it touches the state.

`annotate_problems` is a pure DataFrame function: it adds a `_problem` column holding the first
reason a row is unfit (a null where a value is required, a value out of range, a row id seen
twice in the chunk), or null for a clean row. The caller splits on it after a single action,
so checking costs no extra pass; rejected rows are counted and quarantined, never dropped.
Duplicate row ids are found on the collected rows (`mark_duplicates`): a window in Spark would cost a
shuffle per chunk for a check that almost never fires.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from src.schemas.transaction_schemas import GENDERS, chunk_spark_schema

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

PROBLEM = "_problem"
REQUIRED = ("step", "customer", "gender", "merchant", "amount", "fraud", "source_file_id", "chunk_seq", "source_line")


class SchemaMismatch(ValueError):
    """The chunk object does not have the columns and types of a chunk."""


def check_schema(df: "DataFrame") -> None:
    """Every expected column with its expected type (extra columns are tolerated)."""
    expected = {f.name: f.dataType for f in chunk_spark_schema().fields}
    actual = {f.name: f.dataType for f in df.schema.fields}
    missing = [n for n in expected if n not in actual]
    wrong = [
        f"{n} is {actual[n].simpleString()} (expected {t.simpleString()})"
        for n, t in expected.items()
        if n in actual and actual[n] != t
    ]
    if missing or wrong:
        raise SchemaMismatch("; ".join(([f"missing columns {', '.join(missing)}"] if missing else []) + wrong))


def annotate_problems(df: "DataFrame") -> "DataFrame":
    """Add `_problem`: the first reason the row cannot enter the state, or null."""
    from pyspark.sql import functions as F

    checks = [(F.col(c).isNull(), F.lit(f"null {c}")) for c in REQUIRED]
    checks += [
        (F.length("customer") == 0, F.lit("empty customer id")),
        (F.length("merchant") == 0, F.lit("empty merchant id")),
        (F.col("amount") < 0, F.lit("negative amount")),
        (F.col("step") < 0, F.lit("negative step")),
        (~F.col("gender").isin(*GENDERS), F.concat(F.lit("unknown gender "), F.col("gender"))),
        (~F.col("fraud").isin(0, 1), F.lit("fraud not 0 or 1")),
    ]
    expr = F.when(checks[0][0], checks[0][1])
    for cond, reason in checks[1:]:
        expr = expr.when(cond, reason)
    return df.withColumn(PROBLEM, expr.otherwise(F.lit(None).cast("string")))


DUPLICATE = "duplicate row id (source_file_id, source_line)"


def mark_duplicates(rows: pa.Table) -> pa.Table:
    """Set `_problem` on every repeat of a (source_file_id, source_line) already seen earlier in the chunk."""
    if rows.num_rows < 2:
        return rows
    counts = rows.group_by(["source_file_id", "source_line"]).aggregate([("source_line", "count")])
    if pc.max(counts["source_line_count"]).as_py() <= 1:
        return rows
    seen: set[tuple] = set()
    problems = rows.column(PROBLEM).to_pylist()
    for i, key in enumerate(zip(rows.column("source_file_id").to_pylist(), rows.column("source_line").to_pylist())):
        if key in seen and problems[i] is None:
            problems[i] = DUPLICATE
        seen.add(key)
    idx = rows.schema.get_field_index(PROBLEM)
    return rows.set_column(idx, PROBLEM, pa.array(problems, pa.string()))
