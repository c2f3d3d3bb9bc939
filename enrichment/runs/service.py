"""The service layer: starting and resuming runs, as the CLI and the Celery beat task call them.

Everything that can be checked is checked once, before a run exists and
before the dispatcher (which may load a model) is built: the model directory,
a malformed records file, a missing API key. Then the scope's scheduler lock
is held while paging, and batches go to the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enrichment.config import Settings
from enrichment.errors import ConfigError, EnrichError, InvalidValue, RecordsFileError
from enrichment.model.spec import checked_weights, read_model_json
from enrichment.runs.schedule import (
    Dispatcher,
    ModelIdentity,
    RunProgress,
    fill_run,
    resume_run,
    start_run,
)
from enrichment.sources import RecordsFileSource, Source, source_for_scope
from enrichment.sources.europeana import (
    IMAGE_SOURCES,
    SearchClient,
    SearchQuery,
    dataset_of,
    dataset_query,
)
from enrichment.store.database import Database
from enrichment.store.locks import execution_scope, scope_lock
from enrichment.store.relabel import finish_relabelling
from enrichment.store.runs import mark_failed, move_run, run_state

# Builds the dispatcher once the request is known to be good (it may load a model).
DispatcherFactory = Callable[[], AbstractContextManager[Dispatcher]]


def records_scope(path: Path) -> dict[str, Any]:
    """The stored scope of a records-file run: the file's path only.

    The scope is the key of the scheduler lock and of "a run over this scope
    has not finished", so two runs over one path are refused whatever the file
    holds; what the file held when its run began is kept in the run's position
    (`RecordsFileSource`), where a resume checks it.
    """
    return {"source": "records_file", "path": str(path.resolve())}


def europeana_scope(queries: Sequence[SearchQuery], image_source: str = "auto") -> dict[str, Any]:
    """The stored scope of a Search API run; a query given twice (`--dataset X --dataset X`)
    is kept once, so its records are not paged twice."""
    if image_source not in IMAGE_SOURCES:
        raise InvalidValue("image_source", f"must be one of {', '.join(IMAGE_SOURCES)}")
    return {
        "source": "europeana",
        "queries": [query.as_json() for query in dict.fromkeys(queries)],
        "image_source": image_source,
    }


def sampled(scope: dict[str, Any], size: int, seed: int = 0) -> dict[str, Any]:
    """`scope` narrowed to a stable random draw of `size` records (the same for the same seed).

    The draw prefers records another model version classified and curators
    reviewed, so a new version's sample can be compared with the current one
    on judged labels. A sample is a scope of its own: it never takes its
    previous run's "changed since" shortcut, and never blocks the full scope.
    """
    if size < 1:
        raise InvalidValue("sample", "must be at least 1")
    return {**scope, "sample": {"size": size, "seed": seed}}


def check_scope(scope: dict[str, Any], settings: Settings) -> None:
    """Fail before any run exists: a bad records file names its line, a missing key says so."""
    if scope["source"] == "records_file":
        RecordsFileSource(Path(scope["path"])).check()
    elif not settings.europeana_api_key:
        raise ConfigError(
            "EUROPEANA_API_KEY is not set: get a key at https://pro.europeana.eu/get-api"
        )


def check_datasets(scope: dict[str, Any], settings: Settings) -> None:
    """Refuse a dataset the Search API holds no record of (a mistyped id), before the run
    exists: its run would complete with nothing seen, and a nightly one would say so
    every night with exit 0. Counted without the run's other filters, which may rightly
    leave nothing, and whether or not an earlier run narrows this one to what changed."""
    if scope["source"] != "europeana":
        return
    queries = [SearchQuery.from_json(query) for query in scope["queries"]]
    datasets = [dataset for query in queries if (dataset := dataset_of(query))]
    if not datasets:
        return
    client = SearchClient(settings)
    missing = [dataset for dataset in datasets if client.count(dataset_query(dataset)) == 0]
    if missing:
        raise InvalidValue(
            "datasets",
            f"the Europeana Search API holds no record of dataset {', '.join(missing)}: "
            "check the id (a record's first part: 2048128 in /2048128/object_1)",
        )


def model_identity(model_dir: Path, with_weights: bool = False) -> ModelIdentity:
    """The model a run is scheduled for, read from its directory (a bad one fails here);
    `with_weights` checks the weights too (present, hashing as recorded), as a worker that
    will load them must before it takes a batch."""
    spec, version, sha256 = read_model_json(model_dir)
    if with_weights:
        checked_weights(model_dir, sha256)
    return ModelIdentity(version, spec)


@dataclass(frozen=True)
class RunRequest:
    """A run as a user asks for it: what to enrich, with which model, in batches of how many."""

    scope: dict[str, Any]
    kind: str
    model_dir: Path
    batch_size: int
    full: bool = False


@dataclass(frozen=True)
class CheckedRun:
    """A request found good (`check`), with the model it names: a run can start from it."""

    request: RunRequest
    model: ModelIdentity


def check(request: RunRequest, settings: Settings) -> CheckedRun:
    """Everything that can fail before a run exists, once, before the database is opened."""
    model = model_identity(request.model_dir)
    check_scope(request.scope, settings)
    return CheckedRun(request, model)


def enrich(
    db: Database,
    settings: Settings,
    checked: CheckedRun,
    dispatchers: DispatcherFactory,
    on_start: Callable[[int, str], None] = lambda run_id, version: None,
) -> RunProgress:
    """Start a checked run and schedule it to the end with a new dispatcher.

    The run's executing lock is held until the dispatcher has finished (in
    process: every batch is done), so `enrich status` can tell a run that this
    process still works on from one left behind by a process that died.
    `on_start(run_id, model_version)` is called once the run exists.
    """
    request, model = checked.request, checked.model
    executing = ExitStack()

    def started(run_id: int) -> None:
        executing.enter_context(scope_lock(db, execution_scope(run_id)))
        on_start(run_id, model.version)

    with executing, dispatchers() as dispatcher:
        return _schedule(
            db,
            settings,
            request.scope,
            request.kind,
            model,
            dispatcher,
            request.batch_size,
            request.full,
            started,
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
    """Create a run over `scope` and schedule it to the end with a dispatcher the caller holds
    (the nightly task's); returns when all is dispatched."""
    check_scope(scope, settings)
    return _schedule(db, settings, scope, kind, model, dispatcher, batch_size, full, on_start)


def _schedule(
    db: Database,
    settings: Settings,
    scope: dict[str, Any],
    kind: str,
    model: ModelIdentity,
    dispatcher: Dispatcher,
    batch_size: int,
    full: bool,
    on_start: Callable[[int], None],
) -> RunProgress:
    with scope_lock(db, scope):
        check_datasets(scope, settings)
        run_id = start_run(db, model, kind, scope, full)
        on_start(run_id)
        finish_relabelling(db, [model.version])  # what new thresholds left: before any batch
        return fill_run(db, run_id, _source(db, settings, run_id), dispatcher, batch_size, full)


def resume(
    db: Database,
    settings: Settings,
    run_id: int,
    dispatchers: DispatcherFactory,
    batch_size: int,
    move_to: ModelIdentity | None = None,
    runs_here: str | None = None,
) -> RunProgress:
    """Continue a run from its checkpoint and re-dispatch its unfinished batches.

    The run's scope is checked first; the run's executing lock is held until
    the new dispatcher has finished, and its scope's lock while it pages.
    A records file that changed since the run counted records in it is refused
    before anything is dispatched (`_refuse_changed_file`).
    With `move_to` (a model the operator named), a run for another version is
    first moved to it (`store.runs.move_run`); never otherwise. `runs_here` is
    the version this process would classify with (in-process): a run for
    another one is refused rather than moved behind the operator's back.
    """
    state = run_state(db, run_id)
    check_scope(state.scope, settings)
    moving = move_to is not None and move_to.version != state.model_version
    if not moving and runs_here is not None and runs_here != state.model_version:
        raise EnrichError(
            f"run {run_id} is for model {state.model_version}, and the model here is "
            f"{runs_here}: resume with that model's directory, or move the run to this "
            f"one with `--model-dir`"
        )
    with (
        scope_lock(db, execution_scope(run_id)),
        dispatchers() as dispatcher,
        scope_lock(db, state.scope),
    ):
        _refuse_changed_file(db, run_id)
        if moving:
            assert move_to is not None
            move_run(db, run_id, move_to.registration())
        finish_relabelling(db, [move_to.version if move_to and moving else state.model_version])
        return resume_run(db, run_id, _source(db, settings, run_id), dispatcher, batch_size)


def _refuse_changed_file(db: Database, run_id: int) -> None:
    """Refuse to page on in a records file that is not the one the run counted records in.

    Its position counts records, and another file's first records are not the
    ones done. The run is marked failed with the reason (its batches and
    checkpoint stay as they are), so it no longer holds its scope: a new run
    over the file can start, and enqueues only what has no result yet. Called
    under the run's locks, so no process working on the run is marked failed.
    """
    run = run_state(db, run_id)
    if run.scope["source"] != "records_file" or run.checkpoint.get("done"):
        return
    source = RecordsFileSource(Path(run.scope["path"]))
    if source.changed_since(run.checkpoint.get("position")):
        message = (
            f"records file {source.path} changed since run {run_id} started (size/mtime); "
            f"start a new run: `enrich run --records {source.path}`, which enqueues only "
            "what is not done"
        )
        mark_failed(db, run_id, message)
        raise RecordsFileError(message)


def _source(db: Database, settings: Settings, run_id: int) -> Source:
    run = run_state(db, run_id)
    return source_for_scope(run.scope, settings, run.checkpoint.get("since"))
