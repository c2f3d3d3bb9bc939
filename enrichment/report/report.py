"""A run report for the people who decide whether machine labels enter a catalogue.

One static HTML page per run, built only from stored results (the model is
never run again): the run's summary, labels per class, each class's score
distribution against its threshold, the error reasons, and a gallery per class
of the most and the least confident labels, the latter being the cases to check.

The page holds everything inline (charts and thumbnails as `data:` URIs, CSS
in a `<style>`), so it opens offline and can be mailed around; its
Content-Security-Policy forbids loading anything else. Every text that comes
from the database is escaped: record ids, providers and URLs are third-party
input. Thumbnails are fetched with the project's `Fetcher` (address policy,
caps, deadline); one that cannot be had becomes a placeholder with its reason.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment import PROJECT_NAME, __version__
from enrichment.config import Settings
from enrichment.errors import EnrichError
from enrichment.media.decode import ImageError, load_rgb
from enrichment.media.fetch import Fetcher
from enrichment.report import plots
from enrichment.store.database import Database
from enrichment.store.query import RunSummary, run_summary
from enrichment.store.schema import Label, ModelRow, Outcome, RecordRow, Result, Run, utc_now

BIN_EDGES = np.linspace(0.0, 1.0, 21)
THUMBNAIL_SIDE = 160
SCORE_PAGE = 2000
OUTCOME_ORDER = (Outcome.LABELLED, Outcome.BELOW_THRESHOLD, Outcome.ERROR)
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class Shown:
    """A labelled record in the gallery."""

    record_id: str
    item_uri: str
    provider: str | None
    image_url: str | None
    confidence: float


@dataclass(frozen=True)
class ClassReport:
    key: str
    label: str
    threshold: float
    labelled: int
    scored: int
    histogram: np.ndarray  # counts over BIN_EDGES
    highest: list[Shown]
    lowest: list[Shown]


@dataclass(frozen=True)
class ErrorReason:
    reason: str
    count: int
    example_record: str | None
    example_message: str | None


@dataclass(frozen=True)
class RunReport:
    summary: RunSummary
    started_at: datetime
    seconds: float  # until it finished, or until now while it runs
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
    with db.transaction() as session:
        run = session.get(Run, summary.id)
        model = session.get(ModelRow, summary.model_version)
        if run is None or model is None:
            raise EnrichError(f"run {summary.id} or its model {summary.model_version} is gone")
        started = run.started_at or run.created_at
        seconds = max(0.0, ((run.finished_at or utc_now()) - started).total_seconds())
        counts = _label_counts(session, run)
        histograms, scored = _histograms(session, run, len(model.labels))
        classes = []
        for index, (label, threshold) in enumerate(
            zip(model.labels, model.thresholds, strict=True)
        ):
            key = str(label["key"])
            ranking = (Label.confidence.desc(), Label.record_id)
            highest = _gallery(session, run, key, ranking, per_class, ())
            # The ranking read from its other end, ties included.
            reverse = (Label.confidence.asc(), Label.record_id.desc())
            lowest = _gallery(session, run, key, reverse, per_class, [s.record_id for s in highest])
            classes.append(
                ClassReport(
                    key=key,
                    label=str(label.get("label", key)),
                    threshold=float(threshold),
                    labelled=counts.get(key, 0),
                    scored=scored,
                    histogram=histograms[index],
                    highest=highest,
                    lowest=lowest,
                )
            )
        errors = [
            _error_reason(session, run, reason, count)
            for reason, count in summary.errors_by_reason.items()
        ]
    return RunReport(summary, started, seconds, classes, errors)


def _run_labels(run: Run) -> sa.Select:
    return (
        sa.select(Label)
        .join(
            Result,
            sa.and_(
                Result.record_id == Label.record_id, Result.model_version == Label.model_version
            ),
        )
        .where(Result.run_id == run.id, Label.model_version == run.model_version)
    )


def _label_counts(session: Session, run: Run) -> dict[str, int]:
    query = (
        _run_labels(run)
        .with_only_columns(Label.label_key, sa.func.count())
        .group_by(Label.label_key)
    )
    return {key: count for key, count in session.execute(query)}


def _histograms(session: Session, run: Run, classes: int) -> tuple[np.ndarray, int]:
    """Per-class score histograms, accumulated page by page: a run may hold millions."""
    histograms = np.zeros((classes, len(BIN_EDGES) - 1), dtype=np.int64)
    scored = 0
    query = sa.select(Result.scores).where(
        Result.run_id == run.id,
        Result.model_version == run.model_version,
        Result.status.in_((Outcome.LABELLED, Outcome.BELOW_THRESHOLD)),
    )
    for page in session.execute(query.execution_options(yield_per=SCORE_PAGE)).partitions():
        scores = np.asarray([row.scores for row in page], dtype=np.float64)
        scored += len(scores)
        for index in range(classes):
            histograms[index] += np.histogram(scores[:, index], BIN_EDGES)[0]
    return histograms, scored


def _gallery(
    session: Session,
    run: Run,
    key: str,
    order: Sequence[sa.ColumnElement],
    limit: int,
    skip: Sequence[str],
) -> list[Shown]:
    query = (
        _run_labels(run)
        .join(RecordRow, RecordRow.id == Label.record_id)
        .with_only_columns(
            Label.record_id,
            RecordRow.item_uri,
            RecordRow.provider,
            sa.func.coalesce(Result.image_url, RecordRow.image_url),
            Label.confidence,
        )
        .where(Label.label_key == key)
        .order_by(*order)
        .limit(limit)
    )
    if skip:
        query = query.where(Label.record_id.not_in(skip))
    return [Shown(*row) for row in session.execute(query)]


def _error_reason(session: Session, run: Run, reason: str, count: int) -> ErrorReason:
    """The reason's count, with the first record that has it (if a rerun left one)."""
    example = session.execute(
        sa.select(Result.record_id, Result.error_message)
        .where(Result.run_id == run.id, Result.error_reason == reason)
        .order_by(Result.record_id)
        .limit(1)
    ).first()
    if example is None:
        return ErrorReason(reason, count, None, None)
    return ErrorReason(reason, count, example.record_id, example.error_message)


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
    """Gather, fetch thumbnails, render; written under a temporary name, then renamed."""
    report = gather(db, run_id, per_class)
    page = render(report, thumbnails(report, settings))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"run-{report.summary.id}.html"
    temporary = out_dir / f".{path.name}.tmp"
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, path)
    return path


def render(report: RunReport, shown: dict[str | None, Thumbnail]) -> str:
    """The whole page as one string."""
    summary = report.summary
    sections = "\n".join(
        [
            _summary_section(report),
            _labels_section(report),
            _confidence_section(report),
            _errors_section(report),
            _gallery_section(report, shown),
        ]
    )
    title = f"Run {summary.id} report: {summary.model_version}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>{escape(title)}</h1>
<p>Generated {utc_now():%Y-%m-%d %H:%M} UTC by {PROJECT_NAME} {__version__}.</p></header>
<main>
{sections}
</main>
</body>
</html>
"""


def _summary_section(report: RunReport) -> str:
    summary = report.summary
    facts = [
        ("Status", summary.status),
        ("Kind", summary.kind),
        ("Scope", json.dumps(summary.scope, sort_keys=True)),
        ("Model version", summary.model_version),
        ("Records seen", str(summary.records_seen)),
        ("Records enqueued", str(summary.records_enqueued)),
        ("Records done", str(summary.records_done)),
        ("Started", f"{report.started_at:%Y-%m-%d %H:%M:%S} UTC"),
        (
            "Finished",
            f"{summary.finished_at:%Y-%m-%d %H:%M:%S} UTC" if summary.finished_at else "not yet",
        ),
        ("Duration", _duration(report.seconds)),
        ("Throughput", f"{summary.rate:.2f} records/s" if summary.rate is not None else "n/a"),
    ]
    if summary.eta_seconds is not None:
        facts.append(("Estimated time left", _duration(summary.eta_seconds)))
    if summary.error:
        facts.append(("Run error", summary.error))
    outcomes = [*OUTCOME_ORDER, *sorted(set(summary.outcomes) - set(OUTCOME_ORDER))]
    return f"""<section id="summary"><h2>Summary</h2>
<table class="facts">{_rows(facts)}</table>
<h3>Outcomes</h3>
<table class="counts" id="outcomes"><thead><tr><th>Outcome</th><th>Records</th></tr></thead>
<tbody>{_rows((name, str(summary.outcomes.get(name, 0))) for name in outcomes)}</tbody>
<tfoot>{_rows([("total", str(summary.records_done))])}</tfoot></table>
</section>"""


def _labels_section(report: RunReport) -> str:
    chart = plots.labels_per_class(
        [cls.label for cls in report.classes], [cls.labelled for cls in report.classes]
    )
    rows = "".join(
        f'<tr data-class="{escape(cls.key)}"><td>{escape(cls.label)}</td>'
        f"<td><code>{escape(cls.key)}</code></td><td>{cls.threshold:.2f}</td>"
        f"<td>{cls.labelled}</td><td>{cls.scored}</td>"
        f"<td>{_share(cls.labelled, cls.scored)}</td></tr>"
        for cls in report.classes
    )
    return f"""<section id="labels"><h2>Labels per class</h2>
<img class="chart" src="{chart}" alt="Bar chart of labels per class">
<table class="counts"><thead><tr><th>Class</th><th>Key</th><th>Threshold</th><th>Labels</th>
<th>Records scored</th><th>Share</th></tr></thead><tbody>{rows}</tbody></table>
</section>"""


def _confidence_section(report: RunReport) -> str:
    figures = "".join(
        f'<figure data-class="{escape(cls.key)}"><img src="{_histogram(cls)}"'
        f' alt="Confidence histogram for {escape(cls.label)}">'
        f"<figcaption>{escape(cls.label)}: {cls.labelled} of {cls.scored} labelled, "
        f"threshold {cls.threshold:.2f}</figcaption></figure>"
        for cls in report.classes
    )
    return f"""<section id="confidence"><h2>Confidence per class</h2>
<p>Scores of every record the run classified; the dashed line is the class threshold.</p>
<div class="grid">{figures}</div>
</section>"""


def _histogram(cls: ClassReport) -> str:
    return plots.confidence_histogram(cls.histogram, BIN_EDGES, cls.threshold, cls.label)


def _errors_section(report: RunReport) -> str:
    if not report.errors:
        return '<section id="errors"><h2>Errors</h2><p>No record failed.</p></section>'
    rows = "".join(
        f"<tr><td><code>{escape(error.reason)}</code></td><td>{error.count}</td>"
        f"<td><code>{escape(error.example_record or '')}</code></td>"
        f"<td>{escape(error.example_message or '')}</td></tr>"
        for error in report.errors
    )
    return f"""<section id="errors"><h2>Errors</h2>
<table class="counts"><thead><tr><th>Reason</th><th>Records</th><th>Example record</th>
<th>Example message</th></tr></thead><tbody>{rows}</tbody></table>
</section>"""


def _gallery_section(report: RunReport, shown: dict[str | None, Thumbnail]) -> str:
    blocks = []
    for cls in report.classes:
        if not cls.highest:
            body = "<p>No record got this label.</p>"
        else:
            body = (
                "<h4>Most confident</h4>"
                + _thumbs(cls.highest, shown, "highest")
                + "<h4>Least confident above the threshold: check these</h4>"
                + (
                    _thumbs(cls.lowest, shown, "lowest")
                    if cls.lowest
                    else "<p>All of them are shown above.</p>"
                )
            )
        blocks.append(
            f'<section class="class" data-class="{escape(cls.key)}">'
            f"<h3>{escape(cls.label)} <small>threshold {cls.threshold:.2f}, "
            f"{cls.labelled} labelled</small></h3>{body}</section>"
        )
    return f"""<section id="gallery"><h2>Gallery</h2>
{"".join(blocks)}
</section>"""


def _thumbs(items: Iterable[Shown], shown: dict[str | None, Thumbnail], kind: str) -> str:
    figures = []
    for item in items:
        picture = shown.get(item.image_url) or Thumbnail(reason="no_image")
        if picture.data_uri:
            body = f'<img src="{picture.data_uri}" alt="{escape(item.record_id)}">'
        else:
            body = (
                f'<div class="placeholder" title="{escape(picture.message or "")}">'
                f"<span>image unavailable</span>"
                f"<code>{escape(picture.reason or 'unknown')}</code></div>"
            )
        if item.item_uri.startswith(("http://", "https://")):
            body = f'<a href="{escape(item.item_uri)}">{body}</a>'
        provider = f"<br>{escape(item.provider)}" if item.provider else ""
        figures.append(
            f'<figure class="thumb" data-record="{escape(item.record_id)}" data-kind="{kind}">'
            f"{body}<figcaption><strong>{item.confidence:.3f}</strong> "
            f"<code>{escape(item.record_id)}</code>{provider}</figcaption></figure>"
        )
    return f'<div class="thumbs">{"".join(figures)}</div>'


def _rows(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(
        f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>" for name, value in pairs
    )


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "n/a"


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{seconds:.1f} s"


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
  color: #1d2733; background: #f6f7f9; }
header { background: #1d3557; color: #fff; padding: 1rem 2rem; }
header h1 { margin: 0 0 .3rem; font-size: 1.4rem; }
header p { margin: 0; opacity: .8; font-size: .9rem; }
main { padding: 0 2rem 2rem; max-width: 1200px; }
section { background: #fff; margin: 1.2rem 0; padding: .8rem 1.2rem 1.2rem;
  border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
h2 { font-size: 1.15rem; border-bottom: 1px solid #e1e4e8; padding-bottom: .3rem; }
h3 small { font-weight: normal; color: #5b6673; font-size: .8rem; }
h4 { margin: .8rem 0 .4rem; font-size: .9rem; color: #3b4754; }
table { border-collapse: collapse; font-size: .9rem; margin: .4rem 0; }
th, td { text-align: left; padding: .25rem .8rem .25rem 0; border-bottom: 1px solid #eef0f2;
  vertical-align: top; }
table.facts th { color: #5b6673; font-weight: normal; }
td code, th code { word-break: break-all; }
img.chart { max-width: 100%; display: block; }
.grid { display: flex; flex-wrap: wrap; gap: .6rem; }
.grid figure { margin: 0; }
.grid figcaption { font-size: .8rem; color: #5b6673; }
.thumbs { display: flex; flex-wrap: wrap; gap: .8rem; }
figure.thumb { margin: 0; width: 168px; font-size: .75rem; }
figure.thumb img, .placeholder { display: block; max-width: 160px; max-height: 160px;
  border: 1px solid #d6dbe1; }
.placeholder { width: 160px; height: 120px; background: repeating-linear-gradient(45deg,
  #f0f1f3, #f0f1f3 8px, #e4e6ea 8px, #e4e6ea 16px); color: #6b7682; text-align: center;
  display: flex; flex-direction: column; justify-content: center; }
figcaption code { word-break: break-all; }
"""
