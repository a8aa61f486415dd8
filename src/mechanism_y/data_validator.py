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

from src.schemas.transaction_schemas import CHUNK_ARROW_SCHEMA, GENDERS, TRANSACTION_TEXT_COLUMNS

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

PROBLEM = "_problem"
REQUIRED = ("step", "customer", "gender", "merchant", "amount", "fraud", "source_file_id", "chunk_seq", "source_line")


def chunk_schema_problems(schema: pa.Schema) -> list[str]:
    """What keeps a Parquet object (by its own footer's schema) from being read as a chunk; [] if nothing.

    Every column of `CHUNK_ARROW_SCHEMA` must be there with its type (extra columns are tolerated). Spark
    reads chunks with that schema forced, so a wrong type fails the whole read instead of a row.
    """
    problems = []
    for field in CHUNK_ARROW_SCHEMA:
        if field.name not in schema.names:
            problems.append(f"column {field.name} is missing")
            continue
        actual = schema.field(field.name).type
        if not actual.equals(field.type):
            problems.append(f"column {field.name} is {actual} (expected {field.type})")
    return problems


def annotate_problems(df: "DataFrame") -> "DataFrame":
    """Add `_problem`: the first reason the row cannot enter the state, or null."""
    return df.withColumn(PROBLEM, problem_column())


def problem_column() -> "Column":
    """The expression `annotate_problems` adds as `_problem`. Unresolved, so one instance serves every DataFrame
    of its session: Mechanism Y builds it once instead of crossing Py4J for its ~50 parts every batch."""
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
    # PostgreSQL text cannot hold NUL: such a row would make the batch's COPY fail, batch after batch. `contains`
    # compares bytes; `instr` steps through UTF-8 characters to count a position, and cost a batch ~4 times more
    # JVM time over the 7 columns (bench/README.md, "ysort").
    checks += [(F.col(c).contains("\u0000"), F.lit(f"NUL character in {c}")) for c in TRANSACTION_TEXT_COLUMNS]
    expr = F.when(checks[0][0], checks[0][1])
    for cond, reason in checks[1:]:
        expr = expr.when(cond, reason)
    return expr.otherwise(F.lit(None).cast("string"))


DUPLICATE = "duplicate row id (source_file_id, source_line)"


def mark_duplicates(rows: pa.Table, within: tuple[str, ...] = ()) -> pa.Table:
    """Set `_problem` on every repeat of a (source_file_id, source_line) already seen earlier in the chunk.

    `within` names columns that split the table into chunks (Mechanism Y's batch cut): a row id repeats
    only within its own chunk.
    """
    if rows.num_rows < 2:
        return rows
    keys = [*within, "source_file_id", "source_line"]
    counts = rows.group_by(keys).aggregate([("source_line", "count")])
    if pc.max(counts["source_line_count"]).as_py() <= 1:
        return rows
    seen: set[tuple] = set()
    problems = rows.column(PROBLEM).to_pylist()
    for i, key in enumerate(zip(*(rows.column(k).to_pylist() for k in keys))):
        if key in seen and problems[i] is None:
            problems[i] = DUPLICATE
        seen.add(key)
    idx = rows.schema.get_field_index(PROBLEM)
    return rows.set_column(idx, PROBLEM, pa.array(problems, pa.string()))
