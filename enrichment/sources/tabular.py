"""Reading the tabular files users hand in: CSV or JSON Lines, as numbered rows of fields.

Records files and labelled sets are both written by other tools (Excel's "CSV
UTF-8" with its byte-order mark, pandas, jq), so both go through this one
reader and fail the same way: one `EnrichError` naming the file and line, for
a file that is not a regular file, text that is not UTF-8 (UTF-16 is named as
such), a binary file, a CSV quote that is never closed, a CSV field over
`MAX_FIELD` bytes, a header that names a column twice, a row with more or fewer
fields than the header, a JSON line that is not an object or that gives a key
twice.

Rows come out one at a time; callers that act on a file read it whole first
(a records file is checked before its run exists, a labelled set is read into
a list), so an error on the last line leaves nothing half-done.
"""

from __future__ import annotations

import csv
import json
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enrichment.errors import EnrichError, InputFileError

CSV = "csv"
JSONL = "jsonl"
CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_FIELD = 128 * 1024  # csv's own limit, stated here so the message can name it
BOM = "\ufeff"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class Row:
    """One row: its line number (the first line of a multi-line CSV record) and its fields."""

    line: int
    fields: dict[str, Any]


def table_format(path: Path, default: str | None = None) -> str | None:
    """`csv` or `jsonl` by the file's suffix, else `default`."""
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return CSV
    if suffix in JSONL_SUFFIXES:
        return JSONL
    return default


def check_regular_file(path: Path, what: str, error: type[EnrichError] = InputFileError) -> None:
    """A missing path, a directory, a FIFO or a device each get their own message."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as failure:
        raise error(f"cannot read {what} {path}: {failure.strerror or failure}") from None
    if stat.S_ISDIR(mode):
        raise error(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        # A FIFO would be read once by the check and found empty by the run.
        raise error(f"{what} {path} is not a regular file (a pipe or a device): save it to a file")


def read_rows(
    path: Path,
    fmt: str,
    what: str,
    required_columns: Iterable[str] = (),
    error: type[EnrichError] = InputFileError,
) -> Iterator[Row]:
    """The rows of a CSV (`fmt="csv"`, first line the header) or JSON Lines file.

    `required_columns` must appear in a CSV header (JSON Lines rows are checked
    by the caller, since each line names its own fields). Blank lines are skipped.
    """
    check_regular_file(path, what, error)
    try:
        with path.open("rb") as handle:
            lines = _decoded_lines(path, handle, error)
            if fmt == CSV:
                yield from _csv_rows(path, lines, tuple(required_columns), error)
            else:
                yield from _jsonl_rows(path, lines, error)
    except OSError as failure:
        raise error(f"cannot read {what} {path}: {failure.strerror or failure}") from None


def _decoded_lines(path: Path, handle: Iterable[bytes], error: type[EnrichError]) -> Iterator[str]:
    """Each line as text, decoded on its own so a bad byte is named by its line."""
    for number, raw in enumerate(handle, start=1):
        utf16_bom = number == 1 and raw.startswith(UTF16_BOMS)
        if utf16_bom or b"\0" in raw:
            if utf16_bom or _alternate_nuls(raw):
                # Excel's "Unicode Text" and Windows PowerShell's Out-File write UTF-16.
                raise error(f"{path}:{number}: looks like UTF-16 text: save the file as UTF-8")
            raise error(
                f"{path}:{number}: contains a NUL byte: "
                "not a text file (an image or another binary file?)"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as failure:
            raise error(
                f"{path}:{number}: not UTF-8 text (byte 0x{raw[failure.start]:02x} at "
                f"column {failure.start + 1}): save the file as UTF-8"
            ) from None
        yield text.removeprefix(BOM) if number == 1 else text


def _alternate_nuls(raw: bytes) -> bool:
    """Whether every other byte of a line is NUL, as in UTF-16 text of Latin script.

    Binary files (images) hold NULs too, but at odd and even offsets alike.
    """
    line = raw.rstrip(b"\r\n")
    if len(line) < 4 or not line.strip(b"\0"):
        return False
    return not line[0::2].strip(b"\0") or not line[1::2].strip(b"\0")


def _csv_rows(
    path: Path, lines: Iterator[str], required: tuple[str, ...], error: type[EnrichError]
) -> Iterator[Row]:
    # strict: a quote that is never closed is an error, not a field that swallows every line
    # after it (and their records) up to the end of the file.
    reader = csv.reader(lines, strict=True)
    start = 1  # the line the CSV record being read starts on: where an unclosed quote opened
    try:
        header = next(reader, None)
        if not header or not any(name.strip() for name in header):
            raise error(f"{path}:1: the file is empty; the first line must be the CSV header")
        names = [name.strip() for name in header]
        for index, name in enumerate(names):
            if name and name in names[:index]:
                raise error(
                    f"{path}:1: the CSV header names the column {name!r} twice: "
                    "one of them would be silently ignored"
                )
        missing = [name for name in required if name not in names]
        if missing:
            raise error(
                f"{path}:1: the CSV header must name the column"
                f"{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                f"(it names {', '.join(map(repr, names))})"
            )
        start = reader.line_num + 1
        for values in reader:
            if any(value.strip() for value in values):
                if len(values) > len(names):
                    raise error(f"{path}:{start}: more fields than the header names")
                missing = [name for name in names[len(values) :] if name]
                if missing:
                    # Not read as empty: a row cut short (or run together with the next)
                    # would silently lose its image URL or title.
                    raise error(
                        f"{path}:{start}: fewer fields than the header names (no "
                        f"{', '.join(map(repr, missing))}): end the row with commas for "
                        "fields meant to be empty"
                    )
                fields = {name: value for name, value in zip(names, values, strict=False) if name}
                yield Row(start, fields)
            start = reader.line_num + 1
    except csv.Error as failure:
        raise error(f"{path}:{start}: not valid CSV: {_csv_reason(str(failure))}") from None


def _csv_reason(reason: str) -> str:
    """Python's csv message, told in terms of the file where it is cryptic."""
    if "field larger than field limit" in reason:
        return f"a field is longer than {MAX_FIELD // 1024} KiB (an unclosed quote?)"
    if reason == "unexpected end of data":
        return "a quote opened on this line is never closed"
    if "new-line character seen in unquoted field" in reason:
        return (
            "a carriage return (CR) ends a line without a line feed (LF), as old Mac files "
            "do: save the file with LF or CRLF line endings"
        )
    if "expected after" in reason:
        return f'{reason}: a quote inside a quoted field is written twice ("")'
    return reason


class _RepeatedKey(Exception):
    """A JSON object gives one key twice; json.loads would keep the last value silently."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for json.loads: an object, refused if it names a key twice."""
    fields: dict[str, Any] = {}
    for key, value in pairs:
        if key in fields:
            raise _RepeatedKey(key)
        fields[key] = value
    return fields


def _jsonl_rows(path: Path, lines: Iterator[str], error: type[EnrichError]) -> Iterator[Row]:
    first = True
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            # Without its line ending, so that an error's column is on this line.
            fields = json.loads(text.rstrip("\r\n"), object_pairs_hook=_unique_keys)
        except _RepeatedKey as repeated:
            raise error(
                f"{path}:{number}: the key {repeated.key!r} is given twice: "
                "one of its values would be silently ignored"
            ) from None
        except json.JSONDecodeError as failure:
            hint = ""
            if first and table_format(path) is None:
                hint = (
                    f"; {path.name} was read as JSON Lines because its name ends in "
                    "neither .csv nor .jsonl (or .ndjson)"
                )
            raise error(
                f"{path}:{number}: not valid JSON ({failure.msg} at column {failure.colno}){hint}"
            ) from None
        except RecursionError:
            raise error(f"{path}:{number}: not valid JSON (nested too deeply)") from None
        if not isinstance(fields, dict):
            raise error(f"{path}:{number}: expected a JSON object per line")
        first = False
        yield Row(number, fields)
