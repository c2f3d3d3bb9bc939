"""The Record contract and reading records from a local JSON Lines or CSV file.

A record is identified as Europeana writes it (`/2048128/object_1`); the
dataset is its first segment and the item URI follows from it, so records from
a file and from the Search API land in the same table the same way.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from enrichment.errors import RecordIdError, RecordsFileError
from enrichment.sources.tabular import CSV, JSONL, read_rows, table_format
from enrichment.store.schema import ITEM_URI_BASE

MAX_ID_LENGTH = 512  # records.id
MAX_DATASET_LENGTH = 128  # records.dataset
# What RFC 3987 keeps out of IRIs; an id may not hold `?` or `#` either, which would end its path.
FORBIDDEN_IN_IRI = frozenset('<>"{}|\\^`')
FORBIDDEN_IN_ID = FORBIDDEN_IN_IRI | {"?", "#"}
# Control, format (bidi, zero-width), separators (every whitespace), private use, surrogates.
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cs"})
CSV_COLUMNS = ("id", "image_url")
ITEM_URI_SCHEMES = ("http", "https")
EUROPEANA_ITEMS = urlsplit(ITEM_URI_BASE)  # Europeana's item namespace: host and path
# Europeana serves its item URIs over https too; the identifier is the http one.
SECURE_ITEM_URI_BASE = EUROPEANA_ITEMS._replace(scheme="https").geturl()


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
    """`2048128/object_1` and `/2048128/object_1` name the same record.

    An id becomes the path of the item URI and of every annotation's target, so
    it must be a valid IRI path: see `check_id`.
    """
    value = raw.strip()
    if not value.startswith("/"):
        value = "/" + value
    segments = value.split("/")
    if len(segments) < 3 or not all(segments[1:]):
        raise RecordIdError(f"record id {raw!r} is not of the form /DATASET/LOCAL_ID")
    if any(unquote(segment) in (".", "..") for segment in segments):
        # `/2048128/../2048129/obj` would be read by any URI normaliser as another record.
        raise RecordIdError(f"record id {raw!r} has a '.' or '..' segment, which ids may not hold")
    check_id(value)
    return value


def check_id(value: str) -> None:
    """Refuse what would make the item URI an invalid IRI or could mislead a reader.

    Not allowed: whitespace, control characters (NUL, tab, newline), Unicode
    format characters (bidi overrides such as U+202E, zero-width spaces), private
    use code points, and the characters RFC 3987 keeps out of IRIs (`<>"{}|\\^` and
    the backtick), plus `?` and `#`, which would end the IRI's path.
    """
    if len(value) > MAX_ID_LENGTH:
        raise RecordIdError(f"record id {value[:40]!r}... is over {MAX_ID_LENGTH} characters")
    if len(value.split("/")[1]) > MAX_DATASET_LENGTH:
        raise RecordIdError(
            f"record id {value!r}: the dataset is over {MAX_DATASET_LENGTH} characters"
        )
    forbidden = _forbidden_character(value, FORBIDDEN_IN_ID)
    if forbidden:
        raise RecordIdError(
            f"record id {value!r} contains {forbidden}, which an id may not hold: ids become IRIs"
        )


def check_item_uri(item_uri: str, record_id: str) -> str:
    """`item_uri` if an export can put it in the target of the record's annotations.

    Exports write it as the target's scope (W3C) or as the target itself
    (Europeana's profile), and Europeana's Annotations API tags that object:
    so it must be an absolute http(s) URI with a host and nothing an IRI may not
    hold (whitespace, control and bidi characters, `<>"{}|\\^` and the
    backtick), and a URI in Europeana's item namespace must be the record's
    own, or the labels would land on another object.

    The record's own item URI over https (`https://data.europeana.eu/item/...`,
    which Europeana serves as well) is the same object: it is returned as the
    http URI, Europeana's identifier of the item, which Europeana's own records
    and the Search API give, so the record is stored and targeted the same way
    whichever form the file gave (and its item URI stored as NULL,
    `schema.stored_item_uri`).
    """
    forbidden = _forbidden_character(item_uri, FORBIDDEN_IN_IRI)
    if forbidden:
        raise ValueError(f"'item_uri' {item_uri!r} contains {forbidden}, which a URI may not hold")
    try:
        parts = urlsplit(item_uri)
    except ValueError:  # an unclosed IPv6 bracket
        parts = None
    if parts is None or parts.scheme.lower() not in ITEM_URI_SCHEMES or not parts.hostname:
        raise ValueError(
            f"'item_uri' {item_uri!r} is not an absolute http or https URI with a host"
        )
    own = ITEM_URI_BASE + record_id
    if item_uri in (own, SECURE_ITEM_URI_BASE + record_id):
        return own
    in_europeana = parts.hostname == EUROPEANA_ITEMS.hostname and parts.path.startswith(
        EUROPEANA_ITEMS.path + "/"
    )
    if in_europeana:
        raise ValueError(
            f"'item_uri' {item_uri!r} is not record {record_id}'s Europeana item URI ({own}): "
            "give that one, or leave item_uri out"
        )
    return item_uri


def _forbidden_character(value: str, forbidden: frozenset[str]) -> str | None:
    """The first character of `value` that is in `forbidden` or in FORBIDDEN_CATEGORIES,
    named for a message (`SPACE (U+0020)`); None if there is none."""
    for character in value:
        if character in forbidden or unicodedata.category(character) in FORBIDDEN_CATEGORIES:
            code = f"U+{ord(character):04X}"
            name = unicodedata.name(character, "")
            return f"{name} ({code})" if name else code
    return None


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
    if isinstance(raw_id, int | float) and not isinstance(raw_id, bool):
        raise ValueError(
            f"'id' is the number {raw_id!r}: an id is a string /DATASET/LOCAL_ID, "
            f'such as "/2048128/{raw_id}"'
        )
    if raw_id is None or raw_id == "":
        raise ValueError("missing 'id'")
    if not isinstance(raw_id, str):
        raise ValueError(f"'id' must be a string /DATASET/LOCAL_ID, not {type(raw_id).__name__}")
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
    given_item_uri = _optional_text(fields, "item_uri")
    return Record(
        id=record_id,
        dataset=record_id.split("/")[1],
        item_uri=(
            ITEM_URI_BASE + record_id
            if given_item_uri is None
            else check_item_uri(given_item_uri, record_id)
        ),
        image_url=image_url.strip() if image_url else None,
        provider=_optional_text(fields, "provider"),
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
    """Yield records from `.csv` or JSON Lines (`.jsonl`, `.ndjson`, or any other name).

    Errors name the file and line, so a 2-million-line export with one bad
    line can be fixed without a search. Refused, rather than guessed at: a CSV
    header without `id` or `image_url` (every record would be `no_image`), a
    column named twice, an id on two lines (one of the two image URLs would
    silently win), an item URI that is not the record's (`check_item_uri`), and
    a file without records (an export that failed upstream would otherwise end
    in an empty run that looks like success). A JSON line may leave out
    `image_url`: that record has no image.
    """
    fmt = table_format(path, default=JSONL)
    columns = CSV_COLUMNS if fmt == CSV else ()
    seen: dict[str, int] = {}
    for row in read_rows(path, fmt or JSONL, "records file", columns, RecordsFileError):
        try:
            record = record_from_mapping(row.fields)
        except ValueError as error:
            raise RecordsFileError(f"{path}:{row.line}: {error}") from None
        first = seen.setdefault(record.id, row.line)
        if first != row.line:
            raise RecordsFileError(
                f"{path}:{row.line}: record {record.id} is already on line {first}: "
                "give each record once"
            )
        yield record
    if not seen:
        raise RecordsFileError(
            f"{path}:2: no records after the CSV header: nothing to enrich"
            if fmt == CSV
            else f"{path}:1: the file holds no records (one JSON object a line): nothing to enrich"
        )
