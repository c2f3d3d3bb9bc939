"""The Europeana Search API source and the scheduler, against a local Search API server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.config import Settings
from enrichment.errors import EnrichError, RecordIdError
from enrichment.runs import service
from enrichment.sources import EuropeanaSource
from enrichment.sources.europeana import (
    SearchClient,
    SearchPageError,
    SearchQuery,
    dataset_query,
    record_from_item,
)
from enrichment.sources.records_file import parse_timestamp
from enrichment.store.database import Database
from enrichment.store.locks import scope_lock
from enrichment.store.query import record_results, run_summary
from tests.conftest import enrich, enrich_here, image_bytes, make_tiny_model
from tests.scenario import resume_in_process, run_in_process
from tests.search_api import KEY, RewritingSearchAPI, SearchAPI, generated_item, recorded_items


@pytest.fixture
def api() -> SearchAPI:
    server = SearchAPI()
    yield server
    server.close()


def settings_for(api: SearchAPI, database_url: str, model_dir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        europeana_api_key=KEY,
        europeana_api_url=api.url,
        model_dir=model_dir,
        fetch_allow=("127.0.0.1",),
        batch_size=40,
        search_backoff=0.01,
    )


def env_for(api: SearchAPI, database_url: str, model_dir: Path, key: str = KEY) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "EUROPEANA_API_KEY": key,
        "EUROPEANA_API_URL": api.url,
        "ENRICH_MODEL": str(model_dir),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
        "ENRICH_BATCH_SIZE": "40",
        "ENRICH_SEARCH_BACKOFF": "0.01",  # retries of a failing page without waiting seconds
    }


def fill_collection(api: SearchAPI, image_host, dataset: str, count: int) -> None:
    url = image_host.add(f"/search/{dataset}.png", image_bytes((90, 120, 200), "circle"))
    api.items.extend(generated_item(dataset, index, url) for index in range(count))


def run_dataset(settings: Settings, dataset: str, full: bool = False) -> int:
    """A run of one dataset on the library API, in-process; returns its id."""
    return run_in_process(settings, service.europeana_scope([dataset_query(dataset)]), full)


def run_row(database_url: str, run_id: int) -> dict:
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        row = (
            connection.execute(sa.text("SELECT * FROM runs WHERE id = :id"), {"id": run_id})
            .mappings()
            .one()
        )
    engine.dispose()
    return dict(row)


def scalar(database_url: str, sql: str) -> int:
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        value = connection.execute(sa.text(sql)).scalar_one()
    engine.dispose()
    return value


def test_recorded_items_map_to_records() -> None:
    item = recorded_items("search-pyeuropeana-tutorial-10items-nextcursor.json")[0]
    record = record_from_item(item)
    assert record.id == "/9200314/BibliographicResource_3000093755040_source"
    assert record.dataset == "9200314"
    assert (
        record.item_uri
        == "http://data.europeana.eu/item/9200314/BibliographicResource_3000093755040_source"
    )
    assert record.image_url == item["edmPreview"][0]
    assert record.provider == "Central Institute for the Union Catalogue of Italian Libraries"
    assert record.timestamp_update == parse_timestamp("2014-07-09T14:26:52.277Z")
    assert (
        record_from_item(item, "full").image_url
        == "http://www.14-18.it/img/mappa/RML0358106_01/full"
    )
    without_preview = {key: value for key, value in item.items() if key != "edmPreview"}
    assert record_from_item(without_preview, "auto").image_url == item["edmIsShownBy"][0]
    assert record_from_item(without_preview, "preview").image_url is None
    older_format = [
        record_from_item(i) for i in recorded_items("search-openverse-27items-cc0-images.json")
    ]
    assert len({r.id for r in older_format}) == 27 and all(r.image_url for r in older_format)


def test_cursor_paging_ends_when_next_cursor_is_absent(api: SearchAPI) -> None:
    api.items = [generated_item("777", index, "http://127.0.0.1/x.png") for index in range(250)]
    client = SearchClient(Settings(europeana_api_key=KEY, europeana_api_url=api.url))
    pages = list(client.pages(dataset_query("777")))
    assert [len(page.items) for page in pages] == [100, 100, 50]
    assert pages[-1].next_cursor is None
    ids = [item["id"] for page in pages for item in page.items]
    assert ids == sorted(item["id"] for item in api.items)  # none lost, none repeated
    cursors = [request["cursor"][0] for request in api.requests]
    assert cursors == ["*", pages[0].next_cursor, pages[1].next_cursor]
    assert all(request["rows"] == ["100"] and "start" not in request for request in api.requests)
    assert api.requests[0]["sort"] == ["europeana_id asc"]
    assert api.requests[0]["query"] == ["edm_datasetName:777_*"]


def test_429_with_retry_after_is_honoured_then_succeeds(api: SearchAPI) -> None:
    api.items = [generated_item("5", index, "http://127.0.0.1/x.png") for index in range(3)]
    api.failures = {1: ("status", 429, 1)}
    client = SearchClient(Settings(europeana_api_key=KEY, europeana_api_url=api.url))
    started = time.monotonic()
    page = client.page(SearchQuery("*"), "*")
    assert len(page.items) == 3 and len(api.requests) == 2
    assert time.monotonic() - started >= 0.9  # waited as the server asked


def test_a_page_trickled_a_byte_at_a_time_fails_at_its_deadline(api: SearchAPI) -> None:
    """Each byte within the read timeout, the whole never: a nightly run waited as long as
    the API liked, silently. The page now fails at its deadline, saying so."""
    api.items = [generated_item("5", index, "http://127.0.0.1/x.png") for index in range(3)]
    api.trickle = 0.2
    client = SearchClient(Settings(europeana_api_key=KEY, europeana_api_url=api.url), deadline=2)
    started = time.monotonic()
    with pytest.raises(SearchPageError, match="no whole answer within 2 s"):
        client.page(SearchQuery("*"), "*")
    assert time.monotonic() - started < 10


def test_a_retry_after_past_the_pages_deadline_is_not_waited_for(api: SearchAPI) -> None:
    """urllib3 would sleep for whatever Retry-After says (an hour, a day), five times over."""
    api.failures = {1: ("status", 429, 3600)}
    client = SearchClient(Settings(europeana_api_key=KEY, europeana_api_url=api.url), deadline=30)
    started = time.monotonic()
    with pytest.raises(
        SearchPageError, match=r"HTTP 429 after retries \(it asked for a wait of 3600 s\)"
    ):
        client.page(SearchQuery("*"), "*")
    assert time.monotonic() - started < 10 and len(api.requests) == 1


def test_page_that_keeps_failing_raises_a_resumable_error(api: SearchAPI) -> None:
    api.failures = {1: ("html",), 2: ("truncated",), 3: ("html",)}
    client = SearchClient(
        Settings(europeana_api_key=KEY, europeana_api_url=api.url, search_backoff=0.01)
    )
    with pytest.raises(SearchPageError, match="not JSON"):
        client.page(SearchQuery("*"), "*")


def test_bad_key_stops_the_run_before_anything_is_enqueued(
    api: SearchAPI, tmp_path: Path, tiny_model: Path, image_host
) -> None:
    fill_collection(api, image_host, "2048128", 5)
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    result = enrich(
        "run", "--dataset", "2048128", env=env_for(api, database, tiny_model, key="wrong")
    )
    assert result.returncode == 1
    recorded = json.loads(
        (
            Path(__file__).parent / "data/search-api/search-error-401-apikey-does-not-exist.json"
        ).read_text()
    )
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: Europeana Search API refused the request: {recorded['error']} ({recorded['code']})"
    )
    assert "wrong" not in result.stderr
    assert scalar(database, "SELECT count(*) FROM batches") == 0
    assert scalar(database, "SELECT count(*) FROM records") == 0
    assert scalar(database, "SELECT count(*) FROM runs") == 0  # refused before it began


def test_bad_query_is_reported_with_the_apis_message(
    api: SearchAPI, tmp_path: Path, tiny_model: Path
) -> None:
    result = enrich(
        "run",
        "--query",
        "title:(",
        env=env_for(api, f"sqlite:///{tmp_path}/db.sqlite3", tiny_model),
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Europeana Search API refused the request: Invalid query parameter: "
        "this test server does not understand 'title:(' (400-SQ)"
    )


@pytest.mark.parametrize("failure", ["html", "truncated"])
def test_malformed_page_fails_cleanly_and_resume_completes(
    api: SearchAPI, tmp_path: Path, tiny_model: Path, image_host, failure: str
) -> None:
    fill_collection(api, image_host, "4242", 230)
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    env = env_for(api, database, tiny_model)
    # The dataset's count and page 1 are served, then page 2 keeps failing (three attempts).
    api.failures = {3: (failure,), 4: (failure,), 5: (failure,)}
    # In this process (`enrich_here`): the subprocess's own exit is tested above.
    first = enrich_here("run", "--dataset", "4242", "--no-progress", env=env)
    assert first.returncode == 1
    assert "Europeana Search API page failed" in first.stderr
    assert "; run 1 stopped there: continue it with `enrich resume --run 1`" in first.stderr
    run = run_row(database, 1)
    assert run["status"] == "failed"
    checkpoint = json.loads(run["checkpoint"])
    assert checkpoint["position"]["query"] == 0 and checkpoint["position"]["cursor"] != "*"
    # Whole batches of page 1 only: those the process finished before page 2 failed for good.
    assert scalar(database, "SELECT count(*) FROM results") in (0, 40, 80)
    assert len(checkpoint["pending"]) == 20  # the rest of page 1, kept for the next batch

    resumed = enrich_here("resume", "--run", "1", "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "completed"
    assert summary["records_seen"] == 230 and summary["records_enqueued"] == 230
    assert scalar(database, "SELECT count(*) FROM results") == 230
    assert scalar(database, "SELECT count(DISTINCT record_id) FROM results WHERE run_id = 1") == 230


def test_incremental_runs_enqueue_only_what_changed(
    api: SearchAPI, tmp_path: Path, image_host
) -> None:
    model = tmp_path / "model"
    make_tiny_model(model)
    fill_collection(api, image_host, "9100", 60)
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    settings = settings_for(api, database, model)

    first = run_row(database, run_dataset(settings, "9100"))
    assert (first["records_seen"], first["records_enqueued"]) == (60, 60)

    api.requests.clear()
    second = run_row(database, run_dataset(settings, "9100"))
    assert second["status"] == "completed" and second["records_enqueued"] == 0
    paged = [request for request in api.requests if request["rows"] != ["0"]]  # not counts
    assert any(qf.startswith("timestamp_update:[") for qf in paged[0]["qf"])

    api.items[7]["timestamp_update"] = "2099-01-01T00:00:00.000Z"
    third = run_row(database, run_dataset(settings, "9100"))
    assert third["records_enqueued"] == 1
    assert (
        scalar(database, f"SELECT record_id FROM results WHERE run_id = {third['id']}")
        == "/9100/item_00007"
    )

    new_model = tmp_path / "model2"
    make_tiny_model(new_model, name="tiny-v2", seed=1)
    fourth = run_row(database, run_dataset(settings_for(api, database, new_model), "9100"))
    assert fourth["records_enqueued"] == 60


def test_changed_image_url_in_a_records_file_enqueues_exactly_that_record(
    tmp_path: Path, tiny_model: Path, image_host
) -> None:
    url = image_host.add("/incremental.png", image_bytes((10, 200, 10), "bar"))
    rows = [
        {"id": f"/55/r{i}", "image_url": url, "timestamp_update": "2024-05-01T00:00:00Z"}
        for i in range(5)
    ]
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(row) + "\n" for row in rows))
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    settings = Settings(database_url=database, model_dir=tiny_model, fetch_allow=("127.0.0.1",))
    scope = service.records_scope(records)
    assert run_row(database, run_in_process(settings, scope))["records_enqueued"] == 5
    assert run_row(database, run_in_process(settings, scope))["records_enqueued"] == 0
    rows[3]["image_url"] = image_host.add("/incremental-new.png", image_bytes((200, 10, 10), "bar"))
    records.write_text("".join(json.dumps(row) + "\n" for row in rows))
    changed = run_in_process(settings, scope)
    assert run_row(database, changed)["records_enqueued"] == 1
    results = record_results(Database(database), changed)
    assert [result.record_id for result in results] == ["/55/r3"]


def test_second_scheduler_on_the_same_scope_is_refused(
    api: SearchAPI, tmp_path: Path, tiny_model: Path
) -> None:
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    db = Database(database)
    db.ensure_schema()
    scope = service.europeana_scope([dataset_query("31")])
    with scope_lock(db, scope):
        result = enrich("run", "--dataset", "31", env=env_for(api, database, tiny_model))
    assert result.returncode == 1
    assert "another scheduler is working on this scope" in result.stderr
    assert api.requests == []


def lock_once(db: Database, scope: dict) -> bool:
    with scope_lock(db, scope):
        return True


def test_postgres_advisory_lock_refuses_a_second_scheduler(pg_url: str) -> None:
    db = Database(pg_url)
    db.upgrade()
    scope = service.europeana_scope([dataset_query("31")])
    with scope_lock(db, scope):
        with pytest.raises(EnrichError, match="another scheduler"):
            lock_once(Database(pg_url), scope)
        assert lock_once(Database(pg_url), service.europeana_scope([dataset_query("32")]))
    assert lock_once(Database(pg_url), scope)  # released when the holder is done


def test_a_record_served_twice_and_a_repeated_dataset_are_enqueued_once(
    api: SearchAPI, tmp_path: Path, tiny_model: Path, image_host
) -> None:
    fill_collection(api, image_host, "6060", 150)
    # The API's order is not stable between pages: item 99 ends page 1 and starts page 2.
    api.items.append(dict(api.items[99]))
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    settings = settings_for(api, database, tiny_model)
    twice = service.europeana_scope([dataset_query("6060"), dataset_query("6060")])
    summary = run_summary(Database(database), run_in_process(settings, twice))
    assert summary.records_seen == 150 and summary.records_enqueued == 150
    assert summary.outcomes.get("error", 0) == 0
    assert scalar(database, "SELECT count(*) FROM results WHERE status != 'error'") == 150
    assert len(json.loads(run_row(database, 1)["scope"])["queries"]) == 1
    assert len(api.requests) == 3  # the dataset counted and paged once, not twice
    assert (
        scalar(database, "SELECT title FROM records WHERE id = '/6060/item_00007'")
        == "Object 7 of dataset 6060"
    )


def test_a_dataset_the_search_api_holds_nothing_of_is_refused_before_its_run(
    api: SearchAPI, tmp_path: Path, tiny_model: Path, image_host
) -> None:
    """A mistyped id, alone or beside a real one: one line naming it, exit 1, no run. A
    dataset the run's filters leave empty is not refused (its records exist)."""
    fill_collection(api, image_host, "2048128", 5)
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    env = env_for(api, database, tiny_model)
    for datasets in (["204812"], ["2048128", "204812"]):
        options = [part for dataset in datasets for part in ("--dataset", dataset)]
        refused = enrich("run", *options, "--no-progress", env=env)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            "Error: Invalid value for '--dataset': the Europeana Search API holds no record "
            "of dataset 204812: check the id (a record's first part: 2048128 in "
            "/2048128/object_1)"
        )
        assert scalar(database, "SELECT count(*) FROM runs") == 0
    filtered = enrich("run", "--dataset", "2048128", "--qf", "COUNTRY:nowhere", "--json", env=env)
    assert filtered.returncode == 0, filtered.stderr
    assert json.loads(filtered.stdout)["records_seen"] == 0


def test_a_cursor_that_never_moves_on_fails_the_run_with_a_clear_message(
    api: SearchAPI, tmp_path: Path, tiny_model: Path, image_host
) -> None:
    fill_collection(api, image_host, "7070", 1)
    api.loop = True
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    started = time.monotonic()
    scope = service.europeana_scope([dataset_query("7070")])
    with pytest.raises(SearchPageError, match="Search API paging is going round in a loop"):
        run_in_process(settings_for(api, database, tiny_model), scope)
    assert len(api.requests) <= 3 and time.monotonic() - started < 60
    assert run_row(database, 1)["status"] == "failed"
    assert "going round in a loop" in run_row(database, 1)["error"]


def test_a_page_whose_items_are_not_objects_is_one_clear_error(api: SearchAPI) -> None:
    api.failures = {n: ("not_objects",) for n in (1, 2, 3)}
    client = SearchClient(
        Settings(europeana_api_key=KEY, europeana_api_url=api.url, search_backoff=0.01)
    )
    with pytest.raises(SearchPageError) as raised:
        client.page(SearchQuery("*"), "*")
    assert isinstance(raised.value, EnrichError)  # one line on stderr, not a traceback
    assert str(raised.value) == (
        "Europeana Search API page failed: an item is a JSON str, not an object"
    )


def test_a_connection_failure_is_retried_in_one_place() -> None:
    """urllib3's Retry alone: 1 request + RETRIES retries, not RETRIES x the page loop's tries."""
    import socket
    import threading

    from enrichment.sources.europeana import RETRIES

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    connections: list[int] = []

    def close_every_connection() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            connections.append(1)
            sock.close()  # no answer at all: a connection failure for the client

    threading.Thread(target=close_every_connection, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    client = SearchClient(
        Settings(europeana_api_key=KEY, europeana_api_url=url, search_backoff=0.0)
    )
    with pytest.raises(SearchPageError, match="request failed"):
        client.page(SearchQuery("*"), "*")
    listener.close()
    assert len(connections) == 1 + RETRIES


def test_resuming_a_completed_run_leaves_it_as_it_finished(
    api: SearchAPI, tmp_path: Path, tiny_model: Path, image_host
) -> None:
    fill_collection(api, image_host, "8080", 5)
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    settings = settings_for(api, database, tiny_model)
    run_id = run_in_process(settings, service.europeana_scope([dataset_query("8080")]))
    finished = run_row(database, run_id)
    assert finished["status"] == "completed"
    api.requests.clear()
    resume_in_process(settings, run_id)
    assert run_row(database, run_id) == finished  # finished_at, counts and checkpoint untouched
    assert api.requests == []


def test_items_with_dot_segments_in_their_id_are_skipped_with_their_reason(
    api: SearchAPI, caplog: pytest.LogCaptureFixture
) -> None:
    api.items.append(generated_item("4040", 1, "http://example.org/1.png"))
    for record_id in ("/4040/../4041/obj", "/4040/./obj", "/4040/%2e%2e/obj"):
        api.items.append({**generated_item("4040", 2, "http://example.org/2.png"), "id": record_id})
    source = EuropeanaSource(
        SearchClient(Settings(europeana_api_key=KEY, europeana_api_url=api.url)),
        [SearchQuery("*")],
    )
    with caplog.at_level("WARNING", logger="enrichment.sources"):
        records = [record for page in source.pages(None) for record in page.records]
    assert [record.id for record in records] == ["/4040/item_00001"]
    assert source.skipped == 3
    assert sum("'.' or '..' segment" in message for message in caplog.messages) == 3


def test_items_whose_id_is_not_a_string_are_skipped() -> None:
    """`str()` of a list made `/['/4040/item_00001']` a record of its own (dataset `['`),
    a duplicate of the real one."""
    odd = RewritingSearchAPI(items=[generated_item("4040", 1, "http://example.org/1.png")])
    odd.rewrite = lambda document: document["items"].extend(
        {**generated_item("4040", 2, "http://example.org/2.png"), "id": odd_id}
        for odd_id in (["/4040/item_00001"], {"id": "/4040/x"}, 4040, None)
    )
    try:
        source = EuropeanaSource(
            SearchClient(Settings(europeana_api_key=KEY, europeana_api_url=odd.url)),
            [SearchQuery("*")],
        )
        records = [record for page in source.pages(None) for record in page.records]
    finally:
        odd.close()
    assert [record.id for record in records] == ["/4040/item_00001"]
    assert source.skipped == 4
    with pytest.raises(RecordIdError, match="is a JSON list, not a string"):
        record_from_item({**generated_item("4040", 1, "http://example.org/1.png"), "id": ["/4/x"]})
