"""`enrich results --record`: a record's outcome, and what each Annotations API holds for it."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.store.publications import Created, CreateIntent, record_intents, record_outcomes
from tests.conftest import VOCABULARY
from tests.export_support import NEW, build_catalogue, open_database, record_ids

TEST_API = "https://test.api.europeana.eu/annotation"
PRODUCTION_API = "https://api.europeana.eu/annotation"


def test_each_publication_line_names_the_api_that_holds_it(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path}/enrich.sqlite3"
    db = open_database(database)
    build_catalogue(db)
    record_id = record_ids("1001")[0]
    # The same label published to a test API and to production, under different ids.
    for api_url, number in ((TEST_API, 11), (PRODUCTION_API, 22)):
        [row] = record_intents(
            db,
            api_url,
            [CreateIntent(None, record_id, "map", VOCABULARY["map"], NEW, "sha-map")],
        )
        record_outcomes(db, [Created(row, f"http://data.europeana.eu/annotation/{number}", "me")])
    db.dispose()

    shown = CliRunner().invoke(
        cli, ["results", "--record", record_id], env={"DATABASE_URL": database}
    )
    assert shown.exit_code == 0, shown.output
    published = [line for line in shown.output.splitlines() if "\tpublished:" in line]
    assert sorted(published) == sorted(
        f"{record_id}\tpublished:published\tmap http://data.europeana.eu/annotation/{number} "
        f"({NEW})\t{api_url}"
        for api_url, number in ((TEST_API, 11), (PRODUCTION_API, 22))
    )

    # The JSON lines named the API already, and keep their shape.
    as_json = CliRunner().invoke(
        cli, ["results", "--record", record_id, "--json"], env={"DATABASE_URL": database}
    )
    assert as_json.exit_code == 0, as_json.output
    publications = [
        entry
        for line in as_json.output.splitlines()
        for entry in json.loads(line).get("publications", [])
    ]
    assert {(entry["api_url"], entry["annotation_id"]) for entry in publications} == {
        (TEST_API, "http://data.europeana.eu/annotation/11"),
        (PRODUCTION_API, "http://data.europeana.eu/annotation/22"),
    }
