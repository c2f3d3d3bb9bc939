"""Handing batches to Celery workers: one message per batch, on the run's queue.

A broker that cannot be reached is retried for ENRICH_BROKER_RETRY_SECONDS (a
restart or a network blip), then reported as one clear error; the scheduler
then marks the run failed with it, and `enrich resume` sends what is left. A
broker URL whose scheme no transport knows is refused before any run exists.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from kombu.exceptions import OperationalError
from kombu.transport import TRANSPORT_ALIASES

from enrichment.config import Settings, redact_url
from enrichment.errors import ConfigError, EnrichError
from enrichment.store.database import Database
from enrichment.store.runs import mark_queued
from worker.app import app, configure


class BrokerUnreachable(EnrichError):
    """The broker did not answer within the retry window."""


def check_broker_url(url: str) -> None:
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in TRANSPORT_ALIASES:
        raise ConfigError(
            f"CELERY_BROKER_URL={redact_url(url)} has an unknown scheme {scheme or '(none)'!r}: "
            "use redis://HOST:PORT/DB (or another Celery transport: amqp://, sqs://)"
        )


def retry_policy(seconds: float) -> dict[str, float]:
    """kombu's publish retries, spread over about `seconds` (1 s apart, then 5 s)."""
    return {
        "max_retries": max(1, int(seconds // 5) + 4),
        "interval_start": 0,
        "interval_step": 1,
        "interval_max": 5,
    }


class CeleryDispatcher:
    """Sends each batch to the workers on its run's queue, through the app `settings` set up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configure(settings)
        url = app.conf.broker_url
        check_broker_url(url)
        self.url = url

    def __enter__(self) -> CeleryDispatcher:
        """Reach the broker once before any run exists, retrying a blip for a while."""
        try:
            with app.connection_for_write() as connection:
                connection.ensure_connection(
                    timeout=5, **retry_policy(self.settings.broker_retry_seconds)
                )
        except (OperationalError, OSError) as error:
            raise self._unreachable(error) from None
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def dispatch(self, db: Database, queue: str, batch_ids: list[int]) -> None:
        """One message per batch on `queue`; then the batches are `queued` in `db`."""
        policy = retry_policy(self.settings.broker_retry_seconds)
        try:
            for batch_id in batch_ids:
                app.send_task(
                    "enrichment.process_batch",
                    args=[batch_id],
                    queue=queue,
                    retry=True,
                    retry_policy=policy,
                )
        except (OperationalError, OSError) as error:
            raise self._unreachable(error) from None
        mark_queued(db, batch_ids)

    def _unreachable(self, error: BaseException) -> BrokerUnreachable:
        first = (str(error).splitlines() or [type(error).__name__])[0][:200]
        return BrokerUnreachable(
            f"cannot reach the broker at {redact_url(self.url)} "
            f"(retried for about {self.settings.broker_retry_seconds:g} s): {first}"
        )
