"""A client for Europeana's Annotations API: the few calls publishing needs, politely.

The calls are the ones of Europeana's `annotation-web` controllers: `POST
{base}/` creates one annotation (duplicates refused), `POST {base}s/` takes an
`AnnotationPage` (all items validated first, one bad item rejects the page, no
duplicate check), `PUT {base}/{n}` updates, `DELETE {base}/{n}` withdraws (a
soft delete), `GET {base}/{n}` and `GET {base}/search` read. `base` is
`EUROPEANA_ANNOTATION_API_URL`, `https://api.europeana.eu/annotation` in
production, so the page endpoint is its sibling `.../annotations/`.

Retries are urllib3's, two policies of them (`publish.retries`): safe requests
are retried on any failure, a page of creates only where the server surely did
nothing; any other failure of a page leaves its outcome unknown (`Unsettled`).

401 and 403 raise `AuthError` with the server's message, and nothing retries
them. Redirects are not followed: a write sent on to another URL is not what
was asked, so a 3xx is an error that names where it pointed.

Nothing the server answers is recorded before it is checked: an id must be
`.../annotation/<n>` (Europeana's, or this API's own form), a page's items a
list of objects, one per item sent. An answer that cannot be used is
`Unusable` for its item; a search that pages on without end stops after
`SEARCH_PAGES`; every call, its retries included, ends by `DEADLINE` seconds
however slowly the server trickles its answer (`enrichment.deadline_http`), and no
answer is read past `ANSWER_BYTES`. A success whose document cannot be read
(no JSON, or too long) is what it means for the call: a DELETE is done, a
write's outcome is unknown (a page) or unusable (one annotation), a read fails.
The server's messages are quoted with control characters escaped, so that none of
them can drive the terminal that prints them.

The token is sent in the Authorization header only, and the API key (`wskey`)
in the query of reads: no message of this module, and no exception it raises,
contains either, even where the server repeats them (a redirect's `Location`
keeps the request's query; a message may quote it).
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.util.retry import Retry

from enrichment import PROJECT_NAME, __version__
from enrichment.deadline_http import CallDeadlines, DeadlineAdapter
from enrichment.errors import EnrichError, printable
from enrichment.publish.retries import BACKOFF, PAGE_STATUSES, RETRIES, bounded_retries

TIMEOUT = (10.0, 120.0)
# One call's whole time, retries included: a server trickling its answer is cut off here.
DEADLINE = 300.0
SEARCH_PAGE_SIZE = 100
# A record holds a few annotations per label: a search that pages on past this is broken.
SEARCH_PAGES = 20
EUROPEANA_IDS = "http://data.europeana.eu/annotation"
MESSAGE_CHARS = 400
# No answer is read past this: a page of 100 annotations is a few hundred kilobytes, and a
# server streaming without end would otherwise fill the memory before the deadline.
ANSWER_BYTES = 16 * 1024 * 1024
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


class Unusable(Exception):
    """The server answered for an item, but not with anything that can be recorded.

    The request may have been carried out: a create stays an intent (the
    search finds it, or not), an update stays an update to send again.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Stored:
    """An annotation as the server holds it: its id and its creator (the owner)."""

    id: str
    owner: str | None


def shown(value: Any) -> str:
    """A value the server sent, short and printable, for a message."""
    text = repr(value)
    return printable(text if len(text) <= 80 else text[:77] + "...")


def check_api_url(base_url: str) -> None:
    """Refuse a URL that cannot be the annotation base (its page endpoint is `{url}s/`)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise AnnotationsAPIError(
            f"EUROPEANA_ANNOTATION_API_URL={shown(base_url)} is not an http(s) URL"
        )
    if parts.path.rstrip("/").rsplit("/", 1)[-1] != "annotation" or parts.query:
        raise AnnotationsAPIError(
            f"EUROPEANA_ANNOTATION_API_URL={shown(base_url)} does not look like the Annotations "
            "API: it names the annotation base, whose path ends in /annotation "
            "(such as https://api.europeana.eu/annotation)"
        )


def agent_id(agent: Any) -> str | None:
    """An agent's id, whether the server wrote it as a string or as an object."""
    if isinstance(agent, dict):
        value = agent.get("id")
        return str(value) if value is not None else None
    return str(agent) if agent is not None else None


class AnnotationsAPI:
    """Calls to one Annotations API with one account's token; safe to share between threads.

    `concurrency` sizes the connection pools: the caller never runs more
    requests at once than that. `backoff` is the first pause between retries,
    doubled on each (a `Retry-After` from the server wins). `timeout` is the
    socket's (connect, read) and `deadline` one call's whole time.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        api_key: str | None = None,
        concurrency: int = 4,
        backoff: float = BACKOFF,
        timeout: tuple[float, float] = TIMEOUT,
        deadline: float = DEADLINE,
    ) -> None:
        check_api_url(base_url)
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        # Never shown, whatever the server sends back (`_redacted`).
        self._secrets = [secret for secret in (token, api_key) if secret]
        self.timeout = timeout
        self._deadlines = CallDeadlines(deadline)
        self._closing = threading.Event()
        europeana = re.escape(EUROPEANA_IDS).replace("http", "https?", 1)
        self._ids = re.compile(f"(?:{europeana}|{re.escape(self.base_url)})/[0-9]+")
        retries = {
            page: bounded_retries(page, backoff, self._deadlines, self._closing)
            for page in (False, True)
        }
        self._safe = self._session(token, retries[False], concurrency)
        self._pages = self._session(token, retries[True], concurrency)

    def _session(self, token: str, retry: Retry, concurrency: int) -> requests.Session:
        session = requests.Session()
        adapter = DeadlineAdapter(self._deadlines, retry, concurrency)
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

    @contextmanager
    def aborting(self) -> Iterator[None]:
        """Within it, an exception (a Ctrl-C, a refused token) ends the calls in flight at once
        (`abort`): leaving the caller's thread pool then waits for no answer."""
        try:
            yield
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """End every call now, unanswered, and send nothing more. A write cut off may have
        been carried out: its ledger row stays an intent, which the next publish resolves
        before it writes anything (`publish.unsettled`)."""
        self._closing.set()
        self._deadlines.abort()

    def close(self) -> None:
        """End the waits between tries of calls still running (a Ctrl-C), and the sessions."""
        self._closing.set()
        self._safe.close()
        self._pages.close()
        self._deadlines.close()

    def stored(self, item: Any, expected_id: str | None = None) -> Stored:
        """What the server says it holds, checked; `Unusable` when it cannot be recorded.

        `expected_id`: an update's answer must name the annotation updated.
        """
        if not isinstance(item, dict):
            raise Unusable(f"the server answered {shown(item)} instead of an annotation")
        annotation_id = item.get("id")
        if not isinstance(annotation_id, str) or not self._ids.fullmatch(annotation_id):
            raise Unusable(
                f"the server answered with the id {shown(annotation_id)}, "
                f"not one of {EUROPEANA_IDS}/<n>"
            )
        if expected_id is not None and annotation_id != expected_id:
            raise Unusable(
                f"the server answered the update of {expected_id} "
                f"with the id {shown(annotation_id)}"
            )
        return Stored(annotation_id, agent_id(item.get("creator")))

    def is_annotation_id(self, value: Any) -> bool:
        return isinstance(value, str) and self._ids.fullmatch(value) is not None

    def number(self, annotation_id: str) -> str:
        """The numeric tail of `http://data.europeana.eu/annotation/{n}`, for the URL."""
        tail = annotation_id.rstrip("/").rsplit("/", 1)[-1]
        if not tail.isdigit():
            raise AnnotationsAPIError(f"{annotation_id!r} is not a Europeana annotation id")
        return tail

    def create_page(self, items: list[dict[str, Any]]) -> list[Stored | Unusable]:
        """POST an AnnotationPage of new annotations; what was stored comes back in order.

        Raises `Rejected` when the page is refused (one bad item refuses it all,
        and then nothing was stored) and `Unsettled` when the outcome is unknown.
        An item whose answer cannot be recorded is `Unusable`.
        """
        page = {"@context": "http://www.w3.org/ns/anno.jsonld", "type": "AnnotationPage"}
        url = self.base_url + "s/"
        try:
            response = self._send(
                self._pages, "POST", url, {**page, "items": items}, unsettled=True, unread=Unsettled
            )
        except Rejected as error:
            if error.status == 404:  # only an update names what may not exist
                raise AnnotationsAPIError(self._not_the_api(f"POST {url}", error)) from None
            raise
        return self._page_answer(response, [None] * len(items))

    def update_page(self, items: list[tuple[str, dict[str, Any]]]) -> list[Stored | Unusable]:
        """POST an AnnotationPage of updates, (id, content) each; idempotent, so retried.

        Raises `Rejected` when the page is refused (an item invalid, or 404 for an
        id the server does not know) and then nothing was changed.
        """
        page = {"@context": "http://www.w3.org/ns/anno.jsonld", "type": "AnnotationPage"}
        updates = [{"id": annotation_id, **content} for annotation_id, content in items]
        # A success that cannot be read: sent again item by item (the caller's PUT).
        response = self._send(
            self._safe, "POST", self.base_url + "s/", {**page, "items": updates}, unread=Unsettled
        )
        return self._page_answer(response, [annotation_id for annotation_id, _ in items])

    def _page_answer(
        self, response: dict[str, Any], expected: list[str | None]
    ) -> list[Stored | Unusable]:
        """A page's answer item by item; `Unsettled` when it is not one item per item sent."""
        answered = response.get("items")
        if not isinstance(answered, list) or len(answered) != len(expected):
            count = len(answered) if isinstance(answered, list) else shown(answered)
            raise Unsettled(f"a page of {len(expected)} was answered with items {count}")
        results: list[Stored | Unusable] = []
        for item, expected_id in zip(answered, expected, strict=True):
            try:
                results.append(self.stored(item, expected_id))
            except Unusable as unusable:
                results.append(unusable)
        repeated = Counter(r.id for r in results if isinstance(r, Stored))
        return [
            Unusable(f"the server answered the id {r.id} for {repeated[r.id]} annotations")
            if isinstance(r, Stored) and repeated[r.id] > 1
            else r
            for r in results
        ]

    def create(self, annotation: dict[str, Any]) -> Stored:
        """POST one annotation; `Duplicate` names the ids of the same annotation if it exists."""
        return self.stored(
            self._send(self._safe, "POST", self.base_url + "/", annotation, unread=Unusable)
        )

    def update(self, annotation_id: str, annotation: dict[str, Any]) -> Stored:
        url = f"{self.base_url}/{self.number(annotation_id)}"
        answer = self._send(self._safe, "PUT", url, annotation, unread=Unusable)
        return self.stored(answer, annotation_id)

    def withdraw(self, annotation_id: str) -> None:
        """DELETE (a soft delete); an annotation already gone counts as withdrawn."""
        url = f"{self.base_url}/{self.number(annotation_id)}"
        try:
            self._send(self._safe, "DELETE", url, None, unread=None)  # a success is all it says
        except Rejected as error:
            if error.status not in (404, 410):
                raise AnnotationsAPIError(
                    f"DELETE {url}: refused ({error.status}): {error.message}"
                ) from None

    def get(self, annotation_id: str) -> dict[str, Any]:
        url = f"{self.base_url}/{self.number(annotation_id)}"
        return self._send(self._safe, "GET", url, None, params=self._key())

    def search_record(self, record_id: str) -> Iterator[dict[str, Any]]:
        """Every annotation whose target is the record, page by page, at most `SEARCH_PAGES`.

        Items that are not annotations with a usable id are passed over: they
        cannot be adopted, since nothing could ever be done with their id.
        """
        url = self.base_url + "/search"
        for page in range(SEARCH_PAGES):
            params = {
                **self._key(),
                "query": f'target_record_id:"{record_id}"',
                "profile": "standard",
                "pageSize": str(SEARCH_PAGE_SIZE),
                "page": str(page),
            }
            try:
                response = self._send(self._safe, "GET", url, None, params)
            except Rejected as error:
                raise AnnotationsAPIError(self._not_the_api(f"GET {url}", error)) from None
            items = response.get("items")
            if items is None:
                items = []
            if not isinstance(items, list):
                raise AnnotationsAPIError(
                    f"GET {url}: the search answered items {shown(items)}, not a list"
                )
            yield from (item for item in items if self._usable(item))
            if not response.get("next") or len(items) < SEARCH_PAGE_SIZE:
                return
        raise AnnotationsAPIError(
            f"GET {url}: the search for {record_id} went on past {SEARCH_PAGES} pages of "
            f"{SEARCH_PAGE_SIZE}; a record has far fewer annotations, so the server's paging "
            "is broken"
        )

    def _usable(self, item: Any) -> bool:
        try:
            self.stored(item)
        except Unusable:
            return False
        return True

    def _not_the_api(self, where: str, error: Rejected) -> str:
        return (
            f"{where}: {error.status} {error.message}: EUROPEANA_ANNOTATION_API_URL="
            f"{shown(self.base_url)} does not look like the Annotations API"
        )

    def _key(self) -> dict[str, str]:
        return {"wskey": self.api_key} if self.api_key else {}

    def _redacted(self, text: str) -> str:
        """`text` from the server with the token and the API key blanked out, should it
        repeat them."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _send(
        self,
        session: requests.Session,
        method: str,
        url: str,
        body: dict[str, Any] | None,
        params: dict[str, str] | None = None,
        unsettled: bool = False,
        unread: type[Exception] | None = AnnotationsAPIError,
    ) -> dict[str, Any]:
        """One call, retried by the session's policy; errors become this module's exceptions.

        `unsettled`: a failure after the request may have been sent is `Unsettled`
        (the caller must not simply repeat it); otherwise it is an API error.
        `unread`: raised, with the reason, for a success whose document cannot be read
        (None: such a success is an empty document).
        """
        data = json.dumps(body).encode() if body is not None else None
        where = f"{method} {url}"
        try:
            with self._deadlines.call() as deadline:
                # Checked inside the deadline: `abort` closes first, then expires every
                # deadline entered, so a call is either refused here or cut off.
                if self._closing.is_set():
                    raise AnnotationsAPIError(f"{where}: not sent, the client is closing")
                response = session.request(
                    method,
                    url,
                    data=data,
                    params=params,
                    timeout=self.timeout,
                    allow_redirects=False,
                    stream=True,  # read here, up to `ANSWER_BYTES`
                )
                answer = _read_at_most(response, ANSWER_BYTES + 1)
        except requests.exceptions.RequestException as error:
            late = None
            if self._closing.is_set():
                late = "cut off unanswered, the client is closing"
            elif deadline.expired:
                late = f"no whole answer within {deadline.seconds:g} s"
            raise _failure(where, error, unsettled, late) from None
        return self._answer(where, method, response, answer, unsettled, unread)

    def _answer(
        self,
        where: str,
        method: str,
        response: requests.Response,
        answer: bytes,
        unsettled: bool,
        unread: type[Exception] | None,
    ) -> dict[str, Any]:
        """The answer's document, or this module's exception for what it says."""
        status = response.status_code
        if 300 <= status < 400:
            location = _without_query(response.headers.get("Location") or "nowhere")
            raise AnnotationsAPIError(
                f"{where}: the server redirected ({status}) to {shown(self._redacted(location))}, "
                "and a publish follows no redirect: set EUROPEANA_ANNOTATION_API_URL to the "
                "Annotations API itself; nothing was created by this request"
            )
        if 200 <= status < 300:
            if unread is None or status == 204:
                return {}
            if len(answer) > ANSWER_BYTES:
                raise unread(f"{where}: {status} with an answer longer than {ANSWER_BYTES} bytes")
            try:
                document = json.loads(answer)
            except ValueError:
                # Carried out, but what was stored (its id) cannot be read.
                raise unread(f"{where}: {status} without a JSON body") from None
            return document if isinstance(document, dict) else {}
        message = error_message(response, answer[:ANSWER_BYTES], self._redacted)
        if status in (401, 403):
            raise AuthError(f"the Annotations API refused the token ({status}): {message}")
        if status in (400, 404, 409, 410, 422):
            duplicate = _DUPLICATE.search(message)
            if duplicate and method == "POST":
                ids = [part.strip() for part in duplicate.group(1).split(",") if part.strip()]
                if ids and all(self.is_annotation_id(one) for one in ids):
                    raise Duplicate(status, message, ids)
                message += " (and no usable id of the duplicate was given)"
            raise Rejected(status, message)
        if unsettled and status not in PAGE_STATUSES:
            raise Unsettled(f"{where}: {status} {message}")
        after = response.headers.get("Retry-After")
        # A wait ending past the call's deadline is not begun (`deadline_http.BoundedRetry`).
        asked = f"; it asked for a wait of {shown(after)} s before the next try" if after else ""
        raise AnnotationsAPIError(
            f"{where}: {status} after up to {RETRIES} retries: {message}{asked}"
        )


def _read_at_most(response: requests.Response, limit: int) -> bytes:
    """The answer's body, or its first `limit` bytes where it is longer. Read whole, the
    connection goes back to the pool; cut short, it is closed with the rest unread."""
    chunks: list[bytes] = []
    size = 0
    with response:
        for chunk in response.iter_content(64 * 1024):
            chunks.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    return b"".join(chunks)[:limit]


def _without_query(url: str) -> str:
    """A URL the server named, without what may carry a secret: its query (a redirect's
    `Location` repeats the request's, `wskey` included), user and password."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not even a URL: nothing of it is shown
        return "an address that is not a URL"
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl()


def _failure(
    where: str,
    error: requests.exceptions.RequestException,
    unsettled: bool,
    late: str | None,
) -> Exception:
    """A request that got no answer: `Unsettled` where it may have been carried out.

    `late`: why the answer is missing when the call was cut off (its deadline, a Ctrl-C)."""
    if late:
        message = f"{where}: {late}"
    elif isinstance(error, requests.exceptions.ConnectionError):
        if not unsettled or _never_sent(error):
            return AnnotationsAPIError(f"{where}: cannot reach the server ({_reason(error)})")
        message = f"{where}: {type(error).__name__}"
    else:
        message = f"{where}: {_reason(error) if not unsettled else type(error).__name__}"
    return Unsettled(message) if unsettled else AnnotationsAPIError(message)


def _never_sent(error: requests.exceptions.ConnectionError) -> bool:
    """The connection failed before any byte of the request left: repeating it is safe."""
    return isinstance(error, requests.exceptions.ConnectTimeout) or "NewConnectionError" in repr(
        error.args
    )


def _reason(error: requests.exceptions.RequestException) -> str:
    """The cause in a word (urllib3's reason, such as NewConnectionError), never a header."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return type(reason or error).__name__


def error_message(
    response: requests.Response, answer: bytes, redacted: Callable[[str], str] = str
) -> str:
    """The server's own words (`answer`, its body as read): `error` of `{"success": false,
    "error": ...}`, with its report.

    `redacted` blanks secrets out of the whole text before it is cut short (a secret cut in
    two would no longer be found). Printable: control characters (a terminal's escape
    sequences) are escaped.
    """
    try:
        document = json.loads(answer)
    except ValueError:
        text = _decoded(answer[: MESSAGE_CHARS * 16], response.encoding)
        return printable(redacted((text or response.reason or "").strip())[:MESSAGE_CHARS])
    if not isinstance(document, dict):
        return printable(redacted(str(document))[:MESSAGE_CHARS])
    message = str(document.get("error") or document.get("message") or response.reason or "")
    report = document.get("operationReport")
    if report:
        message += " " + json.dumps(report, sort_keys=True)
    return printable(redacted(message)[:MESSAGE_CHARS])


def _decoded(data: bytes, encoding: str | None) -> str:
    """Text in the charset the server named, UTF-8 where it named none or an unknown one."""
    try:
        return data.decode(encoding or "utf-8", errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")
