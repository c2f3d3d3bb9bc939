"""Reads for the run report and for explanations: a run's stored results, and a record's image.

The report reads several things about one run (labels per class, each
class's score histogram, the most and least confident labels per class, an
example of each error reason); `reading_run` reads them all in one
transaction, so the page describes one state of the run even while it goes
on. Everything handed out is a plain dataclass or number, never a query.

A run may cover the whole collection (millions of results, tens of millions of
scores), so nothing here reads every result into Python on PostgreSQL: the
histograms are counted by the database in one pass (`score_histograms`), and
only SQLite, the small embedded case, pages the score vectors through numpy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.types import REAL

from enrichment.errors import EnrichError
from enrichment.store.columns import exact_scores
from enrichment.store.current import CLASSIFIED
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses, model_classes
from enrichment.store.query import check_run_id
from enrichment.store.schema import (
    Label,
    ModelRow,
    Outcome,
    RecordRow,
    Result,
    Run,
    record_item_uri,
    shown_image_url,
)

# Score vectors a page when SQLite's are read into numpy.
SCORE_PAGE = 2000


@dataclass(frozen=True)
class RunTimes:
    """When a run was created, started and finished (naive UTC; None: not yet)."""

    id: int
    model_version: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class LabelledRecord:
    """A record with one of its labels' confidence: a thumbnail in the report's gallery."""

    record_id: str
    item_uri: str
    provider: str | None
    image_url: str | None  # the one the run classified, else the record's
    confidence: float


@dataclass(frozen=True)
class ScoreHistograms:
    """Each class's scores counted over bins, as `numpy.histogram(scores, edges)` counts
    them: bin i holds edges[i] <= score < edges[i + 1], the last bin its upper edge too,
    and a score outside the edges (or NaN) is in none."""

    counts: np.ndarray  # classes x bins, int64
    scored: int  # the classified results whose scores were counted


@dataclass(frozen=True)
class ErrorExample:
    """The first record (by id) of a run that failed for a given reason, and its message."""

    record_id: str
    message: str | None


class RunReading:
    """One run's stored results, read within one transaction (see `reading_run`).

    A run's results are not all its own for ever: a later run over the same records with
    the same model version takes their rows over, a run moved to another version
    (`enrich resume --model-dir`) keeps its earlier results under the version that made
    them, and retiring a version removes its results. `errors_held` (by index) and the
    histograms' count of scored results say how many of its results the run still holds;
    `results_held`, `other_versions` and `runs_since` say where the rest went, and are
    asked only when some are missing.
    """

    def __init__(
        self,
        session: Session,
        run: RunTimes,
        classes: ModelClasses,
        retired_at: datetime | None,
    ) -> None:
        self._session = session
        self.run = run
        self.classes = classes
        self.retired_at = retired_at  # when the run's model version was retired, if it was

    def _labels(self) -> sa.Select:
        """The labels the run's results carry, from its own model version."""
        return (
            sa.select(Label)
            .join(
                Result,
                sa.and_(
                    Result.record_id == Label.record_id,
                    Result.model_version == Label.model_version,
                ),
            )
            .where(Result.run_id == self.run.id, Label.model_version == self.run.model_version)
        )

    def label_counts(self) -> dict[str, int]:
        """How many of the run's records got each class, by class key (absent: none)."""
        query = (
            self._labels()
            .with_only_columns(Label.label_key, sa.func.count())
            .group_by(Label.label_key)
        )
        return {key: count for key, count in self._session.execute(query)}

    def score_pages(self, page_size: int) -> Iterator[list[list[float]]]:
        """The score vectors of the run's classified records, `page_size` at a time.

        Streamed: a run may hold millions, and only a page is in memory at once.
        """
        query = sa.select(Result.scores).where(
            Result.run_id == self.run.id,
            Result.model_version == self.run.model_version,
            Result.status.in_(CLASSIFIED),
        )
        pages = self._session.execute(query.execution_options(yield_per=page_size)).partitions()
        for page in pages:
            yield [row.scores for row in page]

    def score_histograms(self, edges: Sequence[float]) -> ScoreHistograms:
        """Each of the model's classes' scores over the run's classified results, binned.

        On PostgreSQL one grouped pass over the run's results, whatever their number
        (`_binned_in_sql`); elsewhere the score vectors are paged through numpy.
        """
        if self._session.get_bind().dialect.name == "postgresql":
            return self._binned_in_sql(edges)
        counts = np.zeros((len(self.classes.keys), len(edges) - 1), dtype=np.int64)
        scored = 0
        for page in self.score_pages(SCORE_PAGE):
            scores = np.asarray(page, dtype=np.float64)
            scored += len(scores)
            for index in range(len(counts)):
                counts[index] += np.histogram(scores[:, index], edges)[0]
        return ScoreHistograms(counts, scored)

    def _binned_in_sql(self, edges: Sequence[float]) -> ScoreHistograms:
        """PostgreSQL: count (class, bin) pairs over the unnested score vectors.

        The stored scores are float32s that Python reads as `exact_scores` gives them;
        comparing each stored float32 with `float32_bounds(edges)` puts it in the bin
        its read value falls in, with no per-score arithmetic in SQL.
        """
        element = (
            sa.func.unnest(sa.type_coerce(Result.scores, postgresql.ARRAY(REAL())))
            .table_valued("score", with_ordinality="position")
            .render_derived()
            .lateral()
        )
        bounds = sa.literal(float32_bounds(edges), postgresql.ARRAY(REAL()))
        bin_ = sa.func.width_bucket(element.c.score, bounds, type_=sa.Integer)
        query = (
            sa.select(element.c.position, bin_, sa.func.count())
            .select_from(Result)
            .join(element, sa.true())
            .where(
                Result.run_id == self.run.id,
                Result.model_version == self.run.model_version,
                Result.status.in_(CLASSIFIED),
            )
            .group_by(element.c.position, bin_)
        )
        bins = len(edges) - 1
        counts = np.zeros((len(self.classes.keys), bins), dtype=np.int64)
        scored = 0
        for position, found, count in self._session.execute(query):
            # width_bucket gives 0 below the first bound and len(edges) at or above the
            # last (NaN included): in no bin, but the result was scored all the same.
            if position == 1:
                scored += count
            if position <= len(counts) and 1 <= found <= bins:
                counts[position - 1, found - 1] += count
        return ScoreHistograms(counts, scored)

    def most_confident(self, key: str, limit: int) -> list[LabelledRecord]:
        """The run's `limit` most confident labels of class `key`; ties by record id."""
        return self._gallery(key, (Label.confidence.desc(), Label.record_id), limit, ())

    def least_confident(
        self, key: str, limit: int, skip: Sequence[str] = ()
    ) -> list[LabelledRecord]:
        """The same ranking read from its other end, ties included, leaving out `skip`."""
        return self._gallery(key, (Label.confidence.asc(), Label.record_id.desc()), limit, skip)

    def _gallery(
        self, key: str, order: Sequence[sa.ColumnElement], limit: int, skip: Sequence[str]
    ) -> list[LabelledRecord]:
        query = (
            self._labels()
            .join(RecordRow, RecordRow.id == Label.record_id)
            .with_only_columns(
                Label.record_id,
                record_item_uri(RecordRow.item_uri, RecordRow.id).label("item_uri"),
                RecordRow.provider,
                shown_image_url(Result.image_url, RecordRow.image_url),
                Label.confidence,
            )
            .where(Label.label_key == key)
            .order_by(*order)
            .limit(limit)
        )
        if skip:
            query = query.where(Label.record_id.not_in(skip))
        return [LabelledRecord(*row) for row in self._session.execute(query)]

    def results_held(self) -> int:
        """How many results, of any model version, still name this run (a pass over them:
        on PostgreSQL over `ix_results_run_id`, or over the table for a run that holds most
        of it)."""
        return self._session.execute(
            sa.select(sa.func.count()).select_from(Result).where(Result.run_id == self.run.id)
        ).scalar_one()

    def errors_held(self) -> int:
        """How many of the run's errors of its own version it still holds: the version's
        errors (few, on `ix_results_model_status`) checked for the run."""
        return self._session.execute(
            sa.select(sa.func.count())
            .select_from(Result)
            .where(
                Result.model_version == self.run.model_version,
                Result.status == Outcome.ERROR,
                Result.run_id == self.run.id,
            )
        ).scalar_one()

    def other_versions(self) -> dict[str, int]:
        """The results the run holds of versions other than its own (it was moved to its
        own after they were made), by version. Only asked when `results_held` says there
        are some: it reads the run's results."""
        query = (
            sa.select(Result.model_version, sa.func.count())
            .where(Result.run_id == self.run.id, Result.model_version != self.run.model_version)
            .group_by(Result.model_version)
            .order_by(Result.model_version)
        )
        return {version: count for version, count in self._session.execute(query)}

    def runs_since(self, versions: Sequence[str]) -> list[int]:
        """The other runs of `versions` that were still going when this one started and hold
        results now: the only runs whose results can have taken this run's over (a run that
        failed before writing any, a bad query say, replaced nothing)."""
        start = self.run.started_at or self.run.created_at
        return list(
            self._session.scalars(
                sa.select(Run.id)
                .where(
                    Run.id != self.run.id,
                    Run.model_version.in_(versions),
                    sa.or_(Run.finished_at.is_(None), Run.finished_at >= start),
                    sa.exists().where(Result.run_id == Run.id),
                )
                .order_by(Run.id)
            )
        )

    def error_example(self, reason: str) -> ErrorExample | None:
        """The first record with this error reason, if the run still holds one (a rerun may
        have replaced it)."""
        example = self._session.execute(
            sa.select(Result.record_id, Result.error_message)
            .where(Result.run_id == self.run.id, Result.error_reason == reason)
            .order_by(Result.record_id)
            .limit(1)
        ).first()
        return None if example is None else ErrorExample(example.record_id, example.error_message)


def float32_bounds(edges: Sequence[float]) -> list[float]:
    """The stored (float32) scores at which a score enters each bin of `edges`.

    A stored score f reads as `exact_scores([f])`, which grows with f, so for each edge
    but the last there is a least float32 whose read value is at or above it, and the
    last bin (which holds its upper edge) ends before the least float32 whose read value
    is above the last edge. A float32 f is then in bin i exactly when
    bounds[i] <= f < bounds[i + 1], as its read value is in numpy's bin i.
    """
    return [
        _least_float32(edge, strictly_above=index == len(edges) - 1)
        for index, edge in enumerate(edges)
    ]


def _least_float32(edge: float, strictly_above: bool) -> float:
    """The least float32 whose read value is at (or, `strictly_above`, past) `edge`:
    a few steps from the float32 nearest the edge, since a read value is within half a
    unit of the sixth decimal of its float32."""

    def reaches(candidate: np.float32) -> bool:
        read = exact_scores([float(candidate)])[0]
        return read > edge if strictly_above else read >= edge

    up, down = np.float32(np.inf), np.float32(-np.inf)
    found = np.float32(edge)
    while not reaches(found):
        found = np.nextafter(found, up)
    while reaches(lower := np.nextafter(found, down)):
        found = lower
    return float(found)


@contextmanager
def reading_run(db: Database, run_id: int) -> Iterator[RunReading]:
    """Read one run and its model's classes, and whatever the caller asks next, in one
    transaction."""
    with db.transaction() as session:
        run = session.get(Run, check_run_id(run_id))
        if run is None:
            raise EnrichError(f"run {run_id} is gone")
        classes = model_classes(session).get(run.model_version)
        if classes is None:
            raise EnrichError(f"run {run_id}'s model {run.model_version} is gone")
        times = RunTimes(run.id, run.model_version, run.created_at, run.started_at, run.finished_at)
        retired_at = session.scalar(
            sa.select(ModelRow.retired_at).where(ModelRow.version == run.model_version)
        )
        yield RunReading(session, times, classes, retired_at)


@dataclass(frozen=True)
class RecordImage:
    """A stored record's image URL (None: the record has none)."""

    record_id: str
    image_url: str | None


def record_image(db: Database, record_id: str) -> RecordImage | None:
    """The stored record's image URL; None when no record has this (normalised) id."""
    with db.transaction() as session:
        found = session.execute(
            sa.select(RecordRow.image_url).where(RecordRow.id == record_id)
        ).first()
    return None if found is None else RecordImage(record_id, found.image_url)
