"""Finding the Celery side: the dispatcher and the worker launcher, in `worker/`.

The Celery side lives in `worker/`, which `enrichment/` never imports: it is
found through the `enrichment.celery` entry points that `pyproject.toml`
declares, and only when CELERY_BROKER_URL is set, so a process that runs
in-process (or only reports) never imports Celery, and one that dispatches to
workers never imports torch.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from enrichment.errors import ConfigError

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
