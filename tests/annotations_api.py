"""A local stand-in for Europeana's Annotations API, a real HTTP server (no tests here).

It does what Europeana's `annotation-web` controllers do, as far as publishing
meets it: Bearer tokens mapped to accounts (401 for an unknown one); the server
sets `creator` and `generator` and assigns ids `http://data.europeana.eu/annotation/{n}`;
`POST /annotation/` creates one (an `id` refused, duplicates of the same
motivation, target and body refused with "Found duplicate annotations with
the ids: [...]", whoever created them); `POST /annotations/` validates every
item of a page first and rejects the whole page for one bad item (400 with
an `operationReport`), updates the items with an `id` (404 if unknown) and
inserts the others without a duplicate check, answering 201 with the items in
input order; `PUT` and `DELETE /annotation/{n}` for the owner only (403
otherwise), DELETE a soft delete (410 afterwards); `GET /annotation/search`
by `target_record_id`. Faults on demand: a write lock (423, Europeana's
message, `Retry-After`) every `lock_every`-th write, an answer lost (the write
carried out, then 502) every `lose_answer_every`-th, and `hold_after`,
which applies the n-th write and then keeps its answer back until `release()`,
so a test can kill a client whose request the server already carried out
(`hold_path`: the same for every write to that path, `/annotation/` the single
create).

Hostile modes, for a client that must survive a server that answers badly:
`answer_id` rewrites the id of every annotation a write answers with (what
was stored keeps its real id, which the search shows); `page_items` rewrites
the items of a page's answer; `empty_duplicates` names no id in a duplicate
message; `endless_search` answers every search page full and with a `next`;
`trickle` sends every answer's body one byte per that many seconds;
`redirect_to` answers every request with a 307 there, repeating the request's
path and query as an http-to-https redirect does; `message_suffix` is appended
to every error message (terminal escapes, say); `success_body` sends, for a
success to (method, path, request body), other bytes than its document (none, a
proxy's HTML page) where it returns some; `endless` answers every success with a body that
never ends.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.services import free_port

ID_BASE = "http://data.europeana.eu/annotation/"
ITEM_BASE = "http://data.europeana.eu/item"
USER_BASE = "http://data.europeana.eu/user/"
LOCK_MESSAGE = (
    "Unable to fulfill request because another indexing job is running or an API write "
    "lock is effective: write"
)
_HTTP_URI = re.compile(r"https?://[^\s<>\"{}|\\^`]+")


@dataclass
class AnnotationsServer:
    """The stand-in: `tokens` maps a Bearer token to its account name."""

    tokens: dict[str, str] = field(default_factory=lambda: {"good-token": "publisher"})
    lock_every: int = 0
    retry_after: str = "0"
    # Every n-th write is carried out and then answered 502, as if a gateway lost the answer.
    lose_answer_every: int = 0
    hold_after: int | None = None
    hold_path: str | None = None
    # Targets the server refuses though they look valid locally (its own validation).
    refuse_targets: set[str] = field(default_factory=set)
    annotations: dict[int, dict[str, Any]] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)  # each search's query, as answered
    held: int = 0
    # Hostile modes (see the module's docstring).
    answer_id: Callable[[str], Any] | None = None
    page_items: Callable[[list[Any]], Any] | None = None
    empty_duplicates: bool = False
    endless_search: bool = False
    trickle: float = 0.0
    redirect_to: str | None = None
    message_suffix: str = ""
    success_body: Callable[[str, str, Any], bytes | None] | None = None
    endless: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._next_id = 1
        self._writes = 0
        self._applied = 0
        self._release = threading.Event()
        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The value of EUROPEANA_ANNOTATION_API_URL for this server."""
        return f"http://127.0.0.1:{self.port}/annotation"

    def close(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def release(self) -> None:
        """Let held answers go, and hold no more."""
        self.hold_after = self.hold_path = None
        self._release.set()

    def active(self) -> list[dict[str, Any]]:
        """The annotations not withdrawn."""
        with self._lock:
            return [dict(a) for n, a in sorted(self.annotations.items()) if n not in self.deleted]

    def writes(self) -> list[tuple[str, str, int]]:
        return [r for r in self.requests if r[0] in ("POST", "PUT", "DELETE")]

    def add(self, annotation: dict[str, Any], account: str) -> str:
        """Store an annotation as `account` had created it (for owner and duplicate tests)."""
        with self._lock:
            return self._store(dict(annotation), account)["id"]

    # -- behaviour, under the lock -------------------------------------------------------

    def _store(self, annotation: dict[str, Any], account: str) -> dict[str, Any]:
        number = self._next_id
        self._next_id += 1
        annotation["id"] = f"{ID_BASE}{number}"
        annotation["creator"] = {"id": USER_BASE + account, "type": "Person"}
        annotation["generator"] = {
            "id": "http://data.europeana.eu/client/enrich",
            "type": "Software",
        }
        self.annotations[number] = annotation
        return annotation

    def _problems(self, annotation: Any) -> str | None:
        if not isinstance(annotation, dict):
            return "Cannot parse body to annotation!"
        if annotation.get("motivation") != "tagging":
            return "Invalid value for property motivation. Expected value: tagging"
        body, target = annotation.get("body"), annotation.get("target")
        if not isinstance(body, str) or not _HTTP_URI.fullmatch(body):
            return "Invalid tag format The internal id must be an URL! body"
        if not isinstance(target, str) or not target.startswith(ITEM_BASE + "/"):
            return f"Invalid annotation target base url, which should contain: {ITEM_BASE}."
        if target in self.refuse_targets:
            return f"An error occurred during annotation validation! target {target}"
        return None

    def _duplicates(self, annotation: dict[str, Any], itself: int | None = None) -> list[str]:
        return [
            stored["id"]
            for number, stored in self.annotations.items()
            if number not in self.deleted
            and number != itself
            and all(stored.get(k) == annotation.get(k) for k in ("motivation", "target", "body"))
        ]

    def _number(self, path: str) -> int | None:
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        return int(tail) if tail.isdigit() else None

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, token: str | None
    ):
        """(status, document, headers) for one request; writes counted and faults injected."""
        if self.redirect_to is not None:
            repeated = f"?{urlencode(query, doseq=True)}" if query else ""
            return 307, None, {"Location": self.redirect_to + path + repeated}
        status, document, headers = self._answer(method, path, query, body, token)
        if isinstance(document, dict) and "error" in document:
            document = {**document, "error": document["error"] + self.message_suffix}
        if status < 300 and method in ("POST", "PUT") and isinstance(document, dict):
            document = self._hostile(path, document)
        return status, document, headers

    def _hostile(self, path: str, document: dict[str, Any]) -> dict[str, Any]:
        """A write's answer as a hostile mode rewrites it."""
        if path == "/annotations/":
            items = [
                {**item, "id": self.answer_id(item["id"])} if self.answer_id else item
                for item in document["items"]
            ]
            return {**document, "items": self.page_items(items) if self.page_items else items}
        if self.answer_id is not None:
            return {**document, "id": self.answer_id(document["id"])}
        return document

    def _answer(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, token: str | None
    ):
        if method == "GET" and path == "/annotation/search":
            return self._search(query)
        account = self.tokens.get(token or "")
        write = method in ("POST", "PUT", "DELETE")
        if write and account is None:
            message = "The provided authentication token is invalid! " + (
                "Invalid token" if token else "No token"
            )
            return 401, {"success": False, "error": message}, {}
        with self._lock:
            if write:
                self._writes += 1
                if self.lock_every and self._writes % self.lock_every == 0:
                    headers = {"Retry-After": self.retry_after}
                    return 423, {"success": False, "error": LOCK_MESSAGE}, headers
            answer = self._apply(method, path, body, account or "")
            if write and self.lose_answer_every and self._writes % self.lose_answer_every == 0:
                return 502, {"success": False, "error": "Bad Gateway"}, {}
            if write and answer[0] < 300:
                self._applied += 1
                hold = path == self.hold_path or (
                    self.hold_after is not None and self._applied > self.hold_after
                )
            else:
                hold = False
        if hold:
            with self._lock:
                self.held += 1
            self._release.wait(60)
        return answer

    def _apply(self, method: str, path: str, body: Any, account: str):
        if method == "POST" and path == "/annotation/":
            if isinstance(body, dict) and "id" in body:
                return 400, _error("Identifier must not be set when creating a new Annotation!"), {}
            problem = self._problems(body)
            if problem:
                return 400, _error(problem), {}
            duplicates = self._duplicates(body)
            if duplicates:
                named = "" if self.empty_duplicates else ",".join(duplicates)
                message = f"Found duplicate annotations with the ids: [{named}]"
                return 400, _error(message), {}
            return 201, self._store(dict(body), account), {}
        if method == "POST" and path == "/annotations/":
            return self._page(body, account)
        number = self._number(path)
        if number is None or number not in self.annotations:
            return 404, _error(f"No annotation found with the given identifier! {path}"), {}
        stored = self.annotations[number]
        if method == "GET":
            if number in self.deleted:
                return (
                    410,
                    _error(
                        "The user is not allowed to access the annotation in the current state!"
                    ),
                    {},
                )
            return 200, dict(stored), {}
        if number in self.deleted:
            return (
                410,
                _error("The user is not allowed to access the annotation in the current state!"),
                {},
            )
        if stored["creator"]["id"] != USER_BASE + account:
            return 403, _error("The user is not authorized to perform the given action! owner"), {}
        if method == "DELETE":
            self.deleted.add(number)
            return 204, None, {}
        problem = self._problems(body)
        if problem:
            return 400, _error(problem), {}
        duplicates = self._duplicates(body, itself=number)
        if duplicates:
            return (
                400,
                _error(f"Found duplicate annotations with the ids: [{','.join(duplicates)}]"),
                {},
            )
        updated = {
            **body,
            "id": stored["id"],
            "creator": stored["creator"],
            "generator": stored["generator"],
        }
        self.annotations[number] = updated
        return 200, dict(updated), {}

    def _page(self, page: Any, account: str):
        items = page.get("items") if isinstance(page, dict) else None
        if not isinstance(items, list):
            return 400, _error("Cannot parse body to annotation page!"), {}
        errors = {}
        for position, item in enumerate(items):
            problem = self._problems(item)
            if problem:
                errors[str(position)] = problem
        if errors:
            report = {"failureCount": len(errors), "errors": errors}
            return (
                400,
                {"success": False, "error": "Batch upload failed!", "operationReport": report},
                {},
            )
        with_id = [self._number(str(item["id"])) for item in items if "id" in item]
        missing = [
            n for n in with_id if n is None or n not in self.annotations or n in self.deleted
        ]
        if missing:
            return (
                404,
                _error(f"An annotation with the given identifier is not yet existing! {missing}"),
                {},
            )
        stored = []
        for item in items:
            if "id" in item:
                number = self._number(str(item["id"]))
                assert number is not None
                old = self.annotations[number]
                self.annotations[number] = {
                    **item,
                    "creator": old["creator"],
                    "generator": old["generator"],
                }
                stored.append(dict(self.annotations[number]))
            else:
                stored.append(dict(self._store(dict(item), account)))
        return 201, {"type": "AnnotationPage", "total": len(stored), "items": stored}, {}

    def _search(self, query: dict[str, list[str]]):
        text = (query.get("query") or [""])[0]
        match = re.fullmatch(r'target_record_id:"([^"]+)"', text.strip())
        if match is None:
            return 400, _error(f"Malformed solr query: {text}"), {}
        target = ITEM_BASE + match.group(1)
        page = int((query.get("page") or ["0"])[0])
        size = int((query.get("pageSize") or ["10"])[0])
        with self._lock:
            found = [
                dict(a)
                for n, a in sorted(self.annotations.items())
                if n not in self.deleted and a.get("target") == target
            ]
        items = found[page * size : (page + 1) * size]
        if self.endless_search:
            filler = {"id": "http://data.europeana.eu/annotation/0", "motivation": "tagging"}
            items = (items + [filler] * size)[:size]
            return 200, {"type": "AnnotationPage", "items": items, "next": "more"}, {}
        document: dict[str, Any] = {
            "type": "AnnotationPage",
            "total": len(items),
            "partOf": {"total": len(found)},
            "items": items,
        }
        if (page + 1) * size < len(found):
            document["next"] = f"search?page={page + 1}"
        return 200, document, {}


def _error(message: str) -> dict[str, Any]:
    return {"success": False, "error": message}


def _handler(server: AnnotationsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the tests read `server.requests` instead."""

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            authorization = self.headers.get("Authorization") or ""
            token = (
                authorization.removeprefix("Bearer ")
                if authorization.startswith("Bearer ")
                else None
            )
            status, document, headers = server.handle(
                self.command, parts.path, parse_qs(parts.query), body, token
            )
            server.requests.append((self.command, parts.path, status))
            server.searched.extend(parse_qs(parts.query).get("query", []))
            payload = json.dumps(document).encode() if document is not None else b""
            success = 200 <= status < 300
            other = (
                server.success_body(self.command, parts.path, body) if server.success_body else None
            )
            if success and other is not None:
                payload = other
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if success and server.endless:
                self._endless()
                return
            if payload:
                content_type = "application/ld+json" if other is None else "text/html"
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not server.trickle:
                self.wfile.write(payload)
                return
            try:
                for byte in payload:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(server.trickle)
            except OSError:  # the client gave up: what a trickle is for
                self.close_connection = True

        def _endless(self) -> None:
            """A JSON document that never ends, sent as fast as the client reads it."""
            self.send_header("Content-Type", "application/ld+json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b" " * (1 << 20)
            try:
                self.wfile.write(b"1\r\n{\r\n")
                while True:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the client stopped reading
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return Handler
