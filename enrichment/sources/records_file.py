"""The Record contract and reading records from a local JSON Lines or CSV file.

A record is identified as Europeana writes it (`/2048128/object_1`); the
dataset is its first segment and the item URI follows from it, so records from
a file and from the Search API land in the same table the same way.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from enrichment.errors import RecordsFileError

ITEM_URI_BASE = "http://data.europeana.eu/item"


@dataclass(frozen=True)
class Record:
    """One collection object whose image is to be classified."""

    id: str
    dataset: str
    item_uri: str
    image_url: str | None
    provider: str | None = None
    timestamp_update: datetime | None = None
    title: str | None = None


def normalise_id(raw: str) -> str:
    """`2048128/object_1` and `/2048128/object_1` name the same record."""
    value = raw.strip()
    if not value.startswith("/"):
        value = "/" + value
    segments = value.split("/")
    if len(segments) < 3 or not all(segments[1:]):
        raise ValueError(f"record id {raw!r} is not of the form /DATASET/LOCAL_ID")
    return value


def parse_timestamp(raw: Any) -> datetime | None:
    """ISO 8601 (Europeana writes `2021-03-01T10:00:00.000Z`) or epoch milliseconds."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, int | float):
        return datetime.fromtimestamp(raw / 1000, tz=UTC)
    text = str(raw).strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def record_from_mapping(fields: Mapping[str, Any]) -> Record:
    """Build a Record from a file row; raises ValueError with a readable reason."""
    raw_id = fields.get("id")
    if not isinstance(raw_id, str) or not raw_id.strip():
        raise ValueError("missing 'id'")
    record_id = normalise_id(raw_id)
    image_url = fields.get("image_url") or None
    if image_url is not None and not isinstance(image_url, str):
        raise ValueError("'image_url' must be a string")
    try:
        timestamp = parse_timestamp(fields.get("timestamp_update"))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"'timestamp_update' {fields.get('timestamp_update')!r} is not ISO 8601"
        ) from None
    return Record(
        id=record_id,
        dataset=record_id.split("/")[1],
        item_uri=fields.get("item_uri") or ITEM_URI_BASE + record_id,
        image_url=image_url.strip() if image_url else None,
        provider=fields.get("provider") or None,
        timestamp_update=timestamp,
        title=_optional_text(fields, "title"),
    )


def _optional_text(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name!r} must be a string")
    return value.strip() or None


def read_records_file(path: Path) -> Iterator[Record]:
    """Yield records from `.jsonl`/`.ndjson`/`.json` (one object per line) or `.csv`.

    Errors name the file and line, so a 2-million-line export with one bad
    line can be fixed without a search.
    """
    if not path.is_file():
        raise RecordsFileError(f"records file {path} does not exist")
    if path.suffix.lower() == ".csv":
        yield from _read_csv(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordsFileError(
                    f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(fields, dict):
                raise RecordsFileError(f"{path}:{number}: expected a JSON object per line")
            yield _checked(path, number, fields)


def _read_csv(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "id" not in reader.fieldnames:
            raise RecordsFileError(f"{path}:1: the CSV header must name an 'id' column")
        for row in reader:
            if None in row:
                raise RecordsFileError(
                    f"{path}:{reader.line_num}: more fields than the header names"
                )
            yield _checked(path, reader.line_num, row)


def _checked(path: Path, number: int, fields: Mapping[str, Any]) -> Record:
    try:
        return record_from_mapping(fields)
    except ValueError as error:
        raise RecordsFileError(f"{path}:{number}: {error}") from None
