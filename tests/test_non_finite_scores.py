"""Non-finite scores (issue 23, item 4): a model with NaN weights is refused at load, and a
NaN or infinite score never reaches the database; its record fails alone with
`non_finite_score`, the rest of the batch is stored, and reads over the database work."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from safetensors.torch import load_file, save_file

from enrichment.config import Settings
from enrichment.errors import ModelError
from enrichment.model.classifier import Classifier
from enrichment.model.spec import WEIGHTS_FILE, weights_sha256
from enrichment.runs import service
from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.writes import (
    NON_FINITE_SCORE,
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import enrich, image_bytes, make_tiny_model
from tests.scenario import run_in_process

VERSION = "tiny@000000000000"
PHOTO = "http://data.europeana.eu/concept/base/48"
CLASSES = [{"key": "photograph", "label": "Photograph", "concept": PHOTO}]


def outcome(record: str, score: float) -> RecordOutcome:
    labels = [LabelScore("photograph", PHOTO, score)] if not score < 0.5 else []
    status = "labelled" if labels else "below_threshold"
    return RecordOutcome(record, status, scores=[score], labels=labels, image_url="http://i/1")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/scores.sqlite3"
    return request.getfixturevalue("pg_url")


def test_a_batch_with_non_finite_scores_stores_the_others_and_reads_still_work(
    database_url: str, tmp_path: Path
) -> None:
    db = Database(database_url)
    db.upgrade()
    names = ["ok1", "nan", "inf", "ninf", "ok2"]
    with db.transaction() as session:
        register_model(session, VERSION, "tiny", "resnet18", CLASSES, [0.5])
        upsert_records(session, [Record(f"/d/{n}", "d", f"http://item/d/{n}", None) for n in names])
        save_outcomes(
            session,
            None,
            VERSION,
            [
                outcome("/d/ok1", 0.9),
                outcome("/d/nan", math.nan),
                outcome("/d/inf", math.inf),
                RecordOutcome(
                    "/d/ninf",
                    "labelled",
                    scores=[0.9],
                    labels=[LabelScore("photograph", PHOTO, -math.inf)],
                ),
                outcome("/d/ok2", 0.7),
            ],
        )
    with db.engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT record_id, status, error_reason, scores FROM results ORDER BY 1")
        ).all()
        labels = connection.execute(sa.text("SELECT record_id FROM labels ORDER BY 1")).all()
    by_id = {row[0]: row[1:] for row in rows}
    assert set(by_id) == {f"/d/{n}" for n in names}
    for bad in ("/d/nan", "/d/inf", "/d/ninf"):
        assert by_id[bad][:2] == ("error", NON_FINITE_SCORE) and by_id[bad][2] is None
    assert by_id["/d/ok1"][:2] == ("labelled", None)
    assert [row[0] for row in labels] == ["/d/ok1", "/d/ok2"]

    env = {"DATABASE_URL": database_url}
    results = enrich("results", "--json", env=env)
    assert results.returncode == 0, results.stderr
    lines = [json.loads(line) for line in results.stdout.splitlines()]
    assert {line["record_id"] for line in lines} >= {"/d/ok1", "/d/nan"}
    out = tmp_path / "export.jsonl"
    exported = enrich("export", "--format", "jsonl", "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stderr
    targets = [json.loads(line)["target"]["scope"] for line in out.read_text().splitlines()]
    assert sorted(targets) == ["http://item/d/ok1", "http://item/d/ok2"]


def rewrite_weights(model: Path, change) -> None:
    """Change the weights in place and record their new hash, as a training would write them."""
    weights = model / WEIGHTS_FILE
    state = load_file(str(weights))
    change(state)
    save_file(state, str(weights))
    document = json.loads((model / "model.json").read_text())
    document["weights_sha256"] = weights_sha256(weights)
    (model / "model.json").write_text(json.dumps(document))


def test_a_run_whose_model_gives_nan_stores_its_own_error_and_no_score(
    tmp_path: Path, image_host
) -> None:
    """Finite weights can still overflow to NaN (+inf and -inf summed): caught at the store."""
    model = tmp_path / "overflowing"
    make_tiny_model(model)

    def overflow(state: dict) -> None:
        # Every feature becomes 3e38 whatever the image (the last batch norm's output is
        # its bias), so the first class's sum meets +inf and -inf: NaN on every record.
        state["layer4.1.bn2.weight"][:] = 0.0
        state["layer4.1.bn2.bias"][:] = 3e38
        state["fc.weight"][0, :256] = 3e38
        state["fc.weight"][0, 256:] = -3e38

    rewrite_weights(model, overflow)
    records = tmp_path / "records.jsonl"
    lines = [{"id": "/n/empty"}] + [
        {"id": f"/n/{n}", "image_url": image_host.add(f"/n/{n}.png", image_bytes((n * 60, 9, 9)))}
        for n in range(3)
    ]
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    database = f"sqlite:///{tmp_path}/run.sqlite3"
    settings = Settings(database_url=database, model_dir=model, fetch_allow=("127.0.0.1",))
    run_in_process(settings, service.records_scope(records))
    engine = sa.create_engine(database)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT record_id, status, error_reason, scores FROM results ORDER BY 1")
        ).all()
        labels = connection.execute(sa.text("SELECT count(*) FROM labels")).scalar_one()
    engine.dispose()
    assert [tuple(row) for row in rows] == [
        ("/n/0", "error", NON_FINITE_SCORE, None),
        ("/n/1", "error", NON_FINITE_SCORE, None),
        ("/n/2", "error", NON_FINITE_SCORE, None),
        ("/n/empty", "error", "no_image", None),
    ]
    assert labels == 0


def test_a_model_whose_weights_hold_nan_is_refused_at_load(
    tiny_model: Path, tmp_path: Path
) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "diverged"))
    for value in (math.nan, math.inf):

        def poison(state: dict, value: float = value) -> None:
            state["fc.weight"][0, 0] = value

        rewrite_weights(model, poison)
        with pytest.raises(ModelError, match=r"fc\.weight holds NaN or infinite values") as refused:
            Classifier.load(model)
        assert "\n" not in str(refused.value)


def test_nan_scores_an_older_version_stored_become_errors_and_reads_work_again(
    tmp_path: Path,
) -> None:
    """Migration 0010: an SQLite database written before the check held `[NaN, ...]`."""
    url = f"sqlite:///{tmp_path}/old.sqlite3"
    db = Database(url)
    db.upgrade("0009")
    with db.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO models (version, name, architecture, classes, thresholds, "
                "top_k_fallback, registered_at) VALUES (:v, 'tiny', 'resnet18', :c, '[0.5]', 0, "
                "'2026-12-01')"
            ),
            {"v": VERSION, "c": json.dumps(CLASSES)},
        )
        for name, scores, status in (("ok", "[0.9]", "labelled"), ("bad", "[NaN]", "labelled")):
            connection.execute(
                sa.text(
                    "INSERT INTO records (id, dataset, item_uri, first_seen, last_seen) "
                    "VALUES (:id, 'd', :uri, '2026-12-01', '2026-12-01')"
                ),
                {"id": f"/d/{name}", "uri": f"http://item/d/{name}"},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO results (record_id, model_version, status, scores, "
                    "classified_at) VALUES (:id, :v, :status, :scores, '2026-12-01')"
                ),
                {"id": f"/d/{name}", "v": VERSION, "status": status, "scores": scores},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO labels (record_id, model_version, label_key, concept, "
                    "confidence) VALUES (:id, :v, 'photograph', :c, 0.9)"
                ),
                {"id": f"/d/{name}", "v": VERSION, "c": PHOTO},
            )
    db.upgrade()
    with db.engine.connect() as connection:
        rows = dict(
            connection.execute(sa.text("SELECT record_id, error_reason FROM results")).all()
        )
        labelled = connection.execute(sa.text("SELECT record_id FROM labels")).scalars().all()
    assert rows == {"/d/ok": None, "/d/bad": NON_FINITE_SCORE} and labelled == ["/d/ok"]
    exported = enrich("export", "--format", "jsonl", env={"DATABASE_URL": url})
    assert exported.returncode == 0, exported.stderr
    annotations = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(annotations) == 1 and "http://item/d/ok" in json.dumps(annotations[0]["target"])
    db.dispose()
