"""`enrich publish` against an Annotations API that answers badly (tests/annotations_api.py).

Each case is the stand-in answering as issue #23 found a server could: ids
that are not annotation ids, one id for many annotations, malformed pages,
endless search pages, a body trickled a byte at a time, a redirect, the
server's root as the URL, terminal escapes in its messages. The ledger must
only ever hold what the server clearly said, and every failure is a line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.publish.annotations_api import (
    ANSWER_BYTES,
    MESSAGE_CHARS,
    SEARCH_PAGES,
    AnnotationsAPI,
    AnnotationsAPIError,
    Rejected,
    Unsettled,
    Unusable,
    _decoded,
    _without_query,
)
from enrichment.publish.export import ExportFilter
from enrichment.publish.sync import Publisher
from enrichment.store.database import Database
from enrichment.store.ledger import Publication, PublicationState, publications_for_record
from enrichment.store.publications import CreateIntent, record_intents
from enrichment.store.reviews import Decision, Review
from tests.annotations_api import ID_BASE, AnnotationsServer
from tests.conftest import REPO, VOCABULARY, enrich
from tests.export_support import NEW, OLD, item_uri, record_ids
from tests.test_publish import (
    TOKEN,
    catalogue_of,
    gone_on_the_server,
    held,
    ledger,
    publish,
    wanted,
)

pytest_plugins = ["tests.test_publish"]  # its `db` and `server` fixtures

UNUSABLE_IDS: dict[str, Callable[[str], Any]] = {
    "not-a-url": lambda _: "not-a-url",
    "an object": lambda real: {"id": real},
    "one id for all": lambda _: ID_BASE + "1",
    "another API's": lambda real: real.replace("data.europeana.eu", "example.org"),
}


def assert_ledger_matches_server(db: Database, server: AnnotationsServer) -> None:
    """Every id in the ledger is one the server holds, none twice: a later publish can use it."""
    ids = [row.annotation_id for row in ledger(db).values() if row.annotation_id is not None]
    assert len(ids) == len(set(ids))
    assert set(ids) <= {annotation["id"] for annotation in server.annotations.values()}


@pytest.mark.parametrize("answer", list(UNUSABLE_IDS))
def test_unusable_ids_are_never_recorded_and_publish_and_withdraw_still_work(
    db: Database, server: AnnotationsServer, answer: str
) -> None:
    catalogue = catalogue_of(db)
    expected = wanted(catalogue)
    server.answer_id = UNUSABLE_IDS[answer]
    report = publish(db, server)
    assert report.unusable == len(expected) and report.created == 0
    assert any("answer not recorded" in problem for problem in report.problems)
    # The closing resolve found each on the server, under its real id.
    assert report.adopted == len(expected)
    assert {row.state for row in ledger(db).values()} == {PublicationState.PUBLISHED}
    assert_ledger_matches_server(db, server)
    assert held(server) == expected

    gone = publish(db, server, withdraw_all=True)
    assert gone.withdrawn == len(expected) and server.active() == []
    server.answer_id = None
    again = publish(db, server)
    assert again.created == len(expected) and held(server) == expected
    assert_ledger_matches_server(db, server)


PAGE_ITEMS: dict[str, Callable[[list[Any]], Any]] = {
    "null": lambda items: None,
    "a number": lambda items: 7,
    "strings": lambda items: ["annotation"] * len(items),
    "without id": lambda items: [{k: v for k, v in i.items() if k != "id"} for i in items],
    "one short": lambda items: items[:-1],
}


@pytest.mark.parametrize("shape", list(PAGE_ITEMS))
def test_malformed_page_answers_are_item_errors_and_end_with_exactly_the_labels(
    db: Database, server: AnnotationsServer, shape: str
) -> None:
    catalogue = catalogue_of(db)
    server.page_items = PAGE_ITEMS[shape]
    report = publish(db, server)
    assert report.created == 0 and report.problems
    assert report.adopted == len(wanted(catalogue))
    assert held(server) == wanted(catalogue)
    assert_ledger_matches_server(db, server)

    # Updates answered the same way stay `updating`, and go again when the server mends.
    catalogue.classify(db, NEW, record_ids("1001")[:4])
    changed = publish(db, server)
    assert changed.problems and changed.updated + changed.unusable >= 1
    server.page_items = None
    publish(db, server)
    assert {row.state for row in ledger(db).values()} <= {
        PublicationState.PUBLISHED,
        PublicationState.WITHDRAWN,
    }
    assert held(server) == wanted(catalogue)


def test_a_duplicate_message_without_ids_is_refused_for_its_item(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue = catalogue_of(db)
    publish(db, server)
    (record_id, concept), _ = gone_on_the_server(db, server, catalogue)
    # Someone else holds the same tag: the re-create is a duplicate, named without ids.
    server.add({"motivation": "tagging", "target": item_uri(record_id), "body": concept}, "other")
    server.empty_duplicates = True
    report = publish(db, server)
    assert report.rejected == 1
    assert any("no usable id of the duplicate" in problem for problem in report.problems)
    # The annotation is gone and creating it again was refused: the row is a refused
    # create, with the server's words, created again next time (the gone id names nothing).
    row = ledger(db)[(record_id, concept)]
    assert (row.state, row.annotation_id) == (PublicationState.REJECTED, None)
    assert "no usable id" in row.last_error


def test_an_endless_search_stops_after_its_page_bound(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue_of(db)
    server.lose_answer_every, server.lock_every = 1, 0  # every create's answer lost
    server.endless_search = True
    with pytest.raises(AnnotationsAPIError, match=f"went on past {SEARCH_PAGES} pages"):
        publish(db, server)
    # The rows stay intents: nothing was recorded that the server did not say.
    assert {row.state for row in ledger(db).values()} == {PublicationState.CREATING}

    # One record's search: exactly the bound of pages, then the error. Counted by the
    # record in the query, one the publish above never searched for: a call of it cut off
    # by its error may still be answered (and recorded) by the server after it.
    searched = "/1001/never-published"
    before = searches_of(server, searched)
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01)
    with pytest.raises(AnnotationsAPIError, match="the server's paging is broken"):
        list(api.search_record(searched))
    api.close()
    assert searches_of(server, searched) - before == SEARCH_PAGES


def searches_of(server: AnnotationsServer, record_id: str) -> int:
    """The search requests the server answered for this record."""
    return server.searched.count(f'target_record_id:"{record_id}"')


def test_a_trickled_answer_is_cut_off_at_the_deadline(server: AnnotationsServer) -> None:
    server.trickle = 0.05  # a search answer of ~100 bytes would take 5 s
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01, timeout=(2.0, 4.0), deadline=1.0)
    started = time.monotonic()
    with pytest.raises(AnnotationsAPIError, match="no whole answer within 1 s"):
        list(api.search_record("/1001/object_1"))
    assert time.monotonic() - started < 3.0
    started = time.monotonic()
    annotation = {"motivation": "tagging", "target": item_uri("/1001/a"), "body": VOCABULARY["map"]}
    with pytest.raises(Unsettled, match="no whole answer within 1 s"):
        api.create_page([annotation])
    assert time.monotonic() - started < 3.0
    api.close()


def test_a_url_that_is_not_the_annotations_api_says_so(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue_of(db)
    root = server.url.removesuffix("/annotation")
    with pytest.raises(AnnotationsAPIError, match="does not look like the Annotations API"):
        AnnotationsAPI(root, TOKEN)
    elsewhere = root + "/v2/annotation"  # the right shape, but nothing answers there
    api = AnnotationsAPI(elsewhere, TOKEN, backoff=0.01)
    with pytest.raises(AnnotationsAPIError, match=r"404 .*does not look like the Annotations API"):
        Publisher(db, elsewhere, api).publish(ExportFilter())
    api.close()
    assert server.active() == []

    env = {"DATABASE_URL": db.url, "EUROPEANA_ANNOTATION_API_URL": root}
    done = enrich("publish", env={**env, "EUROPEANA_ANNOTATION_TOKEN": TOKEN})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "does not look like the Annotations API" in done.stderr


def test_a_redirected_publish_creates_nothing_says_so_and_fails(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue_of(db)
    target = AnnotationsServer()
    server.redirect_to = f"http://127.0.0.1:{target.port}"
    env = {
        "DATABASE_URL": db.url,
        "EUROPEANA_ANNOTATION_API_URL": server.url,
        "EUROPEANA_ANNOTATION_TOKEN": TOKEN,
    }
    done = enrich("publish", env=env)
    target.close()
    assert done.returncode == 1, done.stdout
    assert "redirected (307)" in done.stderr and "nothing was created" in done.stderr
    assert "Traceback" not in done.stderr
    assert server.active() == [] and target.requests == []


def test_the_api_key_and_the_token_are_never_shown_though_the_server_repeats_them(
    server: AnnotationsServer,
) -> None:
    """An http-to-https redirect repeats the request's query, and so its `wskey`; a message
    may quote the key or the token. Neither reaches a message."""
    key = "wskey-not-to-be-shown"
    api = AnnotationsAPI(server.url, TOKEN, api_key=key, backoff=0.01)
    server.redirect_to = "https://e.eu"  # short: messages show a URL's first 77 characters
    with pytest.raises(AnnotationsAPIError, match="redirected") as redirected:
        list(api.search_record("/1001/object_1"))
    assert "https://e.eu/annotation/search'" in str(redirected.value)
    server.redirect_to = None
    server.message_suffix = f" (wskey={key}, Authorization: Bearer {TOKEN})"
    with pytest.raises(Rejected) as refused:
        api.get(ID_BASE + "999")
    api.close()
    assert "(wskey=[redacted], Authorization: Bearer [redacted])" in refused.value.message
    for error in (redirected.value, refused.value):
        assert key not in str(error) and TOKEN not in str(error)


def test_a_secret_the_message_cuts_in_two_is_still_not_shown(server: AnnotationsServer) -> None:
    """Messages are cut at `MESSAGE_CHARS`: a token across the cut must be blanked first,
    or its start would be shown."""
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01)
    with pytest.raises(Rejected) as plain:
        api.get(ID_BASE + "999")
    start = MESSAGE_CHARS - 4  # the token begins 4 characters before the cut
    server.message_suffix = " " * (start - len(plain.value.message)) + TOKEN
    with pytest.raises(Rejected) as cut:
        api.get(ID_BASE + "999")
    api.close()
    assert cut.value.message.endswith("[red") and TOKEN[:4] not in cut.value.message


@pytest.mark.parametrize(
    ("location", "shown_as"),
    [
        ("http://h:99999/annotation?wskey=k", "http://h:99999/annotation"),
        ("http://[::1]:8080/annotation/search?wskey=k#top", "http://[::1]:8080/annotation/search"),
        ("https://user:secret@e.eu/annotation?wskey=k", "https://e.eu/annotation"),
        ("/annotation/search?wskey=k", "/annotation/search"),
        ("http://[::1/annotation?wskey=k", "an address that is not a URL"),
    ],
)
def test_a_redirect_is_named_without_what_may_carry_a_secret(location: str, shown_as: str) -> None:
    """Whatever the server puts in `Location` (a port no URL has, an IPv6 host, a user and
    password), the message names it without query or credentials, and never fails on it."""
    assert _without_query(location) == shown_as


def test_a_charset_no_codec_has_reads_as_utf8() -> None:
    assert _decoded("café".encode(), "no-such-charset") == "café"


def test_an_endless_answer_is_read_up_to_its_cap_and_is_what_it_means_for_each_call(
    server: AnnotationsServer,
) -> None:
    """A success whose body never ends, sent as fast as it is read: no call holds more than
    `ANSWER_BYTES` of it, and each ends at once as a success it cannot read."""
    annotation = {"motivation": "tagging", "target": item_uri("/1001/a"), "body": VOCABULARY["map"]}
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01)
    stored = api.create_page([annotation])[0]
    assert not isinstance(stored, Unusable)
    server.endless = True
    with pytest.raises(Unsettled, match=f"longer than {ANSWER_BYTES} bytes"):
        api.create_page([annotation])
    with pytest.raises(AnnotationsAPIError, match=f"longer than {ANSWER_BYTES} bytes"):
        list(api.search_record("/1001/a"))
    api.withdraw(stored.id)  # a DELETE's success says all there is
    api.close()
    assert int(stored.id.rsplit("/", 1)[1]) in server.deleted


def test_successes_without_a_document_neither_stop_a_publish_nor_lose_a_write(
    db: Database, server: AnnotationsServer
) -> None:
    """A proxy answers 200 with no body to a DELETE and with an HTML page to a page of
    updates: the withdrawals are done, and the updates go again one by one."""
    catalogue = catalogue_of(db)
    publish(db, server)
    first = record_ids("1001")
    catalogue.classify(db, NEW, first[:6], failed=tuple(first[6:8]))

    def proxied(method: str, path: str, body: Any) -> bytes | None:
        if method == "DELETE":
            return b""
        updates = path == "/annotations/" and all("id" in item for item in body["items"])
        return b"<html><body>Request accepted</body></html>" if updates else None

    server.success_body = proxied
    report = publish(db, server)
    assert report.updated > 0 and report.withdrawn > 0 and report.unusable == 0
    assert held(server) == wanted(catalogue)
    assert {row.state for row in ledger(db).values()} <= {
        PublicationState.PUBLISHED,
        PublicationState.WITHDRAWN,
    }
    assert len([write for write in server.writes() if write[0] == "PUT"]) == report.updated
    gone = publish(db, server, withdraw_all=True)
    assert server.active() == [] and gone.withdrawn == len(wanted(catalogue))
    assert {row.state for row in ledger(db).values()} == {PublicationState.WITHDRAWN}


def test_a_retry_after_that_is_no_number_still_retries_by_backoff(
    server: AnnotationsServer,
) -> None:
    """urllib3 refuses to parse `Retry-After: 1.5`; the status still says try again."""
    server.lock_every, server.retry_after = 2, "1.5"
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01)
    annotation = {"motivation": "tagging", "target": item_uri("/1001/a"), "body": VOCABULARY["map"]}
    stored = api.create_page([annotation, {**annotation, "target": item_uri("/1001/b")}])
    created = api.create_page([{**annotation, "target": item_uri("/1001/c")}])
    api.close()
    assert not any(isinstance(one, Unusable) for one in stored + created)
    assert [status for *_, status in server.requests] == [201, 423, 201]


def test_server_messages_are_printed_with_control_characters_escaped(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue = catalogue_of(db)
    refused = sorted(wanted(catalogue))[0][0]
    server.refuse_targets = {item_uri(refused)}
    server.message_suffix = "\x1b[2J\x1b]0;owned\x07\u202e"
    env = {
        "DATABASE_URL": db.url,
        "EUROPEANA_ANNOTATION_API_URL": server.url,
        "EUROPEANA_ANNOTATION_TOKEN": TOKEN,
    }
    done = enrich("publish", env=env)
    assert done.returncode == 0, done.stderr
    assert "annotation validation" in done.stderr
    assert "\\x1b[2J\\x1b]0;owned\\x07\\u202e" in done.stderr
    assert not any(c in done.stderr + done.stdout for c in "\x1b\x07\u202e")


def test_a_dry_run_lists_each_change_and_the_labels_reviews_left_out(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue = catalogue_of(db)
    publish(db, server)
    first = record_ids("1001")
    catalogue.classify(db, NEW, first[:6])
    record_id, concept = sorted(wanted(catalogue))[-1]
    key = next(k for k, uri in VOCABULARY.items() if uri == concept)
    with db.transaction() as session:
        session.add(
            Review(
                record_id=record_id,
                label_key=key,
                model_version=OLD,
                decision=Decision.REJECT,
                reviewer="curator",
            )
        )
    env = {"DATABASE_URL": db.url, "EUROPEANA_ANNOTATION_API_URL": server.url}
    requests_before = len(server.requests)
    dry = enrich("publish", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    changes = report["changes"]
    counts = {a: sum(c["action"] == a for c in changes) for a in ("create", "update", "withdraw")}
    assert counts == {
        "create": report["created"],
        "update": report["updated"],
        "withdraw": report["withdrawn"],
    }
    assert report["created"] and report["updated"] and report["withdrawn"]
    assert report["left_out_by_reviews"] == 1
    rows = ledger(db)
    withdrawn = {(c["record_id"], c["concept"]) for c in changes if c["action"] == "withdraw"}
    assert (record_id, concept) in withdrawn
    assert all(rows[(r, c)].state == PublicationState.PUBLISHED for r, c in withdrawn)
    for change in changes:
        if change["action"] != "create":
            row = rows[(change["record_id"], change["concept"])]
            assert change["annotation_id"] == row.annotation_id

    text = enrich("publish", "--dry-run", env=env)
    lines = [line for line in text.stdout.splitlines() if line.startswith("would ")]
    assert len(lines) == len(changes)
    assert f"would withdraw\t{record_id}\t{key}\t{OLD}\t" in text.stdout
    assert "1 labels left out by the curators' reviews (--reviewed not-rejected)" in text.stdout
    assert len(server.requests) == requests_before, "a dry run sends nothing"
    assert {key: row.state for key, row in ledger(db).items()} == {
        key: row.state for key, row in rows.items()
    }


def test_an_intent_shows_as_not_sent_until_the_server_answers(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue_of(db)
    record_id = record_ids("1001")[0]
    record_intents(
        db,
        server.url,
        [CreateIntent(None, record_id, "map", VOCABULARY["map"], OLD, "sha-map")],
    )
    [intent] = publications_for_record(db, record_id)
    assert intent["state"] == PublicationState.CREATING and intent["sent"] is False
    shown_as = CliRunner().invoke(
        cli, ["results", "--record", record_id], env={"DATABASE_URL": db.url}
    )
    assert shown_as.exit_code == 0, shown_as.output
    assert f"{record_id}\tintent:creating\tmap - ({OLD})" in shown_as.output
    publish(db, server)
    shown = publications_for_record(db, record_id)
    assert shown and all(entry["sent"] for entry in shown)
    with db.transaction() as session:
        states = set(session.scalars(sa.select(Publication.state)))
    assert states == {PublicationState.PUBLISHED}


def test_a_wait_asked_for_past_the_deadline_is_not_begun(server: AnnotationsServer) -> None:
    """A write lock with `Retry-After` of a day: the call ends at once with the server's
    answer, saying what it asked for (urllib3 alone would wait six hours a try)."""
    server.lock_every, server.retry_after = 1, "86400"
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01, deadline=30.0)
    annotation = {"motivation": "tagging", "target": item_uri("/1001/a"), "body": VOCABULARY["map"]}
    started = time.monotonic()
    for call in (lambda: api.create(annotation), lambda: api.create_page([annotation])):
        with pytest.raises(AnnotationsAPIError, match=r"423 .*a wait of '86400' s"):
            call()
    assert time.monotonic() - started < 5.0
    assert [status for *_, status in server.requests] == [423, 423]  # one try each, no retry
    api.close()


def test_closing_the_client_ends_a_wait_between_tries(server: AnnotationsServer) -> None:
    """Ctrl-C closes the client: a call waiting for its next try (a `Retry-After` within the
    deadline) ends then, not when the wait is over."""
    server.lock_every, server.retry_after = 1, "20"
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01, deadline=60.0)
    annotation = {"motivation": "tagging", "target": item_uri("/1001/a"), "body": VOCABULARY["map"]}
    failures: list[Exception] = []

    def create() -> None:
        try:
            api.create(annotation)
        except AnnotationsAPIError as error:
            failures.append(error)

    waiting = threading.Thread(target=create)
    waiting.start()
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the answer is in: the call waits 20 s for its next try
    started = time.monotonic()
    api.close()
    waiting.join(10)
    assert not waiting.is_alive() and time.monotonic() - started < 2.0
    assert len(failures) == 1 and len(server.requests) == 1


def test_aborting_cuts_off_a_call_in_flight_and_sends_none_after(
    server: AnnotationsServer,
) -> None:
    """`abort` (what a Ctrl-C does in a publish) ends a call whose answer is held, well before
    its deadline, and nothing is sent after it."""
    server.lock_every, server.hold_after = 0, 0
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01, deadline=60.0)
    annotation = {"motivation": "tagging", "target": item_uri("/1001/a"), "body": VOCABULARY["map"]}
    failures: list[Exception] = []

    def create() -> None:
        try:
            api.create_page([annotation])
        except Unsettled as error:
            failures.append(error)

    waiting = threading.Thread(target=create)
    waiting.start()
    deadline = time.monotonic() + 5
    while not server.held and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.held == 1, "the write carried out, its answer held"
    api.abort()
    waiting.join(5)
    cut_off = not waiting.is_alive()
    try:
        with pytest.raises(AnnotationsAPIError, match="not sent, the client is closing"):
            api.create(annotation)
        assert server.held == 1  # a write sent now would be held too
    finally:
        server.release()
    assert cut_off and len(failures) == 1, failures
    assert "cut off unanswered, the client is closing" in str(failures[0])
    api.close()


def test_ctrl_c_ends_a_publish_at_once_and_the_next_settles_what_was_in_flight(
    db: Database, server: AnnotationsServer
) -> None:
    """An operator's Ctrl-C while the server sits on its answers (a minute each here): the
    publish ends at once, not when they come, says how to go on, and the next publish
    settles the requests that were in flight, with no duplicate on the server."""
    catalogue = catalogue_of(db)
    server.lock_every = 0
    server.hold_after = 2  # the third write and all after it are carried out, then held
    env = {
        **os.environ,
        "DATABASE_URL": db.url,
        "EUROPEANA_ANNOTATION_API_URL": server.url,
        "EUROPEANA_ANNOTATION_TOKEN": TOKEN,
    }
    command = [sys.executable, "-m", "enrichment", "publish", "--page-size", "3"]
    process = subprocess.Popen(
        [*command, "--concurrency", "2"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while server.held < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.held == 2, "two requests carried out and their answers held"
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=15)
    finally:
        process.kill()
    still_held = not server._release.is_set()
    server.release()
    assert still_held, "the publish ended only when the server let its answers go"
    assert process.returncode != 0
    assert "interrupted" in stderr and "enrich publish" in stderr, stderr
    assert "Traceback" not in stderr

    report = publish(db, server)
    assert report.adopted >= 6  # the two held pages of 3, carried out but never answered
    assert held(server) == wanted(catalogue)
    assert_ledger_matches_server(db, server)
    assert {row.state for row in ledger(db).values()} == {PublicationState.PUBLISHED}


def tag(record_id: str, concept: str) -> dict[str, Any]:
    return {
        "type": "Annotation",
        "motivation": "tagging",
        "body": concept,
        "target": item_uri(record_id),
    }


def holders(server: AnnotationsServer, record_id: str, concept: str) -> list[tuple[str, str]]:
    """(id, creator) of the server's active annotations that are this tag."""
    return [
        (a["id"], a["creator"]["id"].rsplit("/", 1)[-1])
        for a in server.active()
        if a["target"] == item_uri(record_id) and a["body"] == concept
    ]


def lost_create(db: Database, server: AnnotationsServer, record_id: str, concept: str) -> None:
    """The ledger as a publish killed after the server carried out this label's create."""
    key = next(k for k, uri in VOCABULARY.items() if uri == concept)
    intent = CreateIntent(None, record_id, key, concept, OLD, "0" * 64)
    record_intents(db, server.url, [intent])


def test_before_its_account_is_known_a_publish_adopts_no_other_accounts_annotation(
    db: Database, server: AnnotationsServer
) -> None:
    """The first publish ever was killed after its first create was carried out; another
    account holds the same tag. The next publish must not adopt the other account's
    annotation (leaving its own on the server, in no ledger) while it cannot tell whose is
    whose: it settles the row once its own creates have said which account it is."""
    catalogue = catalogue_of(db)
    record_id, concept = sorted(wanted(catalogue))[0]
    theirs = server.add(tag(record_id, concept), "someone-else")
    ours = server.add(tag(record_id, concept), "publisher")
    lost_create(db, server, record_id, concept)

    report = publish(db, server)
    row = ledger(db)[record_id, concept]
    assert (row.annotation_id, row.state, row.adopted) == (ours, PublicationState.PUBLISHED, True)
    assert report.adopted == 1 and report.created == len(wanted(catalogue)) - 1
    assert sorted(holders(server, record_id, concept)) == sorted(
        [(theirs, "someone-else"), (ours, "publisher")]
    )
    withdrawn = publish(db, server, withdraw_all=True)
    assert withdrawn.withdrawn == len(wanted(catalogue))
    assert [a["id"] for a in server.active()] == [theirs]


def test_a_lost_create_whose_tag_several_accounts_hold_waits_while_the_account_is_unsure(
    db: Database, server: AnnotationsServer
) -> None:
    """A new token's publish was killed after one create was carried out, and another
    account holds the same tag too. With nothing else to create, nothing says which
    account the new token is: the row is left as it is, and said so, rather than adopting
    either annotation or creating a third."""
    catalogue = catalogue_of(db)
    publish(db, server)
    record_id, concept = sorted(wanted(catalogue))[0]
    row = ledger(db)[record_id, concept]
    server.deleted.add(int(row.annotation_id.rsplit("/", 1)[1]))  # gone, and its row
    with db.transaction() as session:
        session.execute(sa.delete(Publication).where(Publication.id == row.id))
    server.tokens["new-token"] = "new-account"
    server.add(tag(record_id, concept), "someone-else")
    server.add(tag(record_id, concept), "new-account")
    lost_create(db, server, record_id, concept)
    before = server.active()

    api = AnnotationsAPI(server.url, "new-token", backoff=0.01)
    report = Publisher(db, server.url, api, page_size=4).publish(ExportFilter())
    api.close()
    assert (report.created, report.adopted, report.forgotten) == (0, 0, 0)
    assert sum("not known until the server has answered" in p for p in report.problems) == 2
    assert ledger(db)[record_id, concept].state == PublicationState.CREATING
    assert server.active() == before


def test_a_lost_create_is_never_settled_with_another_accounts_annotation(
    db: Database, server: AnnotationsServer
) -> None:
    """The ledger knows this account; a create of it was lost, and only another account
    holds the tag. Adopting that annotation would leave the label unpublished by this
    account for good (its row `published`, not ours to change): the row is forgotten once
    this publish's answers confirm the account, and the next publish creates the label."""
    catalogue = catalogue_of(db)
    publish(db, server, datasets=("1001",))
    record_id, concept = sorted(wanted(catalogue, datasets=("1002",)))[0]
    theirs = server.add(tag(record_id, concept), "someone-else")
    lost_create(db, server, record_id, concept)

    first = publish(db, server, datasets=("1002",))
    assert (first.adopted, first.forgotten) == (0, 1)
    assert holders(server, record_id, concept) == [(theirs, "someone-else")]
    second = publish(db, server, datasets=("1002",))
    assert second.created == 1
    row = ledger(db)[record_id, concept]
    assert row.owner.endswith("/publisher") and not row.adopted
    assert sorted(holders(server, record_id, concept)) == sorted(
        [(theirs, "someone-else"), (row.annotation_id, "publisher")]
    )


def test_a_publish_with_another_accounts_token_adopts_its_own_lost_create(
    db: Database, server: AnnotationsServer
) -> None:
    """The ledger's last answered create is the old token's account; the new token's publish
    was killed after a create was carried out. Its annotation is the only one of the tag:
    adopted, not forgotten and created a second time."""
    catalogue = catalogue_of(db)
    publish(db, server, datasets=("1001",))
    server.tokens["new-token"] = "new-account"
    record_id, concept = sorted(wanted(catalogue, datasets=("1002",)))[0]
    ours = server.add(tag(record_id, concept), "new-account")
    lost_create(db, server, record_id, concept)

    api = AnnotationsAPI(server.url, "new-token", backoff=0.01)
    report = Publisher(db, server.url, api, page_size=4).publish(ExportFilter(datasets=("1002",)))
    api.close()
    assert report.adopted == 1 and report.forgotten == 0
    assert holders(server, record_id, concept) == [(ours, "new-account")]
    assert ledger(db)[record_id, concept].annotation_id == ours


def test_an_annotation_created_again_for_an_update_is_withdrawn_after_a_cut_off_publish(
    db: Database, server: AnnotationsServer
) -> None:
    """An update finds its annotation gone on the server and creates it again; the publish
    is cut off (a Ctrl-C) before that create's answer. The row is a create's intent, so
    `--withdraw` finds the new annotation by its tag and withdraws it, where the gone id
    would have named nothing (and left the new one on the server, in no ledger)."""
    catalogue = catalogue_of(db)
    publish(db, server)
    kept, gone = gone_on_the_server(db, server, catalogue)
    server.hold_path = "/annotation/"  # the create again is carried out, its answer held

    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01)
    publisher = Publisher(db, server.url, api, page_size=4)
    with ThreadPoolExecutor(1) as pool:
        publishing = pool.submit(publisher.publish, ExportFilter())
        deadline = time.monotonic() + 30
        while server.held < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.held == 1
        api.abort()  # what a Ctrl-C does
        assert isinstance(publishing.exception(timeout=30), AnnotationsAPIError)
    server.release()
    api.close()
    again = [annotation_id for annotation_id, _ in holders(server, *kept)]
    assert len(again) == 1 and again != [gone]
    assert ledger(db)[kept].state == PublicationState.CREATING

    report = publish(db, server, withdraw_all=True)
    assert report.adopted == 1
    assert server.active() == []
    assert {row.state for row in ledger(db).values()} == {PublicationState.WITHDRAWN}
