"""A client for Europeana's Annotations API: the few calls publishing needs, politely.

The calls are the ones of Europeana's `annotation-web` controllers: `POST
{base}/` creates one annotation (duplicates refused), `POST {base}s/` takes an
`AnnotationPage` (all items validated first, one bad item rejects the page, no
duplicate check), `PUT {base}/{n}` updates, `DELETE {base}/{n}` withdraws (a
soft delete), `GET {base}/{n}` and `GET {base}/search` read. `base` is
`EUROPEANA_ANNOTATION_API_URL`, `https://api.europeana.eu/annotation` in
production, so the page endpoint is its sibling `.../annotations/`.

Retries are urllib3's `Retry` on the requests adapter rather than tenacity:
urllib3 is already a dependency, its `Retry` honours `Retry-After`, backs off
exponentially, and, above all, decides per HTTP method and per failure kind
(connection refused before sending vs. answer lost after sending), which is
exactly the line between a request that may be repeated and one that may not.
Two sessions carry two policies:

- *safe* requests (reads, PUT, DELETE and the duplicate-checked single create)
  are retried on connection and read errors, 5xx, 429 and the write lock (423,
  Europeana's `error.annotation_write_lock`);
- *page creates* are retried only when the server surely did nothing: a
  connection that never opened, 423, 429 or 503. Any other failure leaves the
  page's outcome unknown (`Unsettled`), and the caller resolves it through the
  search endpoint instead of posting the page again, which would duplicate it.

401 and 403 raise `AuthError` with the server's message, and nothing retries
them. The token is sent in the Authorization header only: no message of this
module, and no exception it raises, contains it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from enrichment import PROJECT_NAME, __version__
from enrichment.errors import EnrichError

RETRIES = 6
BACKOFF = 0.5
BACKOFF_MAX = 30.0
TIMEOUT = (10.0, 120.0)
SEARCH_PAGE_SIZE = 100
MESSAGE_CHARS = 400
_DUPLICATE = re.compile(r"Found duplicate annotations with the ids:\s*\[?([^\]]*)\]?")


class AnnotationsAPIError(EnrichError):
    """The Annotations API answered with an error the publish cannot get past."""


class AuthError(AnnotationsAPIError):
    """401 or 403: the token is missing, invalid or lacks write access. Nothing is retried."""


class Rejected(Exception):
    """The server refused the content (400, or 404 for an update of an unknown id)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Duplicate(Rejected):
    """A single create refused because the same annotation exists: its ids are given."""

    def __init__(self, status: int, message: str, ids: list[str]) -> None:
        super().__init__(status, message)
        self.ids = ids


class Unsettled(Exception):
    """The request may or may not have been carried out: the answer never came."""


@dataclass(frozen=True)
class Stored:
    """An annotation as the server holds it: its id and its creator (the owner)."""

    id: str
    owner: str | None

    @classmethod
    def of(cls, annotation: dict[str, Any]) -> Stored:
        return cls(str(annotation["id"]), agent_id(annotation.get("creator")))


def agent_id(agent: Any) -> str | None:
    """An agent's id, whether the server wrote it as a string or as an object."""
    if isinstance(agent, dict):
        value = agent.get("id")
        return str(value) if value is not None else None
    return str(agent) if agent is not None else None


SAFE_STATUSES = frozenset({423, 429, 500, 502, 503, 504})
# Only what the server surely did not carry out: a lock, a throttle, unavailable.
PAGE_STATUSES = frozenset({423, 429, 503})


def retry_policy(page: bool, backoff: float = BACKOFF) -> Retry:
    """Retries of safe requests, or (`page`) of page creates, which may not be repeated blind."""
    return Retry(
        total=RETRIES,
        connect=RETRIES,
        read=0 if page else RETRIES,
        status=RETRIES,
        other=0,
        allowed_methods=frozenset({"POST"} if page else {"GET", "PUT", "DELETE", "POST"}),
        status_forcelist=PAGE_STATUSES if page else SAFE_STATUSES,
        backoff_factor=backoff,
        backoff_max=BACKOFF_MAX,
        backoff_jitter=backoff,
        respect_retry_after_header=True,
        raise_on_status=False,
    )


class AnnotationsAPI:
    """Calls to one Annotations API with one account's token; safe to share between threads.

    `concurrency` sizes the connection pools: the caller never runs more
    requests at once than that. `backoff` is the first pause between retries,
    doubled on each (a `Retry-After` from the server wins).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        api_key: str | None = None,
        concurrency: int = 4,
        backoff: float = BACKOFF,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._safe = self._session(token, retry_policy(False, backoff), concurrency)
        self._pages = self._session(token, retry_policy(True, backoff), concurrency)

    @staticmethod
    def _session(token: str, retry: Retry, concurrency: int) -> requests.Session:
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_connections=2, pool_maxsize=concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update(
            {
                "Authorization": f"Bearer {token}",
                "Accept": "application/ld+json, application/json",
                "Content-Type": "application/ld+json",
                "User-Agent": f"{PROJECT_NAME}/{__version__}",
            }
        )
        return session

    def close(self) -> None:
        self._safe.close()
        self._pages.close()

    def number(self, annotation_id: str) -> str:
        """The numeric tail of `http://data.europeana.eu/annotation/{n}`, for the URL."""
        tail = annotation_id.rstrip("/").rsplit("/", 1)[-1]
        if not tail.isdigit():
            raise AnnotationsAPIError(f"{annotation_id!r} is not a Europeana annotation id")
        return tail

    def create_page(self, items: list[dict[str, Any]]) -> list[Stored]:
        """POST an AnnotationPage of new annotations; the stored ones come back in order.

        Raises `Rejected` when the page is refused (one bad item refuses it all,
        and then nothing was stored) and `Unsettled` when the outcome is unknown.
        """
        page = {"@context": "http://www.w3.org/ns/anno.jsonld", "type": "AnnotationPage"}
        response = self._send(
            self._pages, "POST", self.base_url + "s/", {**page, "items": items}, unsettled=True
        )
        stored = [Stored.of(item) for item in response.get("items", [])]
        if len(stored) != len(items):
            raise Unsettled(f"the page of {len(items)} came back with {len(stored)} items")
        return stored

    def update_page(self, items: list[tuple[str, dict[str, Any]]]) -> list[Stored]:
        """POST an AnnotationPage of updates, (id, content) each; idempotent, so retried.

        Raises `Rejected` when the page is refused (an item invalid, or 404 for an
        id the server does not know) and then nothing was changed.
        """
        page = {"@context": "http://www.w3.org/ns/anno.jsonld", "type": "AnnotationPage"}
        updates = [{"id": annotation_id, **content} for annotation_id, content in items]
        response = self._send(self._safe, "POST", self.base_url + "s/", {**page, "items": updates})
        stored = [Stored.of(item) for item in response.get("items", [])]
        if len(stored) != len(items):
            raise Unsettled(f"the page of {len(items)} came back with {len(stored)} items")
        return stored

    def create(self, annotation: dict[str, Any]) -> Stored:
        """POST one annotation; `Duplicate` names the ids of the same annotation if it exists."""
        return Stored.of(self._send(self._safe, "POST", self.base_url + "/", annotation))

    def update(self, annotation_id: str, annotation: dict[str, Any]) -> Stored:
        url = f"{self.base_url}/{self.number(annotation_id)}"
        return Stored.of(self._send(self._safe, "PUT", url, annotation))

    def withdraw(self, annotation_id: str) -> None:
        """DELETE (a soft delete); an annotation already gone counts as withdrawn."""
        url = f"{self.base_url}/{self.number(annotation_id)}"
        try:
            self._send(self._safe, "DELETE", url, None)
        except Rejected as error:
            if error.status not in (404, 410):
                raise

    def get(self, annotation_id: str) -> dict[str, Any]:
        url = f"{self.base_url}/{self.number(annotation_id)}"
        return self._send(self._safe, "GET", url, None, params=self._key())

    def search_record(self, record_id: str) -> Iterator[dict[str, Any]]:
        """Every annotation whose target is the record, page by page."""
        page = 0
        while True:
            params = {
                **self._key(),
                "query": f'target_record_id:"{record_id}"',
                "profile": "standard",
                "pageSize": str(SEARCH_PAGE_SIZE),
                "page": str(page),
            }
            response = self._send(self._safe, "GET", self.base_url + "/search", None, params)
            items = response.get("items") or []
            yield from (item for item in items if isinstance(item, dict))
            if not response.get("next") or len(items) < SEARCH_PAGE_SIZE:
                return
            page += 1

    def _key(self) -> dict[str, str]:
        return {"wskey": self.api_key} if self.api_key else {}

    def _send(
        self,
        session: requests.Session,
        method: str,
        url: str,
        body: dict[str, Any] | None,
        params: dict[str, str] | None = None,
        unsettled: bool = False,
    ) -> dict[str, Any]:
        """One call, retried by the session's policy; errors become this module's exceptions.

        `unsettled`: a failure after the request may have been sent is `Unsettled`
        (the caller must not simply repeat it); otherwise it is an API error.
        """
        data = json.dumps(body).encode() if body is not None else None
        where = f"{method} {url}"
        try:
            response = session.request(method, url, data=data, params=params, timeout=TIMEOUT)
        except requests.exceptions.ConnectionError as error:
            if unsettled and not _never_sent(error):
                raise Unsettled(f"{where}: {type(error).__name__}") from None
            raise AnnotationsAPIError(
                f"{where}: cannot reach the server ({_reason(error)})"
            ) from None
        except requests.exceptions.RequestException as error:
            if unsettled:
                raise Unsettled(f"{where}: {type(error).__name__}") from None
            raise AnnotationsAPIError(f"{where}: {_reason(error)}") from None
        if response.status_code in (200, 201):
            try:
                document = response.json()
            except ValueError:
                # Carried out, but what was stored (its id) cannot be read.
                kind = Unsettled if unsettled else AnnotationsAPIError
                raise kind(f"{where}: {response.status_code} without a JSON body") from None
            return document if isinstance(document, dict) else {}
        if response.status_code == 204:
            return {}
        message = error_message(response)
        if response.status_code in (401, 403):
            raise AuthError(
                f"the Annotations API refused the token ({response.status_code}): {message}"
            )
        if response.status_code in (400, 404, 409, 410, 422):
            duplicate = _DUPLICATE.search(message)
            if duplicate and method == "POST":
                ids = [part.strip() for part in duplicate.group(1).split(",") if part.strip()]
                raise Duplicate(response.status_code, message, ids)
            raise Rejected(response.status_code, message)
        if unsettled and response.status_code not in PAGE_STATUSES:
            raise Unsettled(f"{where}: {response.status_code} {message}")
        raise AnnotationsAPIError(
            f"{where}: {response.status_code} after {RETRIES} retries: {message}"
        )


def _never_sent(error: requests.exceptions.ConnectionError) -> bool:
    """The connection failed before any byte of the request left: repeating it is safe."""
    return isinstance(error, requests.exceptions.ConnectTimeout) or "NewConnectionError" in repr(
        error.args
    )


def _reason(error: requests.exceptions.RequestException) -> str:
    """The cause in a word (urllib3's reason, such as NewConnectionError), never a header."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return type(reason or error).__name__


def error_message(response: requests.Response) -> str:
    """The server's own words: `error` of `{"success": false, "error": ...}`, with its report."""
    try:
        document = response.json()
    except ValueError:
        return (response.text or response.reason or "").strip()[:MESSAGE_CHARS]
    if not isinstance(document, dict):
        return str(document)[:MESSAGE_CHARS]
    message = str(document.get("error") or document.get("message") or response.reason or "")
    report = document.get("operationReport")
    if report:
        message += " " + json.dumps(report, sort_keys=True)
    return message[:MESSAGE_CHARS]
