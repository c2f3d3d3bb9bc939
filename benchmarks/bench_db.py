"""Writing results to PostgreSQL: the project's bulk upsert against row-by-row ORM and raw COPY.

100,000 records x 20 classes (10,000 with --quick), two labels above threshold
per record on average (1 to 3), written three ways from the same in-memory
`RecordOutcome`s:

- bulk: `enrichment.store.writes.save_outcomes`, one transaction per batch of 128
  records, as `process_batch` commits them;
- row-by-row: one ORM object and one INSERT per row (the result, then each
  label), committed per record, as a task per image would. Too slow to run on
  all records, it is timed on a sample (2,000 records; 400 quick) and scaled;
- COPY: the same rows as CSV into copies of the two tables with no index, key
  or constraint: the physical limit of getting the bytes into the server.

The work is cut into rounds and each round times all three ways, so that
other work on the machine slows them alike. Targets: bulk >= 20x row-by-row,
>= 0.3x COPY.

    python benchmarks/bench_db.py [--quick]

Not a test: it measures time, which the tests never do. `run(quick)` returns
the figures for `benchmarks/run_all.py`.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import common
import numpy as np
import sqlalchemy as sa

from enrichment.config import Settings
from enrichment.store.columns import scores_literal
from enrichment.store.current import CLASSIFIED
from enrichment.store.database import Database
from enrichment.store.schema import Label, Result, Run, RunStatus, utc_now
from enrichment.store.writes import LabelScore, RecordOutcome, register_model, save_outcomes

VERSION = "bench@000000000001"
PREVIOUS = "bench@000000000000"  # an earlier model's results, already in the tables
ROWWISE_TARGET = 20.0
COPY_TARGET = 0.3
RESULT_COLUMNS = (
    "record_id",
    "model_version",
    "run_id",
    "status",
    "scores",
    "image_url",
    "image_sha256",
    "source_timestamp",
    "classified_at",
    "is_current",
)
LABEL_COLUMNS = ("record_id", "model_version", "label_key", "concept", "confidence")
REAL_TABLES = ("results", "labels")
BARE_TABLES = ("copy_results", "copy_labels")
PREVIOUS_CHUNK = 20_000


def record_id(number: int) -> str:
    return f"/9200001/item_{number:07d}"


def outcomes(first: int, count: int) -> list[RecordOutcome]:
    """Labelled records with a full score vector and 1 to 3 labels, like a real batch's."""
    rng = np.random.default_rng(first)
    labels = common.vocabulary_labels()
    made = []
    for number in range(first, first + count):
        scores = rng.uniform(0.0, 0.45, len(labels))
        chosen = rng.choice(len(labels), size=int(rng.integers(1, 4)), replace=False)
        scores[chosen] = rng.uniform(0.5, 1.0, len(chosen))
        made.append(
            RecordOutcome(
                record_id=record_id(number),
                status="labelled",
                scores=[round(float(score), 6) for score in scores],
                labels=[
                    LabelScore(labels[i].key, labels[i].concept, round(float(scores[i]), 6))
                    for i in sorted(chosen)
                ],
                image_url=f"https://images.example.org/{number}.jpg",
                image_sha256=f"{number:064x}",
                source_timestamp=datetime(2024, 1, 1),
            )
        )
    return made


def prepare(url: str, records: int, sample: int) -> int:
    """A database as production has it when a new model's results arrive; returns a run id.

    The records are there, and so are an earlier model's results and labels for
    them, analysed: PostgreSQL then plans the writes from statistics of a
    table in use, not of tables created empty a minute before, whose plans can
    stay those of a tiny table as it grows. Also creates the unindexed copies
    of the two tables that COPY writes to.
    """
    db = Database(url)
    db.upgrade()
    labels = common.vocabulary_labels()
    with db.transaction() as session:
        for version in (PREVIOUS, VERSION):
            register_model(
                session,
                version,
                "bench",
                "resnet50",
                [
                    {"key": item.key, "label": item.label, "concept": item.concept}
                    for item in labels
                ],
                [item.threshold for item in labels],
            )
        run = Run(
            kind="on_demand",
            scope={"source": "bench"},
            model_version=VERSION,
            status=RunStatus.RUNNING,
            queue="enrich.on_demand",
            started_at=utc_now(),
        )
        session.add(run)
        session.flush()
        run_id = run.id
    rows = io.StringIO()
    for number in range(records + sample):
        rid = record_id(number)
        # The item URI its id gives: stored NULL (an empty CSV field), as `upsert_records` does.
        rows.write(f"{rid},9200001,,,,2024-01-01,2024-01-01\n")
    rows.seek(0)
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.copy_expert(
            "COPY records (id, dataset, item_uri, image_url, provider, first_seen, last_seen) "
            "FROM STDIN WITH (FORMAT csv)",
            rows,
        )
        # Columns, NOT NULL and defaults (a result's current flag), but no index or key.
        cursor.execute("CREATE TABLE copy_results (LIKE results INCLUDING DEFAULTS)")
        cursor.execute("CREATE TABLE copy_labels (LIKE labels INCLUDING DEFAULTS)")
        raw.commit()
    finally:
        raw.close()
    for first in range(0, records + sample, PREVIOUS_CHUNK):
        chunk = outcomes(first, min(PREVIOUS_CHUNK, records + sample - first))
        write_copy(db, None, PREVIOUS, chunk, REAL_TABLES)
    with db.engine.connect() as connection:
        connection.execute(sa.text("ANALYZE"))
        connection.commit()
    db.dispose()
    return run_id


def write_bulk(db: Database, run_id: int, chunk: Sequence[RecordOutcome], batch: int) -> None:
    for start in range(0, len(chunk), batch):
        with db.transaction() as session:
            save_outcomes(session, run_id, VERSION, chunk[start : start + batch])


def write_rowwise(db: Database, run_id: int, chunk: Sequence[RecordOutcome]) -> None:
    """One ORM object, one INSERT per row, one commit per record."""
    for outcome in chunk:
        with db.sessions() as session:
            session.add(
                Result(
                    record_id=outcome.record_id,
                    model_version=VERSION,
                    run_id=run_id,
                    status=outcome.status,
                    scores=outcome.scores,
                    image_url=outcome.image_url,
                    image_sha256=outcome.image_sha256,
                    source_timestamp=outcome.source_timestamp,
                    classified_at=utc_now(),
                )
            )
            session.flush()
            for label in outcome.labels:
                session.add(
                    Label(
                        record_id=outcome.record_id,
                        model_version=VERSION,
                        label_key=label.key,
                        concept=label.concept,
                        confidence=label.confidence,
                    )
                )
                session.flush()
            session.commit()


def write_copy(
    db: Database,
    run_id: int | None,
    version: str,
    chunk: Sequence[RecordOutcome],
    tables: tuple[str, str] = BARE_TABLES,
) -> None:
    """The rows as CSV, streamed with COPY into `tables` in one transaction."""
    now = utc_now()
    results, labels = io.StringIO(), io.StringIO()
    result_writer, label_writer = csv.writer(results), csv.writer(labels)
    for outcome in chunk:
        result_writer.writerow(
            (
                outcome.record_id,
                version,
                run_id,
                outcome.status,
                scores_literal(outcome.scores),
                outcome.image_url,
                "\\x" + outcome.image_sha256,
                outcome.source_timestamp,
                now,
                # Classified: the record's latest, flagged as `save_outcomes` flags it (so
                # the earlier model's results are current where the new version arrives).
                outcome.status in CLASSIFIED,
            )
        )
        for label in outcome.labels:
            label_writer.writerow(
                (outcome.record_id, version, label.key, label.concept, label.confidence)
            )
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for table, columns, buffer in zip(
            tables, (RESULT_COLUMNS, LABEL_COLUMNS), (results, labels), strict=True
        ):
            buffer.seek(0)
            cursor.copy_expert(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)", buffer
            )
        raw.commit()
    finally:
        raw.close()


def counts(db: Database) -> dict[str, int]:
    """Rows of the new model version in each table: what the three ways wrote."""
    with db.engine.connect() as connection:
        return {
            table: connection.execute(
                sa.text(f"SELECT count(*) FROM {table} WHERE model_version = :version"),
                {"version": VERSION},
            ).scalar_one()
            for table in (*REAL_TABLES, *BARE_TABLES)
        }


def run(quick: bool) -> dict[str, Any]:
    records, sample, rounds = (10_000, 400, 4) if quick else (100_000, 2_000, 10)
    batch = Settings.batch_size
    server = (
        "PostgreSQL at BENCH_DATABASE_URL"
        if os.environ.get("BENCH_DATABASE_URL")
        else "throwaway PostgreSQL with its default durability (fsync, synchronous_commit on)"
    )
    with common.database_server(durable=True) as base, common.fresh_database(base) as url:
        if sa.engine.make_url(url).get_backend_name() != "postgresql":
            raise RuntimeError("bench_db measures PostgreSQL: BENCH_DATABASE_URL must be one")
        run_id = prepare(url, records, sample)
        db, bulk_db = Database(url), Database(url)
        clock = common.StatementClock(bulk_db.engine)
        seconds = {"bulk": 0.0, "rowwise": 0.0, "copy": 0.0}
        per_round, sample_per_round = records // rounds, sample // rounds
        for number in range(rounds):
            chunk = outcomes(number * per_round, per_round)
            rowwise = outcomes(records + number * sample_per_round, sample_per_round)
            ways: list[tuple[str, Callable[[], None]]] = [
                ("bulk", lambda c=chunk: write_bulk(bulk_db, run_id, c, batch)),
                ("rowwise", lambda c=rowwise: write_rowwise(db, run_id, c)),
                ("copy", lambda c=chunk: write_copy(db, run_id, VERSION, c)),
            ]
            for name, write in ways if number % 2 == 0 else reversed(ways):
                seconds[name] += common.timed(write)[0]
            common.say(
                f"    round {number + 1}/{rounds}, seconds so far: bulk {seconds['bulk']:.1f} "
                f"({per_round:,} records a round), row-by-row {seconds['rowwise']:.1f} "
                f"({sample_per_round} a round), COPY {seconds['copy']:.1f}"
            )
        rows = counts(db)
        db.dispose()
        bulk_db.dispose()
    labels = rows["copy_labels"]
    if rows["results"] != records + sample or rows["copy_results"] != records:
        raise RuntimeError(f"rows written do not add up: {rows}")
    rates = {
        "bulk": records / seconds["bulk"],
        "rowwise": sample / seconds["rowwise"],
        "copy": records / seconds["copy"],
    }
    return {
        "records": records,
        "server": server,
        "classes": len(common.VOCABULARY),
        "labels": labels,
        "batch": batch,
        "rowwise_sample": sample,
        "rounds": rounds,
        "rows": rows,
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "bulk_statement_seconds": clock.largest(),
        "rowwise_scaled_seconds": round(records / rates["rowwise"], 1),
        "rates": {name: round(value) for name, value in rates.items()},
        "db_over_rowwise": round(rates["bulk"] / rates["rowwise"], 2),
        "db_over_copy": round(rates["bulk"] / rates["copy"], 3),
    }


def report(figures: dict[str, Any]) -> list[str]:
    rates, seconds = figures["rates"], figures["seconds"]
    ways = (
        (f"bulk upsert (save_outcomes, {figures['batch']} a transaction)", "bulk", ""),
        (
            f"row-by-row ORM ({figures['rowwise_sample']:,} records)",
            "rowwise",
            f"; scaled to {figures['records']:,}: {figures['rowwise_scaled_seconds']:,} s",
        ),
        ("COPY into unindexed tables", "copy", ""),
    )
    statements = ", ".join(
        f"{kind} {spent:.1f} s" for kind, spent in figures["bulk_statement_seconds"].items()
    )
    rest = seconds["bulk"] - sum(figures["bulk_statement_seconds"].values())
    return [
        f"  {figures['records']:,} records x {figures['classes']} classes, "
        f"{figures['labels'] / figures['records']:.1f} labels per record; {figures['server']}",
        *(
            f"    {label:<46} {seconds[way]:6.1f} s, {rates[way]:>7,} records/s{extra}"
            for label, way, extra in ways
        ),
        # On PostgreSQL a batch's statements travel inside its COPY (`save_outcomes`), which
        # SQLAlchemy's statement events do not see: then there is nothing to take apart.
        f"    bulk upsert's time by statement: {statements}; the rest (commits, Python) "
        f"{rest:.1f} s"
        if statements
        else "    bulk upsert: its statements travel inside each batch's COPY, not timed apart",
    ]


def summary(figures: dict[str, Any]) -> list[common.Figure]:
    return [
        common.Figure(
            "db_over_rowwise",
            figures["db_over_rowwise"],
            f">= {ROWWISE_TARGET}",
            note=f"row-by-row timed on {figures['rowwise_sample']:,} records and scaled",
        ),
        common.Figure("db_over_copy", figures["db_over_copy"], f">= {COPY_TARGET}"),
    ]


def main(argv: list[str] | None = None) -> int:
    return common.stand_alone(
        __doc__, "10,000 records instead of 100,000", run, report, summary, argv
    )


if __name__ == "__main__":
    sys.exit(main())
