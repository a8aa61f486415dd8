"""Schemas shared by Mechanism X (Arrow, when it writes chunks) and Mechanism Y (Spark, when it reads them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from pyspark.sql.types import StructType

TRANSACTION_HEADER = (
    "step",
    "customer",
    "age",
    "gender",
    "zipcodeOri",
    "merchant",
    "zipMerchant",
    "category",
    "amount",
    "fraud",
)
IMPORTANCE_HEADER = ("Source", "Target", "Weight", "typeTrans", "fraud")
GENDERS = ("M", "F", "E", "U")
AMOUNT_PRECISION, AMOUNT_SCALE = 18, 2

# Text columns carry single quotes in the source files; they are stripped on ingest.
TRANSACTION_TEXT_COLUMNS = ("customer", "age", "gender", "zipcodeOri", "merchant", "zipMerchant", "category")
LINEAGE_COLUMNS = ("source_file_id", "chunk_seq", "source_line")

CHUNK_ARROW_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("customer", pa.string(), nullable=False),
        pa.field("age", pa.string()),
        pa.field("gender", pa.string(), nullable=False),
        pa.field("zipcodeOri", pa.string()),
        pa.field("merchant", pa.string(), nullable=False),
        pa.field("zipMerchant", pa.string()),
        pa.field("category", pa.string()),
        pa.field("amount", pa.decimal128(AMOUNT_PRECISION, AMOUNT_SCALE), nullable=False),
        pa.field("fraud", pa.int8(), nullable=False),
        pa.field("source_file_id", pa.string(), nullable=False),
        pa.field("chunk_seq", pa.int32(), nullable=False),
        pa.field("source_line", pa.int64(), nullable=False),
    ]
)

IMPORTANCE_ARROW_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("weight", pa.decimal128(AMOUNT_PRECISION, AMOUNT_SCALE), nullable=False),
        pa.field("type_trans", pa.string()),
        pa.field("fraud", pa.int8()),
    ]
)

# Rows that failed validation, as written to the lake's quarantine/ (by X at ingest, by Y at detect).
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source_file_id", pa.string(), nullable=False),
        pa.field("source_line", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw_line", pa.string()),
    ]
)
# The columns of the PostgreSQL quarantine table, in COPY order.
QUARANTINE_TABLE_COLUMNS = ("file_id", "line_no", "chunk_seq", "stage", "reason", "raw_line")

# Columns of the detection files in the lake (SPEC §3), in this order.
DETECTION_COLUMNS = ("YStartTime", "detectionTime", "patternId", "ActionType", "customerName", "MerchantId")
DETECTION_ARROW_SCHEMA = pa.schema([pa.field(c, pa.string(), nullable=False) for c in DETECTION_COLUMNS])


# Mechanism Y's running state per (merchant, customer), as Spark holds it and PostgreSQL's y_state stores it.
STATE_ARROW_SCHEMA = pa.schema(
    [
        pa.field("merchant", pa.string(), nullable=False),
        pa.field("customer", pa.string(), nullable=False),
        pa.field("n", pa.int64(), nullable=False),
        pa.field("amount_sum", pa.decimal128(38, AMOUNT_SCALE), nullable=False),
        pa.field("has_f", pa.bool_(), nullable=False),
        pa.field("has_m", pa.bool_(), nullable=False),
    ]
)
# Importance weights aggregated to (customer, merchant): sum and count, so w = sum / count.
WEIGHTS_ARROW_SCHEMA = pa.schema(
    [
        pa.field("customer", pa.string(), nullable=False),
        pa.field("merchant", pa.string(), nullable=False),
        pa.field("weight_sum", pa.decimal128(38, AMOUNT_SCALE), nullable=False),
        pa.field("weight_count", pa.int64(), nullable=False),
    ]
)
# What Mechanism Y folds into its state: the clean rows of a batch, each tagged with its chunk's cut.
BATCH_ROWS_ARROW_SCHEMA = pa.schema(
    [
        pa.field("cut", pa.int32(), nullable=False),
        pa.field("merchant", pa.string(), nullable=False),
        pa.field("customer", pa.string(), nullable=False),
        pa.field("gender", pa.string(), nullable=False),
        pa.field("amount", pa.decimal128(AMOUNT_PRECISION, AMOUNT_SCALE), nullable=False),
    ]
)


def spark_schema(schema: pa.Schema) -> "StructType":
    """The Spark twin of an Arrow schema (types and nullability), so each schema is written once."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def chunk_spark_schema() -> "StructType":
    """The Spark schema of a chunk object (the partition columns year/month/day are not in the files)."""
    return spark_schema(CHUNK_ARROW_SCHEMA)


def state_spark_schema() -> "StructType":
    return spark_schema(STATE_ARROW_SCHEMA)


def weights_spark_schema() -> "StructType":
    return spark_schema(WEIGHTS_ARROW_SCHEMA)


def batch_rows_spark_schema() -> "StructType":
    return spark_schema(BATCH_ROWS_ARROW_SCHEMA)
