"""Scale: every page, per-record and per-dataset command as fast at 10x the rows (issue 24).

Builds two realistic PostgreSQL 15 databases with COPY, 100,000 and 1,000,000
records by default (20,000 and 200,000 with --quick; `--sizes 1000000,10000000`
or BENCH_SCALE_SIZES for the 10-million case), in the shapes `save_outcomes`
writes: two 20-class model versions over the pilot's vocabulary (the first over
every record, run 1; the second over about half, run 2, classified later, so
current for those records), about 200 datasets of uneven size, 60 % of results
labelled with sigmoid-like scores (most near 0, a few above each class's
threshold), 3 % errors, the runs' batches, a publication ledger and 5,000
reviews. Two datasets are the same size at both scales, so that a per-dataset
operation does the same work at both: the "probe" (1,000 records) and the
"large" one (20,000; 5,000 with --quick).

Then it times each operation of the issue's table at both sizes, in a worker
process that has already imported the CLI and the review app, through the
entry points people use: the `enrich` command run in-process (click's runner)
and the review app's routes (Flask's test client); interpreter start-up would
hide growth. Each operation runs under a timeout (120 s): past it the worker
is killed, its queries cancelled, and the line says ">120 s". Sizes alternate
operation by operation, so other work on the machine slows both alike; at each
size an operation whose first try took under 0.1 s is timed 15 times, under a
second 7 times, under ten seconds twice, and the fastest counts. The run report
is gathered and rendered as `enrich report` does, without fetching thumbnails (a
benchmark never reaches the internet). `enrich export` of everything runs in a
fresh worker each time, for its peak RSS. Last come a new model version rolling
out and then rolled back, as a few times a year at Europeana: one batch of its run
written at a time as the pipeline writes it (loaded, its digests looked up,
its outcomes saved and the batch marked done), and `enrich model retire` of
version B, timed once (a second try would find nothing left to remove).

Targets: per-page, per-record and per-dataset operations grow at most 1.5x for
10x the records; whole-collection ones (the report of the run over every
record, the export of everything, a recalibration, a retirement) at most 12x;
bytes per record (every table's pg_total_relation_size over the records) at
most 985, half of the 1,970 the issue measured, with the extrapolation to
Europeana's 60 million records.

    python benchmarks/bench_scale.py [--quick] [--sizes SMALL,LARGE]

Not a test: it measures time, which the tests never do. `run(quick)` returns
the figures for `benchmarks/run_all.py`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import common
import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from enrichment.runs.service import europeana_scope
from enrichment.sources.europeana import SearchQuery, whole_collection_query
from enrichment.sources.records_file import ITEM_URI_BASE
from enrichment.store import schema, writes
from enrichment.store.database import Database
from enrichment.store.schema import Base, Run, RunStatus
from enrichment.store.writes import register_model
from enrichment.thresholds import decide

SIZES = (100_000, 1_000_000)
QUICK_SIZES = (20_000, 200_000)
PROBE_RECORDS = 1_000
LARGE_RECORDS, QUICK_LARGE_RECORDS = 20_000, 5_000
DATASETS = 200
REVIEWS = 5_000
PROBE_REVIEWS = 250
TIMEOUT = 120.0  # seconds per operation
# A whole-collection operation (the report of the run over every record, an export of
# everything, a recalibration) reads every result: at 10 million records (`--sizes`) an
# export took 178 s and a recalibration 16 minutes here.
WHOLE_TIMEOUT = 1800.0
PER_ITEM_TARGET = 1.5  # growth for 10x the records
WHOLE_TARGET = 12.0
BYTES_BEFORE = 1_970  # bytes per record the issue measured
BYTES_TARGET = BYTES_BEFORE / 2
EUROPEANA_RECORDS = 60_000_000
CHUNK = 128 * 400  # records generated and copied at once (whole batches)
BATCH = 128
SEED = 24
PROBE_DATASET, LARGE_DATASET = "2048128", "9200579"
QUEUE_CLASS = "photograph"
DEEP_OFFSET = 5_000
WORKER = Path(__file__).resolve().parent / "scale_worker.py"
WORKER_NAME = "bench-scale-worker"  # its connections' application_name, to cancel them
API_URL = "https://api.europeana.eu/annotation"  # the settings' default: dry runs compare it

# The versions, their runs and when they classified; the second is current where it ran.
VERSIONS = ("pilot-resnet50@3f1c9a27be04", "pilot-resnet50@8d2e6b4f10a7")
# The version whose run `write_batch` writes a batch at a time (with version A's classes).
NEW_VERSION = "pilot-resnet50@5a7c3e9d21f0"
RUN_STARTS = (datetime(2026, 9, 1, 1, 0), datetime(2026, 11, 1, 1, 0))
RUN_HOURS = (160, 50)
REVIEWS_FROM = datetime(2026, 11, 4, 9, 0)
# Outcomes of a result: labelled, below threshold, error.
STATUS_SHARES = (0.60, 0.37, 0.03)
V2_SHARE = 0.5
LABELS_PER_LABELLED = (1, 2, 3)
LABELS_PER_LABELLED_SHARES = (0.65, 0.25, 0.10)
NEAR_THRESHOLD_SHARE = 0.04  # of the scores: up to the threshold, from a twentieth of it
# How often each class is a label, relative (photographs are most of Europeana's images).
CLASS_WEIGHTS = {
    "photograph": 30,
    "drawing": 12,
    "painting": 10,
    "building": 8,
    "postcard": 6,
    "map": 5,
    "textile": 4,
    "clothing": 4,
    "sculpture": 3,
    "ceramics": 3,
    "archaeological_site": 3,
    "furniture": 2,
    "jewellery": 2,
    "specimen": 2,
    "inscription": 2,
    "woodwork": 1,
    "costume_accessories": 1,
    "tapestry": 1,
    "toy": 1,
    "weaponry": 1,
}
ERRORS = (
    ("http_404", "the server answered 404 Not Found"),
    ("timeout", "no answer within 20 s"),
    ("decode_error", "cannot identify image file"),
    ("connection_error", "connection refused"),
    ("too_large", "the image is larger than 20 MB"),
)
LOCAL_IDS = (
    "BibliographicResource_{n:013d}",
    "S_OLM_photo_OLM_{year}_{n}",
    "resource_document_rce_beeldbank_{hex}",
    "item_{hex8}",
    "https___www_museum_example_{n}",
    "ark__12148_btv1b{n:08d}",
)
TITLE_WORDS = (
    "view of the church portrait woman man with a dog street market harbour castle ruins "
    "photograph postcard of the village bridge over river garden interior mill farm "
    "monastery claustro del monasterio en fragment vase bowl plate dress embroidered "
    "hat sword map of the city plan drawing study sketch landscape sea coast ship "
    "station railway school children wedding procession festival costume tapestry"
)
WORDS = tuple(TITLE_WORDS.split())
REVIEWERS = tuple(f"curator-{n}" for n in range(1, 7))


# ---------------------------------------------------------------- the data

# What a result stores of the image URL it was classified from, given its record's: the
# URL itself, or the store's own rule where it has one (NULL where it is the record's).
stored_url: Callable[[str | None, str | None], str | None] = getattr(
    writes, "stored_image_url", lambda outcome_url, record_url: outcome_url
)

# What a record stores of its item URI (every record's is the one its id gives): the URI
# itself, or the store's own rule where it has one (NULL).
stored_item_uri: Callable[[str, str], str | None] = getattr(
    schema, "stored_item_uri", lambda record_id, item_uri: item_uri
)

# What a label stores of its concept (every generated label's is its class's): the concept
# itself, or "" where the store keeps a class's concept once, in the model's classes
# (`writes.stored_concept`).
stored_class_concept: Callable[[str], str] = (
    (lambda concept: "") if hasattr(writes, "stored_concept") else (lambda concept: concept)
)


@dataclass(frozen=True)
class Dataset:
    id: str
    size: int
    shape: str  # the local id's pattern
    provider: str


@dataclass
class Built:
    """What the loader remembers about a database: ids the operations need, and counts."""

    records: int
    datasets: int
    largest_other: int
    rows: dict[str, int] = field(default_factory=dict)
    record_id: str = ""  # a probe record with results of both versions
    seconds: float = 0.0
    derived: list[str] = field(default_factory=list)
    left_out: set[str] = field(default_factory=set)  # generated columns the schema lacks


def layout(records: int, large: int, rng: np.random.Generator) -> list[Dataset]:
    """The probe and the large dataset (the same at every size) and the rest, uneven."""
    others = DATASETS - 2
    rest = records - PROBE_RECORDS - large
    if rest < others:
        raise ValueError(f"{records:,} records are too few for {DATASETS} datasets")
    weights = rng.lognormal(0.0, 1.2, others)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * rest)).astype(int)
    sizes[np.argmax(sizes)] += rest - sizes.sum()
    ids = rng.choice(np.arange(100, 9_300_000), size=others, replace=False)
    made = []
    for index, (dataset, size) in enumerate(
        [(PROBE_DATASET, PROBE_RECORDS), (LARGE_DATASET, large), *zip(ids, sizes, strict=True)]
    ):
        made.append(
            Dataset(
                str(dataset),
                int(size),
                LOCAL_IDS[index % len(LOCAL_IDS)],
                f"{WORDS[index % len(WORDS)].capitalize()} Collection {index}",
            )
        )
    return made


def local_id(dataset: Dataset, n: int) -> str:
    digest = f"{(n * 2654435761 + int(dataset.id)) % 16**12:012x}"
    return dataset.shape.format(n=n, year=1900 + n % 120, hex=digest + digest[:4], hex8=digest)


def thresholds(version: int, classes: int) -> np.ndarray:
    """Per-class thresholds as calibration leaves them: 0.3 to 0.7, each version its own."""
    return np.round(np.random.default_rng(SEED + version).uniform(0.3, 0.7, classes), 3)


def scores_for(
    rng: np.random.Generator, statuses: np.ndarray, limits: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid outputs (6 decimals, as the pipeline rounds them) and which are labels.

    Most scores sit near 0; a few under their threshold are close to it (what
    the review queue shows first); a labelled row has 1 to 3 classes at or
    above their thresholds (drawn by class frequency), the others below.
    """
    rows, classes = len(statuses), len(limits)
    scores = 1.0 / (1.0 + np.exp(-rng.normal(-5.5, 1.3, (rows, classes))))
    near = rng.random((rows, classes)) < NEAR_THRESHOLD_SHARE
    scores[near] = rng.uniform(0.05, 1.0, near.sum()) * limits[np.nonzero(near)[1]]
    scores = np.minimum(np.floor(scores * 1e6) / 1e6, np.floor(limits * 1e6 - 1) / 1e6)
    # Weighted sampling without replacement, all rows at once: the top keys of
    # log(weight) + Gumbel noise are a draw in proportion to the weights.
    keys = np.log(weights) - np.log(-np.log(rng.random((rows, classes))))
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    counts = rng.choice(LABELS_PER_LABELLED, size=rows, p=LABELS_PER_LABELLED_SHARES)
    labelled = (rank < counts[:, None]) & (statuses == 0)[:, None]
    above = limits + (1 - limits) * rng.beta(1.3, 2.2, (rows, classes))
    above = np.minimum(np.ceil(above * 1e6) / 1e6, 1.0)
    scores = np.where(labelled, above, scores)
    if not (decide(scores, limits) == labelled)[statuses != 2].all():
        raise RuntimeError("generated labels differ from what the threshold rule gives")
    return scores, labelled


def moments(start: datetime, seconds: np.ndarray) -> list[str]:
    """Timestamps as COPY reads them, `seconds` after `start`."""
    return (np.datetime64(start, "s") + seconds.astype("timedelta64[s]")).astype(str).tolist()


Columns = dict[str, list[Any]]


class Generator:
    """The rows of one database, chunk by chunk, as columns named as the schema names them."""

    def __init__(self, records: int, large: int, classes: list[dict[str, str]]) -> None:
        self.rng = np.random.default_rng(SEED)
        self.records = records
        self.datasets = layout(records, large, self.rng)
        self.classes = classes
        self.keys = [item["key"] for item in classes]
        self.concepts = [item["concept"] for item in classes]
        self.limits = [thresholds(version, len(classes)) for version in (0, 1)]
        weights = np.array([CLASS_WEIGHTS.get(key, 1) for key in self.keys], dtype=float)
        self.weights = weights / weights.sum()
        self.ledger = {d.id for d in self.datasets[::10]} | {PROBE_DATASET, LARGE_DATASET}
        self.titles = [
            " ".join(self.rng.choice(WORDS, size=int(length))).capitalize()
            for length in self.rng.integers(2, 8, 5_000)
        ]
        self.candidates: list[tuple[str, str, str, bool]] = []  # items curators reviewed
        self.probe_record = ""
        self.batches = [0, 0]
        self.counts: list[dict[str, dict[str, int]]] = [
            {"outcomes": {}, "errors_by_reason": {}} for _ in VERSIONS
        ]
        self.seen = 0
        self.seen_others = 0
        self.reviews_given = 0
        self.published = 0

    def chunks(self) -> Iterator[dict[str, Columns]]:
        pending: list[tuple[Dataset, int]] = []
        for dataset in self.datasets:
            start = int(self.rng.integers(1, 10_000_000))
            pending.extend((dataset, start + n) for n in range(dataset.size))
            while len(pending) >= CHUNK:
                yield self._chunk(pending[:CHUNK])
                del pending[:CHUNK]
        if pending:
            yield self._chunk(pending)

    def _chunk(self, part: list[tuple[Dataset, int]]) -> dict[str, Columns]:
        rng, n = self.rng, len(part)
        ids = [f"/{dataset.id}/{local_id(dataset, number)}" for dataset, number in part]
        # Europeana's thumbnail service names an image by the MD5 of its URL.
        digests = rng.bytes(16 * n).hex()
        previews = [
            f"https://api.europeana.eu/thumbnail/v3/400/{digests[32 * i : 32 * i + 32]}"
            for i in range(n)
        ]
        updated = moments(datetime(2015, 1, 1), rng.integers(0, 300_000_000, n))
        records: Columns = {
            "id": ids,
            "dataset": [dataset.id for dataset, _ in part],
            "item_uri": [stored_item_uri(record, ITEM_URI_BASE + record) for record in ids],
            "image_url": previews,
            "provider": [dataset.provider for dataset, _ in part],
            "title": [self.titles[i] for i in rng.integers(0, len(self.titles), n)],
            "timestamp_update": updated,
            "first_seen": [RUN_STARTS[0] - timedelta(days=400)] * n,
            "last_seen": [RUN_STARTS[0]] * n,
        }
        hashes = rng.bytes(32 * n).hex()
        tables: dict[str, Columns] = {"records": records}
        current: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        chosen_of: list[np.ndarray] = []
        for version in (0, 1):
            chosen = np.arange(n) if version == 0 else np.nonzero(rng.random(n) < V2_SHARE)[0]
            chosen_of.append(chosen)
            statuses = rng.choice(3, size=len(chosen), p=STATUS_SHARES)
            scores, labelled = scores_for(rng, statuses, self.limits[version], self.weights)
            self._add(
                tables,
                self._results(version, ids, previews, updated, hashes, chosen, statuses, scores),
            )
            self._add(tables, self._labels(version, part, ids, chosen, scores, labelled))
            self._add(tables, self._batches(version, [ids[i] for i in chosen]))
            for row in np.nonzero(statuses != 2)[0]:
                current[int(chosen[row])] = (version, scores[row], labelled[row])
        # Which result counts for its record (the second version's where it classified), as
        # the store flags it: set here, a rebuild of the review index writes no flag.
        tables["results"]["is_current"] = [
            current.get(int(i), (None,))[0] == version
            for version, chosen in enumerate(chosen_of)
            for i in chosen
        ]
        self._pick_candidates(part, ids, current)
        self.seen += n
        return tables

    @staticmethod
    def _add(tables: dict[str, Columns], more: dict[str, Columns]) -> None:
        for table, columns in more.items():
            if table not in tables:
                tables[table] = {name: list(values) for name, values in columns.items()}
                continue
            for name, values in columns.items():
                tables[table][name].extend(values)

    def _results(
        self,
        version: int,
        ids: list[str],
        previews: list[str],
        updated: list[str],
        hashes: str,
        chosen: np.ndarray,
        statuses: np.ndarray,
        scores: np.ndarray,
    ) -> dict[str, Columns]:
        """One version's result rows for the chosen records; errors carry no scores or hash."""
        names = np.array(("labelled", "below_threshold", "error"))[statuses].tolist()
        count = len(chosen)
        error = statuses == 2
        reasons = [
            ERRORS[int(i) % len(ERRORS)] if e else (None, None)
            for i, e in zip(chosen, error, strict=True)
        ]
        for name in names:
            outcomes = self.counts[version]["outcomes"]
            outcomes[name] = outcomes.get(name, 0) + 1
        for reason, _ in reasons:
            if reason is not None:
                errors = self.counts[version]["errors_by_reason"]
                errors[reason] = errors.get(reason, 0) + 1
        vectors = scores.tolist()
        offsets = (RUN_HOURS[version] * 3600 * (self.seen + chosen) // self.records).astype(
            np.int64
        )
        return {
            "results": {
                "record_id": [ids[i] for i in chosen],
                "model_version": [VERSIONS[version]] * count,
                "run_id": [version + 1] * count,
                "status": names,
                "error_reason": [reason for reason, _ in reasons],
                "error_message": [message for _, message in reasons],
                "scores": [None if e else v for v, e in zip(vectors, error, strict=True)],
                "image_url": [stored_url(previews[i], previews[i]) for i in chosen],
                "image_sha256": [
                    None if e else hashes[64 * i : 64 * i + 64]
                    for i, e in zip(chosen, error, strict=True)
                ],
                "source_timestamp": [updated[i] for i in chosen],
                "classified_at": moments(RUN_STARTS[version], offsets),
            }
        }

    def _labels(
        self,
        version: int,
        part: list[tuple[Dataset, int]],
        ids: list[str],
        chosen: np.ndarray,
        scores: np.ndarray,
        labelled: np.ndarray,
    ) -> dict[str, Columns]:
        """The labels of one version's results, and the ledger's rows for the first's."""
        rows, classes = np.nonzero(labelled)
        records = [ids[chosen[row]] for row in rows]
        labels = {
            "record_id": records,
            "model_version": [VERSIONS[version]] * len(rows),
            "label_key": [self.keys[c] for c in classes],
            "concept": [stored_class_concept(self.concepts[c]) for c in classes],
            "confidence": scores[rows, classes].tolist(),
        }
        if version != 0:
            return {"labels": labels}
        published = [i for i, row in enumerate(rows) if part[chosen[row]][0].id in self.ledger]
        return {
            "labels": labels,
            "publications": self._publications(
                [records[i] for i in published], [int(classes[i]) for i in published]
            ),
        }

    def _publications(self, records: list[str], classes: list[int]) -> Columns:
        """Ledger rows: mostly published, a few withdrawn or refused by the server."""
        count = len(records)
        numbers = range(self.published, self.published + count)
        self.published += count
        states = [
            "published" if k % 50 else "withdrawn" if k % 100 else "rejected" for k in numbers
        ]
        stamps = moments(
            RUN_STARTS[0] + timedelta(hours=RUN_HOURS[0] + 24),
            np.arange(self.published - count, self.published) % 500 * 3600,
        )
        digests = self.rng.bytes(32 * count).hex()
        sent = [state != "rejected" for state in states]
        return {
            "api_url": [API_URL] * count,
            "record_id": records,
            "label_key": [self.keys[c] for c in classes],
            "concept": [self.concepts[c] for c in classes],
            "model_version": [VERSIONS[0]] * count,
            "content_sha256": [digests[64 * i : 64 * i + 64] for i in range(count)],
            "annotation_id": [
                f"http://data.europeana.eu/annotation/base/{k}" if ok else None
                for k, ok in zip(numbers, sent, strict=True)
            ],
            "owner": [
                "https://www.europeana.eu/user/enrichment-bot" if ok else None for ok in sent
            ],
            "adopted": [False] * count,
            "state": states,
            "published_at": [stamp if ok else None for stamp, ok in zip(stamps, sent, strict=True)],
            "updated_at": stamps,
            "withdrawn_at": [
                stamp if state == "withdrawn" else None
                for stamp, state in zip(stamps, states, strict=True)
            ],
            "last_error": [None if ok else "400 Bad Request: body not valid" for ok in sent],
        }

    def _batches(self, version: int, members: list[str]) -> dict[str, Columns]:
        """The run's batches of these records, done."""
        groups = [members[start : start + BATCH] for start in range(0, len(members), BATCH)]
        first = self.batches[version] + 1
        self.batches[version] += len(groups)
        finished = RUN_STARTS[version] + timedelta(hours=RUN_HOURS[version])
        return {
            "batches": {
                "run_id": [version + 1] * len(groups),
                "seq": list(range(first, first + len(groups))),
                "status": ["done"] * len(groups),
                "attempts": [1] * len(groups),
                "record_ids": groups,
                "error": [None] * len(groups),
                "updated_at": [finished] * len(groups),
                "heartbeat_at": [None] * len(groups),
            }
        }

    def _pick_candidates(
        self,
        part: list[tuple[Dataset, int]],
        ids: list[str],
        current: dict[int, tuple[int, np.ndarray, np.ndarray]],
    ) -> None:
        """Items curators reviewed, drawn in proportion (the probe dataset gets its own share)."""
        others_total = self.records - PROBE_RECORDS
        in_probe = [i for i, (dataset, _) in enumerate(part) if dataset.id == PROBE_DATASET]
        others = [i for i in range(len(part)) if part[i][0].id != PROBE_DATASET]
        self.seen_others += len(others)
        quota = round((REVIEWS - PROBE_REVIEWS) * self.seen_others / others_total)
        wanted = quota - self.reviews_given
        self.reviews_given = quota
        picks = list(self.rng.choice(others, size=min(wanted, len(others)), replace=False))
        if in_probe:
            picks += list(self.rng.choice(in_probe, size=PROBE_REVIEWS, replace=False))
            both = [i for i in in_probe if i in current and current[i][0] == 1]
            self.probe_record = ids[both[0]]
        for index in picks:
            if int(index) not in current:
                continue  # no classified result to review
            version, vector, labelled = current[int(index)]
            if labelled.any() and self.rng.random() < 0.75:
                key = int(self.rng.choice(np.nonzero(labelled)[0]))
            else:
                key = int(np.argmax(np.where(labelled, -1.0, vector)))
            self.candidates.append((ids[index], self.keys[key], VERSIONS[version], labelled[key]))

    def reviews(self) -> Columns:
        """The decisions on the candidates, a few taken back later; ids in time order."""
        rng = self.rng
        rows = []
        for number, index in enumerate(rng.permutation(len(self.candidates)), start=1):
            record, key, version, labelled = self.candidates[index]
            if labelled:
                decision = "accept" if rng.random() < 0.7 else "reject"
                audit = bool(rng.random() < 0.1)
            else:
                decision = "add" if rng.random() < 0.4 else "reject"
                audit = False
            rows.append(
                (number, record, key, version, decision, REVIEWERS[number % 6], audit, None)
            )
        for taken in rng.choice(len(rows), size=len(rows) // 100, replace=False):
            original = rows[taken]
            rows.append((len(rows) + 1, *original[1:4], "undo", original[5], False, original[0]))
        span = (datetime(2026, 12, 5, 18, 0) - REVIEWS_FROM) / max(1, len(rows))
        return {
            "id": [row[0] for row in rows],
            "record_id": [row[1] for row in rows],
            "label_key": [row[2] for row in rows],
            "model_version": [row[3] for row in rows],
            "decision": [row[4] for row in rows],
            "reviewer": [row[5] for row in rows],
            "audit": [row[6] for row in rows],
            "decided_at": [REVIEWS_FROM + span * row[0] for row in rows],
            "reverses": [row[7] for row in rows],
        }


# ---------------------------------------------------------------- COPY


def copy_formatter(column: sa.Column) -> Callable[[list[Any]], list[str]]:
    """How the values of `column` are written in COPY's text format, from the column's type.

    The one place that knows the types: a type the schema changes (scores as a
    real[] rather than JSON, the image hash as 32 bytes rather than 64 hex
    characters) is written from the same generated value (a list of floats; a
    hex string). A TypeDecorator's own conversion runs first. A timestamp may
    come as text already (ISO 8601).
    """
    dialect = postgresql.psycopg2.dialect()
    kind = column.type.dialect_impl(dialect)
    convert = None
    if isinstance(kind, sa.types.TypeDecorator):
        if type(kind).process_bind_param is not sa.types.TypeDecorator.process_bind_param:
            convert = kind.process_bind_param
        kind = kind.load_dialect_impl(dialect)
    write: Callable[[Any], str] = str
    escape = False  # text: escaped below, a whole column at once when it needs it
    if isinstance(kind, sa.JSON):
        write, escape = json.dumps, True
    elif isinstance(kind, sa.ARRAY):
        write = lambda value: "{" + ",".join(map(repr, value)) + "}"  # noqa: E731
    elif isinstance(kind, sa.LargeBinary):
        write = lambda value: "\\\\x" + (value if isinstance(value, str) else value.hex())  # noqa: E731
    elif isinstance(kind, sa.DateTime):
        write = lambda value: value if isinstance(value, str) else value.isoformat(sep=" ")  # noqa: E731
    elif isinstance(kind, sa.Boolean):
        write = lambda value: "t" if value else "f"  # noqa: E731
    elif isinstance(kind, sa.Float):
        write = repr
    elif not isinstance(kind, sa.Integer):
        escape = True

    def formatted(values: list[Any]) -> list[str]:
        if convert is not None:
            values = [convert(value, dialect) for value in values]
        texts = [None if value is None else write(value) for value in values]
        if escape and SPECIAL.search("".join(text for text in texts if text is not None)):
            texts = [None if text is None else text.translate(ESCAPES) for text in texts]
        return ["\\N" if text is None else text for text in texts]

    return formatted


SPECIAL = re.compile(r"[\\\t\n\r]")
ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_rows(cursor: Any, table: str, columns: Columns, built: Built) -> int:
    """COPY the columns into `table`, leaving out generated columns the table no longer has."""
    schema = Base.metadata.tables[table].c
    kept = [name for name in columns if name in schema]
    built.left_out.update(f"{table}.{name}" for name in columns if name not in schema)
    formatted = [copy_formatter(schema[name])(columns[name]) for name in kept]
    count = len(formatted[0]) if formatted else 0
    if count:
        text = "\n".join(map("\t".join, zip(*formatted, strict=True))) + "\n"
        cursor.copy_expert(f"COPY {table} ({', '.join(kept)}) FROM STDIN", io.StringIO(text))
    return count


def build(url: str, records: int, large: int) -> Built:
    """Migrate, register the two versions and their runs, COPY every table, rebuild what is
    derived, VACUUM ANALYZE."""
    started = time.perf_counter()
    db = Database(url)
    db.upgrade()
    classes = [
        {"key": item.key, "label": item.label, "concept": item.concept}
        for item in common.vocabulary_labels()
    ]
    generator = Generator(records, large, classes)
    others = [d.size for d in generator.datasets[2:]]
    built = Built(records, len(generator.datasets), max(others))
    register(db, generator, classes)
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for chunk in generator.chunks():
            for table, columns in chunk.items():
                built.rows[table] = built.rows.get(table, 0) + copy_rows(
                    cursor, table, columns, built
                )
            raw.commit()
            common.say(f"      {generator.seen:>10,} records copied")
        built.rows["reviews"] = copy_rows(cursor, "reviews", generator.reviews(), built)
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('reviews', 'id'), max(id)) FROM reviews"
        )
        raw.commit()
    finally:
        raw.close()
    complete_runs(db, generator)
    built.record_id = generator.probe_record
    built.derived = rebuild_derived(db)
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("VACUUM ANALYZE"))
    db.dispose()
    built.seconds = time.perf_counter() - started
    return built


def register(db: Database, generator: Generator, classes: list[dict[str, str]]) -> None:
    """The two model versions and their runs, which the result rows name (1 and 2)."""
    with db.transaction() as session:
        for version, limits in zip(VERSIONS, generator.limits, strict=True):
            register_model(session, version, "pilot-resnet50", "resnet50", classes, limits.tolist())
    scopes = (
        europeana_scope([whole_collection_query()]),
        europeana_scope([SearchQuery("*", ("TYPE:IMAGE", "YEAR:[1800 TO 1950]"))]),
    )
    with db.transaction() as session:
        for number, (version, scope) in enumerate(zip(VERSIONS, scopes, strict=True)):
            session.add(
                Run(
                    id=number + 1,
                    kind="nightly" if number == 0 else "on_demand",
                    scope=scope,
                    model_version=version,
                    status=RunStatus.RUNNING,
                    queue="enrich.nightly" if number == 0 else "enrich.on_demand",
                    created_at=RUN_STARTS[number] - timedelta(minutes=5),
                    started_at=RUN_STARTS[number],
                )
            )
    with db.engine.begin() as connection:
        connection.execute(sa.text("SELECT setval(pg_get_serial_sequence('runs', 'id'), 2)"))


def complete_runs(db: Database, generator: Generator) -> None:
    """Both runs completed, with their counts, as `complete_run` leaves them."""
    with db.transaction() as session:
        for number in range(len(VERSIONS)):
            run = session.get(Run, number + 1)
            assert run is not None
            done = sum(generator.counts[number]["outcomes"].values())
            run.status = RunStatus.COMPLETED
            run.records_seen = run.records_enqueued = done
            run.batches_total = generator.batches[number]
            run.finished_at = RUN_STARTS[number] + timedelta(hours=RUN_HOURS[number])
            run.final_counts = {
                **generator.counts[number],
                "batches": {"done": generator.batches[number]},
            }


def rebuild_derived(db: Database) -> list[str]:
    """Fill the tables another part derives from the rows (the review index, where the code
    has one), as its own rebuild does after a bulk load."""
    done = []
    for module in ("enrichment.store.review_index",):
        if importlib.util.find_spec(module) is not None:
            began = time.perf_counter()
            importlib.import_module(module).rebuild(db)
            done.append(f"{module}.rebuild {time.perf_counter() - began:.0f} s")
    return done


def table_bytes(url: str) -> dict[str, int]:
    """Every table's pg_total_relation_size (heap, TOAST, indexes), largest first."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 2 DESC"
                )
            ).all()
    finally:
        engine.dispose()
    return {name: int(size) for name, size in rows}


# ---------------------------------------------------------------- the operations


@dataclass(frozen=True)
class Operation:
    name: str
    title: str
    kind: str  # record, dataset, page: flat; whole: grows with the collection
    timeout: float = TIMEOUT
    once: bool = False  # tried once: a second try would find its work done

    @property
    def target(self) -> float:
        return WHOLE_TARGET if self.kind == "whole" else PER_ITEM_TARGET


OPERATIONS = (
    Operation("status", "enrich status", "record"),
    Operation("status_run_json", "enrich status --run 1 --json", "record"),
    Operation("results_record", "enrich results --record (a probe record)", "record"),
    # Each worker process's, every heartbeat interval (15 s), whatever the batches of old runs.
    Operation("sweep", "heartbeat sweep for stale batches (every worker, 15 s)", "page"),
    Operation("run_end_check", "after a batch, is its run complete? (one batch left)", "page"),
    Operation("results_probe", "enrich results --dataset PROBE", "dataset"),
    Operation("export_probe", "enrich export --dataset PROBE", "dataset"),
    Operation("publish_dry_probe", "enrich publish --dry-run --dataset PROBE", "dataset"),
    Operation("results_large_json", "enrich results --dataset LARGE --json", "dataset"),
    Operation("review_record", "review /api/record", "record"),
    Operation("queue_dataset", "review queue, one dataset (PROBE)", "page"),
    Operation("queue_class", f"review queue, one class ({QUEUE_CLASS})", "page"),
    Operation("queue_class_offset", f"  the same, offset={DEEP_OFFSET:,}", "page"),
    Operation("queue_class_after", "  the same, keyset page after that one", "page"),
    Operation("queue_default", "review queue, default (all classes)", "page"),
    Operation("audit_class", f"audit sample, one class ({QUEUE_CLASS})", "page"),
    # Beside every queue page: its pending count and the decisions of the day within it.
    Operation("progress_class", f"review /api/progress, one class ({QUEUE_CLASS})", "page"),
    Operation("progress_dataset", "review /api/progress, one dataset (PROBE)", "page"),
    Operation("stats_page", "review /stats", "page"),
    Operation("review_stats", "enrich review stats --json", "page"),
    Operation(
        "report_run",
        "enrich report 1 (run over every record; no thumbnails)",
        "whole",
        WHOLE_TIMEOUT,
    ),
    Operation(
        "export_all", "enrich export (everything), in a fresh worker", "whole", WHOLE_TIMEOUT
    ),
    # Last: they change the labels. Each try registers version A's thresholds 0.01 higher.
    Operation("relabel_chunk", "recalibration, one chunk (a batch write's longest wait)", "page"),
    Operation("recalibrate", "recalibration, every result of version A", "whole", WHOLE_TIMEOUT),
    # A new version rolling out, then rolled back: they add and remove a version's rows.
    Operation("write_batch", "a new version's run, one batch of 128 written", "page"),
    Operation(
        "retire",
        "enrich model retire (version B, over half the records)",
        "whole",
        WHOLE_TIMEOUT,
        once=True,
    ),
)


class Worker:
    """The parent's side of a worker process: send a step, wait at most the timeout."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PGAPPNAME": WORKER_NAME},
        )
        ready = self._answer(TIMEOUT)
        if not ready or not ready.get("ready"):
            self.close()
            raise RuntimeError(f"the benchmark's worker did not start: {ready}")
        self.start_rss_mb = ready["rss_mb"]

    def _answer(self, timeout: float) -> dict[str, Any] | None:
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else {"error": "the worker exited"}

    def ask(
        self, url: str, step: str, params: dict[str, Any], timeout: float
    ) -> dict[str, Any] | None:
        """The worker's answer, or None when it ran past `timeout` (the worker is then gone)."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"url": url, "step": step, "params": params}) + "\n")
        self.process.stdin.flush()
        answer = self._answer(timeout)
        if answer is None:
            self.process.kill()
            self.process.wait()
        return answer

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def cancel_queries(server_url: str) -> None:
    """End the killed worker's server sessions: a query runs on after its client dies."""
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = :name"
                ),
                {"name": WORKER_NAME},
            )
    finally:
        engine.dispose()


@dataclass
class Timing:
    """One operation at one size: the fastest of its tries, or why there is none."""

    seconds: list[float] = field(default_factory=list)
    timed_out: bool = False
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> float | None:
        return min(self.seconds) if self.seconds else None

    def as_json(self) -> dict[str, Any]:
        return {
            "best": None if self.best is None else round(self.best, 4),
            "tries": [round(value, 4) for value in self.seconds],
            "timed_out": self.timed_out,
            "error": self.error,
            "detail": self.detail,
        }


def tries_wanted(first: float) -> int:
    """Short operations are tried again (the fastest counts): noise is most of a few ms."""
    return 15 if first < 0.1 else 7 if first < 1 else 2 if first < 10 else 1


def time_operations(server_url: str, urls: dict[int, str], params: dict[int, dict[str, Any]]):
    """Every operation at both sizes, alternating sizes; export_all in fresh workers.

    The deep keyset page starts where the offset page ended, at each size."""
    timings = {op.name: {size: Timing() for size in urls} for op in OPERATIONS}
    worker = Worker()
    try:
        for op in OPERATIONS:
            tries = dict.fromkeys(urls, 1)  # each size's own, from its first time
            attempt = 0
            while any(attempt < count for count in tries.values()):
                for size, url in urls.items():
                    timing = timings[op.name][size]
                    if attempt >= tries[size] or timing.timed_out or timing.error:
                        continue
                    if op.name == "queue_class_after" and not params[size].get("after"):
                        timing.error = "no cursor: the offset page gave no next_after"
                        continue
                    fresh = op.name == "export_all"
                    if fresh or not worker.alive:
                        worker.close()
                        worker = Worker()
                    answer = worker.ask(url, op.name, params[size], op.timeout)
                    if answer is None:
                        timing.timed_out = True
                        cancel_queries(server_url)
                    elif "error" in answer:
                        timing.error = answer["error"]
                    else:
                        timing.seconds.append(answer["seconds"])
                        timing.detail = {**answer["detail"], "rss_mb": answer["rss_mb"]}
                        if fresh:
                            timing.detail["start_rss_mb"] = worker.start_rss_mb
                        if op.name == "queue_class_offset" and answer["detail"].get("after"):
                            params[size]["after"] = answer["detail"]["after"]
                        if attempt == 0 and not op.once:
                            tries[size] = tries_wanted(answer["seconds"])
                if attempt == 0 and op.kind == "whole":
                    # As many tries at both sizes (the larger's few): the growth of
                    # whole-collection work never sets the faster of two tries against one.
                    tries = dict.fromkeys(tries, min(tries.values()))
                attempt += 1
            common.say("    " + timing_line(op, timings[op.name], list(urls)))
    finally:
        worker.close()
    return timings


def shown(timing: Timing, timeout: float) -> str:
    if timing.timed_out:
        return f">{timeout:.0f} s"
    if timing.error is not None:
        return "failed"
    seconds = timing.best or 0.0
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def growth(
    timings: dict[int, Timing], sizes: Sequence[int], timeout: float
) -> tuple[float | None, str]:
    """Time at the large size over time at the small one; a lower bound when the large one
    timed out; None when it cannot be told."""
    small, large = timings[sizes[0]], timings[sizes[1]]
    if small.best is not None and large.best is not None:
        return large.best / small.best, ""
    if small.best is not None and large.timed_out:
        return timeout / small.best, "at least: the large size timed out"
    return None, "not measured at both sizes"


def timing_line(op: Operation, timings: dict[int, Timing], sizes: Sequence[int]) -> str:
    value, _ = growth(timings, sizes, op.timeout)
    ratio = "-" if value is None else f"{value:.2f}x"
    sign = ">=" if timings[sizes[1]].timed_out and value is not None else ""
    return (
        f"{op.title:<58} {shown(timings[sizes[0]], op.timeout):>9} "
        f"{shown(timings[sizes[1]], op.timeout):>9} "
        f"{sign}{ratio:>7} (target <= {op.target:g}x)"
    )


# ---------------------------------------------------------------- run, report, summary


def chosen_sizes(quick: bool, sizes: str | None = None) -> tuple[int, int]:
    text = sizes or os.environ.get("BENCH_SCALE_SIZES")
    if not text:
        return QUICK_SIZES if quick else SIZES
    small, large = (int(part.replace("_", "")) for part in text.split(","))
    if not 0 < small < large:
        raise ValueError(f"--sizes SMALL,LARGE with SMALL < LARGE, not {text}")
    return small, large


def run(quick: bool, sizes: str | None = None) -> dict[str, Any]:
    small, large = chosen_sizes(quick, sizes)
    large_dataset = QUICK_LARGE_RECORDS if quick else LARGE_RECORDS
    urls: dict[int, str] = {}
    params: dict[int, dict[str, Any]] = {}
    built: dict[int, Built] = {}
    bytes_of: dict[int, dict[str, int]] = {}
    with common.database_server() as server:
        if sa.engine.make_url(server).get_backend_name() != "postgresql":
            raise RuntimeError("bench_scale measures PostgreSQL: BENCH_DATABASE_URL must be one")
        with common.fresh_database(server) as small_url, common.fresh_database(server) as large_url:
            for size, url in ((small, small_url), (large, large_url)):
                common.say(f"    building {size:,} records (COPY, then VACUUM ANALYZE)")
                built[size] = build(url, size, large_dataset)
                bytes_of[size] = table_bytes(url)
                urls[size] = url
                params[size] = {
                    "run": 1,
                    "record_id": built[size].record_id,
                    "probe": PROBE_DATASET,
                    "large": LARGE_DATASET,
                    "class": QUEUE_CLASS,
                    "offset": DEEP_OFFSET,
                    "version": VERSIONS[0],
                    "new_version": NEW_VERSION,
                    "retired_version": VERSIONS[1],
                }
                common.say(f"    built {size:,} records in {built[size].seconds:.0f} s")
            loads = [os.getloadavg()]
            timings = time_operations(server, urls, params)
            loads.append(os.getloadavg())
    sizes = (small, large)
    export = timings["export_all"]
    return {
        "sizes": list(sizes),
        "probe_records": PROBE_RECORDS,
        "large_records": large_dataset,
        "timeout": TIMEOUT,
        "load_average": [[round(value, 1) for value in load] for load in loads],
        "built": {
            str(size): {
                "seconds": round(item.seconds, 1),
                "datasets": item.datasets,
                "largest_other_dataset": item.largest_other,
                "rows": item.rows,
                "derived": item.derived,
                "left_out": sorted(item.left_out),
            }
            for size, item in built.items()
        },
        "table_bytes": {str(size): value for size, value in bytes_of.items()},
        "bytes_per_record": {
            str(size): round(sum(value.values()) / size, 1) for size, value in bytes_of.items()
        },
        "operations": {
            op.name: {
                "title": op.title,
                "kind": op.kind,
                "target": op.target,
                "timeout": op.timeout,
                "growth": growth(timings[op.name], sizes, op.timeout)[0],
                "note": growth(timings[op.name], sizes, op.timeout)[1],
                **{str(size): timings[op.name][size].as_json() for size in sizes},
            }
            for op in OPERATIONS
        },
        "export_rate": {
            str(size): round(export[size].detail.get("annotations", 0) / export[size].best)
            for size in sizes
            if export[size].best
        },
    }


def report(figures: dict[str, Any]) -> list[str]:
    small, large = figures["sizes"]
    lines_out = [
        f"  {small:,} and {large:,} records on PostgreSQL; the probe dataset "
        f"{figures['probe_records']:,} records and the large one {figures['large_records']:,} "
        f"at both; timeout {figures['timeout']:.0f} s per operation "
        f"({WHOLE_TIMEOUT:.0f} s for the whole-collection ones)"
    ]
    start, end = (", ".join(map(str, load)) for load in figures["load_average"])
    lines_out.append(
        f"    load average (1/5/15 min) {start} when the timing began, {end} when it ended: "
        "other work on the machine lengthens the short operations most"
    )
    for size in (small, large):
        item = figures["built"][str(size)]
        extra = f"; derived: {', '.join(item['derived'])}" if item["derived"] else ""
        left = f"; columns the schema lacks, left out: {', '.join(item['left_out'])}"
        lines_out.append(
            f"    built {size:,} in {item['seconds']:.0f} s: {item['datasets']} datasets (largest "
            f"other {item['largest_other_dataset']:,}), "
            + ", ".join(f"{count:,} {table}" for table, count in item["rows"].items())
            + extra
            + (left if item["left_out"] else "")
        )
    lines_out.append(f"    {'operation':<58} {small:>9,} {large:>9,}  growth")
    for op in figures["operations"].values():
        best = [op[str(size)] for size in (small, large)]
        cells = [
            f">{op.get('timeout', figures['timeout']):.0f} s"
            if part["timed_out"]
            else "failed"
            if part["error"]
            else f"{part['best'] * 1000:.0f} ms"
            if part["best"] < 1
            else f"{part['best']:.1f} s"
            for part in best
        ]
        ratio = "-" if op["growth"] is None else f"{op['growth']:.2f}x"
        lines_out.append(
            f"    {op['title']:<58} {cells[0]:>9} {cells[1]:>9} {ratio:>7} "
            f"(target <= {op['target']:g}x)"
        )
        for size, part in zip((small, large), best, strict=True):
            if part["error"]:
                lines_out.append(f"      {size:,} failed: {part['error'].strip().splitlines()[-1]}")
    export = figures["operations"]["export_all"]
    for size in (small, large):
        part = export[str(size)]
        if part["best"]:
            lines_out.append(
                f"    export of everything at {size:,}: {part['detail'].get('annotations', 0):,} "
                f"annotations, {figures['export_rate'][str(size)]:,} labels/s, peak RSS "
                f"{part['detail']['rss_mb']:.0f} MB ({part['detail']['start_rss_mb']:.0f} MB "
                "before it)"
            )
    for size in (small, large):
        per = figures["bytes_per_record"][str(size)]
        tables = figures["table_bytes"][str(size)]
        parts = ", ".join(
            f"{name} {value / size:,.0f}" for name, value in tables.items() if value / size >= 1
        )
        lines_out.append(
            f"    bytes per record at {size:,}: {per:,.0f} ({parts}); "
            f"{sum(tables.values()) / 2**30:.2f} GiB"
        )
    per = figures["bytes_per_record"][str(large)]
    lines_out.append(
        f"    at Europeana's {EUROPEANA_RECORDS / 1e6:.0f} million records: "
        f"{per * EUROPEANA_RECORDS / 1e9:,.0f} GB (the issue measured {BYTES_BEFORE:,} bytes "
        f"per record, {BYTES_BEFORE * EUROPEANA_RECORDS / 1e9:,.0f} GB)"
    )
    return lines_out


def summary(figures: dict[str, Any]) -> list[common.Figure]:
    made = []
    for name, op in figures["operations"].items():
        value = op["growth"]
        note = op["note"] or f"{op['kind']} operation, 10x the records"
        made.append(
            common.Figure(
                f"scale_{name}",
                value if value is not None else float("nan"),
                f"<= {op['target']:g}",
                note=note,
                incomplete=value is None or bool(op["note"]),
            )
        )
    large = figures["sizes"][1]
    made.append(
        common.Figure(
            "scale_bytes_per_record",
            figures["bytes_per_record"][str(large)],
            f"<= {BYTES_TARGET:g}",
            unit="bytes",
            note=f"at {large:,} records; half of the {BYTES_BEFORE:,} the issue measured",
        )
    )
    for size, rate in figures["export_rate"].items():
        made.append(
            common.Figure(
                f"scale_export_rate_{int(size) // 1000}k",
                rate,
                unit="labels/s",
                note="enrich export of everything",
            )
        )
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 and 200,000 records")
    parser.add_argument(
        "--sizes", help="SMALL,LARGE records, e.g. 1000000,10000000 (or BENCH_SCALE_SIZES)"
    )
    arguments = parser.parse_args(argv)
    started = time.perf_counter()
    figures = run(arguments.quick, arguments.sizes)
    for line in report(figures):
        common.say(line)
    common.say(f"  ({time.perf_counter() - started:.0f} s)")
    lines_out = summary(figures)
    for line in lines_out:
        common.say(line.line())
    return 0 if all(line.met is not False for line in lines_out) else 1


if __name__ == "__main__":
    sys.exit(main())
