"""Y's commit publishing X's staged rows (`ledger.publish_staged`) and the `y_state` table it folds them into,
against real PostgreSQL: what the tables hold after a publish, after a rolled-back one, and the schema's
migration of an existing `y_state`."""

from __future__ import annotations

from decimal import Decimal

import pyarrow as pa
import pytest

from src import ledger
from src.schemas.transaction_schemas import CHUNK_ARROW_SCHEMA
from src.utils.db import Database
from tests.chunk_rows import chunk_row

FILE_ID = "local-publish"


def _row(line: int, customer: str, merchant: str, gender: str, amount: str, chunk_seq: int) -> dict:
    return chunk_row(line, customer, gender, amount, merchant, FILE_ID, chunk_seq)


@pytest.fixture
def db(make_settings):
    db = Database(make_settings())
    db.apply_schema()
    db.execute(
        "INSERT INTO source_files (file_id, source, name, kind, status) VALUES (%s, 'local', 'p.csv', "
        "'transactions', 'done')",
        (FILE_ID,),
    )
    yield db
    db.close()


def _staged_chunk(db: Database, chunk_seq: int, rows: list[dict]) -> int:
    """Record a written chunk and stage its rows as X does; returns its seq."""
    lines = [r["source_line"] for r in rows]
    seq = db.query(
        "INSERT INTO chunks (file_id, chunk_seq, first_line, last_line, rows_total, rows_valid, rows_quarantined, "
        "bytes_start, bytes_end, prefix_md5, object_key, ingest_date, status) VALUES (%s, %s, %s, %s, %s, %s, 0, 0, 1, "
        "'x', %s, '2026-01-02', 'written') RETURNING seq",
        (FILE_ID, chunk_seq, min(lines), max(lines), len(rows), len(rows), f"k/{FILE_ID}-{chunk_seq}.parquet"),
    )[0][0]
    table = pa.Table.from_pylist(rows, schema=CHUNK_ARROW_SCHEMA)
    db.run(lambda cur: ledger.stage_rows(cur, seq, ledger.staging_payload(table)), what="stage")
    return seq


def _state(db: Database) -> list[tuple]:
    return db.query("SELECT merchant, customer, n, amount_sum, has_f, has_m FROM y_state ORDER BY 1, 2")


def test_publish_moves_the_kept_rows_folds_them_and_empties_their_staging(db):
    a = _staged_chunk(
        db,
        0,
        [
            _row(2, "C1", "M1", "F", "10.00", 0),
            _row(3, "C1", "M1", "M", "5.25", 0),
            _row(4, "C2", "M1", "F", "7.00", 0),  # rejected by Y
            _row(5, "C2", "M2", "M", "1.10", 0),
        ],
    )
    b = _staged_chunk(db, 1, [_row(6, "C1", "M1", "F", "2.00", 1), _row(7, "C3", "M2", "F", "3.00", 1)])
    c = _staged_chunk(db, 2, [_row(8, "C9", "M9", "F", "9.00", 2)])  # not in the batch: left staged
    all_rejected = _staged_chunk(db, 3, [_row(9, "C4", "M1", "M", "4.00", 3)])
    db.execute("INSERT INTO y_state VALUES ('M1', 'C1', 3, 30.00, false, true)")  # state of earlier chunks

    published = db.run(
        lambda cur: ledger.publish_staged(cur, [a, b, all_rejected], [(a, 4), (all_rejected, 9)]), what="publish"
    )

    assert published == {a: (3, Decimal("16.35")), b: (2, Decimal("5.00"))}  # all_rejected: nothing published
    assert db.query("SELECT source_line, chunk_seq, customer, merchant, amount FROM transactions ORDER BY 1") == [
        (2, 0, "C1", "M1", Decimal("10.00")),
        (3, 0, "C1", "M1", Decimal("5.25")),
        (5, 0, "C2", "M2", Decimal("1.10")),
        (6, 1, "C1", "M1", Decimal("2.00")),
        (7, 1, "C3", "M2", Decimal("3.00")),
    ]
    assert _state(db) == [
        ("M1", "C1", 6, Decimal("47.25"), True, True),
        ("M2", "C2", 1, Decimal("1.10"), False, True),
        ("M2", "C3", 1, Decimal("3.00"), True, False),
    ]
    assert db.query("SELECT seq, source_line FROM staged_rows ORDER BY 1, 2") == [(c, 8)]


def test_a_publish_rolled_back_leaves_staging_transactions_and_state_as_they_were(db):
    """The statements of a publish go in one round trip of the commit transaction: a failure after them (here a
    raise, as a commit that fails its check) undoes every one."""
    a = _staged_chunk(db, 0, [_row(2, "C1", "M1", "F", "10.00", 0), _row(3, "C2", "M1", "M", "5.00", 0)])

    class Abort(Exception):
        pass

    def publish_then_fail(cur) -> None:
        assert ledger.publish_staged(cur, [a], [(a, 3)]) == {a: (1, Decimal("10.00"))}
        raise Abort

    with pytest.raises(Abort):
        db.run(publish_then_fail, what="publish, then fail")

    assert db.query("SELECT count(*) FROM transactions") == [(0,)]
    assert _state(db) == []
    assert db.query("SELECT source_line FROM staged_rows WHERE seq = %s ORDER BY 1", (a,)) == [(2,), (3,)]
    assert db.run(lambda cur: ledger.publish_staged(cur, [a], []), what="publish") == {a: (2, Decimal("15.00"))}
    assert db.query("SELECT count(*) FROM transactions") == [(2,)]


def test_y_state_leaves_room_for_its_updates_on_a_new_and_an_existing_database(db):
    reloptions = "SELECT reloptions FROM pg_class WHERE oid = 'y_state'::regclass"
    assert db.query(reloptions) == [(["fillfactor=50"],)]
    # A y_state created before the setting (its rows kept), the schema applied again, twice.
    db.execute("INSERT INTO y_state VALUES ('M1', 'C1', 3, 30.00, false, true)")
    db.execute("ALTER TABLE y_state RESET (fillfactor)")
    assert db.query(reloptions) == [(None,)]
    db.apply_schema()
    db.apply_schema()
    assert db.query(reloptions) == [(["fillfactor=50"],)]
    assert _state(db) == [("M1", "C1", 3, Decimal("30.00"), False, True)]
