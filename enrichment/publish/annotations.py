"""One stored label as a Web Annotation, in the profile its consumer expects.

Two profiles:

- `w3c`: any W3C Web Annotation consumer. `motivation: classifying`, the
  concept URI as body, the fetched image as target source scoped to the item,
  the project and model version as generator, and the model's confidence as
  `confidence`, a term of the added project context.
- `europeana`: a request body for Europeana's Annotations API (semantic tag):
  `motivation: tagging`, the concept URI as body, the item URI as target, and
  nothing outside `anno.jsonld`. No `id` either: Europeana assigns its own,
  and in its batch examples an item's `id` names an existing Europeana
  annotation (`http://data.europeana.eu/annotation/...`).

The project namespace, `https://w3id.org/heritage-enrichment/ns#` (prefix
`henr`), holds the terms the W3C model has no word for. It defines one:

    henr:confidence  the classifier's score for the body concept on the target
                     image, an xsd:double in [0, 1]; the label was kept because
                     it reached the class threshold of the model version named
                     by the generator.

An annotation's id is a UUIDv5 of (record, concept, model version) under a
namespace derived from the project namespace: re-exporting gives the same ids,
so a consumer updates instead of duplicating, and a new model version gives
new annotations rather than silently rewriting old ones.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from enrichment import PROJECT_NAME
from enrichment.errors import EnrichError
from enrichment.publish.jsonld import ANNO_CONTEXT, round_trips
from enrichment.store.selection import LabelRow

PROJECT_NAMESPACE = "https://w3id.org/heritage-enrichment/ns#"
PROJECT_CONTEXT = {
    "henr": PROJECT_NAMESPACE,
    "confidence": {"@id": "henr:confidence", "@type": "xsd:double"},
    "version": {"@id": "schema:softwareVersion"},
}
W3C_CONTEXT: list[Any] = [ANNO_CONTEXT, PROJECT_CONTEXT]
EUROPEANA_ITEM_PREFIX = "http://data.europeana.eu/item/"
ANNOTATION_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, PROJECT_NAMESPACE + "annotation")
_ID_NAMESPACE_BYTES = ANNOTATION_ID_NAMESPACE.bytes
CONFIDENCE_DIGITS = 6
PROBLEMS_KEPT = 10
# An absolute IRI (RFC 3987): a scheme, a colon and no character that IRIs forbid.
_ABSOLUTE_IRI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>\"{}|\\^`]+")
_HTTP_IRI = re.compile(r"https?://[^\s<>\"{}|\\^`/]+(/[^\s<>\"{}|\\^`]*)?")
# What an IRI cannot hold as it is (RFC 3987): spaces and controls, the ASCII characters
# above, and the bidirectional formatting characters; percent-encoded where an image URL
# (a provider's edmIsShownBy, often with spaces) becomes a target's `source`.
_NOT_IN_IRIS = re.compile(r'[\s<>"{}|\\^`\x00-\x1f\x7f\u200e\u200f\u202a-\u202e\u2066-\u2069]')


def annotation_id(record_id: str, concept: str, model_version: str) -> str:
    """`urn:uuid:` + uuid5(ANNOTATION_ID_NAMESPACE, "record\nconcept\nversion").

    Written out from the SHA-1 digest as RFC 4122 (section 4.3) defines UUIDv5:
    `uuid.uuid5` builds two UUID objects per call, a fifth of an export's time.
    """
    name = f"{record_id}\n{concept}\n{model_version}".encode()
    digest = hashlib.sha1(_ID_NAMESPACE_BYTES + name, usedforsecurity=False).hexdigest()
    variant = "89ab"[int(digest[16], 16) & 0x3]
    return (
        f"urn:uuid:{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-"
        f"{variant}{digest[17:20]}-{digest[20:32]}"
    )


@lru_cache(maxsize=4096)
def _created(classified_at: datetime) -> str:
    """ISO 8601 in UTC; cached, as a whole batch of results shares one time."""
    return classified_at.replace(microsecond=0).isoformat() + "Z"


def iri_of(url: str) -> str:
    """`url` as an IRI: each character IRIs forbid percent-encoded (its UTF-8 bytes), the
    rest as it is; the same resource for any client that fetches it."""
    if _NOT_IN_IRIS.search(url) is None:
        return url
    return _NOT_IN_IRIS.sub(lambda found: quote(found.group(), safe=""), url)


def w3c_annotation(row: LabelRow) -> dict[str, Any]:
    """The W3C profile, without `@context` (the page or line that holds it adds it)."""
    target: dict[str, Any] | str = (
        {"source": iri_of(row.image_url), "scope": row.item_uri} if row.image_url else row.item_uri
    )
    return {
        "id": annotation_id(row.record_id, row.concept, row.model_version),
        "type": "Annotation",
        "motivation": "classifying",
        "body": row.concept,
        "target": target,
        "generator": {"type": "Software", "name": PROJECT_NAME, "version": row.model_version},
        "created": _created(row.classified_at),
        "confidence": round(row.confidence, CONFIDENCE_DIGITS),
    }


def europeana_annotation(row: LabelRow) -> dict[str, Any]:
    """The Europeana profile: a semantic tag as Europeana's own request examples write it."""
    return {
        "type": "Annotation",
        "motivation": "tagging",
        "body": row.concept,
        "target": row.item_uri,
        "generator": {"type": "Software", "name": f"{PROJECT_NAME} {row.model_version}"},
        "created": _created(row.classified_at),
    }


def w3c_problems(annotation: dict[str, Any]) -> list[str]:
    """Why a consumer would reject this W3C annotation; empty when it would not."""
    problems = []
    if not _ABSOLUTE_IRI.fullmatch(annotation["body"]):
        problems.append(f"body {annotation['body']!r} is not an absolute IRI")
    target = annotation["target"]
    for name, value in target.items() if isinstance(target, dict) else [("target", target)]:
        if not _ABSOLUTE_IRI.fullmatch(value):
            problems.append(f"{name} {value!r} is not an absolute IRI")
    if not 0.0 <= annotation["confidence"] <= 1.0:
        problems.append(f"confidence {annotation['confidence']} is outside [0, 1]")
    return problems


def europeana_problems(annotation: dict[str, Any]) -> list[str]:
    """Why Europeana would reject this item, and with it the whole page it is in."""
    problems = []
    if not _HTTP_IRI.fullmatch(annotation["body"]):
        problems.append(f"body {annotation['body']!r} is not an http(s) URI")
    target = annotation["target"]
    if not (target.startswith(EUROPEANA_ITEM_PREFIX) and _HTTP_IRI.fullmatch(target)):
        problems.append(f"target {target!r} is not a Europeana item URI")
    return problems


@dataclass(frozen=True)
class Profile:
    """How to write one label for one kind of consumer, and how to check the result."""

    name: str
    build: Callable[[LabelRow], dict[str, Any]]
    problems: Callable[[dict[str, Any]], list[str]]
    context: str | list[Any]


PROFILES = {
    "w3c": Profile("w3c", w3c_annotation, w3c_problems, W3C_CONTEXT),
    "europeana": Profile("europeana", europeana_annotation, europeana_problems, ANNO_CONTEXT),
}


@dataclass
class CheckedAnnotations:
    """Annotations built from label rows, each checked before anything writes it.

    An annotation a consumer would reject is skipped and counted, with its
    reason, rather than written: in a Europeana batch one bad item fails the
    whole page. The first annotation of each model version is also expanded
    and compacted with the bundled contexts: a key the contexts do not define
    (which JSON-LD would drop without a word) stops the export.
    """

    profile: Profile
    written: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    _expanded_versions: set[str] = field(default_factory=set)

    def build(self, rows: Iterable[LabelRow]) -> Iterator[dict[str, Any]]:
        for row in rows:
            annotation = self.profile.build(row)
            problems = self.profile.problems(annotation)
            if problems:
                self.skipped += 1
                if len(self.problems) < PROBLEMS_KEPT:
                    self.problems.append(
                        f"{row.record_id} ({row.label_key}): {'; '.join(problems)}"
                    )
                continue
            if row.model_version not in self._expanded_versions:
                self._check_round_trip(annotation)
                self._expanded_versions.add(row.model_version)
            self.written += 1
            yield annotation

    def _check_round_trip(self, annotation: dict[str, Any]) -> None:
        document = {"@context": self.profile.context, **annotation}
        if not round_trips(document):
            raise EnrichError(
                f"the {self.profile.name} profile writes annotations that do not survive "
                f"JSON-LD expansion with their context: {document}"
            )
