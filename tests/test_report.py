"""`enrich report`: a finished run's page holds every section with the database's counts,
escapes third-party text, survives images that are gone, and loads nothing from the network."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from enrichment.config import Settings
from enrichment.errors import OutputError
from enrichment.report.report import (
    ClassReport,
    ErrorReason,
    Holdings,
    RunReport,
    Thumbnail,
    render,
    write_report,
)
from enrichment.store.database import Database
from enrichment.store.query import RunSummary
from enrichment.store.reporting import LabelledRecord
from enrichment.store.schema import item_uri_of
from tests.conftest import enrich, image_bytes, write_jsonl
from tests.scenario import PICTURES, build_scenario

PER_CLASS = 2
# What a record id may hold that means something in HTML (ids refuse <, > and ").
HOSTILE_ID = "/e2e/x'&amp;onerror=alert(1)"
HOSTILE_PROVIDER = "<b>Evil & Co</b>"
# Ends the style sheet, opens a script, and leaves both kinds of attribute quote.
HOSTILE_TEXT = """</style><script>alert('x')</script>"><a title='y' href="z">&amp;"""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
]


@dataclass
class Node:
    """A parsed element; enough of a DOM to find sections, rows and images."""

    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str) -> list[Node]:
        found: list[Node] = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag:
                    found.append(child)
                found.extend(child.all(tag))
        return found

    def by(self, tag: str, **attrs: str) -> list[Node]:
        wanted = {key.rstrip("_").replace("_", "-"): value for key, value in attrs.items()}
        return [n for n in self.all(tag) if all(n.attrs.get(k) == v for k, v in wanted.items())]

    def one(self, tag: str, **attrs: str) -> Node:
        (node,) = self.by(tag, **attrs)
        return node


class TreeBuilder(HTMLParser):
    VOID = frozenset({"meta", "img", "br", "link", "input", "hr", "source"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {key: value or "" for key, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        tags = [node.tag for node in self.stack]
        assert tag in tags, f"</{tag}> closes nothing"
        del self.stack[len(tags) - 1 - tags[::-1].index(tag) :]

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements"
    return builder.root


def descendants(node: Node) -> list[Node]:
    children = [child for child in node.children if isinstance(child, Node)]
    return [*children, *(found for child in children for found in descendants(child))]


def rows(table: Node) -> list[list[str]]:
    return [
        [cell.text().strip() for cell in row.children if isinstance(cell, Node)]
        for body in table.all("tbody")
        for row in body.all("tr")
    ]


@dataclass(frozen=True)
class FinishedRun:
    database: str
    run_id: int
    page: Path
    broken_url: str


@pytest.fixture(scope="module")
def finished_run(
    tmp_path_factory: pytest.TempPathFactory, image_host, tiny_model: Path
) -> FinishedRun:
    """A run made with the real CLI over the scenario plus a hostile record, then reported."""
    tmp = tmp_path_factory.mktemp("report")
    records, expected = build_scenario(image_host, tmp, tiny_model, prefix="/report")
    labelled = next(record for record, want in expected.items() if want.labels)
    broken_url = image_host.add("/report/hostile.png", image_bytes(*PICTURES[labelled]))
    lines = records.read_text().splitlines()
    hostile = {
        "id": HOSTILE_ID,
        "image_url": broken_url,
        "provider": HOSTILE_PROVIDER,
    }
    write_jsonl(records, [*map(json.loads, lines), hostile])
    database = f"sqlite:///{tmp}/enrich.sqlite3"
    env = {
        "DATABASE_URL": database,
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
    }
    run = enrich("run", "--records", str(records), "--batch-size", "3", "--json", env=env)
    assert run.returncode == 0, run.stderr
    run_id = json.loads(run.stdout)["id"]
    # Records files refuse such an item URI now; a database written before they did may hold one.
    engine = sa.create_engine(database)
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE records SET item_uri = 'javascript:alert(1)' WHERE id = :id"),
            {"id": HOSTILE_ID},
        )
    engine.dispose()
    # The image is gone by the time the report is made: its thumbnail becomes a placeholder.
    image_host.add("/report/hostile.png", b"gone", "text/plain", status=410)
    out = tmp / "reports"
    made = enrich("report", str(run_id), "--out", str(out), "--per-class", str(PER_CLASS), env=env)
    assert made.returncode == 0, made.stderr
    page = Path(made.stdout.strip())
    assert page == out / f"run-{run_id}.html"
    return FinishedRun(database, run_id, page, broken_url)


def query(database: str, sql: str, **params: object) -> list[tuple]:
    engine = sa.create_engine(database)
    with engine.connect() as connection:
        found = [tuple(row) for row in connection.execute(sa.text(sql), params)]
    engine.dispose()
    return found


def test_report_has_every_section_with_the_database_counts(finished_run: FinishedRun) -> None:
    database, run_id = finished_run.database, finished_run.run_id
    raw = finished_run.page.read_text(encoding="utf-8")
    document = parse(raw)
    assert [s.attrs.get("id") for s in document.all("section") if "id" in s.attrs] == [
        "summary",
        "labels",
        "confidence",
        "errors",
        "gallery",
    ]

    summary = document.one("section", id="summary")
    (version,) = query(database, "SELECT model_version FROM runs WHERE id = :r", r=run_id)[0]
    facts = {
        row.one("th").text(): row.one("td").text()
        for row in summary.one("table", class_="facts").all("tr")
    }
    assert facts["Model version"] == version
    assert facts["Status"] == "completed"
    assert '"source": "records_file"' in facts["Scope"]
    assert facts["Throughput"].endswith("records/s")
    assert facts["Duration"].endswith("s")
    outcomes = dict(
        query(
            database, "SELECT status, count(*) FROM results WHERE run_id = :r GROUP BY 1", r=run_id
        )
    )
    shown = {name: int(count) for name, count in rows(summary.one("table", id="outcomes"))}
    assert shown == {
        name: outcomes.get(name, 0) for name in ("labelled", "below_threshold", "error")
    }
    assert facts["Records done"] == str(sum(outcomes.values()))

    (labels_json, thresholds_json) = query(
        database, "SELECT classes, thresholds FROM models WHERE version = :v", v=version
    )[0]
    keys = [label["key"] for label in json.loads(labels_json)]
    thresholds = json.loads(thresholds_json)
    counts = dict(
        query(
            database,
            "SELECT l.label_key, count(*) FROM labels l JOIN results r ON r.record_id = l.record_id"
            " AND r.model_version = l.model_version WHERE r.run_id = :r GROUP BY 1",
            r=run_id,
        )
    )
    (scored,) = query(
        database, "SELECT count(*) FROM results WHERE run_id = :r AND status != 'error'", r=run_id
    )[0]
    label_table = document.one("section", id="labels").one("table")
    assert [row[1] for row in rows(label_table)] == keys
    for row, key, threshold in zip(rows(label_table), keys, thresholds, strict=True):
        assert float(row[2]) == pytest.approx(threshold, abs=0.00005)
        assert int(row[3]) == counts.get(key, 0)
        assert int(row[4]) == scored
    assert document.one("section", id="labels").one("img", alt="Bar chart of labels per class")

    histograms = document.one("section", id="confidence").all("figure")
    assert [figure.attrs["data-class"] for figure in histograms] == keys
    for figure in histograms:
        src = figure.one("img").attrs["src"]
        assert src.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).format == "PNG"

    errors = dict(
        query(
            database,
            "SELECT error_reason, count(*) FROM results WHERE run_id = :r"
            " AND error_reason IS NOT NULL GROUP BY 1",
            r=run_id,
        )
    )
    error_rows = rows(document.one("section", id="errors").one("table"))
    assert (
        {row[0]: int(row[1]) for row in error_rows}
        == errors
        == {
            "http_404": 1,
            "not_an_image": 1,
            "no_image": 1,
        }
    )
    for reason, _, example, _ in error_rows:
        found = query(database, "SELECT error_reason FROM results WHERE record_id = :i", i=example)
        assert found == [(reason,)]

    gallery = document.one("section", id="gallery")
    items = {
        record: item_uri_of(record, stored)
        for record, stored in query(database, "SELECT id, item_uri FROM records")
    }
    for key in keys:
        ranked = [
            record
            for record, _ in query(
                database,
                "SELECT l.record_id, l.confidence FROM labels l JOIN results r"
                " ON r.record_id = l.record_id AND r.model_version = l.model_version"
                " WHERE r.run_id = :r AND l.label_key = :k ORDER BY l.confidence DESC, l.record_id",
                r=run_id,
                k=key,
            )
        ]
        block = gallery.one("section", data_class=key)
        highest = [f.attrs["data-record"] for f in block.by("figure", data_kind="highest")]
        lowest = [f.attrs["data-record"] for f in block.by("figure", data_kind="lowest")]
        assert highest == ranked[:PER_CLASS]
        assert lowest == ranked[PER_CLASS:][::-1][:PER_CLASS]
        if not ranked:
            assert "No record got this label" in block.text()
        for figure in block.all("figure"):
            links = figure.all("a")
            record = figure.attrs["data-record"]
            if items[record].startswith("http"):
                assert [a.attrs["href"] for a in links] == [items[record]]
            else:  # a javascript: item URI in the database is never made a link
                assert links == []
    assert gallery.by("figure", data_record=HOSTILE_ID), "the hostile record is labelled"


def test_report_escapes_third_party_text_and_survives_missing_images(
    finished_run: FinishedRun,
) -> None:
    raw = finished_run.page.read_text(encoding="utf-8")
    document = parse(raw)
    assert HOSTILE_ID not in raw  # and it is found below by its text: escaped, not dropped
    assert "<b>Evil" not in raw and "javascript:" not in raw
    assert all("onerror" not in node.attrs for node in document.all("img"))
    assert not document.all("script") and not document.all("link")
    (hostile,) = document.by("figure", data_record=HOSTILE_ID)
    assert HOSTILE_ID in hostile.text() and HOSTILE_PROVIDER in hostile.text()
    placeholder = hostile.one("div")
    assert "http_410" in placeholder.text() and placeholder.attrs["title"]
    thumbs = [
        figure
        for figure in document.one("section", id="gallery").all("figure")
        if figure is not hostile and figure.attrs["data-record"] != HOSTILE_ID
    ]
    assert thumbs
    assert all(
        figure.one("img").attrs["src"].startswith("data:image/jpeg;base64,") for figure in thumbs
    )
    sources = [node.attrs["src"] for node in document.all("img")]
    assert sources and all(src.startswith("data:") for src in sources)
    csp = document.one("meta", http_equiv="Content-Security-Policy").attrs["content"]
    assert "default-src 'none'" in csp


def test_every_text_from_the_database_is_escaped_where_it_is_shown() -> None:
    """Rendered directly, with hostile text in every field a record, a model, a fetch or
    a run can fill: the page keeps its one style sheet, gains no element, and shows each
    text as it was."""
    hostile = {
        name: f"{name} {HOSTILE_TEXT}"
        for name in (
            "id",
            "item",
            "provider",
            "label",
            "key",
            "reason",
            "record",
            "message",
            "fetch_reason",
            "fetch_message",
            "version",
            "error",
            "outcome",
            "scope",
            "moved_from",
        )
    }
    summary = RunSummary(
        id=7,
        kind="full",
        scope={"source": "records_file", "path": hostile["scope"]},
        model_version=hostile["version"],
        status="failed",
        records_seen=3,
        records_enqueued=3,
        batches={},
        outcomes={"labelled": 2, hostile["outcome"]: 1},
        errors_by_reason={hostile["reason"]: 1},
        created_at=datetime(2026, 1, 2, 3, 4, 5),
        finished_at=datetime(2026, 1, 2, 3, 5, 5),
        error=hostile["error"],
        records_done=3,
        rate=0.05,
        eta_seconds=None,
    )
    highest = LabelledRecord(
        hostile["id"], "https://x.org/" + hostile["item"], hostile["provider"], "u1", 0.9
    )
    lowest = LabelledRecord("/plain/1", "https://x.org/1", None, "u2", 0.6)
    report = RunReport(
        summary,
        summary.created_at,
        60.0,
        Holdings(3, 1, 1, [9], {hostile["moved_from"]: 1}, None),
        [
            ClassReport(
                hostile["key"], hostile["label"], 0.5, 2, 2, np.ones(20, int), [highest], [lowest]
            )
        ],
        [ErrorReason(hostile["reason"], 1, hostile["record"], hostile["message"])],
    )
    thumbnails = {
        "u1": Thumbnail("data:image/jpeg;base64,AAAA"),
        "u2": Thumbnail(reason=hostile["fetch_reason"], message=hostile["fetch_message"]),
    }
    raw = render(report, thumbnails)
    document = parse(raw)

    assert "<script" not in raw and raw.count("</style>") == 1
    (style,) = document.all("style")
    css = resources.files("enrichment.report").joinpath("templates/report.css").read_text()
    assert style.text().strip() == css.strip()
    assert not document.all("script") and len(document.all("a")) == 2  # the two item links
    assert [a.attrs["href"] for a in document.all("a")] == [
        "https://x.org/" + hostile["item"],
        "https://x.org/1",
    ]
    attributes = [value for node in descendants(document) for value in node.attrs.values()]
    for name, text in hostile.items():
        assert text not in raw, f"{name} is not escaped"
        if name == "scope":  # shown as JSON, its quotes escaped: checked below
            continue
        assert text in document.text() or any(text in value for value in attributes), name
    facts = {
        row.one("th").text(): row.one("td").text()
        for row in document.one("table", class_="facts").all("tr")
    }
    assert facts["Model version"] == hostile["version"] and facts["Run error"] == hostile["error"]
    assert json.loads(facts["Scope"])["path"] == hostile["scope"]
    assert document.one("title").text() == f"Run 7 report: {hostile['version']}"
    assert [row[0] for row in rows(document.one("table", id="outcomes"))] == [
        "labelled",
        "below_threshold",
        "error",
        hostile["outcome"],
    ]
    (label_row,) = rows(document.one("section", id="labels").one("table"))
    assert label_row[:2] == [hostile["label"], hostile["key"]]
    assert [f.attrs["data-class"] for f in document.all("figure") if "data-class" in f.attrs] == [
        hostile["key"]
    ]
    assert rows(document.one("section", id="errors").one("table")) == [
        [hostile["reason"], "1", hostile["record"], hostile["message"]]
    ]
    block = document.one("section", id="gallery").one("section", data_class=hostile["key"])
    assert block.one("h3").children[0] == hostile["label"] + " "
    (shown,) = block.by("figure", data_kind="highest")
    assert shown.attrs["data-record"] == hostile["id"]
    assert shown.one("img").attrs["alt"] == hostile["id"]
    assert shown.one("code").text() == hostile["id"] and hostile["provider"] in shown.text()
    placeholder = block.one("figure", data_kind="lowest").one("div", class_="placeholder")
    assert placeholder.attrs["title"] == hostile["fetch_message"]
    assert placeholder.one("code").text() == hostile["fetch_reason"]


def test_report_into_a_path_that_cannot_be_written(
    finished_run: FinishedRun, image_host, tmp_path: Path
) -> None:
    """One error naming the path, before any thumbnail is fetched; nothing left behind.
    (`enrich` prints an `OutputError` as one line, as every command does.)"""
    db = Database(finished_run.database)
    settings = Settings(fetch_allow=("127.0.0.1",))
    run = finished_run.run_id
    before = len(image_host.requests)
    with pytest.raises(OutputError) as raised:
        write_report(db, run, Path("/proc/enrich/reports"), settings, PER_CLASS)
    assert str(raised.value) == (
        "cannot create the directory /proc/enrich/reports: No such file or directory: /proc/enrich"
    )
    assert len(image_host.requests) == before, "it failed before fetching the thumbnails"

    # The page's own name is taken by a directory: the write fails, no temporary stays.
    (tmp_path / f"run-{run}.html").mkdir()
    with pytest.raises(OutputError) as raised:
        write_report(db, run, tmp_path, settings, PER_CLASS)
    assert str(raised.value) == f"cannot write {tmp_path}/run-{run}.html: Is a directory"
    assert [path.name for path in tmp_path.iterdir()] == [f"run-{run}.html"]
    db.dispose()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed on first use where we are root and apt can reach it;
    otherwise the test is skipped, saying why. Test processes (`make test` runs two) take
    turns at the install: apt holds a lock of its own, and the second would fail on it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        reason = "chromium is not installed, and installing it needs root and apt-get"
        print(f"skipping the browser check: {reason}")
        pytest.skip(reason)
    with (Path(tempfile.gettempdir()) / "enrich-tests-chromium.lock").open("w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)  # released as the file closes
        return _installed_chromium()


def _installed_chromium() -> str:
    """Chromium, installed by this process unless another test process did meanwhile;
    the test is skipped, saying why, where the install fails."""
    found = shutil.which("chromium")
    if found:
        return found
    try:
        installed = subprocess.run(
            "apt-get update -q && apt-get install -y -q chromium",
            shell=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        last = (installed.stderr.strip() or installed.stdout.strip()).splitlines()[-1:]
        reason = f"apt-get install chromium failed: {' '.join(last)}"
    except subprocess.TimeoutExpired:
        reason = "apt-get install chromium took over 15 minutes"
    found = shutil.which("chromium")
    if found:
        return found
    print(f"skipping the browser check: {reason}")
    pytest.skip(reason)


class DevTools:
    """Chromium driven over --remote-debugging-pipe: the page's own requests, failures and
    console errors as events (the browser's background traffic is not the page's), and
    full-page screenshots. The pipe is fds 3 and 4 of the browser, set up by a tiny Python
    trampoline, since Debian's launcher is a shell script and dash cannot redirect fds >= 10."""

    TRAMPOLINE = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )

    def __init__(self, chromium: str, profile: Path) -> None:
        to_browser, self.writer = os.pipe()
        self.reader, from_browser = os.pipe()
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
        for fd in (to_browser, from_browser):
            os.close(fd)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                self.TRAMPOLINE,
                *map(str, ends),
                chromium,
                *CHROMIUM_FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            pass_fds=ends,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in ends:
            os.close(fd)
        self.buffer = b""
        self.last_id = 0
        self.events: list[dict] = []

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive(time.monotonic() + 60)
            if reply.get("id") == self.last_id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]

    def receive(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.reader], [], [], left)[0], "no answer"
            chunk = os.read(self.reader, 1 << 20)
            assert chunk, "chromium closed the DevTools pipe"
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        message = json.loads(raw)
        if "method" in message:
            self.events.append(message)
        return message

    def load(self, url: str, width: int) -> tuple[str, bytes]:
        """Open `url` in a new tab and wait for its load event; returns the session and a
        full-page PNG screenshot."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Network", "Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=800,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.call("Page.navigate", session, url=url)
        deadline = time.monotonic() + 60
        while not self.seen("Page.loadEventFired", session):
            self.receive(deadline)
        size = self.call("Page.getLayoutMetrics", session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}
        shot = self.call(
            "Page.captureScreenshot", session, format="png", clip=clip, captureBeyondViewport=True
        )
        return session, base64.b64decode(shot["data"])

    def seen(self, method: str, session: str) -> list[dict]:
        return [
            event["params"]
            for event in self.events
            if event["method"] == method and event.get("sessionId") == session
        ]

    def evaluate(self, session: str, expression: str) -> object:
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        return result["result"]["value"]

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.writer)
        os.close(self.reader)


def test_report_renders_in_headless_chromium_without_network(
    finished_run: FinishedRun, chromium: str, image_host, tmp_path: Path
) -> None:
    probe = tmp_path / "probe.html"
    probe_url = image_host.add("/report/probe.png", image_bytes((0, 0, 255)))
    probe.write_text(f'<img src="{probe_url}"><img src="missing.png">', encoding="utf-8")
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        session, _ = browser.load(probe.as_uri(), 400)
        requested = {
            event["request"]["url"] for event in browser.seen("Network.requestWillBeSent", session)
        }
        assert {probe_url, probe.with_name("missing.png").as_uri()} <= requested
        failures = [event["errorText"] for event in browser.seen("Network.loadingFailed", session)]
        assert failures == ["net::ERR_FILE_NOT_FOUND"], "the checks below must see failures"

        before = len(image_host.requests)
        session, screenshot = browser.load(finished_run.page.as_uri(), 1280)
        requests = browser.seen("Network.requestWillBeSent", session)
        urls = [event["request"]["url"] for event in requests]
        assert urls[0] == finished_run.page.as_uri()
        assert all(url.startswith("data:") for url in urls[1:]), urls
        assert browser.seen("Network.loadingFailed", session) == []
        assert browser.seen("Runtime.exceptionThrown", session) == []
        assert [e["entry"]["text"] for e in browser.seen("Log.entryAdded", session)] == []
        assert len(image_host.requests) == before
        images = browser.evaluate(
            session, "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
        )
        assert images and all(images), "every chart and thumbnail decodes"
        assert browser.evaluate(session, "document.title").startswith(
            f"Run {finished_run.run_id} report"
        )
    finally:
        browser.close()
    path = tmp_path / "report.png"
    path.write_bytes(screenshot)
    shot = Image.open(path)
    assert shot.width == 1280 and shot.height > 1500
    colours = shot.convert("RGB").resize((64, 160)).getcolors(64 * 160)
    assert colours is not None and len(colours) > 20, "a blank page"
