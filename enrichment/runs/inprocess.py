"""Running batches in this process: the embedded default, with no broker.

The same `process_batch` a Celery worker calls, with a progress bar. A batch
that raises is retried until it has used its attempts (`ENRICH_MAX_ATTEMPTS`),
then given up with an error result per record, so the run still ends with
every record accounted for.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from enrichment.config import Settings
from enrichment.media.fetch import Fetcher
from enrichment.model.classifier import Classifier
from enrichment.runs.pipeline import PoisonBatch, fail_batch, note_batch_error, process_batch
from enrichment.store.database import Database


class InProcessDispatcher:
    """Runs each batch as soon as it is dispatched; use as a context manager."""

    def __init__(self, settings: Settings, model_dir: Path, show_progress: bool = True) -> None:
        self.max_attempts = settings.max_attempts
        self.classifier = Classifier.load(model_dir)
        self.fetcher = Fetcher(settings)
        self.progress = tqdm(unit="record", desc="classified", disable=not show_progress)

    def __enter__(self) -> InProcessDispatcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.close()
        self.fetcher.close()

    def dispatch(self, db: Database, run_id: int, queue: str, batch_ids: list[int]) -> None:
        for batch_id in batch_ids:
            self.progress.update(self._run_batch(db, batch_id))

    def _run_batch(self, db: Database, batch_id: int) -> int:
        """Process one batch, retrying it until its attempts are used up; returns records done.

        A batch that cannot even start (its attempts are never counted) is left
        unfinished for `enrich resume` rather than retried forever.
        """
        for _ in range(self.max_attempts + 1):
            try:
                report = process_batch(
                    db, batch_id, self.classifier, self.fetcher, max_attempts=self.max_attempts
                )
                return sum(report.outcomes.values())
            except PoisonBatch as error:
                fail_batch(db, batch_id, "batch_failed", str(error))
                return 0
            except Exception as error:  # one broken batch must not end the run
                note_batch_error(db, batch_id, f"{type(error).__name__}: {error}")
        return 0
