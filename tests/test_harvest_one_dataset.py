"""A harvest of one provider's dataset can be trained (issue 23, item 8): with a single
group in labels.csv the validation split falls back to images, and says so."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from enrichment.cli import cli
from tests.harvest_fixture import VOCABULARY, fill
from tests.search_api import KEY, SearchAPI
from tests.services import ImageHost


def test_a_harvest_of_one_dataset_trains_with_a_split_by_image(tmp_path: Path) -> None:
    api, host = SearchAPI(), ImageHost()
    try:
        fill(api, host.add, 24, datasets=1)
        vocabulary = tmp_path / "vocabulary.json"
        vocabulary.write_text(json.dumps(VOCABULARY))
        out = tmp_path / "set"
        env = {"EUROPEANA_API_KEY": KEY, "EUROPEANA_API_URL": api.url}
        harvested = CliRunner().invoke(
            cli,
            ["harvest", "--vocabulary", str(vocabulary), "--out", str(out), "--no-progress"],
            env={**env, "ENRICH_FETCH_ALLOW": "127.0.0.1"},
        )
        assert harvested.exit_code == 0, harvested.output
    finally:
        api.close()
        host.close()
    groups = {line.split(",")[2] for line in (out / "labels.csv").read_text().splitlines()[1:]}
    assert groups == {"900"}
    model = tmp_path / "model"
    trained = CliRunner().invoke(
        cli,
        ["model", "train", "--data", str(out / "labels.csv"), "--vocabulary", str(vocabulary),
         "--out", str(model), "--architecture", "resnet18", "--input-size", "32",
         "--epochs", "1", "--workers", "0"],
        env={},
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert "validation: 1 group cannot give validation 20% of the images" in trained.stderr
    assert "split by image instead" in trained.stderr
    training = json.loads((model / "model.json").read_text())["training"]
    assert "by image" in training["validation"]
    assert training["validation_fallback"].startswith("1 group cannot")
    assert training["images"]["validation"] >= 1
