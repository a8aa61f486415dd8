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


def chunk_spark_schema() -> "StructType":
    """The Spark schema of a chunk object (the partition columns year/month/day are not in the files)."""
    from pyspark.sql.types import (
        ByteType,
        DecimalType,
        IntegerType,
        LongType,
        StringType,
        StructField,
        StructType,
    )

    return StructType(
        [
            StructField("step", IntegerType(), False),
            StructField("customer", StringType(), False),
            StructField("age", StringType(), True),
            StructField("gender", StringType(), False),
            StructField("zipcodeOri", StringType(), True),
            StructField("merchant", StringType(), False),
            StructField("zipMerchant", StringType(), True),
            StructField("category", StringType(), True),
            StructField("amount", DecimalType(AMOUNT_PRECISION, AMOUNT_SCALE), False),
            StructField("fraud", ByteType(), False),
            StructField("source_file_id", StringType(), False),
            StructField("chunk_seq", IntegerType(), False),
            StructField("source_line", LongType(), False),
        ]
    )


def state_spark_schema() -> "StructType":
    """Mechanism Y's running state per (merchant, customer)."""
    from pyspark.sql.types import BooleanType, DecimalType, LongType, StringType, StructField, StructType

    return StructType(
        [
            StructField("merchant", StringType(), False),
            StructField("customer", StringType(), False),
            StructField("n", LongType(), False),
            StructField("amount_sum", DecimalType(38, AMOUNT_SCALE), False),
            StructField("has_f", BooleanType(), False),
            StructField("has_m", BooleanType(), False),
        ]
    )


def weights_spark_schema() -> "StructType":
    """Importance weights aggregated to (customer, merchant): sum and count, so w = sum / count."""
    from pyspark.sql.types import DecimalType, LongType, StringType, StructField, StructType

    return StructType(
        [
            StructField("customer", StringType(), False),
            StructField("merchant", StringType(), False),
            StructField("weight_sum", DecimalType(38, AMOUNT_SCALE), False),
            StructField("weight_count", LongType(), False),
        ]
    )


def batch_rows_spark_schema() -> "StructType":
    """What Mechanism Y folds into its state: the clean rows of a batch, each tagged with its chunk's cut."""
    from pyspark.sql.types import DecimalType, IntegerType, StringType, StructField, StructType

    return StructType(
        [
            StructField("cut", IntegerType(), False),
            StructField("merchant", StringType(), False),
            StructField("customer", StringType(), False),
            StructField("gender", StringType(), False),
            StructField("amount", DecimalType(AMOUNT_PRECISION, AMOUNT_SCALE), False),
        ]
    )
