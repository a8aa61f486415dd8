"""What Mechanism Y reads is checked before it touches the state.

`annotate_problems` is a pure DataFrame function: it adds a `_problem` column holding the first
reason a row is unfit (a null where a value is required, a value out of range, a row id seen
twice in the chunk), or null for a clean row. The caller splits on it after a single action,
so checking costs no extra pass; rejected rows are counted and quarantined, never dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    wrong = [f"{n} is {actual[n].simpleString()} (expected {t.simpleString()})" for n, t in expected.items()
             if n in actual and actual[n] != t]
    if missing or wrong:
        raise SchemaMismatch("; ".join(([f"missing columns {', '.join(missing)}"] if missing else []) + wrong))


def annotate_problems(df: "DataFrame") -> "DataFrame":
    """Add `_problem`: the first reason the row cannot enter the state, or null."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    dup_rank = F.row_number().over(Window.partitionBy("source_file_id", "source_line").orderBy(F.lit(1)))
    checks = [(F.col(c).isNull(), F.lit(f"null {c}")) for c in REQUIRED]
    checks += [
        (F.length("customer") == 0, F.lit("empty customer id")),
        (F.length("merchant") == 0, F.lit("empty merchant id")),
        (F.col("amount") < 0, F.lit("negative amount")),
        (F.col("step") < 0, F.lit("negative step")),
        (~F.col("gender").isin(*GENDERS), F.concat(F.lit("unknown gender "), F.col("gender"))),
        (~F.col("fraud").isin(0, 1), F.lit("fraud not 0 or 1")),
        (dup_rank > 1, F.lit("duplicate row id (source_file_id, source_line)")),
    ]
    expr = F.when(checks[0][0], checks[0][1])
    for cond, reason in checks[1:]:
        expr = expr.when(cond, reason)
    return df.withColumn(PROBLEM, expr.otherwise(F.lit(None).cast("string")))
