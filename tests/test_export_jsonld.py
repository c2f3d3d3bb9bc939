"""Every export profile and format, expanded to RDF with PyLD and the bundled context, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pyld import jsonld

from enrichment.publish.annotations import PROJECT_NAMESPACE
from enrichment.publish.export import ExportFilter
from enrichment.publish.jsonld import document_loader, expand
from enrichment.store.database import Database
from tests.conftest import VOCABULARY
from tests.export_support import (
    Catalogue,
    build_catalogue,
    export_text,
    image_url,
    item_uri,
    open_database,
    read_pages,
)

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
OA = "http://www.w3.org/ns/oa#"
AS = "http://www.w3.org/ns/activitystreams#"
XSD = "http://www.w3.org/2001/XMLSchema#"
DCTERMS = "http://purl.org/dc/terms/"
SCHEMA = "http://schema.org/"
CONCEPTS = set(VOCABULARY.values())

Triple = tuple[str, str, Any]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[Database, Catalogue]:
    db = open_database(f"sqlite:///{tmp_path_factory.mktemp('jsonld')}/export.sqlite3")
    yield db, build_catalogue(db)
    db.dispose()


def triples(document: dict[str, Any]) -> set[Triple]:
    """The document's RDF statements; a literal object is (value, datatype)."""
    dataset = jsonld.to_rdf(document, {"documentLoader": document_loader})

    def term(node: dict[str, str]) -> Any:
        return (node["value"], node["datatype"]) if node["type"] == "literal" else node["value"]

    return {
        (quad["subject"]["value"], quad["predicate"]["value"], term(quad["object"]))
        for quad in dataset["@default"]
    }


def objects(graph: set[Triple], subject: str, predicate: str) -> list[Any]:
    return [o for s, p, o in graph if s == subject and p == predicate]


def the(graph: set[Triple], subject: str, predicate: str) -> Any:
    found = objects(graph, subject, predicate)
    assert len(found) == 1, (subject, predicate, found)
    return found[0]


def rdf_list(graph: set[Triple], head: str) -> list[str]:
    members = []
    while head != RDF + "nil":
        members.append(the(graph, head, RDF + "first"))
        head = the(graph, head, RDF + "rest")
    return members


def assert_w3c_annotation(graph: set[Triple], node: str, expected: dict[str, Any]) -> None:
    """The statements one W3C-profile annotation must make, checked against its JSON."""
    assert the(graph, node, RDF + "type") == OA + "Annotation"
    assert the(graph, node, OA + "motivatedBy") == OA + "classifying"
    assert the(graph, node, OA + "hasBody") == expected["body"]
    assert expected["body"] in CONCEPTS
    target = the(graph, node, OA + "hasTarget")
    scope = the(graph, target, OA + "hasScope")
    assert scope == expected["target"]["scope"]
    record = scope.removeprefix("http://data.europeana.eu/item")
    assert scope == item_uri(record)
    assert the(graph, target, OA + "hasSource") == image_url(record)
    value, datatype = the(graph, node, PROJECT_NAMESPACE + "confidence")
    assert datatype == XSD + "double"
    assert float(value) == pytest.approx(expected["confidence"], abs=1e-12)
    created, datatype = the(graph, node, DCTERMS + "created")
    assert (created, datatype) == (expected["created"], XSD + "dateTime")
    generator = the(graph, node, AS + "generator")
    assert the(graph, generator, RDF + "type") == AS + "Application"
    version = expected["generator"]["version"]
    assert the(graph, generator, SCHEMA + "softwareVersion") == (version, XSD + "string")
    assert the(graph, generator, "http://xmlns.com/foaf/0.1/name")[0] == "heritage-enrichment"


def assert_europeana_annotation(graph: set[Triple], node: str, expected: dict[str, Any]) -> None:
    assert the(graph, node, RDF + "type") == OA + "Annotation"
    assert the(graph, node, OA + "motivatedBy") == OA + "tagging"
    assert the(graph, node, OA + "hasBody") == expected["body"]
    assert expected["body"] in CONCEPTS
    assert the(graph, node, OA + "hasTarget") == expected["target"]
    assert expected["target"].startswith("http://data.europeana.eu/item/")
    predicates = {p for s, p, _ in graph if s == node}
    assert not any(p.startswith(PROJECT_NAMESPACE) for p in predicates), "no custom terms"


def test_w3c_collection_expands_to_annotations_with_typed_confidence(catalogue) -> None:
    db, stored = catalogue
    document = json.loads(export_text(db))
    graph = triples(document)
    collection = document["id"]
    assert the(graph, collection, RDF + "type") == AS + "OrderedCollection"
    assert the(graph, collection, AS + "totalItems") == (
        str(len(stored.expected())),
        XSD + "nonNegativeInteger",
    )
    page = the(graph, collection, AS + "first")
    assert the(graph, collection, AS + "last") == page
    assert the(graph, page, RDF + "type") == AS + "OrderedCollectionPage"
    assert the(graph, page, AS + "partOf") == collection
    items = rdf_list(graph, the(graph, page, AS + "items"))
    annotations = document["first"]["items"]
    assert items == [annotation["id"] for annotation in annotations]
    for annotation in annotations:
        assert_w3c_annotation(graph, annotation["id"], annotation)


def test_w3c_json_lines_each_expand_on_their_own(catalogue) -> None:
    db, _ = catalogue
    lines = export_text(db, ExportFilter(datasets=("1002",)), format="jsonl").splitlines()
    assert lines
    for line in lines:
        annotation = json.loads(line)
        assert_w3c_annotation(triples(annotation), annotation["id"], annotation)


def test_w3c_split_pages_expand_and_link(catalogue, tmp_path: Path) -> None:
    db, stored = catalogue
    out = tmp_path / "labels.jsonld"
    export_text(db, path=out, split=7)
    collection = triples(json.loads(out.read_text()))
    ids = []
    for page in read_pages(out):
        graph = triples(page)
        assert the(graph, page["id"], AS + "partOf") in {s for s, _, _ in collection}
        for annotation in page["items"]:
            assert_w3c_annotation(graph, annotation["id"], annotation)
            ids.append(annotation["id"])
    assert len(ids) == len(set(ids)) == len(stored.expected())


@pytest.mark.parametrize("split", [None, 5])
def test_europeana_pages_expand_to_tagging_annotations(catalogue, tmp_path, split) -> None:
    db, stored = catalogue
    out = tmp_path / "europeana.jsonld"
    export_text(db, profile="europeana", path=out, split=split)
    pages = list(read_pages(out)) if split else [json.loads(out.read_text())]
    count = 0
    for page in pages:
        graph = triples(page)
        (node,) = [
            s for s, p, o in graph if p == RDF + "type" and o == AS + "OrderedCollectionPage"
        ]
        nodes = rdf_list(graph, the(graph, node, AS + "items"))
        assert len(nodes) == len(page["items"]) <= (split or len(nodes))
        for member, annotation in zip(nodes, page["items"], strict=True):
            assert_europeana_annotation(graph, member, annotation)
        count += len(nodes)
    assert count == len(stored.expected())


def test_europeana_json_lines_expand_with_the_w3c_context_alone(catalogue) -> None:
    db, _ = catalogue
    text = export_text(db, ExportFilter(labels=("map",)), profile="europeana", format="jsonl")
    for line in text.splitlines():
        annotation = json.loads(line)
        assert annotation["@context"] == "http://www.w3.org/ns/anno.jsonld"
        graph = triples(annotation)
        (node,) = [s for s, p, o in graph if p == RDF + "type" and o == OA + "Annotation"]
        assert_europeana_annotation(graph, node, annotation)


def test_the_document_loader_serves_the_bundled_context_and_refuses_the_network() -> None:
    document = {
        "@context": "https://www.w3.org/ns/anno.jsonld",
        "id": "http://example.org/anno1",
        "type": "Annotation",
        "target": "http://example.org/page1",
    }
    (node,) = expand(document)
    assert node["@type"] == [OA + "Annotation"]
    remote = {**document, "@context": "http://example.org/elsewhere.jsonld"}
    with pytest.raises(jsonld.JsonLdError, match="not a bundled context"):
        document_loader("http://example.org/elsewhere.jsonld")
    with pytest.raises(jsonld.JsonLdError) as failure:
        expand(remote)
    assert failure.value.details == {"url": "http://example.org/elsewhere.jsonld"}
