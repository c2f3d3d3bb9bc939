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
import torch
from safetensors.torch import load_file, save_file

from enrichment.errors import ModelError
from enrichment.model.classifier import Classifier
from enrichment.model.spec import WEIGHTS_FILE, weights_sha256
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
from tests.conftest import enrich

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


def test_a_model_whose_weights_hold_nan_is_refused_at_load(
    tiny_model: Path, tmp_path: Path
) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "diverged"))
    weights = model / WEIGHTS_FILE
    state = load_file(str(weights))
    state["fc.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    document = json.loads((model / "model.json").read_text())
    document["weights_sha256"] = weights_sha256(weights)
    (model / "model.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match=r"fc\.weight holds NaN or infinite values") as refused:
        Classifier.load(model)
    assert "\n" not in str(refused.value)
    state["fc.weight"][0, 0] = torch.inf
    save_file(state, str(weights))
    document["weights_sha256"] = weights_sha256(weights)
    (model / "model.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match="holds NaN or infinite values"):
        Classifier.load(model)
