"""Where a run's records come from: a records file or Europeana Search API queries.

A source yields pages of records, each with the checkpoint to resume after it,
so a run can continue exactly where it stopped. A run's `scope` (stored with the
run) is all that is needed to build its source again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from enrichment.config import Settings
from enrichment.errors import RecordsFileError
from enrichment.sources.europeana import SearchClient, SearchQuery, record_from_item
from enrichment.sources.records_file import Record, read_records_file

log = logging.getLogger(__name__)
FILE_PAGE = 1000
# What a records file's position stores of the file it counted records in: a run resumed
# over another file would skip records by count, so `RecordsFileSource` refuses it.
FILE_IDENTITY = ("size", "mtime_ns")
# Pages of record ids a Search API source remembers to drop a record served twice:
# the API's order is not guaranteed between pages, so one can reappear a page later.
REPEAT_WINDOW = 20


@dataclass(frozen=True)
class SourcePage:
    records: list[Record]
    checkpoint: dict[str, Any]


class Source(Protocol):
    def pages(self, checkpoint: dict[str, Any] | None) -> Iterator[SourcePage]: ...


@dataclass(frozen=True)
class RecordsFileSource:
    """A JSON Lines or CSV file; checked whole before a run starts, so a bad line writes nothing.

    Its position is the count of records paged, with the file's size and
    modification time (`FILE_IDENTITY`) as paging began: a run resumes by
    skipping that many records, which is right only in the same file. Size and
    time rather than a hash, which would read a multi-GB file once more.
    """

    path: Path

    def check(self) -> int:
        return sum(1 for _ in read_records_file(self.path))

    def identity(self) -> dict[str, int]:
        """The file's size and modification time (ns), as positions store them."""
        status = self.path.stat()
        return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}

    def changed_since(self, position: dict[str, Any] | None) -> bool:
        """Whether the file is no longer the one `position` counted records in.

        A position from before identities were stored cannot tell, and is
        trusted as it was; a run not yet past its first page has nothing to skip.
        """
        if not position or any(key not in position for key in FILE_IDENTITY):
            return False
        return self.identity() != {key: position[key] for key in FILE_IDENTITY}

    def pages(self, checkpoint: dict[str, Any] | None) -> Iterator[SourcePage]:
        if self.changed_since(checkpoint):
            # `runs.service.resume` refuses this first, naming the run; this catches a file
            # that changed after that check, before skipping records of the wrong file.
            raise RecordsFileError(
                f"records file {self.path} changed since its run started (size/mtime): "
                "its records cannot be counted off to resume"
            )
        identity = self.identity()
        done = (checkpoint or {}).get("records", 0)
        records = islice(read_records_file(self.path), done, None)
        while page := list(islice(records, FILE_PAGE)):
            done += len(page)
            yield SourcePage(page, {"records": done, **identity})


@dataclass
class EuropeanaSource:
    """Search API queries paged in order by cursor; `since` keeps recently updated records.

    A record that comes again within the last REPEAT_WINDOW pages (the API's
    order is not stable between pages, and two queries of a scope can overlap)
    is passed on once; the scheduler also never puts one id in a batch twice.
    """

    client: SearchClient
    queries: Sequence[SearchQuery]
    image_source: str = "auto"
    since: str | None = None
    skipped: int = field(default=0, init=False)
    repeated: int = field(default=0, init=False)
    _recent: deque[set[str]] = field(
        default_factory=lambda: deque(maxlen=REPEAT_WINDOW), init=False, repr=False
    )

    def pages(self, checkpoint: dict[str, Any] | None) -> Iterator[SourcePage]:
        state = checkpoint or {}
        start, cursor = state.get("query", 0), state.get("cursor", "*")
        for index in range(start, len(self.queries)):
            query = self.queries[index]
            if self.since:
                query = query.with_filter(f"timestamp_update:[{self.since} TO *]")
            for page in self.client.pages(query, cursor if index == start else "*"):
                after = (
                    {"query": index, "cursor": page.next_cursor}
                    if page.next_cursor and page.items
                    else {"query": index + 1, "cursor": "*"}
                )
                yield SourcePage(self._records(page.items), after)

    def _records(self, items: list[dict[str, Any]]) -> list[Record]:
        records: dict[str, Record] = {}
        for item in items:
            try:
                record = record_from_item(item, self.image_source)
            except (KeyError, ValueError) as error:
                self.skipped += 1
                log.warning("skipped a Search API item without a usable id: %s", error)
                continue
            if record.id in records or any(record.id in ids for ids in self._recent):
                self.repeated += 1
                continue
            records[record.id] = record
        self._recent.append(set(records))
        return list(records.values())


def source_for_scope(scope: dict[str, Any], settings: Settings, since: str | None = None) -> Source:
    """Rebuild a run's source from its stored scope."""
    if scope["source"] == "records_file":
        return RecordsFileSource(Path(scope["path"]))
    return EuropeanaSource(
        SearchClient(settings),
        [SearchQuery.from_json(query) for query in scope["queries"]],
        scope.get("image_source", "auto"),
        since,
    )
