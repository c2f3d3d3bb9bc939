"""Hostile and odd input to the review app and `enrich review`: each is a 4xx with a message,
or a one-line startup error; never a 500 or a traceback. And the reverse-proxy mode: off, a
POST through a TLS-terminating proxy is refused; on, it is served."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.config import Settings
from enrichment.review.app import create_app
from enrichment.store.database import Database
from tests.test_review_api import VERSION, ReviewServer, build_review_db, serve

HUGE = "99999999999999999999"


@pytest.fixture
def server(pg_url: str, image_host, tmp_path: Path) -> Iterator[ReviewServer]:
    db = build_review_db(pg_url, image_host)
    running = serve(db, tmp_path, token="t0ken")
    yield running
    running.close()
    db.dispose()


def logged_in(server: ReviewServer, next_target: str) -> requests.Response:
    """Log in through the form with `next` as the login page was given it."""
    with requests.Session() as browser:
        page = browser.get(f"{server.url}/login", params={"next": next_target}, timeout=10)
        assert page.status_code == 200
        return browser.post(
            f"{server.url}/login",
            data={"token": "t0ken", "next": next_target},
            headers={"Origin": server.url},
            allow_redirects=False,
            timeout=10,
        )


@pytest.mark.parametrize(
    "target",
    ["/\t/evil.com/x", "/\n/evil.com", "//evil.com/x", "/\\evil.com", "https://evil.com/"],
)
def test_login_never_redirects_off_the_app(server: ReviewServer, target: str) -> None:
    answer = logged_in(server, target)
    assert answer.status_code == 302
    assert answer.headers["Location"] == "/queue"


def test_login_keeps_a_plain_local_target(server: ReviewServer) -> None:
    answer = logged_in(server, "/queue?label=map&label=drawing")
    assert answer.headers["Location"] == "/queue?label=map&label=drawing"


def bearer(server: ReviewServer) -> dict[str, str]:
    return {"Authorization": "Bearer t0ken"}


@pytest.mark.parametrize("query", ["endpoint=1", "_method=POST", "next=x&values=1"])
def test_stray_query_parameters_are_ignored(server: ReviewServer, query: str) -> None:
    page = requests.get(f"{server.url}/queue?{query}", headers=bearer(server), timeout=10)
    assert page.status_code == 200 and "next page" not in page.text


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (f"/queue?offset={HUGE}", "offset"),
        (f"/queue?run={HUGE}", "run"),
        (f"/api/queue?offset={HUGE}", "offset"),
        (f"/api/queue?run={HUGE}", "run"),
        ("/api/queue?run=-3", "run"),
        ("/api/queue?after=nonsense", "after"),
        ("/api/queue?after=7~map~/9001/a", "after"),
    ],
)
def test_out_of_range_numbers_are_refused(server: ReviewServer, path: str, field: str) -> None:
    answer = requests.get(server.url + path, headers=bearer(server), timeout=10)
    assert answer.status_code == 400
    if path.startswith("/api/"):
        assert answer.json()["field"] == field
    else:
        assert field in answer.text


@pytest.mark.parametrize(
    "ids", [[10**30], [2**63], list(range(1, 400_001)), [], ["1"], "1", [1.5], [-1]]
)
def test_undo_refuses_ids_no_decision_can_have(server: ReviewServer, ids: object) -> None:
    answer = requests.post(
        f"{server.url}/api/undo", json={"ids": ids}, headers=bearer(server), timeout=30
    )
    assert answer.status_code == 400 and answer.json()["field"] == "ids"


def test_a_deeply_nested_body_is_refused(server: ReviewServer) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    answer = requests.post(
        f"{server.url}/api/decisions",
        data=deep,
        headers={**bearer(server), "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 400 and "nested" in answer.json()["error"]


def test_a_take_back_by_a_huge_reviewer_name_is_refused(server: ReviewServer) -> None:
    answer = requests.post(
        f"{server.url}/api/undo",
        json={"ids": [1], "reviewer": "x" * 500},
        headers=bearer(server),
        timeout=10,
    )
    assert answer.status_code == 400 and answer.json()["field"] == "reviewer"


def proxied_post(db: Database, tmp_path: Path, behind_proxy: bool) -> int:
    """A browser's POST as a TLS-terminating proxy forwards it: https Origin, plain hop."""
    settings = Settings(database_url="unused", review_token="t0ken")
    app = create_app(db, settings, tmp_path / "cache", "0.0.0.0", behind_proxy=behind_proxy)
    body = {
        "record_id": "/9001/a",
        "label_key": "photograph",
        "model_version": VERSION,
        "decision": "accept",
        "reviewer": "ada",
    }
    with app.test_client() as client:
        answer = client.post(
            "/api/decisions",
            data=json.dumps(body),
            content_type="application/json",
            base_url="http://10.0.0.5:8765",
            headers={
                "Origin": "https://review.example.org",
                "Authorization": "Bearer t0ken",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "review.example.org",
                "X-Forwarded-Port": "443",
                "X-Forwarded-For": "192.0.2.7",
            },
        )
        return answer.status_code


def test_proxy_mode_is_off_by_default_and_serves_a_tls_proxy_when_on(
    pg_url: str, image_host, tmp_path: Path
) -> None:
    db = build_review_db(pg_url, image_host)
    try:
        assert proxied_post(db, tmp_path, behind_proxy=False) == 403
        assert proxied_post(db, tmp_path, behind_proxy=True) == 201
    finally:
        db.dispose()


def run_review(pg_url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["review", *args], env={"DATABASE_URL": pg_url})
    return result.exit_code, result.output


def test_startup_problems_are_one_line_errors(pg_url: str, image_host, tmp_path: Path) -> None:
    build_review_db(pg_url, image_host).dispose()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, output = run_review(pg_url, "--port", port, "--cache-dir", str(tmp_path / "c"))
    assert code == 1 and "Traceback" not in output
    assert output.strip().splitlines() == [
        f"Error: Invalid value for '--port': cannot listen on 127.0.0.1:{port}: "
        + output.split(f"127.0.0.1:{port}: ", 1)[1].strip()
    ]
    code, output = run_review(
        pg_url, "--host", "no-such-host.invalid", "--cache-dir", str(tmp_path)
    )
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "Invalid value for '--host': no-such-host.invalid does not resolve" in output
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, output = run_review(pg_url, "--cache-dir", str(blocker / "cache"))
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "cannot create the directory" in output and "Traceback" not in output
