"""Harvesting a multilabel training set from the Search API: which records, with which labels.

One cursor-paged query per concept of a vocabulary, through the same
`SearchClient` as runs (so the same retries, error messages and loop guard).
A record returned for `drawing` and for `map` is one candidate labelled with
both; its labels also take every vocabulary concept its `edmConcept` names, so
a record is fully labelled even when the query of one of its concepts stopped
paging before reaching it (a concept stops at CANDIDATES_PER_CAP times the
per-class cap: the selection needs a choice, not all of Europeana's photographs). It also
stops after EXAMINED_PER_CANDIDATE results per candidate wanted, usable or not
(`Collected.cut_short`): a query whose results are nearly all unusable (no image,
excluded, rights outside `--reusability`) would otherwise page through everything the API
holds for it, or for ever where a server's cursor never ends.

The selection of at most N records per class is stable: records are ranked by the
number of their labels (multilabel records first, since they are the rare
ones and teach the label combinations), then by a hash of the seed and the
record id, which does not depend on the order the API happened to return; a
record is taken while none of its labels has reached N. So no class ever holds
more than N records, and the same seed over the same results picks the same set.

This module only talks to the Search API; downloading, checking and writing
the images is `enrichment.model.harvest`.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enrichment.errors import InvalidValue
from enrichment.sources.europeana import (
    SearchClient,
    SearchQuery,
    first_text,
    record_from_item,
    reusability_groups,
)
from enrichment.sources.records_file import Record, normalise_id

DEFAULT_CONCEPT_QUERY = 'skos_concept:"{uri}"'
DEFAULT_PER_CLASS = 1000
CANDIDATES_PER_CAP = 3
EXAMINED_PER_CANDIDATE = 20
# Europeana's reusability groups, by the start of the rights statement URI
# (https://pro.europeana.eu/page/available-rights-statements).
OPEN_RIGHTS = (
    "http://creativecommons.org/publicdomain/mark/",
    "http://creativecommons.org/publicdomain/zero/",
    "http://creativecommons.org/licenses/by/",
    "http://creativecommons.org/licenses/by-sa/",
)
RESTRICTED_RIGHTS = (
    "http://creativecommons.org/licenses/by-nc/",
    "http://creativecommons.org/licenses/by-nc-sa/",
    "http://creativecommons.org/licenses/by-nc-nd/",
    "http://creativecommons.org/licenses/by-nd/",
    "http://rightsstatements.org/vocab/NoC-NC/",
    "http://rightsstatements.org/vocab/NoC-OKLR/",
)
EXCLUDE_FIELDS = ("europeana_id", "record_id", "id", "record")


@dataclass(frozen=True)
class HarvestOptions:
    """What decides a harvest's selection; stored with it, so a resumed harvest is the same one."""

    per_class: int = DEFAULT_PER_CLASS
    reusability: tuple[str, ...] = ()  # groups of REUSABILITY, as a run asks for them
    qf: tuple[str, ...] = ()
    image_source: str = "auto"
    concept_query: str = DEFAULT_CONCEPT_QUERY
    exclude: frozenset[str] = frozenset()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise InvalidValue("per_class", f"must be at least 1, not {self.per_class}")
        if self.reusability:
            reusability_groups(",".join(self.reusability))
        if "{uri}" not in self.concept_query:
            raise InvalidValue(
                "concept_query",
                f'{self.concept_query!r} must contain {{uri}}, e.g. skos_concept:"{{uri}}"',
            )

    def as_json(self) -> dict[str, Any]:
        return {
            "per_class": self.per_class,
            "reusability": list(self.reusability),
            "qf": list(self.qf),
            "image_source": self.image_source,
            "concept_query": self.concept_query,
            "excluded_ids": len(self.exclude),
            "excluded_sha256": hashlib.sha256("\n".join(sorted(self.exclude)).encode()).hexdigest(),
            "seed": self.seed,
        }


@dataclass
class Candidate:
    """One record found by one or more concept queries, with all its vocabulary labels."""

    record: Record
    rights: str | None
    labels: set[str] = field(default_factory=set)

    def as_json(self, order: Sequence[str]) -> dict[str, Any]:
        return {
            "id": self.record.id,
            "dataset": self.record.dataset,
            "image_url": self.record.image_url,
            "provider": self.record.provider,
            "title": self.record.title,
            "rights": self.rights,
            "labels": [key for key in order if key in self.labels],
        }


@dataclass
class Collected:
    """Everything the concept queries found, and what was left out before selection, by why."""

    candidates: dict[str, Candidate] = field(default_factory=dict)
    found: dict[str, int] = field(default_factory=dict)  # the API's totalResults per concept
    left_out: dict[str, int] = field(default_factory=dict)  # excluded, no_image, ...
    # Concepts whose paging stopped at the cap on results examined: (examined, usable).
    cut_short: dict[str, tuple[int, int]] = field(default_factory=dict)
    _out: set[str] = field(default_factory=set, repr=False)

    def leave_out(self, record_id: str, reason: str) -> None:
        """Count a record left out once, however many concepts return it."""
        if record_id not in self._out:
            self._out.add(record_id)
            self.left_out[reason] = self.left_out.get(reason, 0) + 1


def reusability_of(rights: str | None) -> str:
    """open, restricted or permission, as Europeana groups rights statements."""
    value = (rights or "").replace("https://", "http://")
    if value.startswith(OPEN_RIGHTS):
        return "open"
    if value.startswith(RESTRICTED_RIGHTS):
        return "restricted"
    return "permission"


def concept_query(uri: str, options: HarvestOptions) -> SearchQuery:
    """The Search API query for one concept: images with media, the options' filters."""
    return SearchQuery(
        "*",
        (options.concept_query.replace("{uri}", uri), "TYPE:IMAGE", *options.qf),
        ",".join(options.reusability) or None,
        media=True,
    )


def collect(
    client: SearchClient,
    vocabulary: Mapping[str, str],
    options: HarvestOptions,
    on_concept: Callable[[str, int], None] = lambda key, found: None,
) -> Collected:
    """Page each concept's query and merge what comes back into one candidate per record."""
    by_uri = {uri: key for key, uri in vocabulary.items()}
    collected = Collected()
    enough = CANDIDATES_PER_CAP * options.per_class
    most = EXAMINED_PER_CANDIDATE * enough
    for key, uri in vocabulary.items():
        eligible = examined = 0
        for page in client.pages(concept_query(uri, options)):
            if page.total is not None:
                collected.found[key] = page.total
            for item in page.items:
                eligible += _merge(collected, item, key, by_uri, options)
            examined += len(page.items)
            if eligible >= enough:
                break
            if examined >= most:
                collected.cut_short[key] = (examined, eligible)
                break
        collected.found.setdefault(key, eligible)
        on_concept(key, eligible)
    return collected


def _merge(
    collected: Collected,
    item: Mapping[str, Any],
    key: str,
    by_uri: Mapping[str, str],
    options: HarvestOptions,
) -> int:
    """Add one item's labels to its record's candidate; 1 if it is a usable candidate."""
    try:
        record = record_from_item(item, options.image_source)
    except (KeyError, ValueError):
        collected.leave_out(repr(item.get("id")), "no_usable_id")
        return 0
    known = collected.candidates.get(record.id)
    if known is not None:
        known.labels.add(key)
        return 1
    rights = first_text(item.get("rights"))
    if record.id in options.exclude:
        collected.leave_out(record.id, "excluded")
        return 0
    if not record.image_url:
        collected.leave_out(record.id, "no_image")
        return 0
    if options.reusability and reusability_of(rights) not in options.reusability:
        collected.leave_out(record.id, "rights_not_in_reusability")
        return 0
    concepts = item.get("edmConcept")
    # edmConcept is a list of URIs; anything else in it (an object, a number) is not one.
    labels = {key} | {
        by_uri[uri]
        for uri in (concepts if isinstance(concepts, list) else [])
        if isinstance(uri, str) and uri in by_uri
    }
    collected.candidates[record.id] = Candidate(record, rights, labels)
    return 1


def select(candidates: Iterable[Candidate], per_class: int, seed: int) -> list[Candidate]:
    """At most `per_class` records per label, multilabel records first, in id order."""

    def rank(candidate: Candidate) -> tuple[int, str]:
        tie = hashlib.sha256(f"{seed}\0{candidate.record.id}".encode()).hexdigest()
        return -len(candidate.labels), tie

    counts: dict[str, int] = {}
    chosen: list[Candidate] = []
    for candidate in sorted(candidates, key=rank):
        if all(counts.get(label, 0) < per_class for label in candidate.labels):
            chosen.append(candidate)
            for label in candidate.labels:
                counts[label] = counts.get(label, 0) + 1
    return sorted(chosen, key=lambda candidate: candidate.record.id)


def read_exclusions(paths: Sequence[Path]) -> frozenset[str]:
    """Record ids to leave out: from a CSV with an id column (the pilot's `ID`, a harvest's
    `europeana_id`), or a text file with one id per line."""
    ids: set[str] = set()
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidValue("exclude_files", f"cannot read {path} ({error})") from None
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            header = {name.strip().lower(): name for name in (rows[0] if rows else {})}
            column = next((header[name] for name in EXCLUDE_FIELDS if name in header), None)
            if column is None:
                raise InvalidValue(
                    "exclude_files",
                    f"{path} has no record id column (one of {', '.join(EXCLUDE_FIELDS)})",
                )
            # A harvest's labels.csv also names the records whose image a row stands for.
            extra = header.get("duplicates")
            values = [row[column] for row in rows]
            values += (
                [value for row in rows for value in (row[extra] or "").split()] if extra else []
            )
        else:
            values = text.splitlines()
        for line, value in enumerate(values, start=2 if path.suffix.lower() == ".csv" else 1):
            if not (value or "").strip():
                continue
            try:
                ids.add(normalise_id(value))
            except ValueError as error:
                raise InvalidValue("exclude_files", f"{path}:{line}: {error}") from None
    return frozenset(ids)
