"""Offline JSON-LD processing with the contexts that ship with the package.

Exports are checked by expanding them with PyLD. The W3C context
(`http://www.w3.org/ns/anno.jsonld`) is read from `enrichment/data/`, never
fetched: a nightly export must not depend on, or leak requests to, w3.org, and
a test must give the same answer offline. Any other remote context is refused.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from pyld import jsonld

ANNO_CONTEXT = "http://www.w3.org/ns/anno.jsonld"
BUNDLED_CONTEXTS = {
    ANNO_CONTEXT: "anno.jsonld",
    "https://www.w3.org/ns/anno.jsonld": "anno.jsonld",
}


@cache
def bundled_document(name: str) -> dict[str, Any]:
    """A JSON document from `enrichment/data/`, parsed once per process."""
    return json.loads(resources.files("enrichment").joinpath("data", name).read_text("utf-8"))


def document_loader(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """PyLD's document loader, answering from the bundled contexts and refusing the rest."""
    name = BUNDLED_CONTEXTS.get(url)
    if name is None:
        raise jsonld.JsonLdError(
            f"{url} is not a bundled context and remote contexts are not fetched",
            "jsonld.LoadDocumentError",
            {"url": url},
            code="loading remote context failed",
        )
    return {
        "contentType": "application/ld+json",
        "contextUrl": None,
        "documentUrl": url,
        "document": bundled_document(name),
    }


def expand(document: dict[str, Any]) -> list[dict[str, Any]]:
    """JSON-LD expansion of `document`, offline."""
    return jsonld.expand(document, {"documentLoader": document_loader})


def round_trips(document: dict[str, Any]) -> bool:
    """Whether expanding and compacting again gives the same document.

    JSON-LD silently drops a key that its context does not define, and
    rewrites a value whose form the context does not expect; a document that
    comes back unchanged says nothing was lost on the way to RDF.
    """
    context = document["@context"]
    compacted = jsonld.compact(
        expand(document), {"@context": context}, {"documentLoader": document_loader}
    )
    return compacted == document
