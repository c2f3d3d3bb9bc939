"""The service layer: starting and resuming runs, as the CLI and the Celery beat task call them.

Each function validates everything it can before a run exists (a malformed
records file, a missing API key), holds the scope's scheduler lock while
paging, and hands batches to the dispatcher it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from enrichment.config import Settings
from enrichment.errors import ConfigError, EnrichError
from enrichment.runs.schedule import (
    Dispatcher,
    ModelIdentity,
    RunProgress,
    fill_run,
    get_run,
    resume_run,
    start_run,
)
from enrichment.sources import RecordsFileSource, source_for_scope
from enrichment.sources.europeana import IMAGE_SOURCES, SearchQuery
from enrichment.store.database import Database
from enrichment.store.locks import scope_lock


def records_scope(path: Path) -> dict[str, Any]:
    return {"source": "records_file", "path": str(path.resolve())}


def europeana_scope(queries: Sequence[SearchQuery], image_source: str = "auto") -> dict[str, Any]:
    """The stored scope of a Search API run; a query given twice (`--dataset X --dataset X`)
    is kept once, so its records are not paged twice."""
    if image_source not in IMAGE_SOURCES:
        raise EnrichError(f"--image-source must be one of {', '.join(IMAGE_SOURCES)}")
    return {
        "source": "europeana",
        "queries": [query.as_json() for query in dict.fromkeys(queries)],
        "image_source": image_source,
    }


def check_scope(scope: dict[str, Any], settings: Settings) -> None:
    """Fail before any run exists: a bad records file names its line, a missing key says so."""
    if scope["source"] == "records_file":
        RecordsFileSource(Path(scope["path"])).check()
    elif not settings.europeana_api_key:
        raise ConfigError(
            "EUROPEANA_API_KEY is not set: get a key at https://pro.europeana.eu/get-api"
        )


def start(
    db: Database,
    settings: Settings,
    scope: dict[str, Any],
    kind: str,
    model: ModelIdentity,
    dispatcher: Dispatcher,
    batch_size: int,
    full: bool = False,
    on_start: Callable[[int], None] = lambda run_id: None,
) -> RunProgress:
    """Create a run over `scope` and schedule it to the end; returns when all is dispatched."""
    check_scope(scope, settings)
    with scope_lock(db, scope):
        run_id = start_run(db, model, kind, scope, full)
        on_start(run_id)
        return fill_run(db, run_id, _source(db, settings, run_id), dispatcher, batch_size, full)


def resume(
    db: Database, settings: Settings, run_id: int, dispatcher: Dispatcher, batch_size: int
) -> RunProgress:
    """Continue a run from its checkpoint and re-dispatch its unfinished batches."""
    with db.transaction() as session:
        scope = get_run(session, run_id).scope
    check_scope(scope, settings)
    with scope_lock(db, scope):
        return resume_run(db, run_id, _source(db, settings, run_id), dispatcher, batch_size)


def _source(db: Database, settings: Settings, run_id: int):
    with db.transaction() as session:
        run = get_run(session, run_id)
        return source_for_scope(run.scope, settings, (run.checkpoint or {}).get("since"))
