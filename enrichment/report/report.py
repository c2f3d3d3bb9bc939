"""A run report for the people who decide whether machine labels enter a catalogue.

One static HTML page per run, built only from stored results (the model is
never run again): the run's summary, labels per class, each class's score
distribution against its threshold, the error reasons, and a gallery per class
of the most and the least confident labels, the latter being the cases to check.

The page holds everything inline (charts and thumbnails as `data:` URIs, CSS
in a `<style>`), so it opens offline and can be mailed around; its
Content-Security-Policy forbids loading anything else. The page is the
package's Jinja2 template `templates/report.html.j2` with autoescape on, so
every text that comes from the database is escaped without a call to forget:
record ids, providers, URLs, labels and error messages are third-party input.
Thumbnails are fetched with the project's `Fetcher` (address policy,
caps, deadline); one that cannot be had becomes a placeholder with its reason.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import numpy as np

from enrichment import PROJECT_NAME, __version__
from enrichment.config import Settings
from enrichment.files import make_directory, write_atomically
from enrichment.media.decode import ImageError, load_rgb
from enrichment.media.fetch import Fetcher
from enrichment.report import plots
from enrichment.store.database import Database
from enrichment.store.query import RunSummary, run_summary
from enrichment.store.reporting import LabelledRecord, RunReading, reading_run
from enrichment.store.schema import Outcome, utc_now
from enrichment.thresholds import confidence_text, threshold_text

BIN_EDGES = np.linspace(0.0, 1.0, 21)
THUMBNAIL_SIDE = 160
OUTCOME_ORDER = (Outcome.LABELLED, Outcome.BELOW_THRESHOLD, Outcome.ERROR)


@dataclass(frozen=True)
class ClassReport:
    """One class of the run's model: its threshold, how many records it labelled, its
    score histogram, and its gallery (the most and the least confident labels)."""

    key: str
    name: str  # the class's human name
    threshold: float
    labelled: int
    scored: int
    histogram: np.ndarray  # counts over BIN_EDGES
    highest: list[LabelledRecord]
    lowest: list[LabelledRecord]


@dataclass(frozen=True)
class ErrorReason:
    reason: str
    count: int
    example_record: str | None
    example_message: str | None


@dataclass(frozen=True)
class Holdings:
    """How many of the run's results the class figures count, and what became of the rest.

    The summary's outcomes are what the run did (its counts when it completed); the class
    figures are the results it still holds of its model version. They differ when other
    runs have since replaced some of its results, when it was moved to its version after
    making results with another, and when its version was retired (its results removed).
    """

    done: int  # the run's results when it completed (or, while it runs, now)
    held: int  # those it still holds of its own model version: what the class figures count
    replaced: int  # taken over by other runs' results for the same records
    replacing_runs: list[int]  # the runs that can have taken them over
    other_versions: dict[str, int]  # held, of the versions it was moved from
    retired_at: datetime | None  # when its model version was retired

    @property
    def partial(self) -> bool:
        """Whether the class figures count fewer results than the run made."""
        return self.held < self.done or self.retired_at is not None


@dataclass(frozen=True)
class RunReport:
    summary: RunSummary
    started_at: datetime
    seconds: float  # until it finished, or until now while it runs
    holdings: Holdings
    classes: list[ClassReport]
    errors: list[ErrorReason]


@dataclass(frozen=True)
class Thumbnail:
    """A small JPEG as a data: URI, or the reason there is none."""

    data_uri: str | None = None
    reason: str | None = None
    message: str | None = None


def gather(db: Database, run_id: int | None, per_class: int) -> RunReport:
    """Everything the page shows, read from the run's stored results."""
    summary = run_summary(db, run_id)
    with reading_run(db, summary.id) as reading:
        run, model = reading.run, reading.classes
        started = run.started_at or run.created_at
        seconds = max(0.0, ((run.finished_at or utc_now()) - started).total_seconds())
        counts = reading.label_counts()
        histograms = reading.score_histograms(BIN_EDGES.tolist())
        classes = []
        for index, (key, name, threshold) in enumerate(
            zip(model.keys, model.names, model.thresholds, strict=True)
        ):
            highest = reading.most_confident(key, per_class)
            lowest = reading.least_confident(key, per_class, [shown.record_id for shown in highest])
            classes.append(
                ClassReport(
                    key=key,
                    name=name,
                    threshold=threshold,
                    labelled=counts.get(key, 0),
                    scored=histograms.scored,
                    histogram=histograms.counts[index],
                    highest=highest,
                    lowest=lowest,
                )
            )
        errors = [
            _error_reason(reading, reason, count)
            for reason, count in summary.errors_by_reason.items()
        ]
        holdings = _holdings(reading, summary.records_done, histograms.scored)
    return RunReport(summary, started, seconds, holdings, classes, errors)


def _holdings(reading: RunReading, done: int, scored: int) -> Holdings:
    """Where the run's `done` results are now. `scored` is how many classified results of
    its version it holds (the histograms counted them), so only its errors are counted
    again, on the version's errors; the run's results are read again only when some of
    them are missing, which is rare (a run whose results are all its own costs no pass)."""
    held = scored + reading.errors_held()
    if held >= done:
        return Holdings(done, held, 0, [], {}, reading.retired_at)
    everything = reading.results_held()
    # A retired version's results were removed, not replaced: the retirement says so.
    replaced = 0 if reading.retired_at else max(0, done - everything)
    other_versions = reading.other_versions() if everything > held else {}
    replacing_runs = (
        reading.runs_since([reading.run.model_version, *other_versions]) if replaced else []
    )
    return Holdings(done, held, replaced, replacing_runs, other_versions, reading.retired_at)


def _error_reason(reading: RunReading, reason: str, count: int) -> ErrorReason:
    """The reason's count, with the first record that has it (if a rerun left one)."""
    example = reading.error_example(reason)
    if example is None:
        return ErrorReason(reason, count, None, None)
    return ErrorReason(reason, count, example.record_id, example.message)


def thumbnail(fetcher: Fetcher, url: str | None) -> Thumbnail:
    """Fetch and shrink one image; never raises, so one bad image cannot break the page."""
    if not url:
        return Thumbnail(reason="no_image", message="the record has no image URL")
    fetched = fetcher.fetch(url)
    if fetched.content is None:
        return Thumbnail(reason=fetched.error_reason, message=fetched.error_message)
    try:
        image = load_rgb(fetched.content, THUMBNAIL_SIDE, fetcher.settings.max_image_pixels)
    except ImageError as error:
        return Thumbnail(reason=error.reason, message=error.message)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())


def thumbnails(report: RunReport, settings: Settings) -> dict[str | None, Thumbnail]:
    """A thumbnail for every image the gallery shows, fetched concurrently, once each."""
    urls = {shown.image_url for cls in report.classes for shown in (*cls.highest, *cls.lowest)}
    fetcher = Fetcher(settings)
    try:
        futures = {url: fetcher.submit(thumbnail, fetcher, url) for url in urls}
        return {url: future.result() for url, future in futures.items()}
    finally:
        fetcher.close()


def write_report(
    db: Database, run_id: int | None, out_dir: Path, settings: Settings, per_class: int
) -> Path:
    """Gather, fetch thumbnails, render, write `run-ID.html` into `out_dir`.

    The directory is made before the thumbnails are fetched, so a path that
    cannot be written fails at once rather than after every fetch.
    """
    report = gather(db, run_id, per_class)
    make_directory(out_dir)
    page = render(report, thumbnails(report, settings))
    path = out_dir / f"run-{report.summary.id}.html"
    write_atomically(path, page.encode("utf-8"))
    return path


def render(report: RunReport, shown: dict[str | None, Thumbnail]) -> str:
    """The whole page as one string; the charts are drawn here, the rest is the template's."""
    counts = report.summary.outcomes
    return TEMPLATES.get_template("report.html.j2").render(
        report=report,
        thumbnails=shown,
        no_image=Thumbnail(reason="no_image"),
        outcomes=[
            (name, counts.get(name, 0))
            for name in (*OUTCOME_ORDER, *sorted(set(counts) - set(OUTCOME_ORDER)))
        ],
        labels_chart=plots.labels_per_class(
            [cls.name for cls in report.classes], [cls.labelled for cls in report.classes]
        ),
        histograms=[
            plots.confidence_histogram(cls.histogram, BIN_EDGES, cls.threshold, cls.name)
            for cls in report.classes
        ],
        generated=utc_now(),
        project=PROJECT_NAME,
        version=__version__,
    )


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{seconds:.1f} s"


# Every expression in the templates is HTML-escaped (autoescape), and a name the
# template does not get is an error rather than an empty string (StrictUndefined).
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("enrichment.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
TEMPLATES.filters["duration"] = _duration
TEMPLATES.filters["threshold"] = threshold_text
TEMPLATES.filters["confidence"] = confidence_text
TEMPLATES.filters["json"] = lambda value: json.dumps(value, sort_keys=True)
