"""Configuration from environment variables, with documented defaults.

Settings are read once per process into an immutable object and passed down,
so library functions never read the environment behind a caller's back and
tests can build the exact settings they need.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from enrichment.errors import ConfigError, InvalidValue

log = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "sqlite:///enrichment.sqlite3"
DEFAULT_EUROPEANA_API_URL = "https://api.europeana.eu"
# Europeana's thumbnail service (api.europeana.eu/thumbnail/v2) serves nearly every
# image of a run: `--image-source auto` prefers it. It is Europeana's own service,
# built to serve the portal's result pages, so one worker may keep 256 requests in
# flight there (a GPU at 3,000 images/s with ~80 ms answers needs about 240); the
# limit is adaptive, so a 429 or 503 from it still halves that at once.
# docs/throughput.md gives the reasoning in full.
DEFAULT_HOST_LIMITS: tuple[tuple[str, int], ...] = (("api.europeana.eu", 256),)
# The range of every numeric setting, checked when it is read: a value outside it is
# a typing slip (ENRICH_HEARTBEAT_INTERVAL=1e308 overflows the heartbeat's timer, 0.001
# re-sends live batches), refused with the variable's name rather than met later.
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "ENRICH_BATCH_SIZE": (1, 100_000),
    "ENRICH_FETCH_TIMEOUT": (0.1, 3600),
    "ENRICH_FETCH_CONNECT_TIMEOUT": (0.1, 600),
    "ENRICH_FETCH_READ_TIMEOUT": (0.1, 3600),
    "ENRICH_FETCH_CONCURRENCY": (1, 4096),
    "ENRICH_MAX_IMAGE_BYTES": (1024, 2**31),
    "ENRICH_FETCH_PER_HOST": (1, 4096),
    "ENRICH_FETCH_PER_HOST_MAX": (1, 4096),
    "ENRICH_MAX_IMAGE_PIXELS": (1024, 2**31),
    "ENRICH_MAX_ATTEMPTS": (1, 100),
    "ENRICH_VISIBILITY_TIMEOUT": (10, 7 * 24 * 3600),
    "ENRICH_PROCESSES_PER_GPU": (1, 64),
    "ENRICH_FEEDERS_PER_GPU": (0, 256),
    "ENRICH_WORKER_BATCHES": (1, 64),
    "ENRICH_INFERENCE_BATCH": (1, 4096),
    "ENRICH_HEARTBEAT_INTERVAL": (1, 3600),
    "ENRICH_HEARTBEAT_STALE": (2, 1000),
    "ENRICH_BROKER_RETRY_SECONDS": (1, 24 * 3600),
    "ENRICH_SEARCH_BACKOFF": (0.01, 60),
}
MAX_HOST_LIMIT = 4096
HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?$|^\[?[0-9a-f:.]+\]?$")


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
    # A host without its own limit starts at `fetch_per_host` downloads at once and,
    # while its answers stay as fast as its best, is let up to `fetch_per_host_max`.
    fetch_per_host: int = 4
    fetch_per_host_max: int = 64
    # (host pattern, limit): exact names or `*.domain`; the first match wins.
    fetch_host_limits: tuple[tuple[str, int], ...] = DEFAULT_HOST_LIMITS
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
    # Pool processes per GPU (or for the CPU): while one classifies, the next fetches.
    processes_per_gpu: int = 2
    # Processes that fetch and decode for each GPU's model (each has its own GIL);
    # 0: derived from the usable CPUs (`enrichment.media.cpus.feeders_per_gpu`).
    feeders_per_gpu: int = 0
    # Images per forward pass of the model, in every process that classifies.
    inference_batch: int = 32
    # A running batch's worker touches `batches.heartbeat_at` this often (seconds); a
    # batch whose heartbeat is `heartbeat_stale` intervals old is re-dispatched.
    heartbeat_interval: float = 15.0
    heartbeat_stale: int = 8
    # How long a run's dispatch keeps retrying an unreachable broker, in seconds.
    broker_retry_seconds: float = 60.0
    # Seconds before the Search API's second try of a page, doubling for each try after.
    search_backoff: float = 1.0

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
            if not math.isfinite(value):
                raise ConfigError(f"{name}={raw!r} must be a finite number")
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {raw}")
            low, high = NUMBER_RANGES.get(name, (0, math.inf))
            if not low <= value <= high:
                raise ConfigError(f"{name}={raw} must be between {low:g} and {high:g}")
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
        model = text("ENRICH_MODEL")
        allow = parse_allow_list("ENRICH_FETCH_ALLOW", text("ENRICH_FETCH_ALLOW") or "")
        per_host = int(number("ENRICH_FETCH_PER_HOST", cls.fetch_per_host, int))
        per_host_max = int(number("ENRICH_FETCH_PER_HOST_MAX", max(per_host, 64), int))
        if per_host_max < per_host:
            raise ConfigError(
                f"ENRICH_FETCH_PER_HOST_MAX={per_host_max} is below "
                f"ENRICH_FETCH_PER_HOST={per_host}"
            )
        return cls(
            database_url=text("DATABASE_URL") or DEFAULT_DATABASE_URL,
            broker_url=text("CELERY_BROKER_URL"),
            europeana_api_key=header_safe("EUROPEANA_API_KEY", text("EUROPEANA_API_KEY")),
            europeana_api_url=web_url(
                "EUROPEANA_API_URL", text("EUROPEANA_API_URL") or DEFAULT_EUROPEANA_API_URL
            ),
            europeana_annotation_api_url=web_url(
                "EUROPEANA_ANNOTATION_API_URL",
                text("EUROPEANA_ANNOTATION_API_URL") or cls.europeana_annotation_api_url,
            ),
            europeana_annotation_token=header_safe(
                "EUROPEANA_ANNOTATION_TOKEN", text("EUROPEANA_ANNOTATION_TOKEN")
            ),
            model_dir=Path(model) if model else None,
            batch_size=int(number("ENRICH_BATCH_SIZE", cls.batch_size, int)),
            fetch_allow=allow,
            fetch_timeout=number("ENRICH_FETCH_TIMEOUT", cls.fetch_timeout, float),
            fetch_connect_timeout=number(
                "ENRICH_FETCH_CONNECT_TIMEOUT", cls.fetch_connect_timeout, float
            ),
            fetch_concurrency=int(number("ENRICH_FETCH_CONCURRENCY", cls.fetch_concurrency, int)),
            fetch_max_bytes=int(number("ENRICH_MAX_IMAGE_BYTES", cls.fetch_max_bytes, int)),
            fetch_per_host=per_host,
            fetch_per_host_max=per_host_max,
            fetch_host_limits=(
                *parse_host_limits(
                    "ENRICH_FETCH_HOST_LIMITS", text("ENRICH_FETCH_HOST_LIMITS") or ""
                ),
                *DEFAULT_HOST_LIMITS,
            ),
            fetch_read_timeout=number("ENRICH_FETCH_READ_TIMEOUT", cls.fetch_read_timeout, float),
            max_image_pixels=int(number("ENRICH_MAX_IMAGE_PIXELS", cls.max_image_pixels, int)),
            contact_url=header_safe("ENRICH_CONTACT_URL", text("ENRICH_CONTACT_URL"))
            or cls.contact_url,
            max_attempts=int(number("ENRICH_MAX_ATTEMPTS", cls.max_attempts, int)),
            visibility_timeout=visibility,
            nightly_at=parse_clock("ENRICH_NIGHTLY_AT", text("ENRICH_NIGHTLY_AT") or "02:00"),
            gpus=parse_gpus("ENRICH_GPUS", text("ENRICH_GPUS") or ""),
            preload_model=flag("ENRICH_PRELOAD_MODEL", cls.preload_model),
            review_token=header_safe("ENRICH_REVIEW_TOKEN", text("ENRICH_REVIEW_TOKEN")),
            processes_per_gpu=int(number(processes_variable(env), cls.processes_per_gpu, int)),
            feeders_per_gpu=int(number("ENRICH_FEEDERS_PER_GPU", cls.feeders_per_gpu, int)),
            inference_batch=int(number("ENRICH_INFERENCE_BATCH", cls.inference_batch, int)),
            heartbeat_interval=number("ENRICH_HEARTBEAT_INTERVAL", cls.heartbeat_interval, float),
            heartbeat_stale=int(number("ENRICH_HEARTBEAT_STALE", cls.heartbeat_stale, int)),
            broker_retry_seconds=number(
                "ENRICH_BROKER_RETRY_SECONDS", cls.broker_retry_seconds, float
            ),
            search_backoff=number("ENRICH_SEARCH_BACKOFF", cls.search_backoff, float),
        )

    def require_model_dir(self) -> Path:
        if self.model_dir is None:
            raise InvalidValue("model_dir", "no model directory given, and ENRICH_MODEL is not set")
        return self.model_dir


def processes_variable(env: Mapping[str, str]) -> str:
    """ENRICH_PROCESSES_PER_GPU, or its old name ENRICH_WORKER_BATCHES (with a warning)."""
    if (
        env.get("ENRICH_PROCESSES_PER_GPU", "").strip()
        or not env.get("ENRICH_WORKER_BATCHES", "").strip()
    ):
        return "ENRICH_PROCESSES_PER_GPU"
    log.warning("ENRICH_WORKER_BATCHES is deprecated: set ENRICH_PROCESSES_PER_GPU instead")
    return "ENRICH_WORKER_BATCHES"


def parse_clock(name: str, raw: str) -> tuple[int, int]:
    """HH:MM as (hour, minute), refused with the variable's name when it is not a time of day."""
    hour, _, minute = raw.partition(":")
    if not (hour.isdigit() and minute.isdigit() and int(hour) < 24 and int(minute) < 60):
        raise ConfigError(f"{name}={raw!r} must be HH:MM")
    return int(hour), int(minute)


def parse_gpus(name: str, raw: str) -> tuple[str, ...]:
    """GPU indices or UUIDs (`0,1`, `GPU-8f1c...`, `MIG-...`), as CUDA_VISIBLE_DEVICES takes."""
    gpus = tuple(gpu.strip() for gpu in raw.split(",") if gpu.strip())
    for gpu in gpus:
        if not re.fullmatch(r"\d{1,3}|(GPU|MIG)-[0-9A-Za-z/-]{1,80}", gpu):
            raise ConfigError(f"{name}: {gpu!r} is not a GPU index (0, 1, ...) or UUID (GPU-...)")
    return gpus


def parse_allow_list(name: str, raw: str) -> tuple[str, ...]:
    """ENRICH_FETCH_ALLOW: host names and CIDRs; anything else is refused, never guessed at.

    An entry with a slash or a colon, or of digits and dots only, is meant as an
    address or network, so `127.0.0.1/33` or `10.0.0.256` is an error rather than
    silently a host name that nothing will ever match.
    """
    entries = tuple(item.strip() for item in raw.split(",") if item.strip())
    for entry in entries:
        if "/" in entry or ":" in entry or re.fullmatch(r"[0-9.]+", entry):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(f"{name}: {entry!r} is not a valid address or network") from None
        elif not re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?", entry):
            raise ConfigError(f"{name}: {entry!r} is not a host name, address or network")
    return entries


def parse_host_limits(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    """`host=N,*.domain=N` as ((host, N), ...); a malformed entry is refused with its text."""
    limits: list[tuple[str, int]] = []
    for entry in (item.strip() for item in raw.split(",")):
        if not entry:
            continue
        host, equals, value = (part.strip() for part in entry.partition("="))
        host = host.lower().rstrip(".")
        if (
            not equals
            or not HOST_PATTERN.match(host)
            or not value.isdigit()
            or not 1 <= int(value) <= MAX_HOST_LIMIT
        ):
            raise ConfigError(
                f"{name}: {entry!r} must be HOST=N or *.DOMAIN=N with N a whole number "
                f"from 1 to {MAX_HOST_LIMIT}"
            )
        limits.append((host.strip("[]"), int(value)))
    return tuple(limits)


def header_safe(name: str, value: str | None) -> str | None:
    """A value sent in an HTTP header: printable Latin-1 on one line, or refused by name.

    A CR/LF or a character outside Latin-1 cannot go into a header; accepted, it
    would fail every request later, blamed on whatever that request was for.
    """
    if value is None:
        return None
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise ConfigError(f"{name} must be one line without control characters")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{name} must hold Latin-1 characters only (encode others as %XX)"
        ) from None
    return value


def web_url(name: str, value: str) -> str:
    """An http(s) URL without its trailing slash, or refused by name."""
    header_safe(name, value)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}={value!r} must be an http:// or https:// URL")
    return value.rstrip("/")


def redact_url(url: str) -> str:
    """A database or broker URL safe to print: the password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
