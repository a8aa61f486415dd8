"""Reading and validating source CSVs, vectorised with Arrow.

A file is read as bytes from a known offset and split into lines ourselves (LF or CRLF), so
every row keeps its exact line number and the byte offset where it ends: that is what makes
resume, append detection and quarantine records exact. Fields are then split, unquoted,
checked and typed with Arrow compute kernels; only the (rare) bad rows are touched in Python.
A block whose rows are all good (the usual case) is read by Arrow's CSV reader instead
(`_fast_columns`), which gives the same columns for less work; any block it cannot vouch for
goes through the field split, which names each bad row's line and reason.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

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
MAX_LINE_BYTES = 1 << 20  # default of the MAX_LINE_BYTES setting
RAW_LINE_CAP = 4096  # characters of a bad line kept in the quarantine

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
    """MD5 of the whole file (unless `whole` is False) and of its first `start` bytes.

    Encoding is checked per row when the rows are split (a row that is not UTF-8 is quarantined),
    so one bad row no longer rejects a whole file: only a header that is not UTF-8 does.
    """
    whole_md5 = hashlib.md5(usedforsecurity=False) if whole else None
    prefix = hashlib.md5(usedforsecurity=False)
    pos = 0
    with open(path, "rb") as fh:
        if whole_md5 is None:  # only the prefix is hashed: the rest need not be read for the size
            size = os.fstat(fh.fileno()).st_size
            while pos < min(start, size):
                block = fh.read(min(READ_BLOCK, start - pos))
                if not block:
                    break
                prefix.update(block)
                pos += len(block)
            return FileScan(size=size, md5="", prefix_md5=prefix.hexdigest())
        while True:
            block = fh.read(READ_BLOCK)
            if not block:
                break
            if whole_md5 is not None:
                whole_md5.update(block)
            if pos < start:
                prefix.update(block[: start - pos])
            pos += len(block)
    return FileScan(size=pos, md5=whole_md5.hexdigest() if whole_md5 else "", prefix_md5=prefix.hexdigest())


# ----------------------------------------------------------------------------- poison-proof text

# Control characters a data row may not carry: C0 except TAB (a field separator some tools emit and
# whitespace we trim), plus DEL. LF ends a line; CR is allowed only in a CRLF line break (and as
# trailing CRs, which are trimmed). C1 controls (U+0080-U+009F) are valid UTF-8 that PostgreSQL and
# Parquet store, so they pass.
_CONTROL_PATTERN = r"[\x00-\x08\x0a-\x1f\x7f]"
_CONTROL_RE = re.compile(_CONTROL_PATTERN)
_ESCAPE_RE = re.compile(r"[\\\x00-\x08\x0a-\x1f\x7f\udc80-\udcff]")
_NOT_CONTROL = bytes(b for b in range(256) if not (b < 0x20 and b not in (0x09, 0x0A) or b == 0x7F))
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "BS", 0x0B: "VT", 0x0C: "FF", 0x0D: "CR", 0x1B: "ESC", 0x7F: "DEL"}


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if ch == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x20 and ch != "\t" or code == 0x7F:
        return f"\\x{code:02x}"
    return ch


def quarantine_text(raw: bytes | str, size: int | None = None) -> str:
    """A bad line as PostgreSQL and Parquet accept it: valid UTF-8, no NUL, at most RAW_LINE_CAP characters.

    Control characters and undecodable bytes are written `\\xNN` and a backslash `\\\\`, so the
    original bytes can be told from the text; a line longer than the cap (or known only by its first
    bytes, `size` giving its full length) ends with a marker saying how long it was.
    """
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")
    if size is None:
        size = len(raw) if isinstance(raw, bytes) else len(text.encode("utf-8", "surrogateescape"))
    shown_bytes = len(raw) if isinstance(raw, bytes) else size
    if len(text) <= RAW_LINE_CAP and shown_bytes >= size and not _ESCAPE_RE.search(text):
        return text
    out: list[str] = []
    used = 0
    cut = shown_bytes < size
    for ch in text:
        piece = _escape_char(ch)
        if used + len(piece) > RAW_LINE_CAP:
            cut = True
            break
        out.append(piece)
        used += len(piece)
    if cut:
        out.append(f" ...[cut at {RAW_LINE_CAP} characters: the line has {size} bytes]")
    return "".join(out)


def _control_reason(text: str, header: tuple[str, ...]) -> str:
    """Name the first control character of a row and the column it sits in."""
    for i, value in enumerate(text.split(",")):
        m = _CONTROL_RE.search(value)
        if m:
            code = ord(m.group())
            name = f"{_CONTROL_NAMES[code]} (0x{code:02X})" if code in _CONTROL_NAMES else f"0x{code:02X}"
            column = header[i] if i < len(header) else f"field {i + 1} (beyond the {len(header)} columns)"
            return f"control character {name} in column {column}"
    return "control character in the row"


def _show(value: str | None, limit: int = 60) -> str:
    """A field value for a reason: repr'd (so control characters show) and cut when long."""
    if value is None or len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


# ----------------------------------------------------------------------------- lines


@dataclass
class RowBlock:
    """Non-blank data lines of a file region, with line numbers and end offsets.

    `flaw` is null for a line that is text, and the reason for one that is not (longer than the
    line limit, not UTF-8): such a line's entry in `lines` is already its quarantine text.
    """

    lines: pa.Array  # string, without terminators
    line_no: np.ndarray  # int64, 1-based line numbers in the file
    end_offset: np.ndarray  # int64, byte offset just after each line's terminator
    flaw: pa.Array | None = None  # string or null per line; None when no line has a flaw
    maybe_control: bool = True  # False when the bytes were seen to hold no control character

    def __len__(self) -> int:
        return len(self.lines)

    def slice(self, start: int, stop: int) -> "RowBlock":
        flaw = self.flaw[start:stop] if self.flaw is not None else None
        return RowBlock(
            self.lines[start:stop], self.line_no[start:stop], self.end_offset[start:stop], flaw, self.maybe_control
        )

    def flaws(self) -> pa.Array:
        return self.flaw if self.flaw is not None else pa.nulls(len(self), pa.string())

    @staticmethod
    def empty() -> "RowBlock":
        return RowBlock(pa.array([], pa.string()), np.empty(0, np.int64), np.empty(0, np.int64))

    @staticmethod
    def concat(a: "RowBlock", b: "RowBlock") -> "RowBlock":
        if not len(a):
            return b
        if not len(b):
            return a
        flaw = None
        if a.flaw is not None or b.flaw is not None:
            flaw = pa.concat_arrays([a.flaws(), b.flaws()])
        return RowBlock(
            pa.concat_arrays([a.lines, b.lines]),
            np.concatenate([a.line_no, b.line_no]),
            np.concatenate([a.end_offset, b.end_offset]),
            flaw,
            a.maybe_control or b.maybe_control,
        )


def _invalid_utf8_lines(body: bytes, starts: np.ndarray, stops: np.ndarray) -> list[tuple[int, int]]:
    """(line index, offset in the line) of the first undecodable byte of each line that is not UTF-8.

    Decodes from one bad line to the next over a memoryview, so the cost stays linear in the body.
    """
    found = []
    view = memoryview(body)
    pos = 0
    while pos < len(body):
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            break
        except UnicodeDecodeError as exc:
            bad = pos + exc.start
        i = int(np.searchsorted(stops, bad, side="right"))
        found.append((i, bad - int(starts[i])))
        pos = int(stops[i])
    return found


def _line_flaws(
    body: bytes, binary: pa.Array, starts: np.ndarray, stops: np.ndarray, content: np.ndarray, max_line_bytes: int
) -> tuple[pa.Array | None, dict[int, tuple[str, str]]]:
    """Lines that are too long or not UTF-8: {index: (reason, quarantine text)}, and the lines as text if all are UTF-8."""
    flaws: dict[int, tuple[str, str]] = {}
    for i in np.flatnonzero(content > max_line_bytes).tolist():
        size = int(content[i])
        head = body[int(starts[i]) : int(starts[i]) + min(size, RAW_LINE_CAP)]
        flaws[i] = (f"line longer than {max_line_bytes} bytes ({size} bytes)", quarantine_text(head, size))
    try:
        return binary.cast(pa.string()), flaws
    except pa.ArrowInvalid:
        pass
    for i, offset in _invalid_utf8_lines(body, starts, stops):
        if i not in flaws:
            line_bytes = body[int(starts[i]) : int(starts[i]) + int(content[i])]
            flaws[i] = (
                f"not UTF-8: byte 0x{line_bytes[offset]:02X} at byte {offset + 1} of the line",
                quarantine_text(line_bytes),
            )
    return None, flaws


def _split_lines(body: bytes, pos: int, line: int, max_line_bytes: int = MAX_LINE_BYTES) -> RowBlock:
    """Vectorised line split of `body` (which starts at file offset `pos`, line number `line`).

    Lines longer than `max_line_bytes` (without their line break) and lines that are not UTF-8 are
    kept as rows with a flaw, so they are quarantined with their line number instead of stopping the file.
    """
    return _split_counted(body, pos, line, max_line_bytes)[0]


def _split_counted(body: bytes, pos: int, line: int, max_line_bytes: int) -> tuple[RowBlock, int]:
    """`_split_lines`, and the number of line breaks in `body` (the lines it advances, blank ones included)."""
    raw = np.frombuffer(body, dtype=np.uint8)
    nl = np.flatnonzero(raw == 10)
    terminated = body.endswith(b"\n")
    starts = np.concatenate(([0], nl + 1)) if not terminated else np.concatenate(([0], nl[:-1] + 1))
    stops = np.concatenate((nl + 1, [len(body)])) if not terminated else nl + 1  # exclusive, incl. terminator
    nlines = len(starts)
    content = _content_lengths(raw, starts, stops, terminated)
    offsets = np.concatenate((starts, [len(body)])).astype(np.int32)
    binary = pa.Array.from_buffers(pa.binary(), nlines, [None, pa.py_buffer(offsets), pa.py_buffer(body)])
    text, flaws = _line_flaws(body, binary, starts, stops, content, max_line_bytes)
    flaw = None
    if flaws:
        idx = sorted(flaws)
        mask = np.zeros(nlines, dtype=bool)
        mask[idx] = True
        binary = pc.replace_with_mask(binary, pa.array(mask), pa.array([flaws[i][1].encode() for i in idx]))
        text = binary.cast(pa.string())
        flaw = pa.array([flaws[i][0] if m else None for i, m in enumerate(mask)], pa.string())
    text = pc.utf8_rtrim(text, "\r\n")
    numbers = np.arange(line, line + nlines, dtype=np.int64)
    ends = pos + stops.astype(np.int64)
    # Blank: only spaces and tabs. Other whitespace (VT, FF, ...) is a control character and quarantined.
    if b" " in body or b"\t" in body:
        blank = pc.equal(pc.utf8_length(pc.utf8_trim(text, " \t")), 0).to_numpy(zero_copy_only=False)
    else:  # nothing to trim: a blank line is an empty one
        blank = _lengths(text) == 0
    if flaw is not None:
        blank &= pc.is_null(flaw).to_numpy(zero_copy_only=False)
    if blank.any():
        keep = ~blank
        text, numbers, ends = text.filter(pa.array(keep)), numbers[keep], ends[keep]
        flaw = flaw.filter(pa.array(keep)) if flaw is not None else None
    return RowBlock(text, numbers, ends, flaw, _maybe_control(body)), len(nl)


def _maybe_control(body: bytes) -> bool:
    """Whether `body` may hold a control character other than a CR of a CRLF (a fast byte-level pre-check)."""
    controls = body.translate(None, _NOT_CONTROL)
    if not controls:
        return False
    return bool(controls.strip(b"\r")) or body.count(b"\r\n") != len(controls)


def _content_lengths(raw: np.ndarray, starts: np.ndarray, stops: np.ndarray, terminated: bool) -> np.ndarray:
    """Bytes of each line without its line break (LF, or CR LF)."""
    content = (stops - starts).astype(np.int64)
    has_lf = np.ones(len(starts), dtype=bool)
    if not terminated:
        has_lf[-1] = False
    content -= has_lf
    before_lf = np.maximum(stops - 2, 0)
    has_cr = has_lf & (content > 0) & (raw[before_lf] == 13) if len(raw) else has_lf & False
    return content - has_cr


def _long_line(
    fh: BinaryIO, parts: list[bytes], carried: int, pos: int, line: int, end: int | None, max_line_bytes: int
) -> tuple[RowBlock, int, bytes]:
    """Stream through a line that outgrew `max_line_bytes` without holding it: keep its head, find its end.

    Returns a one-row block (flawed) for it, the offset after it, and the bytes read past it.
    """
    head = b"".join(parts)[:RAW_LINE_CAP]
    last = parts[-1][-1:]
    total = carried
    rest = b""
    while True:
        want = READ_BLOCK if end is None else min(READ_BLOCK, end - pos - total)
        data = fh.read(want) if want > 0 else b""
        if not data:  # the line runs to the end of the file (or of the range)
            size, after = total, pos + total
            break
        nl = data.find(b"\n")
        if len(head) < RAW_LINE_CAP:
            head += data[: nl if nl >= 0 else RAW_LINE_CAP][: RAW_LINE_CAP - len(head)]
        if nl < 0:
            total += len(data)
            last = data[-1:]
            continue
        before = data[nl - 1 : nl] if nl > 0 else last
        size = total + nl - (1 if before == b"\r" else 0)
        after, rest = pos + total + nl + 1, data[nl + 1 :]
        break
    head = head[: min(size, RAW_LINE_CAP)]  # same text as when the whole line fits in a read block
    block = RowBlock(
        pa.array([quarantine_text(head, size)], pa.string()),
        np.array([line], np.int64),
        np.array([after], np.int64),
        pa.array([f"line longer than {max_line_bytes} bytes ({size} bytes)"], pa.string()),
    )
    return block, after, rest


def _skip_glued_break(fh: BinaryIO, start: int) -> int:
    """If the byte before `start` ends an unterminated row, the line break now after it belongs to that row."""
    if start > 0:
        fh.seek(start - 1)
        prev = fh.read(1)
        if prev not in (b"\n", b""):
            nxt = fh.read(2)
            if nxt.startswith(b"\r\n"):
                return start + 2
            if nxt.startswith(b"\n"):
                return start + 1
    return start


def iter_row_blocks(
    path: Path, start: int, first_line: int, end: int | None = None, *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[RowBlock]:
    """Split bytes [start, end) of the file into non-blank lines; `first_line` is the line number at `start`.

    A final line without a line break is a row too. Blank lines keep their line numbers but yield no row.
    If the byte before `start` ends an unterminated row (a file that grew after its last line),
    the line break that now follows it belongs to that row and is skipped. A line longer than
    `max_line_bytes` is streamed past (at most about `max_line_bytes` + READ_BLOCK bytes held) and
    yielded as one flawed row; the pieces of a line cut by read blocks are joined once, never re-copied.
    """
    with open(path, "rb") as fh:
        start = _skip_glued_break(fh, start)
        fh.seek(start)
        pos, line = start, first_line
        parts: list[bytes] = []  # the start of a line cut by the read block (no line break in them)
        carried = 0
        pending = b""  # bytes read past a long line, handled before reading more
        while True:
            if pending:
                data, pending = pending, b""
            else:
                want = READ_BLOCK if end is None else min(READ_BLOCK, end - pos - carried)
                data = fh.read(want) if want > 0 else b""
            if not data:
                if carried:
                    block, _ = _split_counted(b"".join(parts), pos, line, max_line_bytes)
                    if len(block):
                        yield block
                return
            last_nl = data.rfind(b"\n")
            if last_nl < 0:
                parts.append(data)
                carried += len(data)
                if carried > max_line_bytes + 1:  # cannot fit even with a CR before its LF
                    block, pos, pending = _long_line(fh, parts, carried, pos, line, end, max_line_bytes)
                    yield block
                    line += 1
                    parts, carried = [], 0
                continue
            cut = last_nl + 1
            body = b"".join([*parts, data[:cut]]) if parts else data[:cut]
            rest = data[cut:]
            block, breaks = _split_counted(body, pos, line, max_line_bytes)
            if len(block):
                yield block
            pos += len(body)
            line += breaks
            parts, carried = ([rest], len(rest)) if rest else ([], 0)


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


def _fields(text: pa.Array, ncols: int, exclude: np.ndarray) -> tuple[list[pa.Array], np.ndarray, np.ndarray]:
    """Split lines into `ncols` unquoted string columns, leaving out `exclude`d lines.

    Returns (columns of the split rows, field count per line, which lines were split).
    """
    parts = pc.split_pattern(text, ",")
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    ok = (counts == ncols) & ~exclude
    if not ok.all():
        parts = parts.filter(pa.array(ok))
    if not len(parts):
        return [pa.array([], pa.string()) for _ in range(ncols)], counts, ok
    # One kernel per column: surrounding blanks and quotes ('C123', "x") go in the same trim.
    cols = [pc.utf8_trim(pc.list_element(parts, i), " \t'\"") for i in range(ncols)]
    return cols, counts, ok


def _bad_reason_count(count: int, ncols: int) -> str:
    return f"expected {ncols} fields, found {count}"


def _rejected_before_split(block: RowBlock, header: tuple[str, ...]) -> dict[int, tuple[str, str]]:
    """Lines refused whatever their fields say: flawed (too long, not UTF-8) or carrying control characters.

    Returns {position in the block: (reason, quarantine text)}.
    """
    out: dict[int, tuple[str, str]] = {}
    if block.flaw is not None:
        for p in np.flatnonzero(pc.is_valid(block.flaw).to_numpy(zero_copy_only=False)).tolist():
            out[p] = (block.flaw[p].as_py(), block.lines[p].as_py())
    if not block.maybe_control:
        return out
    control = pc.match_substring_regex(block.lines, _CONTROL_PATTERN).to_numpy(zero_copy_only=False)
    for p in np.flatnonzero(control).tolist():
        if p not in out:
            text = block.lines[p].as_py()
            out[p] = (_control_reason(text, header), quarantine_text(text))
    return out


Check = tuple[pa.Array, Callable[[list], str]]


def _validate(
    block: RowBlock, header: tuple[str, ...], make_checks: Callable[[list[pa.Array]], list[Check]]
) -> tuple[list[pa.Array], pa.Array, np.ndarray, ParsedRows]:
    """Split, unquote and check; returns (columns, indices of good split rows, their line numbers, bad rows)."""
    ncols = len(header)
    text = block.lines
    early = _rejected_before_split(block, header)
    exclude = np.zeros(len(block), dtype=bool)
    exclude[list(early)] = True
    cols, counts, ok_cols = _fields(text, ncols, exclude)
    checks = make_checks(cols)
    valid = np.ones(int(ok_cols.sum()), dtype=bool)
    for mask, _ in checks:
        valid &= mask.to_numpy(zero_copy_only=False)
    rows_idx = np.flatnonzero(ok_cols)  # position in the block of each split row
    out = ParsedRows(pa.table({}))
    bad_positions = sorted(set(np.flatnonzero(~ok_cols).tolist()) | set(rows_idx[~valid].tolist()))
    split_pos = {int(p): i for i, p in enumerate(rows_idx)} if bad_positions else {}
    for p in bad_positions:
        if p in early:
            reason, raw = early[p]
        elif not ok_cols[p]:
            reason, raw = _bad_reason_count(int(counts[p]), ncols), quarantine_text(text[p].as_py())
        else:
            i = split_pos[p]
            values = [c[i].as_py() for c in cols]
            reason = next(r(values) for m, r in checks if not m[i].as_py())
            raw = quarantine_text(text[p].as_py())
        out.bad_lines.append(int(block.line_no[p]))
        out.bad_reasons.append(reason)
        out.bad_raw.append(raw)
    return cols, pa.array(np.flatnonzero(valid)), block.line_no[rows_idx[valid]], out


def _good_only(cols: list[pa.Array], good_idx: pa.Array) -> list[pa.Array]:
    """The split columns restricted to the good rows; as they are when every row is good (the usual case)."""
    if cols and len(good_idx) == len(cols[0]):
        return cols
    return [c.take(good_idx) for c in cols]


def parse_transactions(block: RowBlock, *, file_id: str, chunk_seq: int, fast: bool = True) -> ParsedRows:
    """Validate rows per SPEC §2; good rows typed as CHUNK_ARROW_SCHEMA, bad rows with reasons.

    A chunk whose rows are all good usually goes through `_fast_transactions` (Arrow's CSV reader); any other
    chunk, or with `fast=False`, through the field split below, which names each bad row's line and reason.
    Both give the same table for the same rows.
    """
    if not len(block):
        return ParsedRows(CHUNK_ARROW_SCHEMA.empty_table())
    if fast:
        good = _fast_transactions(block, file_id, chunk_seq)
        if good is not None:
            return ParsedRows(good)

    def checks(cols: list[pa.Array]) -> list[Check]:
        step, customer, _age, gender, _zo, merchant, _zm, _cat, amount, fraud = cols
        return [
            (
                pc.match_substring_regex(step, _NONNEG_INT),
                lambda v: f"step {_show(v[0])} is not a non-negative integer",
            ),
            (pc.greater(pc.utf8_length(customer), 0), lambda v: "empty customer id"),
            (
                pc.is_in(gender, value_set=_gender_set()),
                lambda v: f"unknown gender {_show(v[3])} (expected M, F, E or U)",
            ),
            (pc.greater(pc.utf8_length(merchant), 0), lambda v: "empty merchant id"),
            (pc.match_substring_regex(amount, _DECIMAL_OK), lambda v: _amount_reason("amount", v[8])),
            (pc.is_in(fraud, value_set=pa.array(["0", "1"])), lambda v: f"fraud {_show(v[9])} is not 0 or 1"),
        ]

    cols, good_idx, good_lines, out = _validate(block, TRANSACTION_HEADER, checks)
    step, customer, age, gender, zip_ori, merchant, zip_m, category, amount, fraud = _good_only(cols, good_idx)
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
            **_lineage(file_id, chunk_seq, good_lines),
        },
        schema=CHUNK_ARROW_SCHEMA,
    )
    return out


@functools.cache
def _gender_set() -> pa.Array:
    """The genders as an Arrow array, made on first use (a conversion at import would import pandas)."""
    return pa.array(GENDERS, pa.string())


def _lineage(file_id: str, chunk_seq: int, lines: np.ndarray) -> dict[str, pa.Array]:
    n = len(lines)
    return {
        "source_file_id": pa.repeat(pa.scalar(file_id, pa.string()), n),
        "chunk_seq": pa.array(np.full(n, chunk_seq, dtype=np.int32)),
        "source_line": pa.array(lines),
    }


# The fast path reads a block with Arrow's CSV reader: no quoting (a quote is a character like any other, as in
# the field split), the integer columns typed by the reader, the others as text.
_FAST_PARSE = pacsv.ParseOptions(delimiter=",", quote_char=False, escape_char=False, newlines_in_values=False)
_POWERS_OF_TEN = np.array([10**k for k in range(1, 10)], dtype=np.int64)
_TRIM = " \t'\""  # what the field split trims from each field


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _lengths(strings: pa.Array) -> np.ndarray:
    """Byte length of each value of a string array, from its offsets."""
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int32, count=len(strings) + 1, offset=strings.offset * 4)
    return np.diff(offsets)


def _fast_columns(
    block: RowBlock, header: tuple[str, ...], integers: dict[str, tuple[pa.DataType, int]]
) -> dict[str, pa.Array] | None:
    """The block's columns as the field split gives them (text trimmed, `integers` typed), read by Arrow's CSV
    reader; None when a line may not split into good fields.

    `integers` maps a column to its type and the largest value the split takes, written as plain digits
    (`[0-9]+`). The reader splits each line on commas exactly as `split_pattern` does (no quoting, no
    escapes; a line with another field count fails the read) and the text columns get the split's trim.
    The reader also takes integers the split refuses (`-0`, `007`, ` 7`, `0x7`): each such form is longer
    than the number it reads as, so the block is taken only if its bytes add up to the text columns' bytes
    plus the integers' digits written plainly, plus commas and line breaks.
    """
    if block.flaw is not None or block.maybe_control:
        return None  # a flawed line or a control character: the split says which and where
    n = len(block)
    joined = pc.binary_join_element_wise(block.lines, "", "\n")  # each line and its LF
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32, count=n + 1, offset=joined.offset * 4)
    body = joined.buffers()[2][int(offsets[0]) : int(offsets[-1])]
    if body[:3] == BOM:  # the reader would drop a BOM that begins the block; the split keeps it in the field
        return None
    read = pacsv.ReadOptions(column_names=list(header), use_threads=False, block_size=len(body) + 1)
    convert = pacsv.ConvertOptions(
        column_types={c: integers[c][0] if c in integers else pa.string() for c in header},
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
        check_utf8=False,  # the lines are UTF-8 already (RowBlock)
    )
    try:
        raw = pacsv.read_csv(
            pa.BufferReader(body), read_options=read, parse_options=_FAST_PARSE, convert_options=convert
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # a field count or an integer the reader refuses: the split names the row
    if raw.num_rows != n:
        return None
    cols = {c: _one_chunk(raw.column(c)) for c in header}
    size = (len(header) - 1) * n + n  # commas and line breaks
    for c in header:
        if c not in integers:
            size += int(_lengths(cols[c]).sum())
            continue
        values = cols[c]
        if values.null_count:
            return None
        ints = values.to_numpy()
        if ints.min() < 0 or ints.max() > integers[c][1]:
            return None
        size += n + int(np.searchsorted(_POWERS_OF_TEN, ints, side="right").sum())  # digits of each
    if size != len(body):
        return None
    return {c: cols[c] if c in integers else pc.utf8_trim(cols[c], _TRIM) for c in header}


_TRANSACTION_INTEGERS = {"step": (pa.int32(), 999_999_999), "fraud": (pa.int8(), 1)}  # step: _NONNEG_INT


def _fast_transactions(block: RowBlock, file_id: str, chunk_seq: int) -> pa.Table | None:
    """The chunk's table when every row is good (`_fast_columns`, then the split's checks); None when any row may
    not be, which sends the chunk through the field split, so a bad row's record is what it always was."""
    cols = _fast_columns(block, TRANSACTION_HEADER, _TRANSACTION_INTEGERS)
    if (
        cols is None
        or not _lengths(cols["customer"]).all()
        or not _lengths(cols["merchant"]).all()
        or not pc.all(pc.is_in(cols["gender"], value_set=_gender_set())).as_py()
        or not pc.all(pc.match_substring_regex(cols["amount"], _DECIMAL_OK)).as_py()
    ):
        return None
    return pa.table(
        {
            **cols,
            "amount": cols["amount"].cast(CHUNK_ARROW_SCHEMA.field("amount").type),
            **_lineage(file_id, chunk_seq, block.line_no),
        },
        schema=CHUNK_ARROW_SCHEMA,
    )


_IMPORTANCE_INTEGERS = {"fraud": (pa.int8(), 1)}


def _fast_importance(block: RowBlock) -> pa.Table | None:
    """`_fast_transactions` for a CustomerImportance block."""
    cols = _fast_columns(block, IMPORTANCE_HEADER, _IMPORTANCE_INTEGERS)
    if (
        cols is None
        or not _lengths(cols["Source"]).all()
        or not _lengths(cols["Target"]).all()
        or not pc.all(pc.match_substring_regex(cols["Weight"], _DECIMAL_OK)).as_py()
    ):
        return None
    return pa.table(
        {
            "source": cols["Source"],
            "target": cols["Target"],
            "weight": cols["Weight"].cast(IMPORTANCE_ARROW_SCHEMA.field("weight").type),
            "type_trans": cols["typeTrans"],
            "fraud": cols["fraud"],
        },
        schema=IMPORTANCE_ARROW_SCHEMA,
    )


def _amount_reason(name: str, value: str) -> str:
    if re.fullmatch(_DECIMAL, value or ""):
        if value.startswith("-"):
            return f"negative {name} {value if len(value) <= 60 else _show(value)}"
        return f"{name} {_show(value)} has more than {AMOUNT_SCALE} decimal places"
    return f"{name} {_show(value)} is not a number"


def parse_importance(block: RowBlock, *, fast: bool = True) -> ParsedRows:
    """CustomerImportance rows: Source, Target non-empty, Weight a non-negative decimal, fraud 0/1.

    As `parse_transactions`: a block whose rows are all good usually goes through `_fast_importance`."""
    if not len(block):
        return ParsedRows(IMPORTANCE_ARROW_SCHEMA.empty_table())
    if fast:
        good = _fast_importance(block)
        if good is not None:
            return ParsedRows(good)

    def checks(cols: list[pa.Array]) -> list[Check]:
        source, target, weight, _type, fraud = cols
        return [
            (pc.greater(pc.utf8_length(source), 0), lambda v: "empty Source (customer) id"),
            (pc.greater(pc.utf8_length(target), 0), lambda v: "empty Target (merchant) id"),
            (pc.match_substring_regex(weight, _DECIMAL_OK), lambda v: _amount_reason("Weight", v[2])),
            (pc.is_in(fraud, value_set=pa.array(["0", "1"])), lambda v: f"fraud {_show(v[4])} is not 0 or 1"),
        ]

    cols, good_idx, _lines, out = _validate(block, IMPORTANCE_HEADER, checks)
    source, target, weight, type_trans, fraud = _good_only(cols, good_idx)
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
