"""The Europeana Search API as a source of records: cursor paging, errors, mapping.

Runs page with `cursor` (never `start`, which stops at 1000 results), sorted by
a stable field, 100 rows a page (the server's cap). The API's own error
messages are surfaced: a bad key or query stops a run before anything is
enqueued. Connection failures, 429 and 5xx are retried in one place, urllib3's
`Retry` on the session (with backoff, honouring Retry-After); only a 200 whose
body is not a usable page, which urllib3 cannot see, is fetched again here.
Each page, its retries included, has PAGE_DEADLINE (`enrichment.deadline_http`):
socket timeouts bound each wait, not their sum, so an API trickling its answer a
byte at a time, or asking in Retry-After for an hour, held a nightly run silently
for as long; now the page fails, saying why, and the run can be resumed.
A cursor that does not move on, or pages that bring nothing new, stop the
query with a clear error instead of paging forever.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from enrichment import PROJECT_NAME, __version__
from enrichment.config import Settings
from enrichment.deadline import Deadline
from enrichment.deadline_http import BoundedRetry, CallDeadlines, DeadlineAdapter
from enrichment.errors import ConfigError, EnrichError, InvalidValue, RecordIdError, printable
from enrichment.sources.records_file import ITEM_URI_BASE, Record, normalise_id, parse_timestamp

log = logging.getLogger(__name__)

SEARCH_PATH = "/record/v2/search.json"
ROWS = 100
SORT = "europeana_id asc"
PROFILE = "standard"
IMAGE_SOURCES = ("auto", "preview", "full")
REUSABILITY = ("open", "restricted", "permission")
MALFORMED_ATTEMPTS = 3
RETRIES = 5
# One page's whole time, its retries and their waits included: a hundred records come in
# well under a second, and a throttled API's backoff of 1, 2, 4, 8 and 16 s fits.
PAGE_DEADLINE = 300.0
# How many recent pages a query remembers, to notice a cursor going round in a loop.
LOOP_WINDOW = 50


def reusability_groups(text: str) -> tuple[str, ...]:
    """One or more of Europeana's reusability groups, comma-separated (`open,permission`).

    The Search API takes them in that form; runs and harvests both ask for them so.
    """
    groups = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [group for group in groups if group not in REUSABILITY]
    if unknown or not groups:
        raise InvalidValue(
            "reusability",
            f"{text!r}: each group must be one of {', '.join(REUSABILITY)} "
            "(several comma-separated, e.g. open,permission)",
        )
    return groups


class SearchAPIError(EnrichError):
    """The Search API refused the request (bad key, bad query, ...): retrying will not help."""


class SearchPageError(EnrichError):
    """A page could not be fetched after retries; the run can be resumed from its cursor."""


@dataclass(frozen=True)
class SearchQuery:
    """One Search API query; a run's scope is one or more of these, paged in order."""

    query: str
    qf: tuple[str, ...] = ()
    reusability: str | None = None
    media: bool | None = None
    thumbnail: bool | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "qf": list(self.qf),
            "reusability": self.reusability,
            "media": self.media,
            "thumbnail": self.thumbnail,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> SearchQuery:
        return cls(
            query=document["query"],
            qf=tuple(document.get("qf", ())),
            reusability=document.get("reusability"),
            media=document.get("media"),
            thumbnail=document.get("thumbnail"),
        )

    def with_filter(self, extra: str) -> SearchQuery:
        return SearchQuery(
            self.query, (*self.qf, extra), self.reusability, self.media, self.thumbnail
        )


_DATASET_QUERY = re.compile(r"edm_datasetName:([^_\s]+)_\*")


def dataset_query(dataset: str) -> SearchQuery:
    """All records of one dataset: Europeana's dataset names are `ID_suffix`."""
    if not dataset.isalnum():
        raise InvalidValue(
            "datasets", f"dataset id {dataset!r} must be letters and digits, e.g. 2048128"
        )
    return SearchQuery(f"edm_datasetName:{dataset}_*")


def dataset_of(query: SearchQuery) -> str | None:
    """The dataset whose records the query is (`dataset_query`'s), if it is one."""
    match = _DATASET_QUERY.fullmatch(query.query)
    return match.group(1) if match else None


def whole_collection_query() -> SearchQuery:
    return SearchQuery("*", ("TYPE:IMAGE",))


@dataclass(frozen=True)
class SearchPage:
    items: list[dict[str, Any]]
    next_cursor: str | None
    total: int | None = None


@dataclass
class SearchClient:
    """One pooled HTTP session against `{EUROPEANA_API_URL}/record/v2/search.json`."""

    settings: Settings
    session: requests.Session = field(default_factory=requests.Session)
    deadline: float = PAGE_DEADLINE

    def __post_init__(self) -> None:
        if not self.settings.europeana_api_key:
            raise ConfigError(
                "EUROPEANA_API_KEY is not set: get a key at https://pro.europeana.eu/get-api"
            )
        self._deadlines = CallDeadlines(self.deadline)
        # Never set: a page's waits end at its deadline, and a Ctrl-C ends the process.
        never = threading.Event()
        bounded = type(
            "SearchRetry", (BoundedRetry,), {"deadlines": self._deadlines, "closing": never}
        )
        retries = bounded(
            total=RETRIES,
            status_forcelist=(429, 500, 502, 503, 504),
            # urllib3 waits backoff_factor * 2**(n - 1) s before the n-th retry (none
            # before the 1st).
            backoff_factor=self.settings.search_backoff,
            backoff_jitter=0.5,
            respect_retry_after_header=True,
            raise_on_status=False,
            allowed_methods=frozenset({"GET"}),
        )
        adapter = DeadlineAdapter(self._deadlines, retries, pool_maxsize=2)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = (
            f"{PROJECT_NAME}/{__version__} (+{self.settings.contact_url})"
        )

    def count(self, query: SearchQuery) -> int | None:
        """How many records the query matches (None: the API did not say), from a page of
        none."""
        return self.page(query, "*", rows=0).total

    def page(self, query: SearchQuery, cursor: str, rows: int = ROWS) -> SearchPage:
        """One page; raises SearchAPIError for refusals, SearchPageError when it keeps failing."""
        params: list[tuple[str, str]] = [
            ("wskey", self.settings.europeana_api_key or ""),
            ("query", query.query),
            ("rows", str(rows)),
            ("profile", PROFILE),
            ("sort", SORT),
            ("cursor", cursor),
            *(("qf", value) for value in query.qf),
        ]
        if query.reusability:
            params.append(("reusability", query.reusability))
        if query.media is not None:
            params.append(("media", str(query.media).lower()))
        if query.thumbnail is not None:
            params.append(("thumbnail", str(query.thumbnail).lower()))
        url = self.settings.europeana_api_url + SEARCH_PATH
        problem = ""
        # One deadline for the page: its tries here and urllib3's retries within each.
        with self._deadlines.call() as deadline:
            for attempt in range(MALFORMED_ATTEMPTS):
                if attempt:
                    pause = min(self.settings.search_backoff * 2**attempt, 10)
                    if pause >= deadline.remaining():
                        break
                    time.sleep(pause)
                response = self._get(url, params, deadline)
                if response.status_code == 429 or response.status_code >= 500:
                    # The adapter already retried these with backoff and Retry-After, within
                    # the page's deadline: a wait past it was not begun.
                    after = response.headers.get("Retry-After")
                    asked = f" (it asked for a wait of {printable(after[:40])} s)" if after else ""
                    raise SearchPageError(
                        f"Europeana Search API page failed: HTTP {response.status_code} after "
                        f"retries{asked}"
                    )
                body = _json_body(response)
                if body is None:
                    problem = f"HTTP {response.status_code} with a body that is not JSON"
                    continue
                if response.status_code >= 400 or body.get("success") is False:
                    # The error and, where the API gives one, its explanation (which part of a
                    # query it could not parse).
                    said = [str(part) for part in (body.get("error"), body.get("message")) if part]
                    message = ": ".join(dict.fromkeys(said)) or f"HTTP {response.status_code}"
                    code = body.get("code")
                    raise SearchAPIError(
                        f"Europeana Search API refused the request: {message}"
                        + (f" ({code})" if code else "")
                    )
                items = body.get("items", [])
                if not isinstance(items, list):
                    problem = "the response has no list of items"
                    continue
                strange = next((item for item in items if not isinstance(item, dict)), None)
                if strange is not None:
                    problem = f"an item is a JSON {type(strange).__name__}, not an object"
                    continue
                cursor_after = body.get("nextCursor") or None
                if cursor_after is not None and not isinstance(cursor_after, str):
                    problem = "its nextCursor is not a string"
                    continue
                return SearchPage(items, cursor_after, result_count(body.get("totalResults")))
        raise SearchPageError(f"Europeana Search API page failed: {problem}")

    def _get(self, url: str, params: list[tuple[str, str]], deadline: Deadline) -> Any:
        """One request under the page's deadline (urllib3 retrying it within), or the
        SearchPageError that says why there is no answer."""
        try:
            return self.session.get(url, params=params, timeout=(10, 60))
        except requests.RequestException as error:
            if deadline.expired:
                raise SearchPageError(
                    "Europeana Search API page failed: no whole answer within "
                    f"{deadline.seconds:g} s"
                ) from None
            # The adapter already retried connection and read failures with backoff, as
            # many times as the deadline left room for.
            raise SearchPageError(
                f"Europeana Search API page failed: request failed ({type(error).__name__}) "
                "after retries"
            ) from None

    def pages(self, query: SearchQuery, cursor: str = "*") -> Iterator[SearchPage]:
        """Pages from `cursor` on, until `nextCursor` is absent.

        A cursor seen before among the recent pages, or a page whose records
        all came on the recent pages already, means the server is going round
        in a loop: that is an error, not the end, since records may be missing.
        """
        cursors: deque[str] = deque([cursor], maxlen=LOOP_WINDOW)
        recent: deque[frozenset[str]] = deque()
        in_window: Counter[str] = Counter()  # ids on the recent pages, kept as pages come and go
        while True:
            page = self.page(query, cursor)
            ids = frozenset(str(item.get("id")) for item in page.items)
            if ids and all(record_id in in_window for record_id in ids):
                raise SearchPageError(
                    "Europeana Search API paging is going round in a loop: the page after "
                    f"cursor {cursor[:40]!r} brought no record that was not on a recent page"
                )
            yield page
            if page.next_cursor is None or not page.items:
                return
            if page.next_cursor in cursors:
                raise SearchPageError(
                    "Europeana Search API paging is going round in a loop: nextCursor "
                    f"{page.next_cursor[:40]!r} was already used; the run stops here"
                )
            recent.append(ids)
            in_window.update(ids)
            if len(recent) > LOOP_WINDOW:
                for record_id in recent.popleft():
                    in_window[record_id] -= 1
                    if not in_window[record_id]:
                        del in_window[record_id]
            cursors.append(page.next_cursor)
            cursor = page.next_cursor


def result_count(value: Any) -> int | None:
    """`totalResults` when it is a count; anything else (a list, an object, -1) is unknown.

    The count is only reported (a harvest keeps it per concept), so a server
    that sends nonsense there costs the number, never the harvest or a later run.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if value is not None:
        log.warning("the Search API's totalResults is not a count (%.80r): ignored", value)
    return None


def _json_body(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def first_text(values: Any) -> str | None:
    """The first string of a Search API field, which may be a string or a list of them."""
    if isinstance(values, str):
        return values or None
    if isinstance(values, Sequence) and values and isinstance(values[0], str):
        return values[0] or None
    return None


def record_from_item(item: Mapping[str, Any], image_source: str = "auto") -> Record:
    """Map a Search API item to a Record; `image_source` is preview, full, or auto (either).

    Raises RecordIdError (a ValueError) for an id that is not a string: `str()` of a list
    made `/['/900/item_1']` a record of its own, in a dataset named `['`."""
    raw_id = item["id"]
    if not isinstance(raw_id, str):
        raise RecordIdError(f"record id {raw_id!r} is a JSON {type(raw_id).__name__}, not a string")
    record_id = normalise_id(raw_id)
    preview, full = first_text(item.get("edmPreview")), first_text(item.get("edmIsShownBy"))
    image_url = {"preview": preview, "full": full, "auto": preview or full}[image_source]
    timestamp = item.get("timestamp_update") or item.get("timestamp_update_epoch")
    try:
        updated = parse_timestamp(timestamp)
    except (TypeError, ValueError, OverflowError):
        updated = None
    return Record(
        id=record_id,
        dataset=record_id.split("/")[1],
        item_uri=ITEM_URI_BASE + record_id,
        image_url=image_url,
        provider=first_text(item.get("dataProvider")) or first_text(item.get("provider")),
        timestamp_update=updated,
        title=first_text(item.get("title")),
    )
