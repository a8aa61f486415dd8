"""Reading and validating source CSVs, vectorised with Arrow.

A file is read as bytes from a known offset and split into lines ourselves (LF or CRLF), so
every row keeps its exact line number and the byte offset where it ends: that is what makes
resume, append detection and quarantine records exact. Fields are then split, unquoted,
checked and typed with Arrow compute kernels; only the (rare) bad rows are touched in Python.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from src.errors import FileRejected
from src.schemas.transaction_schemas import (
    AMOUNT_SCALE,
    CHUNK_ARROW_SCHEMA,
    GENDERS,
    IMPORTANCE_ARROW_SCHEMA,
    IMPORTANCE_HEADER,
    TRANSACTION_HEADER,
)

BOM = b"\xef\xbb\xbf"
READ_BLOCK = 8 << 20
MAX_HEADER_BYTES = 64 << 10

KIND_TRANSACTIONS = "transactions"
KIND_IMPORTANCE = "importance"
KIND_IGNORED = "ignored"


@dataclass(frozen=True)
class Header:
    kind: str  # transactions | importance | ignored
    data_offset: int  # byte offset of the first data line
    reason: str | None = None


def _clean(name: str) -> str:
    return name.strip().strip("'\"").strip()


def read_header(path: Path) -> Header:
    """Tell transactions from importance files by their header; reject what cannot be a CSV."""
    with open(path, "rb") as fh:
        head = fh.read(MAX_HEADER_BYTES)
    if not head:
        return Header(KIND_IGNORED, 0, "empty file (no header)")
    start = len(BOM) if head.startswith(BOM) else 0
    nl = head.find(b"\n", start)
    if nl < 0 and len(head) == MAX_HEADER_BYTES:
        raise FileRejected(f"no line break in the first {MAX_HEADER_BYTES} bytes: not a CSV file")
    line = head[start : nl if nl >= 0 else len(head)]
    if b"\x00" in line:
        raise FileRejected("binary content (NUL bytes) in the first line: not a CSV file")
    try:
        text = line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise FileRejected(f"header is not UTF-8 (byte {exc.start + start}): not a UTF-8 CSV file") from None
    names = tuple(_clean(c) for c in text.split(","))
    offset = (nl + 1) if nl >= 0 else len(head)
    lowered = tuple(n.lower() for n in names)
    if lowered == tuple(h.lower() for h in TRANSACTION_HEADER):
        return Header(KIND_TRANSACTIONS, offset)
    if lowered == tuple(h.lower() for h in IMPORTANCE_HEADER):
        return Header(KIND_IMPORTANCE, offset)
    if len(names) == len(TRANSACTION_HEADER) and lowered[0] == "step" or "customer" in lowered and "amount" in lowered:
        raise FileRejected(
            f"wrong header {','.join(names)!r}: a transactions file needs {','.join(TRANSACTION_HEADER)!r}"
        )
    if "source" in lowered and "weight" in lowered:
        raise FileRejected(
            f"wrong header {','.join(names)!r}: an importance file needs {','.join(IMPORTANCE_HEADER)!r}"
        )
    return Header(
        KIND_IGNORED,
        offset,
        f"header {text[:120]!r} is neither a transactions header ({','.join(TRANSACTION_HEADER)}) "
        f"nor a CustomerImportance header ({','.join(IMPORTANCE_HEADER)})",
    )


@dataclass
class FileScan:
    """What one pass over the file tells before ingesting from `start`."""

    size: int
    md5: str
    prefix_md5: str  # md5 of bytes [0, start)


def scan_file(path: Path, start: int, *, whole: bool = True) -> FileScan:
    """MD5 of the whole file (unless `whole` is False) and of its first `start` bytes; checks the rest is UTF-8."""
    whole_md5 = hashlib.md5() if whole else None
    prefix = hashlib.md5()
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(READ_BLOCK)
            if not block:
                break
            if whole_md5 is not None:
                whole_md5.update(block)
            if pos < start:
                prefix.update(block[: start - pos])
            tail_from = max(0, start - pos)
            if tail_from < len(block):
                tail = block[tail_from:]
                try:
                    decoder.decode(tail)
                except UnicodeDecodeError as exc:
                    bad = pos + tail_from + exc.start
                    with open(path, "rb") as again:
                        line_no = again.read(bad).count(b"\n") + 1
                    raise FileRejected(f"not UTF-8: invalid byte at offset {bad} (line {line_no})") from None
            pos += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise FileRejected("not UTF-8: the file ends inside a multi-byte character") from None
    return FileScan(size=pos, md5=whole_md5.hexdigest() if whole_md5 else "", prefix_md5=prefix.hexdigest())


@dataclass
class RowBlock:
    """Non-blank data lines of a file region, with line numbers and end offsets."""

    lines: pa.Array  # string, without terminators
    line_no: np.ndarray  # int64, 1-based line numbers in the file
    end_offset: np.ndarray  # int64, byte offset just after each line's terminator

    def __len__(self) -> int:
        return len(self.lines)

    def slice(self, start: int, stop: int) -> "RowBlock":
        return RowBlock(self.lines[start:stop], self.line_no[start:stop], self.end_offset[start:stop])

    @staticmethod
    def empty() -> "RowBlock":
        return RowBlock(pa.array([], pa.string()), np.empty(0, np.int64), np.empty(0, np.int64))

    @staticmethod
    def concat(a: "RowBlock", b: "RowBlock") -> "RowBlock":
        if not len(a):
            return b
        if not len(b):
            return a
        return RowBlock(
            pa.concat_arrays([a.lines, b.lines]),
            np.concatenate([a.line_no, b.line_no]),
            np.concatenate([a.end_offset, b.end_offset]),
        )


def _split_lines(body: bytes, pos: int, line: int) -> RowBlock:
    """Vectorised line split of `body` (which starts at file offset `pos`, line number `line`)."""
    raw = np.frombuffer(body, dtype=np.uint8)
    nl = np.flatnonzero(raw == 10)
    terminated = body.endswith(b"\n")
    starts = np.concatenate(([0], nl + 1)) if not terminated else np.concatenate(([0], nl[:-1] + 1))
    stops = np.concatenate((nl + 1, [len(body)])) if not terminated else nl + 1  # exclusive, incl. terminator
    nlines = len(starts)
    offsets = np.concatenate((starts, [len(body)])).astype(np.int32)
    lines = pa.Array.from_buffers(pa.binary(), nlines, [None, pa.py_buffer(offsets), pa.py_buffer(body)])
    text = pc.utf8_rtrim(lines.cast(pa.string()), "\r\n")
    numbers = np.arange(line, line + nlines, dtype=np.int64)
    ends = pos + stops.astype(np.int64)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
    if pc.any(blank).as_py():
        keep = pc.invert(blank)
        mask = keep.to_numpy(zero_copy_only=False)
        text, numbers, ends = text.filter(keep), numbers[mask], ends[mask]
    return RowBlock(text, numbers, ends)


def iter_row_blocks(path: Path, start: int, first_line: int, end: int | None = None) -> Iterator[RowBlock]:
    """Split bytes [start, end) of the file into non-blank lines; `first_line` is the line number at `start`.

    A final line without a line break is a row too. Blank lines keep their line numbers but yield no row.
    If the byte before `start` ends an unterminated row (a file that grew after its last line),
    the line break that now follows it belongs to that row and is skipped.
    """
    with open(path, "rb") as fh:
        if start > 0:
            fh.seek(start - 1)
            prev = fh.read(1)
            if prev not in (b"\n", b""):
                nxt = fh.read(2)
                if nxt.startswith(b"\r\n"):
                    start += 2
                elif nxt.startswith(b"\n"):
                    start += 1
        fh.seek(start)
        pos = start
        line = first_line
        carry = b""
        while True:
            want = READ_BLOCK if end is None else min(READ_BLOCK, end - pos - len(carry))
            data = fh.read(want) if want > 0 else b""
            buf = carry + data if carry else data
            if not buf:
                return
            if not data:
                cut = len(buf)
            else:
                last_nl = buf.rfind(b"\n")
                if last_nl < 0:
                    carry = buf
                    continue
                cut = last_nl + 1
            body, carry = buf[:cut], buf[cut:]
            block = _split_lines(body, pos, line)
            if len(block):
                yield block
            pos += len(body)
            line += body.count(b"\n") + (0 if body.endswith(b"\n") else 1)
            if not data:
                return


@dataclass
class ParsedRows:
    """Typed good rows (Arrow) and bad rows (line, reason, raw text)."""

    good: pa.Table
    bad_lines: list[int] = field(default_factory=list)
    bad_reasons: list[str] = field(default_factory=list)
    bad_raw: list[str] = field(default_factory=list)


_NONNEG_INT = r"^[0-9]{1,9}$"
_DECIMAL = r"^-?[0-9]{1,16}(\.[0-9]+)?$"
_DECIMAL_OK = r"^[0-9]{1,16}(\.[0-9]{1," + str(AMOUNT_SCALE) + r"})?$"


def _fields(text: pa.Array, ncols: int) -> tuple[pa.Array, list[pa.Array], np.ndarray]:
    """Split lines into `ncols` unquoted string columns; returns (text, columns, field counts)."""
    parts = pc.split_pattern(text, ",")
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    ok = counts == ncols
    if not ok.all():
        parts = parts.filter(pa.array(ok))
    if not len(parts):
        return text, [pa.array([], pa.string()) for _ in range(ncols)], counts
    # One kernel per column: surrounding blanks and quotes ('C123', "x") go in the same trim.
    cols = [pc.utf8_trim(pc.list_element(parts, i), " \t'\"") for i in range(ncols)]
    return text, cols, counts


def _bad_reason_count(count: int, ncols: int) -> str:
    return f"expected {ncols} fields, found {count}"


Check = tuple[pa.Array, Callable[[list], str]]


def _validate(
    block: RowBlock, ncols: int, make_checks: Callable[[list[pa.Array]], list[Check]]
) -> tuple[list[pa.Array], pa.Array, np.ndarray, ParsedRows]:
    """Split, unquote and check; returns (columns, indices of good split rows, their line numbers, bad rows)."""
    text, cols, counts = _fields(block.lines, ncols)
    ok_cols = counts == ncols
    checks = make_checks(cols)
    valid = np.ones(int(ok_cols.sum()), dtype=bool)
    for mask, _ in checks:
        valid &= mask.to_numpy(zero_copy_only=False)
    rows_idx = np.flatnonzero(ok_cols)  # position in the block of each split row
    out = ParsedRows(pa.table({}))
    bad_positions = sorted(set(np.flatnonzero(~ok_cols).tolist()) | set(rows_idx[~valid].tolist()))
    split_pos = {int(p): i for i, p in enumerate(rows_idx)} if bad_positions else {}
    for p in bad_positions:
        if not ok_cols[p]:
            reason = _bad_reason_count(int(counts[p]), ncols)
        else:
            i = split_pos[p]
            values = [c[i].as_py() for c in cols]
            reason = next(r(values) for m, r in checks if not m[i].as_py())
        out.bad_lines.append(int(block.line_no[p]))
        out.bad_reasons.append(reason)
        out.bad_raw.append(text[p].as_py())
    return cols, pa.array(np.flatnonzero(valid)), block.line_no[rows_idx[valid]], out


def parse_transactions(block: RowBlock, *, file_id: str, chunk_seq: int) -> ParsedRows:
    """Validate rows per SPEC §2; good rows typed as CHUNK_ARROW_SCHEMA, bad rows with reasons."""
    if not len(block):
        return ParsedRows(CHUNK_ARROW_SCHEMA.empty_table())

    def checks(cols: list[pa.Array]) -> list[Check]:
        step, customer, _age, gender, _zo, merchant, _zm, _cat, amount, fraud = cols
        return [
            (pc.match_substring_regex(step, _NONNEG_INT), lambda v: f"step {v[0]!r} is not a non-negative integer"),
            (pc.greater(pc.utf8_length(customer), 0), lambda v: "empty customer id"),
            (
                pc.is_in(gender, value_set=pa.array(GENDERS)),
                lambda v: f"unknown gender {v[3]!r} (expected M, F, E or U)",
            ),
            (pc.greater(pc.utf8_length(merchant), 0), lambda v: "empty merchant id"),
            (pc.match_substring_regex(amount, _DECIMAL_OK), lambda v: _amount_reason("amount", v[8])),
            (pc.is_in(fraud, value_set=pa.array(["0", "1"])), lambda v: f"fraud {v[9]!r} is not 0 or 1"),
        ]

    cols, good_idx, good_lines, out = _validate(block, len(TRANSACTION_HEADER), checks)
    step, customer, age, gender, zip_ori, merchant, zip_m, category, amount, fraud = (c.take(good_idx) for c in cols)
    n_good = len(good_idx)
    out.good = pa.table(
        {
            "step": step.cast(pa.int32()),
            "customer": customer,
            "age": age,
            "gender": gender,
            "zipcodeOri": zip_ori,
            "merchant": merchant,
            "zipMerchant": zip_m,
            "category": category,
            "amount": amount.cast(CHUNK_ARROW_SCHEMA.field("amount").type),
            "fraud": fraud.cast(pa.int8()),
            "source_file_id": pa.array([file_id] * n_good, pa.string()),
            "chunk_seq": pa.array(np.full(n_good, chunk_seq, dtype=np.int32)),
            "source_line": pa.array(good_lines),
        },
        schema=CHUNK_ARROW_SCHEMA,
    )
    return out


def _amount_reason(name: str, value: str) -> str:
    if re.fullmatch(_DECIMAL, value or ""):
        if value.startswith("-"):
            return f"negative {name} {value}"
        return f"{name} {value!r} has more than {AMOUNT_SCALE} decimal places"
    return f"{name} {value!r} is not a number"


def parse_importance(block: RowBlock) -> ParsedRows:
    """CustomerImportance rows: Source, Target non-empty, Weight a non-negative decimal, fraud 0/1."""
    if not len(block):
        return ParsedRows(IMPORTANCE_ARROW_SCHEMA.empty_table())

    def checks(cols: list[pa.Array]) -> list[Check]:
        source, target, weight, _type, fraud = cols
        return [
            (pc.greater(pc.utf8_length(source), 0), lambda v: "empty Source (customer) id"),
            (pc.greater(pc.utf8_length(target), 0), lambda v: "empty Target (merchant) id"),
            (pc.match_substring_regex(weight, _DECIMAL_OK), lambda v: _amount_reason("Weight", v[2])),
            (pc.is_in(fraud, value_set=pa.array(["0", "1"])), lambda v: f"fraud {v[4]!r} is not 0 or 1"),
        ]

    cols, good_idx, _lines, out = _validate(block, len(IMPORTANCE_HEADER), checks)
    source, target, weight, type_trans, fraud = (c.take(good_idx) for c in cols)
    out.good = pa.table(
        {
            "source": source,
            "target": target,
            "weight": weight.cast(IMPORTANCE_ARROW_SCHEMA.field("weight").type),
            "type_trans": type_trans,
            "fraud": fraud.cast(pa.int8()),
        },
        schema=IMPORTANCE_ARROW_SCHEMA,
    )
    return out
