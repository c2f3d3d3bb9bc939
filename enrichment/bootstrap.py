"""The composition root: the settings read once per process, and what is built from them.

The CLI reads the settings at its start (`enrichment.cli.base`), a Celery
worker process when its app is configured (`worker.app`); both build the
database, the fetcher, the classifier and the dispatcher here, so no library
function reads the environment behind its caller's back.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from enrichment.config import Settings
from enrichment.store.database import Database

# Imported where they are built: a reporting command loads neither the fetcher's
# nor the model's dependencies, and only the processes that classify import torch.
if TYPE_CHECKING:
    from enrichment.media.fetch import Fetcher
    from enrichment.model.classifier import Classifier
    from enrichment.runs.pipeline import Decoding
    from enrichment.runs.schedule import Dispatcher


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from the environment, validated; the one place that reads them."""
    return Settings.from_env(environ)


def open_database(settings: Settings, create: bool = False) -> Database:
    """The database of DATABASE_URL, at this code's schema (a new SQLite file migrated).

    Only with `create` (a run) is an SQLite file that does not exist yet made.
    """
    db = Database(settings.database_url)
    if not create:
        db.check_exists()
    db.ensure_schema()
    return db


def new_fetcher(settings: Settings) -> Fetcher:
    """A fetcher with its threads; whoever holds it closes it."""
    from enrichment.media.fetch import Fetcher

    return Fetcher(settings)


def load_classifier(model_dir: Path) -> Classifier:
    """The model of a directory, loaded (torch is imported here, on first use)."""
    from enrichment.model.classifier import Classifier

    return Classifier.load(model_dir)


def new_decoding(settings: Settings, classifier: Classifier, processes: int = 1) -> Decoding:
    """Where this model process turns fetched bytes into input: its GPU, feeders, or threads.

    `processes` is how many model processes share each GPU (a Celery worker's
    ENRICH_PROCESSES_PER_GPU): they split its feeders (ENRICH_FEEDERS_PER_GPU).
    Feeder processes are started here, once; whoever holds the result closes it.
    """
    from enrichment.media.cpus import feeders_per_gpu
    from enrichment.runs.pipeline import decoding_for

    gpus = max(1, len(settings.gpus))
    feeders = max(1, feeders_per_gpu(settings.feeders_per_gpu, gpus) // max(1, processes))
    return decoding_for(classifier, feeders, settings.max_image_pixels)


def dispatcher(
    settings: Settings,
    model_dir: Path,
    inference_batch: int | None = None,
    show_progress: bool = False,
) -> AbstractContextManager[Dispatcher]:
    """Celery workers with a broker (no model here); this process without one.

    `inference_batch` (images per forward pass) defaults to the setting.
    """
    from enrichment.runs.dispatchers import celery_entry

    if settings.broker_url:
        return celery_entry("dispatcher")(settings)
    return in_process_dispatcher(
        settings, load_classifier(model_dir), inference_batch, show_progress
    )


def in_process_dispatcher(
    settings: Settings,
    classifier: Classifier,
    inference_batch: int | None = None,
    show_progress: bool = False,
) -> AbstractContextManager[Dispatcher]:
    """Batches run in this process with a loaded model, and a fetcher and decoding (feeder
    processes where there are enough CPUs) that the dispatcher owns."""
    from enrichment.runs.inprocess import InProcessDispatcher

    return InProcessDispatcher(
        classifier,
        new_fetcher(settings),
        settings.max_attempts,
        inference_batch=inference_batch or settings.inference_batch,
        show_progress=show_progress,
        decoding=new_decoding(settings, classifier),
    )
