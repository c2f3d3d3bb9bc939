"""Decoding in feeder processes, and on the model's device, gives the in-thread path's inputs.

The feeder pool is real processes (spawned), the images are served by the local
image host, and the runs write to a real SQLite database.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from enrichment import bootstrap
from enrichment.config import Settings
from enrichment.media.decode import ImageError, Preprocessing, decode
from enrichment.media.feeders import FeederPool
from enrichment.media.fetch import Fetcher
from enrichment.model.batch_decode import BatchDecoder
from enrichment.model.classifier import Classifier
from enrichment.model.spec import read_model_json
from enrichment.runs import service
from enrichment.runs.pipeline import IN_THREAD, Decoding, decoding_for, process_batch
from enrichment.runs.schedule import ModelIdentity, RunKind
from enrichment.store.database import Database
from tests.conftest import enrich, image_bytes, write_jsonl
from tests.scenario import assert_rows_match, build_scenario, stored_rows

IMAGENET = Preprocessing(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def photo(seed: int, size: tuple[int, int] = (300, 200), fmt: str = "JPEG") -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pool():
    with FeederPool(2, IMAGENET) as feeders:
        yield feeders


def test_feeders_give_exactly_the_in_thread_inputs(pool: FeederPool) -> None:
    bodies = [photo(1), photo(2, (40, 900)), photo(3, fmt="PNG"), image_bytes((9, 99, 199))]
    for body in bodies:
        ours = pool.decode(body)
        assert ours.shape == (3, 64, 64) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, decode(body, IMAGENET))


def test_a_bad_image_in_a_feeder_is_its_own_error_with_the_in_thread_reason(
    pool: FeederPool,
) -> None:
    truncated = photo(4)[:-400]
    for body in (b"<html>not an image</html>", truncated, b"\x89PNG\r\n\x1a\nbroken"):
        with pytest.raises(ImageError) as in_thread:
            decode(body, IMAGENET)
        with pytest.raises(ImageError) as in_feeder:
            pool.decode(body)
        assert in_feeder.value.reason == in_thread.value.reason
    np.testing.assert_array_equal(pool.decode(photo(5)), decode(photo(5), IMAGENET))


def _waiting_on_its_feeder(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name in ("send_bytes", "recv_bytes"):
            return True
        frame = frame.f_back
    return False


def test_a_feeder_killed_mid_decode_fails_only_that_image_and_is_started_again() -> None:
    with FeederPool(1, IMAGENET) as feeders:
        (pid,) = feeders.pids()
        os.kill(pid, signal.SIGSTOP)  # it cannot answer: the image is in flight when it dies
        answers: list[object] = []

        def decode_one() -> None:
            try:
                answers.append(feeders.decode(photo(6)))
            except ImageError as error:
                answers.append(error)

        thread = threading.Thread(target=decode_one)
        thread.start()
        while not _waiting_on_its_feeder(thread):
            thread.join(0.01)
        os.kill(pid, signal.SIGKILL)
        thread.join()
        (error,) = answers
        assert isinstance(error, ImageError)
        assert error.reason == "decode_error" and "died" in error.message
        assert feeders.pids() != [pid]
        np.testing.assert_array_equal(feeders.decode(photo(7)), decode(photo(7), IMAGENET))


def test_a_feeder_killed_while_idle_costs_no_image() -> None:
    with FeederPool(1, IMAGENET) as feeders:
        (pid,) = feeders.pids()
        os.kill(pid, signal.SIGKILL)
        feeders._feeders[0].process.wait()  # dead and gone before the next image comes
        np.testing.assert_array_equal(feeders.decode(photo(8)), decode(photo(8), IMAGENET))
        assert feeders.pids() != [pid]


def test_a_closed_pool_decodes_nothing_and_leaves_no_process() -> None:
    feeders = FeederPool(2, IMAGENET)
    processes = [feeder.process for feeder in feeders._feeders]
    feeders.close()
    assert all(process.poll() is not None for process in processes)
    with pytest.raises(ImageError, match="closed"):
        feeders.decode(photo(9))


class GpuDecoder(BatchDecoder):
    """The tensor path's code on the CPU, saying it is on the GPU (as a CUDA model's would)."""

    on_gpu = True  # type: ignore[assignment]


class OnTheGpu:
    """A model on CUDA as far as `decoding_for` can tell: its batch decoder is on the GPU."""

    def __init__(self, decoder: BatchDecoder) -> None:
        self.decoder = decoder

    def batch_decoder(self, max_pixels: int) -> BatchDecoder:
        return self.decoder


def test_decoding_is_chosen_by_device_then_feeders(tiny_model: Path) -> None:
    classifier = Classifier.load(tiny_model)
    assert classifier.device.type == "cpu"  # no CUDA here: the CPU path
    assert decoding_for(classifier, 1, 1000) is IN_THREAD
    chosen = decoding_for(classifier, 2, 1000)
    try:
        assert chosen.on_device is None and chosen.feeders is not None
        assert chosen.feeders.processes == 2 and chosen.feeders.max_pixels == 1000
    finally:
        chosen.close()
    gpu = GpuDecoder(IMAGENET, classifier.device, jpeg_device=classifier.device)
    on_gpu = decoding_for(OnTheGpu(gpu), 8, 1000)  # type: ignore[arg-type]
    assert on_gpu.on_device is gpu and on_gpu.feeders is None


class Recording:
    def __init__(self, settings: Settings, classifier: Classifier, decoding: Decoding) -> None:
        self.classifier = classifier
        self.decoding = decoding
        self.fetcher = Fetcher(settings)

    def dispatch(self, db: Database, queue: str, batch_ids: list[int]) -> None:
        for batch_id in batch_ids:
            process_batch(db, batch_id, self.classifier, self.fetcher, 3, decoding=self.decoding)


def run_with(tmp_path: Path, name: str, records: Path, tiny_model: Path, make) -> dict:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/{name}.sqlite3", fetch_allow=("127.0.0.1",)
    )
    db = Database(settings.database_url)
    db.ensure_schema()
    classifier = Classifier.load(tiny_model)
    decoding = make(classifier)
    dispatcher = Recording(settings, classifier, decoding)
    try:
        service.start(
            db,
            settings,
            service.records_scope(records),
            RunKind.ON_DEMAND,
            ModelIdentity(classifier.version, classifier.spec),
            dispatcher,
            batch_size=4,
        )
    finally:
        dispatcher.fetcher.close()
        decoding.close()
    return stored_rows(settings.database_url)


def test_a_run_through_feeders_or_the_device_path_stores_what_the_threads_do(
    tmp_path: Path, tiny_model: Path, image_host
) -> None:
    bodies = {
        "a.jpg": photo(11),
        "b.jpg": photo(12, (500, 120)),
        "c.png": image_bytes((200, 30, 30), "circle"),
        "d.jpg": photo(11),  # the same image as a: decoded once
        "e.jpg": photo(13)[:-300],  # truncated
        "f.txt": b"plain text",
    }
    rows = [
        {"id": f"/feed/{name}", "image_url": image_host.add(f"/feed/{name}", body)}
        for name, body in bodies.items()
    ]
    rows.append({"id": "/feed/missing", "image_url": image_host.url("/feed/nowhere.jpg")})
    records = write_jsonl(tmp_path / "records.jsonl", rows)
    threads = run_with(tmp_path, "threads", records, tiny_model, lambda _: IN_THREAD)
    feeders = run_with(
        tmp_path, "feeders", records, tiny_model, lambda c: decoding_for(c, 2, 10**8)
    )
    device = run_with(
        tmp_path,
        "device",
        records,
        tiny_model,
        lambda c: Decoding(on_device=BatchDecoder(c.spec.preprocessing, c.device, c.device)),
    )
    assert threads.keys() == feeders.keys() == device.keys() and len(threads) == 7
    assert threads["/feed/e.jpg"]["reason"] == "truncated"
    assert threads["/feed/f.txt"]["reason"] == "not_an_image"
    for record, row in threads.items():
        for other in (feeders[record], device[record]):
            assert other["status"] == row["status"], record
            assert other["reason"] == row["reason"], record
    for record, row in threads.items():
        assert feeders[record]["scores"] == row["scores"], record
        if row["scores"]:
            np.testing.assert_allclose(device[record]["scores"], row["scores"], atol=0.02)


def test_the_setting_starts_that_many_feeders_shared_by_a_gpus_processes(
    tiny_model: Path,
) -> None:
    classifier = Classifier.load(tiny_model)
    settings = Settings(feeders_per_gpu=4)
    assert bootstrap.new_decoding(Settings(feeders_per_gpu=1), classifier) is IN_THREAD
    assert bootstrap.new_decoding(Settings(feeders_per_gpu=2), classifier, 2) is IN_THREAD
    shared = bootstrap.new_decoding(settings, classifier, processes=2)
    try:
        assert shared.feeders is not None and shared.feeders.processes == 2
        assert shared.feeders.max_pixels == settings.max_image_pixels
    finally:
        shared.close()


def test_enrich_run_with_two_feeders_per_gpu_stores_the_expected_rows(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    records, expected = build_scenario(image_host, tmp_path, tiny_model, prefix="/feeders")
    _, version, _ = read_model_json(tiny_model)
    database = f"sqlite:///{tmp_path}/enrich.sqlite3"
    env = {
        "DATABASE_URL": database,
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
        "ENRICH_FEEDERS_PER_GPU": "2",
    }
    run = enrich("run", "--records", str(records), "--batch-size", "3", "--json", env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "completed"
    assert_rows_match(stored_rows(database), expected, version)
