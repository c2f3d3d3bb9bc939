"""Choosing who runs a run's batches: this process, or Celery workers behind a broker.

The Celery side lives in `worker/`, which `enrichment/` never imports: it is
found through the `enrichment.celery` entry points that `pyproject.toml`
declares, and only when CELERY_BROKER_URL is set, so a process that runs
in-process (or only reports) never imports Celery, and one that dispatches to
workers never imports torch.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from enrichment.config import Settings
from enrichment.errors import ConfigError
from enrichment.runs.schedule import Dispatcher

CELERY_ENTRY_POINTS = "enrichment.celery"


def celery_entry(name: str) -> Any:
    """The object the `enrichment.celery` entry point `name` names (the worker package's)."""
    found = entry_points(group=CELERY_ENTRY_POINTS, name=name)
    if not found:
        raise ConfigError(
            f"CELERY_BROKER_URL is set but no Celery {name} is installed "
            f"(entry point {CELERY_ENTRY_POINTS}:{name}); reinstall the package"
        )
    return next(iter(found)).load()


def make_dispatcher(settings: Settings, model_dir: Path, show_progress: bool) -> Dispatcher:
    """In-process without a broker; Celery workers with one."""
    if settings.broker_url:
        return celery_entry("dispatcher")(settings)
    from enrichment.runs.inprocess import InProcessDispatcher

    return InProcessDispatcher(settings, model_dir, show_progress=show_progress)
