"""Property tests of X's CSV validator (issue 9): whatever the bytes, every line is accounted for exactly once.

The validator is what X runs on a file: `iter_row_blocks` (line split, line limit, encoding) then
`parse_transactions` (fields and values), on blocks cut into chunks as X cuts them. The oracle is
the test's own split of the bytes on LF: each non-blank line must come out either as a good row or
as a quarantine row (compared by line number), never both and never neither, and nothing raises.
A line is blank when, without its line break and trailing CRs, it holds only spaces and tabs (and
is not over the line limit).
"""

from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from src.mechanism_x import csv_parser
from src.mechanism_x.csv_parser import RAW_LINE_CAP, RowBlock, iter_row_blocks, parse_transactions, quarantine_text

HEADER = b"step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud\n"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MARKER_ROOM = 100  # the "...[cut ...]" marker after RAW_LINE_CAP characters


def oracle(body: bytes, max_line_bytes: int) -> tuple[set[int], dict[int, bytes]]:
    """(blank line numbers, {line number: line without its LF}) for the bytes after the header."""
    segments = body.split(b"\n")
    if body.endswith(b"\n") or not body:
        segments = segments[:-1]  # nothing after the last line break
    blank, lines = set(), {}
    for i, segment in enumerate(segments):
        line_no = i + 2
        terminated = i < len(segments) - 1 or body.endswith(b"\n")
        content = len(segment) - (1 if terminated and segment.endswith(b"\r") else 0)
        if content <= max_line_bytes and not segment.rstrip(b"\r").strip(b" \t"):
            blank.add(line_no)
        else:
            lines[line_no] = segment
    return blank, lines


def validate(body: bytes, *, max_line_bytes: int, read_block: int, batch: int):
    """Run the validator as X does; returns (good line numbers, bad line numbers, bad reasons, bad raw lines)."""
    saved = csv_parser.READ_BLOCK
    csv_parser.READ_BLOCK = read_block
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tx.csv"
            path.write_bytes(HEADER + body)
            pending = RowBlock.empty()
            for block in iter_row_blocks(path, len(HEADER), 2, max_line_bytes=max_line_bytes):
                pending = RowBlock.concat(pending, block)
            good, bad, reasons, raws = [], [], [], []
            for start in range(0, len(pending), batch):
                parsed = parse_transactions(pending.slice(start, start + batch), file_id="f", chunk_seq=0)
                good += parsed.good.column("source_line").to_pylist()
                bad += parsed.bad_lines
                reasons += parsed.bad_reasons
                raws += parsed.bad_raw
            return good, bad, reasons, raws
    finally:
        csv_parser.READ_BLOCK = saved


def check_partition(body: bytes, max_line_bytes: int, read_block: int, batch: int) -> tuple[list[int], dict]:
    good, bad, reasons, raws = validate(body, max_line_bytes=max_line_bytes, read_block=read_block, batch=batch)
    blank, lines = oracle(body, max_line_bytes)
    assert len(good) == len(set(good)) and len(bad) == len(set(bad)), "a line came out twice"
    assert not set(good) & set(bad), "a line is both good and quarantined"
    assert set(good) | set(bad) == set(lines), "a line is neither good nor quarantined (or a blank one came out)"
    for reason, raw in zip(reasons, raws, strict=True):
        assert reason and "\x00" not in reason
        assert "\x00" not in raw and len(raw) <= RAW_LINE_CAP + MARKER_ROOM
        raw.encode("utf-8")  # no lone surrogates: PostgreSQL and Parquet take it
    return good, lines


# Bytes that matter to a CSV splitter, mixed with anything at all.
TOKENS = st.sampled_from(
    [
        b"\n",
        b"\r",
        b"\r\n",
        b",",
        b"'",
        b'"',
        b" ",
        b"\t",
        b"\x00",
        b"\x07",
        b"\x7f",
        b"\xff",
        b"\xc3",
        b"\xa9",
        b"1",
        b".",
    ]
)
NOISE = st.lists(st.one_of(TOKENS, st.binary(max_size=8)), max_size=200).map(b"".join)
LIMITS = st.sampled_from([16, 64, 1 << 20])
BLOCKS = st.sampled_from([5, 64, 4096, 8 << 20])
BATCHES = st.integers(min_value=1, max_value=7)


@SETTINGS
@given(body=NOISE, max_line_bytes=LIMITS, read_block=BLOCKS, batch=BATCHES)
@example(body=b"", max_line_bytes=64, read_block=5, batch=1)
@example(body=b"\r\r\n \t\r\n\x0b\n", max_line_bytes=64, read_block=5, batch=1)
@example(body=b"x" * 200 + b"\r\n" + b" " * 100 + b"\n", max_line_bytes=64, read_block=5, batch=2)
@example(body=b"x" * 200 + b"\r\n" + b" " * 100 + b"\n\t" * 3, max_line_bytes=64, read_block=4096, batch=2)
@example(body=b"\xed\xa0\x80\n\xc3\n\xf4\x90\x80\x80", max_line_bytes=64, read_block=5, batch=3)
def test_any_bytes_after_a_header_are_each_good_or_quarantined_once(body, max_line_bytes, read_block, batch):
    check_partition(body, max_line_bytes, read_block, batch)


ID = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=10)
VALID_ROW = st.builds(
    lambda step, customer, gender, merchant, whole, cents, fraud: (
        f"{step},'C{customer}','3','{gender}','28007','M{merchant}','28007','es_food',{whole}.{cents:02d},{fraud}"
    ).encode(),
    st.integers(0, 179),
    ID,
    st.sampled_from("MFEU"),
    ID,
    st.integers(0, 10**6),
    st.integers(0, 99),
    st.sampled_from("01"),
)


@st.composite
def rows_with_junk(draw) -> bytes:
    """Valid rows, some with arbitrary bytes spliced in at a random place (which may split or join lines)."""
    rows = draw(st.lists(VALID_ROW, min_size=1, max_size=25))
    out = []
    for row in rows:
        if draw(st.booleans()):
            at = draw(st.integers(0, len(row)))
            row = row[:at] + draw(NOISE.filter(bool)) + row[at:]
        out.append(row)
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    return newline.join(out) + draw(st.sampled_from([b"", newline]))


@SETTINGS
@given(body=rows_with_junk(), max_line_bytes=LIMITS, read_block=BLOCKS, batch=BATCHES)
def test_valid_rows_with_junk_mixed_in_are_each_good_or_quarantined_once(body, max_line_bytes, read_block, batch):
    good, lines = check_partition(body, max_line_bytes, read_block, batch)
    # A line that is still a whole valid row (junk went elsewhere) is ingested, not quarantined.
    valid = {n for n, line in lines.items() if _is_plain_valid_row(line.rstrip(b"\r"), max_line_bytes)}
    assert valid <= set(good)


def _is_plain_valid_row(line: bytes, max_line_bytes: int) -> bool:
    import re

    pattern = rb"\d{1,3},'C[A-Z0-9]{1,10}','3','[MFEU]','28007','M[A-Z0-9]{1,10}','28007','es_food',\d{1,7}\.\d\d,[01]"
    return len(line) <= max_line_bytes and re.fullmatch(pattern, line) is not None


@settings(max_examples=100, deadline=None)
@given(raw=st.one_of(st.binary(max_size=6000), st.text(max_size=6000)))
def test_quarantine_text_is_always_storable(raw):
    text = quarantine_text(raw)
    assert "\x00" not in text and len(text) <= RAW_LINE_CAP + MARKER_ROOM
    text.encode("utf-8")  # valid UTF-8: no lone surrogate left


def test_an_endless_line_is_streamed_in_bounded_memory(tmp_path, monkeypatch):
    """A 48 MiB line with no line break is never held: Python-side peak stays near limit + read block."""
    monkeypatch.setattr(csv_parser, "READ_BLOCK", 64 << 10)
    path = tmp_path / "tx.csv"
    size = 48 << 20
    with open(path, "wb") as fh:
        fh.write(HEADER + b"1,'C1','3','M','28007','M1','28007','es_food',1.00,0\n")
        for _ in range(size >> 20):
            fh.write(b"z" * (1 << 20))
        fh.write(b"\n2,'C2','3','F','28007','M1','28007','es_food',2.00,1")
    tracemalloc.start()
    try:
        blocks = list(iter_row_blocks(path, len(HEADER), 2, max_line_bytes=64 << 10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes for a {size}-byte line"
    rows = RowBlock.empty()
    for b in blocks:
        rows = RowBlock.concat(rows, b)
    parsed = parse_transactions(rows, file_id="f", chunk_seq=0)
    assert parsed.good.column("source_line").to_pylist() == [2, 4]
    assert parsed.bad_lines == [3] and parsed.bad_reasons == [f"line longer than {64 << 10} bytes ({size} bytes)"]
    assert parsed.bad_raw[0].startswith("z" * 100) and f"{size} bytes" in parsed.bad_raw[0]


# ----------------------------------------------------------------------------- the fast path
# `parse_transactions` reads a chunk whose rows all look good with Arrow's CSV reader (`_fast_transactions`)
# and sends any other chunk through the field split (`fast=False`). The two must agree on every chunk:
# same good table (and so the same Parquet object), same bad rows with the same line numbers, reasons
# and raw text.

CLEAN = "{step},'C{i}','3','M','28007','M{i}','28007','es_food',{i}.25,0"


def _chunks(body: bytes, batch: int, tmp: Path) -> list[RowBlock]:
    path = tmp / "tx.csv"
    path.write_bytes(HEADER + body)
    pending = RowBlock.empty()
    for block in iter_row_blocks(path, len(HEADER), 2):
        pending = RowBlock.concat(pending, block)
    return [pending.slice(start, start + batch) for start in range(0, len(pending), batch)]


def both_paths(body: bytes, batch: int = 10_000) -> tuple[int, int]:
    """Parse `body` (after a header) both ways, chunk by chunk, and assert the results are identical.

    Returns (chunks, chunks the fast path took).
    """
    from src.utils.object_store import parquet_bytes

    with tempfile.TemporaryDirectory() as tmp:
        chunks = _chunks(body, batch, Path(tmp))
    taken = 0
    for seq, rows in enumerate(chunks):
        slow = parse_transactions(rows, file_id="f", chunk_seq=seq, fast=False)
        fast = parse_transactions(rows, file_id="f", chunk_seq=seq)
        assert fast.good.schema == slow.good.schema
        assert fast.good.equals(slow.good), (fast.good.to_pylist()[:3], slow.good.to_pylist()[:3])
        assert parquet_bytes(fast.good) == parquet_bytes(slow.good)
        assert (fast.bad_lines, fast.bad_reasons, fast.bad_raw) == (slow.bad_lines, slow.bad_reasons, slow.bad_raw)
        taken += csv_parser._fast_transactions(rows, "f", seq) is not None
    return len(chunks), taken


def _clean_rows(n: int, start: int = 0) -> list[bytes]:
    return [CLEAN.format(step=i % 180, i=i).encode() for i in range(start, start + n)]


def test_clean_rows_take_the_fast_path_and_give_the_split_s_result():
    body = b"\n".join(_clean_rows(50)) + b"\n"
    assert both_paths(body, batch=20) == (3, 3)


# Rows the fast path must either read exactly as the split does or leave to it. `True`: the split takes the
# row as good; the fast path may take the chunk. `False`: the row is quarantined (so the fast path must not
# take the chunk).
EDGE_ROWS = [
    ("0,'C1','3','M','28007','M1','28007','es_food',1.25,0", True),
    ("0,'C1','3','M','28007','M1','28007','es_food',1,0", True),  # no decimals
    ("0,'C1','3','M','28007','M1','28007','es_food',1.5,0", True),  # one decimal
    ("0,'C1','3','M','28007','M1','28007','es_food',1.255,0", False),  # three decimals
    ("0,'C1','3','M','28007','M1','28007','es_food',-1.25,0", False),
    ("0,'C1','3','M','28007','M1','28007','es_food',-0,0", False),
    ("0,'C1','3','M','28007','M1','28007','es_food',007.10,0", True),  # leading zeros in the amount
    ("0,'C1','3','M','28007','M1','28007','es_food',9999999999999999.99,0", True),  # the largest amount
    ("0,'C1','3','M','28007','M1','28007','es_food',99999999999999999,0", False),  # 17 digits
    ("0,'C1','3','M','28007','M1','28007','es_food',1e3,0", False),
    ("0,'C1','3','M','28007','M1','28007','es_food',.5,0", False),
    ("0,'C1','3','M','28007','M1','28007','es_food','1.25',0", True),  # a quoted amount
    ("007,'C1','3','M','28007','M1','28007','es_food',1.25,0", True),  # leading zeros in the step
    ("-0,'C1','3','M','28007','M1','28007','es_food',1.25,0", False),
    ("-1,'C1','3','M','28007','M1','28007','es_food',1.25,0", False),
    ("+1,'C1','3','M','28007','M1','28007','es_food',1.25,0", False),
    ("0x1,'C1','3','M','28007','M1','28007','es_food',1.25,0", False),
    (" 1 ,'C1','3','M','28007','M1','28007','es_food',1.25,0", True),  # blanks around the step
    ("'1','C1','3','M','28007','M1','28007','es_food',1.25,'1'", True),  # quoted step and fraud
    ("999999999,'C1','3','M','28007','M1','28007','es_food',1.25,0", True),
    ("1000000000,'C1','3','M','28007','M1','28007','es_food',1.25,0", False),  # 10 digits
    ("2147483648,'C1','3','M','28007','M1','28007','es_food',1.25,0", False),
    ("99999999999999999999,'C1','3','M','28007','M1','28007','es_food',1.25,0", False),
    ("1.0,'C1','3','M','28007','M1','28007','es_food',1.25,0", False),
    (",'C1','3','M','28007','M1','28007','es_food',1.25,0", False),  # empty step
    ("0,'C1','3','M','28007','M1','28007','es_food',1.25,", False),  # empty fraud
    ("0,'C1','3','M','28007','M1','28007','es_food',1.25,01", False),
    ("0,'C1','3','M','28007','M1','28007','es_food',1.25,-0", False),
    ("0,'C1','3','M','28007','M1','28007','es_food',1.25,2", False),
    ("0,'C1','3','M','28007','M1','28007','es_food',1.25, 1", True),
    ("0,'','3','M','28007','M1','28007','es_food',1.25,0", False),  # empty customer
    ("0,'C1','3','M','28007','',' ','es_food',1.25,0", False),  # empty merchant
    ("0,'C1','','M','','M1','','',1.25,0", True),  # empty optional fields
    ("0,'C1','3','X','28007','M1','28007','es_food',1.25,0", False),
    ("0,'C1','3','m','28007','M1','28007','es_food',1.25,0", False),
    ("0,\"C1\",'3',\"M\",'28007',\"M1\",'28007','es_food',1.25,0", True),  # double quotes
    ("0,'C'1','3','M','28007','M1','28007','es_food',1.25,0", True),  # a quote inside a value
    ("0,'C1'x,'3','M','28007','M1','28007','es_food',1.25,0", True),
    ("0,' C1 ','3','M','28007','M1','28007','es food',1.25,0", True),  # blanks inside the quotes
    ("0,\t'C1'\t,'3','M','28007','M1','28007','es_food',1.25,0", True),
    ("0,'C1','3','M','28007','M1','28007','es_food',1.25,0,", False),  # 11 fields
    ("0,'C1','3','M','28007','M1','28007','es_food',1.25", False),  # 9 fields
    ("0,'C1,2','3','M','28007','M1','28007','es_food',1.25,0", False),  # a comma inside quotes
    ("\ufeff0,'C1','3','M','28007','M1','28007','es_food',1.25,0", False),  # a BOM before the step
    ("0,'\ufeffC1','3','M','28007','M1','28007','es_food',1.25,0", True),  # a BOM inside a value
    ("0,'Cé1','3','M','28007','Mñ','28007','es_food',1.25,0", True),  # non-ASCII
    ("0,'C1','3','M','28007','M1','28007','es_food',1.25,0\r", True),  # a CR before the LF
    ("0,'C1','3','M','28007','M1','28007','es_\x07food',1.25,0", False),  # a control character
]


@pytest.mark.parametrize(("row", "good"), EDGE_ROWS, ids=[r for r, _ in EDGE_ROWS])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_an_edge_row_among_clean_ones_gives_the_same_result_both_ways(row, good, where):
    rows = _clean_rows(9)
    at = {"first": 0, "middle": 4, "last": 9}[where]
    rows.insert(at, row.encode())
    body = b"\n".join(rows) + b"\n"
    chunks, taken = both_paths(body, batch=10)
    assert chunks == 1
    with tempfile.TemporaryDirectory() as tmp:
        [rows_block] = _chunks(body, 10, Path(tmp))
    parsed = parse_transactions(rows_block, file_id="f", chunk_seq=0, fast=False)
    assert (not parsed.bad_lines) == good, (parsed.bad_lines, parsed.bad_reasons)
    if not good:
        assert taken == 0 and parsed.bad_lines == [at + 2]


@pytest.mark.parametrize(
    "body",
    [
        b"\r\n".join(_clean_rows(25)) + b"\r\n",  # CRLF
        b"\n".join(_clean_rows(25)),  # the last line without a line break
        b"\n".join(_clean_rows(25)) + b"\n\n \t\n",  # blank lines at the end
        b"\n\n".join(_clean_rows(25)) + b"\n",  # blank lines between rows
        b"\n".join(r.replace(b",", b" , ") for r in _clean_rows(25)) + b"\n",  # blanks around every field
        b"\n".join(r.replace(b"'", b"") for r in _clean_rows(25)) + b"\n",  # no quotes
    ],
    ids=["crlf", "no-final-newline", "trailing-blank-lines", "blank-lines-between", "blanks", "unquoted"],
)
def test_layouts_give_the_same_result_both_ways(body):
    chunks, taken = both_paths(body, batch=10)
    assert chunks == 3
    assert taken in (0, 3)


def test_the_fast_path_takes_crlf_and_unterminated_files():
    assert both_paths(b"\r\n".join(_clean_rows(25)), batch=10) == (3, 3)


STEP_FORMS = st.one_of(
    st.integers(0, 10**10).map(str),
    st.sampled_from(["-0", "-1", "00", "007", " 7", "7 ", "0x7", "+7", "", "1.0", "2147483648", "'3'"]),
)
AMOUNT_FORMS = st.one_of(
    st.builds(lambda w, d: f"{w}{d}", st.integers(0, 10**17), st.sampled_from(["", ".", ".5", ".25", ".255", ".0"])),
    st.sampled_from(["-1.00", "-0", "1e3", ".5", "'1.25'", " 1.25", "", "0x10", "1,5"]),
)
FIELD = st.text(alphabet="ab '\"\t,é", max_size=5)


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(STEP_FORMS, FIELD, st.sampled_from(["M", "F", "E", "U", "X", "", "'M'"]), AMOUNT_FORMS, FIELD),
        min_size=1,
        max_size=12,
    ),
    batch=st.integers(1, 12),
)
def test_generated_rows_give_the_same_result_both_ways(rows, batch):
    lines = [
        f"{step},'C{cust}','3',{gender},'28007','M1','28007','es_food',{amount},{fraud}".encode()
        for step, cust, gender, amount, fraud in rows
    ]
    both_paths(b"\n".join(lines) + b"\n", batch=batch)


def test_a_generated_sample_gives_the_same_objects_both_ways(tmp_path):
    from src.sample_data import generate

    generate(tmp_path, rows=30_000, seed=7)
    body = (tmp_path / "transactions.csv").read_bytes()
    body = body[body.index(b"\n") + 1 :]
    assert both_paths(body, batch=10_000) == (3, 3)


IMPORTANCE_HEADER_LINE = b"Source,Target,Weight,typeTrans,fraud\n"
IMPORTANCE_EDGE_ROWS = [
    "'C1','M1',16.34,'es_transportation',0",
    "'C1','M1',16,'es_transportation',1",
    "'C1','M1',16.345,'es_transportation',0",
    "'C1','M1',-1,'es_transportation',0",
    "'C1','M1',0016.3,'es_transportation',0",
    "'','M1',16.34,'es_transportation',0",
    "'C1','',16.34,'es_transportation',0",
    "'C1','M1',16.34,'',0",
    "'C1','M1',16.34,'es_transportation',",
    "'C1','M1',16.34,'es_transportation',-0",
    "'C1','M1',16.34,'es_transportation',01",
    "'C1','M1',16.34,'es_transportation', 1",
    "'C1','M1',16.34,'es_transportation','1'",
    "'C1','M1',16.34,'es_transportation',0x1",
    "'C1','M1',16.34,'es_transportation',2",
    "'C1','M1',16.34,'es_transportation'",
    "'C1','M1',16.34,'es_transportation',0,0",
    "\ufeff'C1','M1',16.34,'es_transportation',0",
    "'C'1',\"M1\", 16.34 ,'es transportation',0",
]


@pytest.mark.parametrize("row", IMPORTANCE_EDGE_ROWS)
def test_an_importance_edge_row_gives_the_same_result_both_ways(row, tmp_path):
    clean = [f"'C{i}','M{i}',{i}.5,'es_food',{i % 2}".encode() for i in range(9)]
    clean.insert(4, row.encode())
    path = tmp_path / "imp.csv"
    path.write_bytes(IMPORTANCE_HEADER_LINE + b"\r\n".join(clean))
    block = RowBlock.empty()
    for piece in iter_row_blocks(path, len(IMPORTANCE_HEADER_LINE), 2):  # the unterminated last line comes apart
        block = RowBlock.concat(block, piece)
    slow = csv_parser.parse_importance(block, fast=False)
    fast = csv_parser.parse_importance(block)
    assert fast.good.equals(slow.good)
    assert (fast.bad_lines, fast.bad_reasons, fast.bad_raw) == (slow.bad_lines, slow.bad_reasons, slow.bad_raw)
    if slow.bad_lines:
        assert csv_parser._fast_importance(block) is None


def test_a_generated_importance_file_gives_the_same_rows_both_ways(tmp_path):
    from src.sample_data import generate

    generate(tmp_path, rows=30_000, seed=7)
    path = tmp_path / "CustomerImportance.csv"
    header = csv_parser.read_header(path)
    for block in iter_row_blocks(path, header.data_offset, 2):
        assert csv_parser._fast_importance(block) is not None
        assert csv_parser.parse_importance(block).good.equals(csv_parser.parse_importance(block, fast=False).good)


@SETTINGS
@given(body=st.one_of(NOISE, rows_with_junk()), batch=BATCHES)
@example(body=b"\n".join(_clean_rows(5)), batch=5)
def test_any_bytes_give_the_same_result_both_ways(body, batch):
    both_paths(body, batch=batch)
