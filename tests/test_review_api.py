"""The review app's JSON API over real HTTP (waitress on a free port): queue order, decisions
with their reviewer, undo, the cross-site request forgery and login guards, and the stats and
labelled set that `enrich review` derives from the decisions."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
import waitress.server
import waitress.wasyncore
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.config import Settings
from enrichment.errors import EnrichError
from enrichment.model.labelled import read_labelled
from enrichment.review.app import create_app
from enrichment.review.guard import Logins
from enrichment.review.stats import class_stats
from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.review_queue import QueueFilter
from enrichment.store.reviews import Review, standing
from enrichment.store.schema import Outcome
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import VOCABULARY, enrich, image_bytes
from tests.services import free_port, wait_for

KEYS = ("photograph", "drawing", "map")
THRESHOLDS = (0.5, 0.4, 0.6)
MODEL_LABELS = [{"key": key, "label": key.title(), "concept": VOCABULARY[key]} for key in KEYS]
VERSION = "pilot@cccccccccccc"
# record -> scores in KEYS order; the margins |score - threshold| give the queue order.
SCORES = {
    "/9001/a": [0.90, 0.45, 0.10],  # margins .40 .05 .50
    "/9001/b": [0.52, 0.20, 0.95],  # .02 .20 .35
    "/9001/c": [0.30, 0.41, 0.58],  # .20 .01 .02
    "/9002/d": [0.75, 0.70, 0.62],  # .25 .30 .02
    "/9002/e": [0.49, 0.05, 0.30],  # .01 .35 .30
}
COLOURS = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 180, 40), (120, 40, 160)]


def margin_order(scores: dict[str, list[float]], keys=KEYS) -> list[tuple[str, str]]:
    """(record, key) by |score - threshold|, then record, then key, as the queue promises."""
    items = [
        (round(abs(s - THRESHOLDS[i]), 6), record, KEYS[i])
        for record, values in scores.items()
        for i, s in enumerate(values)
        if KEYS[i] in keys
    ]
    return [(record, key) for _, record, key in sorted(items)]


def scored_outcome(record_id: str, scores: list[float], image_url: str) -> RecordOutcome:
    """A record's outcome from its scores: a label for each class at or above its threshold."""
    labels = [
        LabelScore(key, VOCABULARY[key], score)
        for key, score, threshold in zip(KEYS, scores, THRESHOLDS, strict=True)
        if score >= threshold
    ]
    return RecordOutcome(
        record_id,
        Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD,
        scores=scores,
        labels=labels,
        image_url=image_url,
    )


def build_review_db(url: str, image_host, version: str = VERSION) -> Database:
    """Five classified records with images on the local image host; labels at threshold."""
    db = Database(url)
    db.upgrade()
    records = []
    for (record_id, _), colour in zip(SCORES.items(), COLOURS, strict=True):
        image = image_host.add(f"/review{record_id}.png", image_bytes(colour, "circle"))
        records.append(
            Record(
                record_id,
                record_id.split("/")[1],
                "http://data.europeana.eu/item" + record_id,
                image,
                "Museum of <Things>",
                title=f"Object {record_id[-1].upper()}",
            )
        )
    outcomes = [
        scored_outcome(record_id, scores, next(r.image_url for r in records if r.id == record_id))
        for record_id, scores in SCORES.items()
    ]
    with db.transaction() as session:
        register_model(session, version, "pilot", "resnet18", MODEL_LABELS, list(THRESHOLDS))
        upsert_records(session, records)
    with db.transaction() as session:
        save_outcomes(session, None, version, outcomes)
    return db


@dataclass
class ReviewServer:
    """The app served by waitress in a thread, as `enrich review` serves it."""

    url: str
    db: Database
    server: waitress.server.BaseWSGIServer
    thread: threading.Thread
    channels: dict

    def decisions(self) -> list[tuple]:
        """The decisions that stand, in order: not take-backs, not taken back."""
        with self.db.engine.connect() as connection:
            rows = connection.execute(
                sa.select(
                    Review.record_id,
                    Review.label_key,
                    Review.decision,
                    Review.reviewer,
                    Review.audit,
                )
                .where(standing())
                .order_by(Review.id)
            )
            return [tuple(row) for row in rows]

    def close(self) -> None:
        """Stop the loop: it runs while any channel is open, the dispatcher's trigger included.

        The channels are closed on the loop's own thread (through its trigger): closed from
        here, a descriptor could vanish under the loop's select (EBADF in the server thread).
        """
        self.server.task_dispatcher.shutdown()
        # EBADF: the loop has closed its channels already, its trigger among them.
        with contextlib.suppress(OSError):
            self.server.trigger.pull_trigger(lambda: waitress.wasyncore.close_all(self.channels))
        self.thread.join(10)
        assert not self.thread.is_alive()


def serve(db: Database, tmp_path: Path, token: str | None = None, bound_to: str = "127.0.0.1"):
    settings = Settings(database_url="unused", fetch_allow=("127.0.0.1",), review_token=token)
    app = create_app(db, settings, tmp_path / "cache", bound_to=bound_to)
    channels: dict = {}
    server = waitress.server.create_server(app, map=channels, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return ReviewServer(f"http://127.0.0.1:{server.effective_port}", db, server, thread, channels)


@pytest.fixture
def review_db(pg_url: str, image_host) -> Iterator[Database]:
    db = build_review_db(pg_url, image_host)
    yield db
    db.dispose()


@pytest.fixture
def app_server(review_db: Database, tmp_path: Path) -> Iterator[ReviewServer]:
    server = serve(review_db, tmp_path)
    yield server
    server.close()


def decide(server: ReviewServer, *decisions: tuple, **headers: str) -> requests.Response:
    body = {
        "decisions": [
            {
                "record_id": record_id,
                "label_key": key,
                "model_version": VERSION,
                "decision": decision,
                "reviewer": reviewer,
            }
            for record_id, key, decision, reviewer in decisions
        ]
    }
    return requests.post(f"{server.url}/api/decisions", json=body, headers=headers, timeout=10)


def test_queue_is_ordered_by_distance_to_the_threshold(app_server: ReviewServer) -> None:
    answer = requests.get(f"{app_server.url}/api/queue", params={"limit": 100}, timeout=10).json()
    got = [(item["record_id"], item["label_key"]) for item in answer["items"]]
    assert got == margin_order(SCORES)
    assert answer["total"] == 15
    first = answer["items"][0]
    assert first == {
        **first,
        "record_id": "/9001/c",
        "label_key": "drawing",
        "model_version": VERSION,
        "threshold": 0.4,
        "labelled": True,
        "state": "pending",
        "title": "Object C",
        "item_page": "http://data.europeana.eu/item/9001/c",
    }
    assert abs(first["confidence"] - 0.41) < 1e-6
    maps = requests.get(f"{app_server.url}/api/queue?label=map", timeout=10).json()["items"]
    assert [(i["record_id"], i["label_key"]) for i in maps] == margin_order(SCORES, ("map",))
    below = requests.get(f"{app_server.url}/api/queue?side=below&dataset=9002", timeout=10).json()
    assert {(i["record_id"], i["label_key"]) for i in below["items"]} == {
        ("/9002/e", "photograph"),
        ("/9002/e", "drawing"),
        ("/9002/e", "map"),
    }
    ranged = requests.get(
        f"{app_server.url}/api/queue?min_score=0.6&max_score=0.8", timeout=10
    ).json()["items"]
    assert sorted(i["confidence"] for i in ranged) == pytest.approx([0.62, 0.7, 0.75])
    bad = requests.get(f"{app_server.url}/api/queue?state=maybe", timeout=10)
    assert bad.status_code == 400 and "state must be one of" in bad.json()["error"]
    assert bad.json()["field"] == "state"
    # The progress beside the page checks the same filter (it counted only pending items,
    # and a wrong state reached the decisions of the day as a KeyError: a 500).
    progress = requests.get(f"{app_server.url}/api/progress?state=maybe", timeout=10)
    assert progress.status_code == 400 and progress.json()["field"] == "state"
    # A wrong value is named by its query parameter, never by a command-line option.
    unknown = requests.get(f"{app_server.url}/api/queue?label=unicorn", timeout=10).json()
    assert unknown["field"] == "label" and "unicorn" in unknown["error"]
    assert "--" not in unknown["error"]


def test_decisions_are_stored_with_their_reviewer_and_the_last_counts(
    app_server: ReviewServer,
) -> None:
    done = decide(
        app_server,
        ("/9001/c", "drawing", "accept", "ada"),
        ("/9001/b", "photograph", "reject", "grace"),
        ("/9002/e", "photograph", "add", "ada"),
    )
    assert done.status_code == 201, done.text
    ids = done.json()["ids"]
    assert len(ids) == 3 and ids == sorted(ids)
    assert decide(app_server, ("/9001/c", "drawing", "reject", "grace")).status_code == 201
    assert app_server.decisions() == [
        ("/9001/c", "drawing", "accept", "ada", False),
        ("/9001/b", "photograph", "reject", "grace", False),
        ("/9002/e", "photograph", "add", "ada", False),
        ("/9001/c", "drawing", "reject", "grace", False),
    ]
    every = requests.get(f"{app_server.url}/api/queue?state=any&limit=100", timeout=10).json()
    state = {(i["record_id"], i["label_key"]): (i["state"], i["reviewer"]) for i in every["items"]}
    assert state[("/9001/c", "drawing")] == ("reject", "grace")
    assert state[("/9002/e", "photograph")] == ("add", "ada")
    pending = requests.get(f"{app_server.url}/api/queue?limit=100", timeout=10).json()
    assert pending["total"] == 12
    # Undo takes back the last decision: the one before it counts again.
    last = app_server.decisions()
    undone = requests.post(f"{app_server.url}/api/undo", json={"ids": [ids[-1] + 1]}, timeout=10)
    assert undone.json() == {"undone": 1}
    assert app_server.decisions() == last[:-1]
    # The model's own label is accepted, a missed one added: never the other way round.
    wrong = decide(app_server, ("/9002/e", "drawing", "accept", "ada"))
    assert wrong.status_code == 400 and "add it instead" in wrong.json()["error"]
    nobody = requests.post(
        f"{app_server.url}/api/decisions",
        json={
            "record_id": "/9001/a",
            "label_key": "map",
            "model_version": VERSION,
            "decision": "add",
        },
        timeout=10,
    )
    assert nobody.status_code == 400 and "reviewer" in nobody.json()["error"]
    assert len(app_server.decisions()) == 3


def test_cross_origin_posts_are_refused_and_loopback_scripts_accepted(
    app_server: ReviewServer,
) -> None:
    one = ("/9001/a", "photograph", "accept", "ada")
    refused = decide(app_server, one, Origin="http://evil.example")
    assert refused.status_code == 403 and "cross-origin" in refused.json()["error"]
    refused = decide(app_server, one, **{"Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 403
    # A page on another port of the same machine is another origin too.
    assert decide(app_server, one, Origin="http://127.0.0.1:1").status_code == 403
    # A DNS-rebinding page reaches the loopback address under its own host name.
    rebound = decide(app_server, one, Host="attacker.example")
    assert rebound.status_code == 403
    assert app_server.decisions() == []
    assert decide(app_server, one, Origin=app_server.url).status_code == 201
    assert decide(app_server, one).status_code == 201  # a script: no Origin, loopback
    form = requests.post(
        f"{app_server.url}/api/decisions", data={"record_id": "/9001/a"}, timeout=10
    )
    assert form.status_code == 415
    assert len(app_server.decisions()) == 2
    page = requests.get(f"{app_server.url}/queue", timeout=10)
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


def test_bound_elsewhere_the_app_needs_the_token(review_db: Database, tmp_path: Path) -> None:
    with pytest.raises(EnrichError, match="ENRICH_REVIEW_TOKEN"):
        serve(review_db, tmp_path, token=None, bound_to="0.0.0.0")
    server = serve(review_db, tmp_path, token="s3cret-token", bound_to="0.0.0.0")
    try:
        one = ("/9001/a", "photograph", "accept", "ada")
        page = requests.get(f"{server.url}/queue", allow_redirects=False, timeout=10)
        assert page.status_code == 302 and "/login" in page.headers["Location"]
        assert requests.get(f"{server.url}/api/queue", timeout=10).status_code == 401
        assert decide(server, one).status_code == 401  # a script without the token
        assert decide(server, one, Authorization="Bearer wrong").status_code == 401
        assert decide(server, one, Authorization="Bearer s3cret-token").status_code == 201
        browser = requests.Session()
        wrong = browser.post(
            f"{server.url}/login", data={"token": "nope"}, headers={"Origin": server.url}
        )
        assert wrong.status_code == 401
        logged = browser.post(
            f"{server.url}/login",
            data={"token": "s3cret-token", "next": "/queue"},
            headers={"Origin": server.url},
            allow_redirects=False,
        )
        assert logged.status_code == 302 and logged.headers["Location"].endswith("/queue")
        assert "SameSite=Strict" in logged.headers["Set-Cookie"]
        assert browser.get(f"{server.url}/queue", timeout=10).status_code == 200
        body = {
            "decisions": [
                dict(
                    zip(("record_id", "label_key", "decision", "reviewer"), one, strict=True),
                    model_version=VERSION,
                )
            ]
        }
        ok = browser.post(f"{server.url}/api/decisions", json=body, headers={"Origin": server.url})
        assert ok.status_code == 201
        # The cookie alone, without an Origin, is not enough: that is what forms forge.
        forged = browser.post(f"{server.url}/api/decisions", json=body)
        assert forged.status_code == 401
        assert len(server.decisions()) == 2
        # Logging out ends the login itself: a copy of the cookie kept from before (another
        # tab, a shared machine) no longer acts as a curator.
        kept = browser.cookies.copy()
        out = browser.post(f"{server.url}/logout", headers={"Origin": server.url})
        assert out.url.endswith("/login")
        replayed = requests.post(
            f"{server.url}/api/decisions", json=body, headers={"Origin": server.url}, cookies=kept
        )
        assert replayed.status_code == 401
        assert requests.get(f"{server.url}/api/queue", cookies=kept, timeout=10).status_code == 401
        assert len(server.decisions()) == 2
        browser.close()  # its kept-alive connection would hold the server's loop open
    finally:
        server.close()


def test_a_login_lasts_its_lifetime_and_ends_at_log_out() -> None:
    logins = Logins(lifetime=0.2)
    first, second = logins.begin(), logins.begin()
    assert first != second and logins.live(first) and logins.live(second)
    logins.end(first)
    assert not logins.live(first) and logins.live(second)
    time.sleep(0.3)
    assert not logins.live(second)
    assert not logins.live(None) and not logins.live(["not", "a", "login"])


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return centre - half, centre + half


def test_review_stats_precision_by_hand(review_db: Database, pg_url: str) -> None:
    # photograph labels (>= 0.5): a .90, b .52, d .75; e (.49) and c (.30) are below.
    with review_db.transaction() as session:
        for record_id, key, decision, audit in [
            ("/9001/a", "photograph", "accept", False),
            ("/9001/b", "photograph", "accept", False),
            ("/9001/b", "photograph", "reject", False),  # the last decision counts
            ("/9002/d", "photograph", "accept", True),
            ("/9002/e", "photograph", "add", False),
            ("/9001/c", "photograph", "reject", False),
            ("/9001/a", "map", "reject", False),
        ]:
            session.add(
                Review(
                    record_id=record_id,
                    label_key=key,
                    model_version=VERSION,
                    decision=decision,
                    reviewer="ada",
                    audit=audit,
                )
            )
            session.flush()
    rows = {row.key: row.as_json() for row in class_stats(review_db, QueueFilter())}
    photo = rows["photograph"]
    assert (photo["reviewed"], photo["accepted"], photo["rejected_above"]) == (5, 2, 1)
    assert (photo["added"], photo["rejected_below"], photo["audited"]) == (1, 1, 1)
    assert photo["precision"]["estimate"] == pytest.approx(2 / 3)
    low, high = wilson(2, 3)
    assert photo["precision"]["low"] == pytest.approx(low)
    assert photo["precision"]["high"] == pytest.approx(high)
    assert photo["audit_precision"]["estimate"] == 1.0
    # Reviewed scores, best first: .90 yes, .75 yes, .52 no, .49 yes, .30 no. F1 at each cut:
    # 2/4, 4/5, 4/6, 6/7, 6/8: the best labels down to .49, halfway to .30 is 0.395.
    assert photo["suggested_threshold"] == pytest.approx(0.395)
    assert rows["map"]["precision"] is None and rows["map"]["rejected_below"] == 1
    assert rows["map"]["suggested_threshold"] is None  # no positive: nothing to place it by
    text = CliRunner().invoke(cli, ["review", "stats"], env={"DATABASE_URL": pg_url})
    assert text.exit_code == 0, text.output
    table = text.stdout.splitlines()
    assert "0.667 [0.208, 0.939]" in text.stdout  # three decimals, as the page shows them
    assert "0.395 (too few decisions: 5 < 30)" in text.stdout
    # Aligned: numbers end under the end of their heading, the suggestion starts under its own.
    for heading in ("reviewed", "precision (95% CI)", "audit precision"):
        end = table[0].index(heading) + len(heading)
        assert all(line[end - 1] != " " and line[end] == " " for line in table[1:]), heading
    start = table[0].index("suggested")
    assert all(line[start - 1] == " " and line[start] != " " for line in table[1:])
    as_json = CliRunner().invoke(cli, ["review", "stats", "--json"], env={"DATABASE_URL": pg_url})
    assert as_json.exit_code == 0, as_json.output
    assert {row["key"]: row for row in json.loads(as_json.stdout)} == rows


def test_review_export_is_a_labelled_set_that_calibrate_reads(
    tiny_model: Path, image_host, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    version = json.loads((model_dir / "model.json").read_text())["version"]
    url = f"sqlite:///{tmp_path}/review.sqlite3"
    db = build_review_db(url, image_host, version)
    with db.transaction() as session:
        for record_id, key, decision in [
            ("/9001/a", "photograph", "reject"),
            ("/9001/a", "drawing", "add"),
            ("/9001/c", "drawing", "accept"),
            ("/9002/d", "map", "reject"),
        ]:
            session.add(
                Review(
                    record_id=record_id,
                    label_key=key,
                    model_version=version,
                    decision=decision,
                    reviewer="ada",
                )
            )
    db.dispose()
    out = tmp_path / "reviewed.jsonl"
    env = {"DATABASE_URL": url, "ENRICH_FETCH_ALLOW": "127.0.0.1"}
    # In this process (torch is loaded already): the same command line, without a new Python.
    done = CliRunner().invoke(cli, ["review", "export", "--out", str(out)], env=env)
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # Decided labels as decided; the model's labels nobody decided on stay.
    assert {row["record_id"]: row["labels"] for row in rows} == {
        "/9001/a": ["drawing"],
        "/9001/c": ["drawing"],
        "/9002/d": ["drawing", "photograph"],
    }
    labelled = read_labelled(out, {key: VOCABULARY[key] for key in KEYS})
    assert len(labelled.images) == 3 and labelled.group_field == "record_id"
    calibrated = CliRunner().invoke(
        cli, ["model", "calibrate", str(model_dir), "--data", str(out), "--json"], env=env
    )
    assert calibrated.exit_code == 0, calibrated.output
    report = json.loads(calibrated.stdout)
    assert report["version"] == version
    calibration = report["calibration"]
    assert (calibration["images"], calibration["skipped"]) == (3, 0)
    support = {key: value["support"] for key, value in calibration["classes"].items()}
    assert support == {"photograph": 1, "drawing": 3, "map": 0}
    # Three reviewed records move no threshold (calibrate needs 10 of each side).
    assert all(c["method"].startswith("kept: ") for c in calibration["classes"].values())

    # Standard output is `-`; a `.csv` name, which calibrate would read as CSV, is refused.
    piped = CliRunner().invoke(cli, ["review", "export", "--out", "-"], env=env)
    assert piped.exit_code == 0 and piped.stdout.splitlines() == out.read_text().splitlines()
    assert not Path("-").exists()
    as_csv = CliRunner().invoke(
        cli, ["review", "export", "--out", str(tmp_path / "reviewed.csv")], env=env
    )
    assert as_csv.exit_code == 2 and "the labelled set is JSON Lines" in as_csv.output
    assert not (tmp_path / "reviewed.csv").exists()


def test_audit_sample_draws_labels_above_threshold_until_each_is_audited(
    app_server: ReviewServer,
) -> None:
    labelled = {
        (record, key)
        for record, scores in SCORES.items()
        for key, score, threshold in zip(KEYS, scores, THRESHOLDS, strict=True)
        if score >= threshold
    }

    def audit_queue() -> list[tuple[str, str]]:
        answer = requests.get(f"{app_server.url}/api/queue?audit=1&limit=100", timeout=10)
        return [(i["record_id"], i["label_key"]) for i in answer.json()["items"]]

    drawn = audit_queue()
    assert sorted(drawn) == sorted(labelled) and len(drawn) == 8
    # A decision from the uncertainty queue leaves the label in the audit sample...
    assert decide(app_server, (*drawn[0], "accept", "ada")).status_code == 201
    assert sorted(audit_queue()) == sorted(labelled)
    # ...one made in the audit sample takes it out, and is marked as such.
    body = {
        "record_id": drawn[1][0],
        "label_key": drawn[1][1],
        "model_version": VERSION,
        "decision": "reject",
        "reviewer": "ada",
        "audit": True,
    }
    assert requests.post(f"{app_server.url}/api/decisions", json=body, timeout=10).ok
    assert sorted(audit_queue()) == sorted(labelled - {drawn[1]})
    assert app_server.decisions()[-1] == (*drawn[1], "reject", "ada", True)
    # The draw is random: over a few draws the first item is not always the same one.
    firsts = {audit_queue()[0] for _ in range(12)}
    assert len(firsts) > 1


def test_enrich_review_serves_on_loopback_and_refuses_the_network_without_a_token(
    review_db: Database, pg_url: str, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": pg_url, "ENRICH_REVIEW_TOKEN": ""}
    refused = enrich("review", "--host", "0.0.0.0", env=env)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "Error: binding to 0.0.0.0 (not loopback) needs a login: set ENRICH_REVIEW_TOKEN"
    ]
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "enrichment",
            "review",
            "--port",
            str(port),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return requests.get(f"{url}/api/queue?limit=1", timeout=2).ok
            except requests.ConnectionError:
                assert process.poll() is None, process.stderr.read()
                return False

        wait_for(answers, 60, "enrich review to answer")
        assert requests.get(f"{url}/api/queue?limit=1", timeout=5).json()["total"] == 15
        page = requests.get(f"{url}/queue", timeout=5)
        assert page.ok and "Object C" in page.text
    finally:
        process.terminate()
        process.wait(20)
    started = process.stderr.read()
    assert f"review app on http://127.0.0.1:{port}/ over postgresql" in started
    assert "15 pending items" in started
