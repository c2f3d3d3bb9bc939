"""Configuration from environment variables, with documented defaults.

Settings are read once per process into an immutable object and passed down,
so library functions never read the environment behind a caller's back and
tests can build the exact settings they need.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

from enrichment.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///enrichment.sqlite3"
DEFAULT_EUROPEANA_API_URL = "https://api.europeana.eu"


@dataclass(frozen=True)
class Settings:
    """Everything configurable, in one place; see the README's configuration table."""

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str | None = None
    europeana_api_key: str | None = field(default=None, repr=False)
    europeana_api_url: str = DEFAULT_EUROPEANA_API_URL
    europeana_annotation_api_url: str = "https://api.europeana.eu/annotation"
    europeana_annotation_token: str | None = field(default=None, repr=False)
    model_dir: Path | None = None
    batch_size: int = 128
    fetch_allow: tuple[str, ...] = ()
    fetch_timeout: float = 20.0
    fetch_connect_timeout: float = 5.0
    fetch_concurrency: int = 64
    fetch_max_bytes: int = 20 * 1024 * 1024
    fetch_per_host: int = 4
    fetch_read_timeout: float = 10.0
    max_image_pixels: int = 80_000_000
    contact_url: str = "https://github.com/heritage-enrichment/heritage-enrichment"
    # A batch is given up (an error result per record) after this many attempts.
    max_attempts: int = 3
    # Celery's redelivery timeout for an unacknowledged batch, in seconds.
    visibility_timeout: int = 3600
    # When Celery beat starts the nightly run, (hour, minute) in UTC.
    nightly_at: tuple[int, int] = (2, 0)
    # GPU indices for `enrich worker`, one pool process each; empty: every visible GPU.
    gpus: tuple[str, ...] = ()
    # Load the model when a worker process starts (the scheduler worker needs none).
    preload_model: bool = True
    # The login of `enrich review` when it is bound to anything but loopback.
    review_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def number(name: str, default: float, kind: type[int] | type[float]) -> float:
            raw = text(name)
            if raw is None:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a {kind.__name__}") from None
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {raw}")
            return value

        def flag(name: str, default: bool) -> bool:
            raw = text(name)
            if raw is None:
                return default
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}={raw!r} must be 1 or 0")

        visibility = int(number("ENRICH_VISIBILITY_TIMEOUT", cls.visibility_timeout, int))
        if visibility < 10:
            raise ConfigError(f"ENRICH_VISIBILITY_TIMEOUT={visibility} must be >= 10 seconds")
        model = text("ENRICH_MODEL")
        allow = text("ENRICH_FETCH_ALLOW") or ""
        return cls(
            database_url=text("DATABASE_URL") or DEFAULT_DATABASE_URL,
            broker_url=text("CELERY_BROKER_URL"),
            europeana_api_key=text("EUROPEANA_API_KEY"),
            europeana_api_url=(text("EUROPEANA_API_URL") or DEFAULT_EUROPEANA_API_URL).rstrip("/"),
            europeana_annotation_api_url=(
                text("EUROPEANA_ANNOTATION_API_URL") or cls.europeana_annotation_api_url
            ).rstrip("/"),
            europeana_annotation_token=text("EUROPEANA_ANNOTATION_TOKEN"),
            model_dir=Path(model) if model else None,
            batch_size=int(number("ENRICH_BATCH_SIZE", cls.batch_size, int)),
            fetch_allow=tuple(item.strip() for item in allow.split(",") if item.strip()),
            fetch_timeout=number("ENRICH_FETCH_TIMEOUT", cls.fetch_timeout, float),
            fetch_connect_timeout=number(
                "ENRICH_FETCH_CONNECT_TIMEOUT", cls.fetch_connect_timeout, float
            ),
            fetch_concurrency=int(number("ENRICH_FETCH_CONCURRENCY", cls.fetch_concurrency, int)),
            fetch_max_bytes=int(number("ENRICH_MAX_IMAGE_BYTES", cls.fetch_max_bytes, int)),
            fetch_per_host=int(number("ENRICH_FETCH_PER_HOST", cls.fetch_per_host, int)),
            fetch_read_timeout=number("ENRICH_FETCH_READ_TIMEOUT", cls.fetch_read_timeout, float),
            max_image_pixels=int(number("ENRICH_MAX_IMAGE_PIXELS", cls.max_image_pixels, int)),
            contact_url=text("ENRICH_CONTACT_URL") or cls.contact_url,
            max_attempts=int(number("ENRICH_MAX_ATTEMPTS", cls.max_attempts, int)),
            visibility_timeout=visibility,
            nightly_at=parse_clock("ENRICH_NIGHTLY_AT", text("ENRICH_NIGHTLY_AT") or "02:00"),
            gpus=tuple(
                gpu.strip() for gpu in (text("ENRICH_GPUS") or "").split(",") if gpu.strip()
            ),
            preload_model=flag("ENRICH_PRELOAD_MODEL", cls.preload_model),
            review_token=text("ENRICH_REVIEW_TOKEN"),
        )

    def require_model_dir(self) -> Path:
        if self.model_dir is None:
            raise ConfigError("no model directory: set ENRICH_MODEL or pass --model-dir DIR")
        return self.model_dir


def parse_clock(name: str, raw: str) -> tuple[int, int]:
    """HH:MM as (hour, minute), refused with the variable's name when it is not a time of day."""
    hour, _, minute = raw.partition(":")
    if not (hour.isdigit() and minute.isdigit() and int(hour) < 24 and int(minute) < 60):
        raise ConfigError(f"{name}={raw!r} must be HH:MM")
    return int(hour), int(minute)


def redact_url(url: str) -> str:
    """A database or broker URL safe to print: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"
