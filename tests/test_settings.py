"""Settings read from the environment: the names of the worker's sizes, and their old alias."""

from __future__ import annotations

import logging
import re

import pytest

from enrichment.config import Settings
from enrichment.errors import ConfigError
from tests.conftest import enrich


def test_processes_per_gpu_and_inference_batch_have_defaults_and_variables() -> None:
    defaults = Settings.from_env({})
    assert (defaults.processes_per_gpu, defaults.inference_batch) == (2, 32)
    chosen = Settings.from_env({"ENRICH_PROCESSES_PER_GPU": "3", "ENRICH_INFERENCE_BATCH": "64"})
    assert (chosen.processes_per_gpu, chosen.inference_batch) == (3, 64)
    with pytest.raises(ConfigError, match="ENRICH_INFERENCE_BATCH must be positive, got 0"):
        Settings.from_env({"ENRICH_INFERENCE_BATCH": "0"})


def test_the_old_worker_batches_variable_still_works_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="enrichment.config"):
        old = Settings.from_env({"ENRICH_WORKER_BATCHES": "4"})
    assert old.processes_per_gpu == 4
    assert [record.getMessage() for record in caplog.records] == [
        "ENRICH_WORKER_BATCHES is deprecated: set ENRICH_PROCESSES_PER_GPU instead"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="enrichment.config"):
        both = Settings.from_env({"ENRICH_WORKER_BATCHES": "4", "ENRICH_PROCESSES_PER_GPU": "1"})
    assert both.processes_per_gpu == 1 and caplog.records == []
    with pytest.raises(ConfigError, match="ENRICH_WORKER_BATCHES='x' is not a int"):
        Settings.from_env({"ENRICH_WORKER_BATCHES": "x"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ENRICH_HEARTBEAT_INTERVAL": "1e308"}, "ENRICH_HEARTBEAT_INTERVAL=1e308 must be between"),
        ({"ENRICH_HEARTBEAT_INTERVAL": "0.001"}, "ENRICH_HEARTBEAT_INTERVAL=0.001 must be between"),
        ({"ENRICH_HEARTBEAT_STALE": "1"}, "ENRICH_HEARTBEAT_STALE=1 must be between"),
        ({"ENRICH_BATCH_SIZE": "10000000"}, "ENRICH_BATCH_SIZE=10000000 must be between"),
        ({"ENRICH_FETCH_TIMEOUT": "1e9"}, "ENRICH_FETCH_TIMEOUT=1e9 must be between"),
        ({"ENRICH_FETCH_CONNECT_TIMEOUT": "0.0001"}, "ENRICH_FETCH_CONNECT_TIMEOUT=0.0001"),
        ({"ENRICH_FETCH_READ_TIMEOUT": "1e300"}, "ENRICH_FETCH_READ_TIMEOUT=1e300"),
        ({"ENRICH_FETCH_CONCURRENCY": "99999"}, "ENRICH_FETCH_CONCURRENCY=99999"),
        ({"ENRICH_MAX_IMAGE_BYTES": "10"}, "ENRICH_MAX_IMAGE_BYTES=10 must be between"),
        ({"ENRICH_MAX_IMAGE_PIXELS": "1" + "0" * 12}, "ENRICH_MAX_IMAGE_PIXELS=1000000000000"),
        ({"ENRICH_FETCH_PER_HOST": "100000"}, "ENRICH_FETCH_PER_HOST=100000"),
        ({"ENRICH_MAX_ATTEMPTS": "1000"}, "ENRICH_MAX_ATTEMPTS=1000 must be between"),
        ({"ENRICH_VISIBILITY_TIMEOUT": "5"}, "ENRICH_VISIBILITY_TIMEOUT=5 must be between 10"),
        ({"ENRICH_PROCESSES_PER_GPU": "500"}, "ENRICH_PROCESSES_PER_GPU=500"),
        ({"ENRICH_INFERENCE_BATCH": "100000"}, "ENRICH_INFERENCE_BATCH=100000"),
        ({"ENRICH_BROKER_RETRY_SECONDS": "1e12"}, "ENRICH_BROKER_RETRY_SECONDS=1e12"),
        ({"ENRICH_SEARCH_BACKOFF": "600"}, "ENRICH_SEARCH_BACKOFF=600 must be between"),
        ({"ENRICH_FETCH_HOST_LIMITS": "a.example=100000"}, "ENRICH_FETCH_HOST_LIMITS:"),
        (
            {"ENRICH_CONTACT_URL": "https://a.example/\r\nX-Evil: 1"},
            "ENRICH_CONTACT_URL must be one",
        ),
        (
            {"ENRICH_CONTACT_URL": "https://a.example/\u0101"},
            "ENRICH_CONTACT_URL must hold Latin-1",
        ),
        ({"ENRICH_REVIEW_TOKEN": "t\u2603ken"}, "ENRICH_REVIEW_TOKEN must hold Latin-1"),
        ({"EUROPEANA_ANNOTATION_TOKEN": "a\nb"}, "EUROPEANA_ANNOTATION_TOKEN must be one line"),
        ({"EUROPEANA_API_KEY": "k\u0101y"}, "EUROPEANA_API_KEY must hold Latin-1"),
        ({"EUROPEANA_API_URL": "ftp://x.example"}, "EUROPEANA_API_URL='ftp://x.example' must be"),
        ({"EUROPEANA_ANNOTATION_API_URL": "annotation"}, "EUROPEANA_ANNOTATION_API_URL="),
        ({"ENRICH_GPUS": "0,all"}, "ENRICH_GPUS: 'all' is not a GPU index"),
    ],
)
def test_every_setting_out_of_its_range_is_one_error_naming_the_variable(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        Settings.from_env(environ)
    assert "\n" not in str(refused.value).strip()


def test_values_inside_the_ranges_are_kept() -> None:
    settings = Settings.from_env(
        {
            "ENRICH_HEARTBEAT_INTERVAL": "1",
            "ENRICH_HEARTBEAT_STALE": "2",
            "ENRICH_VISIBILITY_TIMEOUT": "10",
            "ENRICH_CONTACT_URL": "https://museum.example/caf\u00e9",
            "EUROPEANA_API_URL": "http://127.0.0.1:8080/",
            "ENRICH_GPUS": "0, 1,GPU-8f1c2d3e-aaaa-bbbb",
            "ENRICH_SEARCH_BACKOFF": "0.25",
        }
    )
    assert settings.search_backoff == 0.25
    assert (settings.heartbeat_interval, settings.heartbeat_stale) == (1.0, 2)
    assert settings.visibility_timeout == 10
    assert settings.contact_url == "https://museum.example/caf\u00e9"
    assert settings.europeana_api_url == "http://127.0.0.1:8080"
    assert settings.gpus == ("0", "1", "GPU-8f1c2d3e-aaaa-bbbb")


def test_the_command_line_says_which_setting_is_out_of_range_in_one_line(tmp_path) -> None:
    result = enrich(
        "status",
        env={
            "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
            "ENRICH_HEARTBEAT_INTERVAL": "1e308",
        },
    )
    assert result.returncode == 1
    assert result.stderr == "Error: ENRICH_HEARTBEAT_INTERVAL=1e308 must be between 1 and 3600\n"
