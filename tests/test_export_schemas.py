"""Exported annotations against the W3C test suite's JSON Schemas and Europeana's own examples.

The schemas are the Web Annotation WG's (tests/data/w3c-annotation-schemas), resolved
through a local `referencing` registry; the Europeana request bodies are copied from
Europeana's integration tests (tests/data/europeana). Nothing is fetched.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from enrichment.publish.export import ExportFilter
from enrichment.store.database import Database
from tests.export_support import (
    Catalogue,
    build_catalogue,
    export_text,
    open_database,
    read_pages,
)

DATA = Path(__file__).resolve().parent / "data"
SUITE = DATA / "w3c-annotation-schemas"
EUROPEANA = DATA / "europeana"
# The optional features the W3C profile claims, as the suite's own assertions.
W3C_FEATURES = (
    "annotations/3.3.1-annotationCreatedImplemented.json",
    "annotations/3.3.5-annotationSingleMotivationImplemented.json",
    "annotations/3.1-bodyKeyFound.json",
    "annotations/specificResource/4.6-scope.json",
    "annotations/3.3.1-annotationGeneratorImplemented.json",
    "annotations/3.3.2-annotationGeneratorAgentTypeImplemented.json",
    "annotations/3.3.2-annotationGeneratorAgentSingleNameImplemented.json",
)
EUROPEANA_FEATURES = tuple(f for f in W3C_FEATURES if "scope" not in f)
ID_ASSERTION = "annotations/3.1-annotationIdValidated.json"
# RFC 3986 absolute URI, and RFC 3339 date-time: jsonschema checks neither format
# without optional packages, and the suite depends on both.
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
DATE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("uri")
def _is_uri(value: object) -> bool:
    return not isinstance(value, str) or URI.fullmatch(value) is not None


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return DATE_TIME.fullmatch(value) is not None and bool(datetime.fromisoformat(value))


@cache
def registry() -> Registry:
    """The suite's definition files under their own ids, so relative $refs resolve locally."""
    resources = []
    for path in sorted((SUITE / "definitions").glob("*.json")):
        contents = json.loads(path.read_text())
        resources.append(
            (contents["id"], Resource.from_contents(contents, default_specification=DRAFT4))
        )
    return Registry().with_resources(resources)


@cache
def assertion(name: str) -> tuple[jsonschema.Draft4Validator, bool, str]:
    """A suite assertion: its validator, whether a conforming annotation is valid, its message."""
    schema = json.loads((SUITE / name).read_text())
    validator = jsonschema.Draft4Validator(schema, registry=registry(), format_checker=FORMATS)
    return validator, schema["expectedResult"] == "valid", schema["errorMessage"]


def musts() -> list[str]:
    return json.loads((SUITE / "annotations" / "annotationMusts.test").read_text())["assertions"]


def failed(document: dict[str, Any], names: list[str] | tuple[str, ...]) -> list[str]:
    """The assertions `document` does not meet, by file name."""
    failures = []
    for name in names:
        validator, want_valid, _ = assertion(name)
        if validator.is_valid(document) != want_valid:
            failures.append(name)
    return failures


def definition(name: str) -> jsonschema.Draft4Validator:
    """A definition of collections.json, e.g. `annotationPageTypeValueFound`."""
    return jsonschema.Draft4Validator(
        {"$ref": f"collections.json#/definitions/{name}"},
        registry=registry(),
        format_checker=FORMATS,
    )


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[Database, Catalogue]:
    db = open_database(f"sqlite:///{tmp_path_factory.mktemp('schemas')}/export.sqlite3")
    yield db, build_catalogue(db)
    db.dispose()


def test_the_suite_is_complete_and_resolves_offline() -> None:
    names = musts()
    assert len(names) == 54
    for name in (*names, *W3C_FEATURES):
        validator, _, _ = assertion(name)
        validator.is_valid({})  # resolves every $ref it reaches, from the registry only


def test_w3c_annotations_meet_every_must_and_the_features_they_claim(catalogue) -> None:
    db, _ = catalogue
    document = json.loads(export_text(db))
    assert document["first"]["items"]
    for annotation in document["first"]["items"]:
        standalone = {"@context": document["@context"], **annotation}
        assert failed(standalone, musts()) == [], annotation["id"]
        assert failed(standalone, W3C_FEATURES) == [], annotation["id"]
    for line in export_text(db, format="jsonl").splitlines():
        assert failed(json.loads(line), musts() + list(W3C_FEATURES)) == []


def test_europeana_items_meet_every_must_but_the_id_europeana_assigns(catalogue) -> None:
    db, _ = catalogue
    page = json.loads(export_text(db, profile="europeana"))
    assert page["items"]
    for item in page["items"]:
        standalone = {"@context": page["@context"], **item}
        assert failed(standalone, musts()) == [ID_ASSERTION]
        assert failed(standalone, EUROPEANA_FEATURES) == []
        assert failed({**standalone, "id": "http://data.europeana.eu/annotation/1"}, musts()) == []


@pytest.mark.parametrize(
    ("change", "broken"),
    [
        (lambda a: a.pop("@context"), "3.1-annotationContextValidated"),
        (
            lambda a: a.update({"@context": "http://example.org/ctx.jsonld"}),
            "3.1-annotationContext",
        ),
        (lambda a: a.update(id="not an identifier"), "3.1-annotationIdValidated"),
        (lambda a: a.update(type="Note"), "3.1-annotationTypeValidated"),
        (lambda a: a.pop("target"), "3.1-targetKeyFound"),
        (lambda a: a.update(created="yesterday"), "3.3.1-annotationCreatedValidated"),
        (lambda a: a.update(bodyValue="photograph"), "3.2.5-notBodyBodyValue"),
        (lambda a: a.update(target={"source": "not a uri"}), "3.2-targetObjectsRecognized"),
    ],
)
def test_the_validator_rejects_what_the_suite_calls_invalid(catalogue, change, broken) -> None:
    """The checks above mean something: breaking an exported annotation fails the right MUST."""
    db, _ = catalogue
    document = json.loads(export_text(db, ExportFilter(labels=("photograph",))))
    annotation = {"@context": document["@context"], **document["first"]["items"][0]}
    change(annotation)
    assert any(name.split("/")[-1].startswith(broken) for name in failed(annotation, musts()))


def check_collection(collection: dict[str, Any], total: int) -> None:
    for name in (
        "annotationCollectionTypeValueFound",
        "labelFound",
        "totalFound",
        "firstValidIfPresent",
        "lastValidIfPresent",
        "firstRequiredIfTotalMoreThanZero",
    ):
        definition(name).validate(collection)
    assert collection["total"] == total
    assert definition("contextValueInArrayFound").is_valid(collection["@context"])


def check_page(page: dict[str, Any]) -> None:
    for name in (
        "annotationPageTypeValueFound",
        "partOfFound",
        "startIndexFound",
        "itemsFound",
        "nextValidIfPresent",
        "prevValidIfPresent",
    ):
        definition(name).validate(page)


def test_collections_and_pages_match_the_suite_definitions(catalogue, tmp_path: Path) -> None:
    db, stored = catalogue
    total = len(stored.expected())
    document = json.loads(export_text(db))
    check_collection(document, total)
    check_page(document["first"])
    out = tmp_path / "labels.jsonld"
    export_text(db, path=out, split=6, base_url="https://example.org/exports/")
    check_collection(json.loads(out.read_text()), total)
    pages = list(read_pages(out))
    assert len(pages) == -(-total // 6)
    for page in pages:
        check_page(page)
        assert definition("contextValueInArrayFound").is_valid(page["@context"])


# Europeana: the shape of its own request examples.


def europeana_example(name: str) -> dict[str, Any]:
    return json.loads((EUROPEANA / f"{name}.jsonld").read_text())


def europeana_shape_problems(item: dict[str, Any]) -> list[str]:
    """How `item` differs from Europeana's own valid semantic-tag requests."""
    tag = europeana_example("semantictag-dereferenced_semantictag_test_entity")
    agent = europeana_example("tag-full_agent")
    batch = europeana_example("tag-batch-annotation_page")
    allowed = {*tag, *agent, *(key for example in batch["items"] for key in example)}
    allowed -= {"@context", "id", "bodyValue"}  # per page; assigned by Europeana; a plain tag
    problems = [f"key {key} is in no Europeana example" for key in set(item) - allowed]
    if item.get("motivation") != tag["motivation"]:
        problems.append(f"motivation is {item.get('motivation')!r}, not {tag['motivation']!r}")
    for key, like in (("body", tag["body"]), ("target", tag["target"])):
        value = item.get(key)
        prefix = like[: like.index("/item/") + 6] if key == "target" else "http"
        if not (isinstance(value, str) and value.startswith(prefix) and URI.fullmatch(value)):
            problems.append(f"{key} {value!r} is not a URI like {like!r}")
    if "type" in item and item["type"] != agent["type"]:
        problems.append(f"type is {item['type']!r}")
    generator = item.get("generator", {})
    if set(generator) - set(agent["generator"]) or generator.get("type", "Software") != "Software":
        problems.append(f"generator {generator} is not an agent like Europeana's")
    if "created" in item and not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", item["created"]):
        problems.append(f"created {item['created']!r} is not written like {agent['created']!r}")
    return problems


def test_the_shape_check_accepts_europeanas_valid_tag_and_rejects_its_wrong_ones() -> None:
    valid = europeana_example("semantictag-dereferenced_semantictag_test_entity")
    assert europeana_shape_problems(valid) == []
    assert europeana_shape_problems(europeana_example("tag-wrong-without_body"))
    wrong = europeana_shape_problems(europeana_example("tag-wrong-minimal_wrong"))
    assert any("motivation" in p for p in wrong) and any("body" in p for p in wrong)


@pytest.mark.parametrize("split", [None, 4])
def test_europeana_pages_have_the_shape_of_europeanas_batch_request(
    catalogue, tmp_path: Path, split: int | None
) -> None:
    db, stored = catalogue
    batch = europeana_example("tag-batch-annotation_page")
    out = tmp_path / "europeana.jsonld"
    export_text(db, profile="europeana", path=out, split=split)
    pages = list(read_pages(out)) if split else [json.loads(out.read_text())]
    assert not split or not out.exists(), "Europeana takes pages, not a collection"
    for page in pages:
        assert set(page) == set(batch)
        assert (page["@context"], page["type"]) == (batch["@context"], batch["type"])
        assert 0 < len(page["items"]) <= (split or len(page["items"]))
        for item in page["items"]:
            assert europeana_shape_problems(item) == [], item
    assert sum(len(page["items"]) for page in pages) == len(stored.expected())
