"""A local Europeana Search API for the demo, the tests and the benchmarks.

It serves Europeana-format items the way `/record/v2/search.json` does: `rows`
capped at 100, an opaque `nextCursor` until the last page, a `wskey` check
with Europeana's own 401 body, `{"success": false, ...}` errors, the dataset
query and the `TYPE` and `timestamp_update` filters the scheduler sends, the
field filters a harvest sends (`skos_concept:"<uri>"`, `what:`, `DATA_PROVIDER:`,
`COUNTRY:`), `reusability` (open, restricted, permission, comma-separated, from
each item's `rights`) and `media`, and (for tests) failures scripted by
request number.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

KEY = "test-key"
UNKNOWN_KEY = {
    "apikey": "APIKEY",
    "success": False,
    "error": "API key doesn't exist",
    "code": "401-AX",
}


# Europeana's reusability groups, by the start of a rights statement URI.
OPEN_RIGHTS = (
    "http://creativecommons.org/publicdomain/mark/",
    "http://creativecommons.org/publicdomain/zero/",
    "http://creativecommons.org/licenses/by/",
    "http://creativecommons.org/licenses/by-sa/",
)
RESTRICTED_RIGHTS = (
    "http://creativecommons.org/licenses/by-nc",
    "http://creativecommons.org/licenses/by-nd/",
    "http://rightsstatements.org/vocab/NoC-NC/",
    "http://rightsstatements.org/vocab/NoC-OKLR/",
)
# Search API fields a harvest filters on, and the item field each one reads (`what`
# searches subjects and types in Europeana; here a list of concept URIs of its own).
FIELDS = {
    "skos_concept": "edmConcept",
    "what": "what",
    "DATA_PROVIDER": "dataProvider",
    "COUNTRY": "country",
}


def generated_item(
    dataset: str,
    index: int,
    image_url: str,
    updated: str = "2024-01-01T00:00:00.000Z",
    concepts: tuple[str, ...] = (),
    rights: str = "http://creativecommons.org/publicdomain/zero/1.0/",
) -> dict[str, Any]:
    return {
        "id": f"/{dataset}/item_{index:05d}",
        "type": "IMAGE",
        "title": [f"Object {index} of dataset {dataset}"],
        "edmPreview": [image_url],
        "edmIsShownBy": [image_url + "?full"],
        "edmConcept": list(concepts),
        "rights": [rights],
        "dataProvider": [f"Provider of {dataset}"],
        "provider": ["Test aggregator"],
        "country": ["Europe"],
        "edmDatasetName": [f"{dataset}_Test_dataset"],
        "timestamp_update": updated,
    }


def reusability(rights: str) -> str:
    if rights.startswith(OPEN_RIGHTS):
        return "open"
    if rights.startswith(RESTRICTED_RIGHTS):
        return "restricted"
    return "permission"


@dataclass
class SearchAPI:
    items: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[int, tuple] = field(default_factory=dict)  # by request number, from 1
    requests: list[dict[str, list[str]]] = field(default_factory=list)
    key: str = KEY
    loop: bool = False  # every nextCursor points back at the page just served
    trickle: float = 0.0  # seconds between the bytes of each answer (tests: a stalling API)

    def __post_init__(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                params = parse_qs(parts.query, keep_blank_values=True)
                api.requests.append(params)
                status, headers, body = api.answer(parts.path, params)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not api.trickle:
                    self.wfile.write(body)
                    return
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(api.trickle)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, params: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        if path != "/record/v2/search.json":
            return 404, {}, b"not found"
        failure = self.failures.get(len(self.requests))
        if failure:
            kind, *arguments = failure
            if kind == "status":
                status, retry_after = arguments
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
                return status, headers, b'{"success": false, "error": "busy"}'
            if kind == "html":
                return (
                    200,
                    {"Content-Type": "text/html"},
                    b"<html><body>Gateway hiccup</body></html>",
                )
            if kind == "truncated":
                return (
                    200,
                    {"Content-Type": "application/json"},
                    b'{"success": true, "items": [{"id": "/1/',
                )
            if kind == "not_objects":
                return (
                    200,
                    {"Content-Type": "application/json"},
                    b'{"success": true, "items": ["/1/a"]}',
                )
        if params.get("wskey", [""])[0] != self.key:
            body = {**UNKNOWN_KEY, "apikey": params.get("wskey", [""])[0]}
            return 401, {"Content-Type": "application/json"}, json.dumps(body).encode()
        if "start" in params:
            return 400, {}, json.dumps({"success": False, "error": "use cursor"}).encode()
        try:
            selected = self.select(params["query"][0], params.get("qf", []))
            selected = self.reusable(selected, params)
        except ValueError as error:
            body = {
                "apikey": self.key,
                "success": False,
                "error": "Invalid query parameter",
                "message": str(error),
                "code": "400-SQ",
            }
            return 400, {"Content-Type": "application/json"}, json.dumps(body).encode()
        rows = min(int(params.get("rows", ["12"])[0]), 100)
        cursor = params.get("cursor", ["*"])[0]
        start = 0 if cursor == "*" else int(base64.urlsafe_b64decode(cursor.encode()).decode())
        page = selected[start : start + rows]
        document: dict[str, Any] = {
            "apikey": self.key,
            "success": True,
            "requestNumber": len(self.requests),
            "itemsCount": len(page),
            "totalResults": len(selected),
            "items": page,
        }
        if start + rows < len(selected):
            document["nextCursor"] = base64.urlsafe_b64encode(str(start + rows).encode()).decode()
        if self.loop:  # a broken server: the next page is always this one again
            document["nextCursor"] = base64.urlsafe_b64encode(str(start).encode()).decode()
        return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()

    def select(self, query: str, filters: list[str]) -> list[dict[str, Any]]:
        chosen = sorted(self.items, key=lambda item: item["id"])
        dataset = re.fullmatch(r"edm_datasetName:(\w+?)_\*", query)
        if dataset:
            chosen = [item for item in chosen if item["id"].split("/")[1] == dataset.group(1)]
        elif query not in ("*", "*:*"):
            raise ValueError(f"this test server does not understand {query!r}")
        for value in filters:
            since = re.fullmatch(r"timestamp_update:\[(\S+) TO \*\]", value)
            if value == "TYPE:IMAGE":
                chosen = [item for item in chosen if item.get("type") == "IMAGE"]
            elif since:
                chosen = [
                    item for item in chosen if item.get("timestamp_update", "") >= since.group(1)
                ]
            elif field_filter := re.fullmatch(r'(\w+):"?([^"]+)"?', value):
                name, wanted = field_filter.groups()
                if name not in FIELDS:
                    raise ValueError(f"this test server does not understand qf {value!r}")
                chosen = [item for item in chosen if wanted in item.get(FIELDS[name], [])]
            else:
                raise ValueError(f"this test server does not understand qf {value!r}")
        return chosen

    def reusable(
        self, chosen: list[dict[str, Any]], params: dict[str, list[str]]
    ) -> list[dict[str, Any]]:
        """The `reusability` and `media` parameters, as Europeana applies them."""
        groups = {g for value in params.get("reusability", []) for g in value.split(",") if g}
        if groups - {"open", "restricted", "permission"}:
            raise ValueError(f"unknown reusability {sorted(groups)}")
        if groups:
            chosen = [item for item in chosen if reusability(item["rights"][0]) in groups]
        if params.get("media", [""])[0] == "true":
            chosen = [item for item in chosen if item.get("edmIsShownBy")]
        return chosen
