"""The feed's CPU cuts keep their results: shared keep-alive connections within a host's
limit, the two-pass normalisation, the feeders-per-GPU setting, and gpu.sh's CPU side.

Speed itself is measured in benchmarks/bench_feed.py, never here.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from enrichment.config import ConfigError, Settings
from enrichment.media.cpus import feeders_per_gpu
from enrichment.media.decode import Preprocessing, normalise
from enrichment.media.fetch import Fetcher

REPO = Path(__file__).resolve().parent.parent
BODY = b"\xff\xd8\xff" + bytes(2000)


class CountingHost:
    """A keep-alive HTTP/1.1 image host that records the client port of every request."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with host.lock:
                    host.ports.append(self.client_address[1])
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, number: int) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/img/{number}.jpg"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def counting_host() -> Iterator[CountingHost]:
    host = CountingHost()
    yield host
    host.close()


def test_fetch_threads_share_a_hosts_connections_within_its_limit(
    counting_host: CountingHost,
) -> None:
    settings = Settings(fetch_allow=("127.0.0.1",), fetch_host_limits=(("127.0.0.1", 3),))
    with Fetcher(settings) as fetcher:
        futures = [fetcher.submit(fetcher.fetch, counting_host.url(n)) for n in range(150)]
        results = [future.result() for future in futures]
    assert all(result.content == BODY for result in results)
    assert len(counting_host.ports) == 150
    # 150 downloads on a pool of hundreds of threads: each thread that fetched would
    # have opened a connection of its own; shared, no more than the host's limit.
    assert len(set(counting_host.ports)) <= 3


def test_normalise_is_the_textbook_formula_within_float32_rounding() -> None:
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    for mean, std in [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ([0.5] * 3, [0.25] * 3)]:
        inputs = normalise(image, Preprocessing(40, mean, std))  # a list, as JSON gives it
        pixels = np.asarray(image, dtype=np.float64) / 255.0
        expected = ((pixels - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)
        assert inputs.dtype == np.float32 and inputs.shape == (3, 40, 30)
        assert inputs.flags.c_contiguous
        assert np.abs(inputs - expected).max() < 2e-6


def test_feeders_per_gpu_is_the_setting_or_the_cpus_less_one_for_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = tmp_path / "proc"  # no cgroup files: the affinity mask alone counts
    proc.mkdir()
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert feeders_per_gpu(0, gpus=1, proc=proc) == 15
    assert feeders_per_gpu(0, gpus=2, proc=proc) == 7
    assert feeders_per_gpu(0, gpus=0, proc=proc) == 15  # the CPU as the model's device
    assert feeders_per_gpu(4, gpus=1, proc=proc) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0}, raising=False)
    assert feeders_per_gpu(0, gpus=1, proc=proc) == 1


def test_feeders_per_gpu_is_read_and_range_checked() -> None:
    assert Settings.from_env({}).feeders_per_gpu == 0
    assert Settings.from_env({"ENRICH_FEEDERS_PER_GPU": "6"}).feeders_per_gpu == 6
    with pytest.raises(ConfigError, match="ENRICH_FEEDERS_PER_GPU"):
        Settings.from_env({"ENRICH_FEEDERS_PER_GPU": "1000"})


def test_gpu_sh_parses_and_refuses_an_unknown_argument() -> None:
    script = REPO / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    refused = subprocess.run(
        ["bash", str(script), "--fast"], capture_output=True, text=True, check=False
    )
    assert refused.returncode == 2 and "usage" in refused.stderr
