"""The run report's numbers on SQLite and PostgreSQL: labels per class, each class's
confidence histogram, the galleries and the error examples, for a run with errors, two
model versions and a record another run classified again.

PostgreSQL counts the histograms in SQL (`RunReading.score_histograms`) rather than
reading every score vector into numpy, so the bins must be numpy's to the last score:
the expected numbers below are those the numpy path gave before (same edges, the lower
edge in, the upper out but for the last bin's), and scores on and beside every edge, in
both the forms a stored float32 reads back as, are binned as numpy bins what
`score_pages` reads.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from enrichment.report.report import BIN_EDGES, Holdings, gather
from enrichment.store.columns import exact_scores
from enrichment.store.database import Database
from enrichment.store.reporting import float32_bounds, reading_run
from enrichment.store.schema import RecordRow, Run
from enrichment.store.writes import LabelScore, RecordOutcome, register_model, save_outcomes
from tests.conftest import upgraded_database

VERSION = "tiny@000000000000"
OTHER = "tiny@111111111111"
CLASSES = [
    {"key": "photograph", "label": "Photograph", "concept": "http://c/photo"},
    {"key": "map", "label": "Map", "concept": "http://c/map"},
]
THRESHOLDS = [0.5, 0.25]
EDGES = BIN_EDGES.tolist()
# A float32 just above and just below the one nearest 0.15: each reads back as itself
# on both databases (neither is the float32 of a 6-decimal number).
ABOVE_015 = float(np.nextafter(np.float32(0.15), np.float32(1)))
BELOW_015 = float(np.nextafter(np.float32(0.15), np.float32(0)))


def outcome(record: str, photo: float, map_: float) -> RecordOutcome:
    """A classified record, labelled with each class whose score reaches its threshold."""
    labels = [
        LabelScore(item["key"], item["concept"], score)
        for item, score, threshold in zip(CLASSES, (photo, map_), THRESHOLDS, strict=True)
        if score >= threshold
    ]
    status = "labelled" if labels else "below_threshold"
    return RecordOutcome(f"/n/{record}", status, scores=[photo, map_], labels=labels)


def add_records_and_runs(db: Database, names: list[str], runs: int) -> None:
    with db.transaction() as session:
        register_model(session, VERSION, "tiny", "resnet18", CLASSES, THRESHOLDS)
        register_model(session, OTHER, "tiny", "resnet18", CLASSES, [0.5, 0.5])
        session.add_all(
            RecordRow(id=f"/n/{name}", dataset="n", image_url=f"http://img/n/{name}")
            for name in names
        )
        for number in range(1, runs + 1):
            session.add(
                Run(
                    id=number,
                    kind="full",
                    scope={"source": "records_file"},
                    model_version=VERSION,
                    status="completed",
                    queue="enrich",
                    created_at=datetime(2026, 1, number),
                    started_at=datetime(2026, 1, number, 1),
                    finished_at=datetime(2026, 1, number, 2),
                    # As `complete_run` leaves them: what the run did (/n/a and /n/e
                    # with the other version too, before it was moved), kept after run 2
                    # took /n/r's and /n/i's results over.
                    final_counts=(
                        {
                            "outcomes": {"labelled": 7, "below_threshold": 3, "error": 2},
                            "errors_by_reason": {"http_404": 1, "timeout": 1},
                        }
                        if number == 1
                        else None
                    ),
                )
            )


@pytest.fixture(params=["sqlite", "postgresql"])
def reported(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """Run 1 over a..i and r; run 2 classifies r and i again; another version beside."""
    db = upgraded_database(request, tmp_path)
    add_records_and_runs(db, list("abcdefghir"), 2)
    with db.transaction() as session:
        save_outcomes(
            session,
            1,
            VERSION,
            [
                outcome("a", 0.95, 0.3),  # both under an edge that is a hair above them
                outcome("b", 1.0, 0.05),  # the last bin holds its upper edge
                outcome("c", 0.6, 0.25),
                outcome("d", 0.7, 0.85),
                outcome("e", 0.15, ABOVE_015),
                outcome("f", 0.35, BELOW_015),
                outcome("g", 0.5, 1.000001),  # past the last edge: in no bin
                RecordOutcome.failed("/n/h", "http_404", "gone"),
                RecordOutcome.failed("/n/i", "timeout", "slow"),
                outcome("r", 0.9, 0.1),
            ],
        )
    with db.transaction() as session:
        save_outcomes(session, 1, OTHER, [outcome("a", 0.05, 0.05), outcome("e", 0.99, 0.99)])
    with db.transaction() as session:
        save_outcomes(session, 2, VERSION, [outcome("r", 0.2, 0.2), outcome("i", 0.55, 0.1)])
    return db


def nonzero(histogram: np.ndarray) -> dict[int, int]:
    return {int(index): int(histogram[index]) for index in np.nonzero(histogram)[0]}


def gallery(shown: list) -> list[tuple[str, float]]:
    return [(item.record_id, item.confidence) for item in shown]


def test_the_reports_numbers_are_the_runs_own(reported: Database) -> None:
    report = gather(reported, 1, 2)
    photo, map_ = report.classes
    assert (photo.key, photo.labelled, photo.scored) == ("photograph", 5, 7)
    assert (map_.key, map_.labelled, map_.scored) == ("map", 4, 7)
    # 0.95, 0.6, 0.7, 0.35 and 0.15 sit under numpy's edges (0.9500000000000001, ...).
    assert nonzero(photo.histogram) == {2: 1, 6: 1, 10: 1, 11: 1, 13: 1, 18: 1, 19: 1}
    assert nonzero(map_.histogram) == {1: 1, 2: 1, 3: 1, 5: 2, 16: 1}
    assert gallery(photo.highest) == [("/n/b", 1.0), ("/n/a", 0.95)]
    assert gallery(photo.lowest) == [("/n/g", 0.5), ("/n/c", 0.6)]
    assert gallery(map_.highest) == [("/n/g", 1.000001), ("/n/d", 0.85)]
    assert gallery(map_.lowest) == [("/n/c", 0.25), ("/n/a", 0.3)]
    # Run 2 took /n/i's result over: its error is counted (the run's final counts) with
    # no example left.
    assert [(e.reason, e.count, e.example_record) for e in report.errors] == [
        ("http_404", 1, "/n/h"),
        ("timeout", 1, None),
    ]
    # Of its 12 results, run 2 took 2 over and 2 are the other version's: the class
    # figures count the 7 classified and the 1 error left.
    assert report.holdings == Holdings(
        done=12, held=8, replaced=2, replacing_runs=[2], other_versions={OTHER: 2}, retired_at=None
    )
    assert report.holdings.partial

    again = gather(reported, 2, 2)
    assert [(c.labelled, c.scored) for c in again.classes] == [(1, 2), (0, 2)]
    assert [nonzero(c.histogram) for c in again.classes] == [{4: 1, 11: 1}, {2: 1, 4: 1}]
    assert [gallery(c.highest) for c in again.classes] == [[("/n/i", 0.55)], []]
    assert again.holdings == Holdings(2, 2, 0, [], {}, None) and not again.holdings.partial


@pytest.fixture(params=["sqlite", "postgresql"])
def on_the_edges(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """One run whose scores are every edge, the 6-decimal numbers beside it, and the
    float32s beside the edge's own float32 (some of which read back as 6-decimal
    numbers on PostgreSQL, some as themselves)."""
    scores: list[float] = []
    for edge in EDGES:
        scores.extend(round(edge + step * 1e-6, 6) for step in range(-3, 4))
        nearest = np.float32(edge)
        for _ in range(3):
            nearest = np.nextafter(nearest, np.float32(-1))
        for _ in range(7):
            scores.append(float(nearest))
            nearest = np.nextafter(nearest, np.float32(2))
    scores.extend([-0.000001, 1.5, 3.999999])
    pairs = [scores[index : index + 2] for index in range(0, len(scores) - 1, 2)]
    db = upgraded_database(request, tmp_path)
    add_records_and_runs(db, [f"{number:04}" for number in range(len(pairs))], 1)
    with db.transaction() as session:
        save_outcomes(
            session,
            1,
            VERSION,
            [
                RecordOutcome(f"/n/{number:04}", "below_threshold", scores=pair)
                for number, pair in enumerate(pairs)
            ],
        )
    return db


def test_scores_on_and_beside_every_edge_are_binned_as_numpy_bins_them(
    on_the_edges: Database,
) -> None:
    with reading_run(on_the_edges, 1) as reading:
        read = np.asarray([row for page in reading.score_pages(50) for row in page])
        binned = reading.score_histograms(EDGES)
    assert binned.scored == len(read) > 140
    for index in range(2):
        assert binned.counts[index].tolist() == np.histogram(read[:, index], EDGES)[0].tolist()
    # Not everything fell into one bin, nor out of all of them.
    assert (binned.counts > 0).sum() > 30
    assert binned.counts.sum() < 2 * len(read)


def test_a_float32_bound_is_where_read_values_cross_the_edge() -> None:
    bounds = float32_bounds(EDGES)
    assert bounds == sorted(bounds)
    for index, (edge, bound) in enumerate(zip(EDGES, bounds, strict=True)):
        last = index == len(EDGES) - 1
        candidate = np.float32(bound)
        for _ in range(40):
            candidate = np.nextafter(candidate, np.float32(-1))
        for _ in range(80):
            read = exact_scores([float(candidate)])[0]
            inside = read > edge if last else read >= edge
            assert inside == (candidate >= np.float32(bound)), (edge, float(candidate))
            candidate = np.nextafter(candidate, np.float32(2))
