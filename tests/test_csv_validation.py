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
