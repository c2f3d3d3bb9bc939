"""Settings read from the environment: the names of the worker's sizes, and their old alias."""

from __future__ import annotations

import logging

import pytest

from enrichment.config import Settings
from enrichment.errors import ConfigError


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
