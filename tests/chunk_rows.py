"""One clean chunk row (CHUNK_ARROW_SCHEMA's columns) made by hand, for tests that lay chunks or staged rows down
themselves."""

from __future__ import annotations

from decimal import Decimal


def chunk_row(
    line: int,
    customer: str = "C_V1",
    gender: str = "F",
    amount: str | None = "10.00",
    merchant: str = "M_V",
    file_id: str = "handmade-bad",
    chunk_seq: int = 0,
) -> dict:
    return {
        "step": 1,
        "customer": customer,
        "age": "2",
        "gender": gender,
        "zipcodeOri": "28007",
        "merchant": merchant,
        "zipMerchant": "28007",
        "category": "es_food",
        "amount": None if amount is None else Decimal(amount),
        "fraud": 0,
        "source_file_id": file_id,
        "chunk_seq": chunk_seq,
        "source_line": line,
    }
