"""Running a run's batches in this process: the embedded default, with no broker.

The same `process_batch` a Celery worker calls, with a progress bar. A batch
that raises is retried once, then given up with an error result per record,
so the run still ends with every record accounted for.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from enrichment.config import Settings
from enrichment.fetch import Fetcher
from enrichment.model import Classifier
from enrichment.pipeline import complete_run_if_done, fail_batch, process_batch
from enrichment.schedule import ScheduledRun
from enrichment.store import Database

ATTEMPTS = 2


class InProcessDispatcher:
    def __init__(self, settings: Settings, model_dir: Path, show_progress: bool = True) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.show_progress = show_progress

    def dispatch(self, db: Database, run: ScheduledRun) -> None:
        classifier = Classifier.load(self.model_dir)
        fetcher = Fetcher(self.settings)
        try:
            with tqdm(
                total=len(run.batch_ids),
                unit="batch",
                desc=f"run {run.run_id}",
                disable=not self.show_progress,
            ) as progress:
                for batch_id in run.batch_ids:
                    self._run_batch(db, batch_id, classifier, fetcher)
                    progress.update()
        finally:
            fetcher.close()
        complete_run_if_done(db, run.run_id)

    def _run_batch(
        self, db: Database, batch_id: int, classifier: Classifier, fetcher: Fetcher
    ) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                process_batch(db, batch_id, classifier, fetcher)
                return
            except Exception as error:  # one broken batch must not end the run
                if attempt == ATTEMPTS:
                    fail_batch(db, batch_id, "batch_failed", f"{type(error).__name__}: {error}")
