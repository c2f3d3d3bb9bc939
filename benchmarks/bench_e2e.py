"""The whole pipeline against the model alone and against the naive way (items 1 and 2).

For each model (resnet50: compute-heavy for a CPU; mobilenet_v3_large: light),
the same `Classifier` and model batch (32) are timed three ways, round by
round, side by side (the order flipping every round):

- model only: `Classifier.scores` on preprocessed inputs already in memory,
  as many images as a batch holds: the most this machine allows;
- pipeline: `enrichment.runs.pipeline.process_batch` on one batch cut by the real
  scheduler (`service.start` over a records file), fetching every image from
  local providers that answer after 200 ms, decoding, classifying and
  upserting into PostgreSQL, as a worker does;
- naive: one task per image, `requests.get`, full decode, batch size 1, and
  one ORM INSERT per row (result, then each label), committed per image.

Rates come from each way's fastest round: on a
shared machine other work only ever adds time, in bursts shorter than a round,
as bench_decode takes the fastest of its repeats. Ratios over all rounds are
printed beside them.

Many providers are modelled as 16 hosts on 127.0.0.10-25 (all allow-listed),
with the fetcher's own defaults (each unknown host starts at 4 connections,
64 in all). The light model is then run again with every image from ONE host,
the case of real runs (Europeana's thumbnail service): there each batch starts
with the host's adaptive limit as the fetcher has learnt it (bench_feed
measures the whole overlapped feed).

    python benchmarks/bench_e2e.py [--quick]

Not a test: it measures time, which the tests never do. `run(quick)` returns
the figures for `benchmarks/run_all.py`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common
import numpy as np
import requests
import sqlalchemy as sa
import torch
from bench_decode import naive as naive_decode
from peers import PICTURES, PREVIEW_SIZE, preview_jpeg

from enrichment.config import Settings
from enrichment.media.decode import decode
from enrichment.media.fetch import Fetcher
from enrichment.model.classifier import (
    Classifier,
    build_network,
    head_parameter_names,
    save_model_dir,
)
from enrichment.model.spec import ModelSpec
from enrichment.runs import service
from enrichment.runs.pipeline import DEFAULT_INFERENCE_BATCH, process_batch
from enrichment.runs.schedule import ModelIdentity, RunKind
from enrichment.store.database import Database
from enrichment.store.runs import mark_queued
from enrichment.store.schema import Batch, Label, Outcome, RecordRow, Result, utc_now

LATENCY = 0.2
HOSTS = 16
INPUT_SIZE = 224
LABELS_GIVEN = 2  # the head is biased so that each image gets this many labels, a typical count
MODEL_TARGET = 0.9
NAIVE_TARGET = 10.0


@dataclass(frozen=True)
class Plan:
    """How much of one model to measure: `rounds` batches of `batch_size` records each way."""

    architecture: str
    role: str
    batch_size: int
    rounds: int
    naive_per_round: int


def plans(quick: bool, cuda: bool) -> tuple[Plan, Plan]:
    """Sizes for about 4 minutes on 2 loaded CPU cores (1 minute quick), or a GPU."""
    if cuda:
        return Plan("resnet50", "heavy", 128, 12, 3), Plan(
            "mobilenet_v3_large", "light", 128, 12, 3
        )
    if quick:
        return Plan("resnet50", "heavy", 64, 1, 3), Plan("mobilenet_v3_large", "light", 64, 1, 6)
    return Plan("resnet50", "heavy", 128, 4, 6), Plan("mobilenet_v3_large", "light", 128, 4, 6)


class InMemoryQueue:
    """A dispatcher that keeps the scheduler's batch ids, for this process to work like a worker."""

    def __init__(self) -> None:
        self.batch_ids: list[int] = []

    def dispatch(self, db: Database, queue: str, batch_ids: list[int]) -> None:
        mark_queued(db, batch_ids)
        self.batch_ids.extend(batch_ids)


class ForwardClock:
    """Notes when each forward pass starts and ends, by wrapping the classifier's `scores`.

    The real method still runs. Inside the pipeline this splits the batch's
    time into the model working and the model waiting (for the first images,
    for the database), and shows whether its forwards ran slower than alone.
    """

    def __init__(self, classifier: Classifier) -> None:
        self.calls: list[tuple[float, float]] = []
        scores = classifier.scores

        def timed_scores(inputs: np.ndarray) -> np.ndarray:
            started = time.perf_counter()
            try:
                return scores(inputs)
            finally:
                self.calls.append((started, time.perf_counter()))

        classifier.scores = timed_scores  # type: ignore[method-assign]


def make_model(directory: Path, architecture: str) -> Classifier:
    """Random weights in the real model-directory format, loaded back the way a worker does.

    The head's weights are scaled down and its bias set so that the first
    LABELS_GIVEN classes are always above threshold: the database then gets as
    many label rows as a real run would, not half of the 20 classes per image.
    """
    torch.manual_seed(0)
    labels = common.vocabulary_labels()
    network = build_network(architecture, len(labels))
    state = network.state_dict()
    with torch.no_grad():
        for name in head_parameter_names(architecture):
            if name.endswith("weight"):
                state[name].mul_(0.01)
            else:
                state[name].fill_(-4.0)
                state[name][:LABELS_GIVEN] = 4.0
    spec = ModelSpec(
        name=f"bench-{architecture}",
        architecture=architecture,
        input_size=INPUT_SIZE,
        classes=labels,
    )
    save_model_dir(directory, spec, network)
    return Classifier.load(directory)


def write_records(path: Path, count: int, hosts: list[str]) -> Path:
    """A records file whose images are spread over the providers in turn."""
    with path.open("w", encoding="utf-8") as handle:
        for number in range(count):
            row = {
                "id": f"/9100001/item_{number:06d}",
                "image_url": f"{hosts[number % len(hosts)]}/img/{number}.jpg",
                "provider": f"Provider {number % len(hosts)}",
                "timestamp_update": "2024-01-01T00:00:00Z",
            }
            handle.write(json.dumps(row) + "\n")
    return path


def naive_task(db: Database, run_id: int, classifier: Classifier, record: RecordRow) -> None:
    """One image as first written: one task, one GET, one forward pass, one row at a time."""
    response = requests.get(record.image_url or "", timeout=30)
    response.raise_for_status()
    inputs = naive_decode(response.content, classifier.spec.preprocessing)
    scores = classifier.scores(inputs[np.newaxis])[0]
    labels = classifier.labels_above_threshold(scores)
    with db.transaction() as session:
        session.add(
            Result(
                record_id=record.id,
                model_version=classifier.version,
                run_id=run_id,
                status=Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD,
                scores=[float(score) for score in scores],
                image_url=record.image_url,
                source_timestamp=record.timestamp_update,
                classified_at=utc_now(),
            )
        )
        session.flush()
        for label in labels:
            session.add(
                Label(
                    record_id=record.id,
                    model_version=classifier.version,
                    label_key=label.key,
                    concept=label.concept,
                    confidence=label.confidence,
                )
            )
            session.flush()


def preprocessed(classifier: Classifier, count: int) -> np.ndarray:
    """The model's inputs for `count` images, decoded beforehand: what model-only is fed."""
    decoded = [
        decode(preview_jpeg(seed), classifier.spec.preprocessing) for seed in range(PICTURES)
    ]
    return np.stack([decoded[number % len(decoded)] for number in range(count)])


def model_only(classifier: Classifier, inputs: np.ndarray) -> None:
    for start in range(0, len(inputs), DEFAULT_INFERENCE_BATCH):
        classifier.scores(inputs[start : start + DEFAULT_INFERENCE_BATCH])


def decode_ms(classifier: Classifier) -> float:
    """One preview to model input on one core, fastest of a few: the CPU cost per image."""
    data = preview_jpeg(0)
    timings = [
        common.timed(lambda: decode(data, classifier.spec.preprocessing))[0] for _ in range(9)
    ]
    return 1000 * min(timings)


def warm_up(classifier: Classifier, fetcher: Fetcher, inputs: np.ndarray, hosts: list[str]) -> None:
    """First calls build oneDNN kernels, threads and connections: none of that is steady state."""
    classifier.scores(inputs[:DEFAULT_INFERENCE_BATCH])
    classifier.scores(inputs[:1])
    urls = [f"{hosts[n % len(hosts)]}/img/{n}.jpg" for n in range(len(inputs))]
    for future in [fetcher.submit(fetcher.fetch, url) for url in urls]:
        future.result()
    requests.get(urls[0], timeout=30).raise_for_status()


def measure(plan: Plan, base_url: str, hosts: list[str]) -> dict[str, Any]:
    """Schedule (rounds + 1) batches; run `rounds` through the pipeline, the last one naively."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp,
        common.fresh_database(base_url) as url,
    ):
        classifier = make_model(Path(tmp) / "model", plan.architecture)
        db = Database(url)
        db.upgrade()
        settings = Settings(
            database_url=url, batch_size=plan.batch_size, fetch_allow=("127.0.0.0/8",)
        )
        queue = InMemoryQueue()
        records = write_records(
            Path(tmp) / "records.jsonl", (plan.rounds + 1) * plan.batch_size, hosts
        )
        progress = service.start(
            db,
            settings,
            service.records_scope(records),
            RunKind.ON_DEMAND,
            ModelIdentity(classifier.version, classifier.spec),
            queue,
            plan.batch_size,
        )
        with db.transaction() as session:
            spare_batch = session.get(Batch, queue.batch_ids[plan.rounds])
            assert spare_batch is not None
            spare = list(
                session.scalars(
                    sa.select(RecordRow)
                    .where(RecordRow.id.in_(spare_batch.record_ids))
                    .order_by(RecordRow.id)
                )
            )
        inputs = preprocessed(classifier, plan.batch_size)
        fetcher = Fetcher(settings)
        try:
            warm_up(classifier, fetcher, inputs, hosts)
            figures = _rounds(plan, db, progress.run_id, classifier, fetcher, inputs, queue, spare)
        finally:
            fetcher.close()
        figures["decode_ms_per_image"] = round(decode_ms(classifier), 2)
        figures["database"] = db.dialect
        figures["device"] = str(classifier.device)
        figures["torch_threads"] = torch.get_num_threads()
        db.dispose()
    return figures


def _rounds(
    plan: Plan,
    db: Database,
    run_id: int,
    classifier: Classifier,
    fetcher: Fetcher,
    inputs: np.ndarray,
    queue: InMemoryQueue,
    spare: list[RecordRow],
) -> dict[str, Any]:
    """Each round times all three ways; the order flips every round, to cancel drift in load."""
    model_s: list[float] = []
    pipeline_s: list[float] = []
    naive_s: list[float] = []  # per image, over each round's naive records
    forward_s: list[float] = []  # the model's own time inside each pipeline batch
    first_wait_s: list[float] = []  # from the batch's start to its first forward pass
    model_inputs: list[int] = []
    outcomes: dict[str, int] = {}
    clock = ForwardClock(classifier)
    for number in range(plan.rounds):
        naive_records = spare[number * plan.naive_per_round : (number + 1) * plan.naive_per_round]

        def run_model() -> None:
            model_s.append(common.timed(lambda: model_only(classifier, inputs))[0])

        def run_pipeline(batch_id: int = queue.batch_ids[number]) -> None:
            clock.calls.clear()
            started = time.perf_counter()
            report = process_batch(db, batch_id, classifier, fetcher, 3, DEFAULT_INFERENCE_BATCH)
            pipeline_s.append(time.perf_counter() - started)
            forward_s.append(sum(end - begin for begin, end in clock.calls))
            first_wait_s.append(clock.calls[0][0] - started)
            model_inputs.append(report.model_inputs)
            for status, count in report.outcomes.items():
                outcomes[status] = outcomes.get(status, 0) + count

        def run_naive(chosen: list[RecordRow] = naive_records) -> None:
            seconds, _ = common.timed(
                lambda: [naive_task(db, run_id, classifier, record) for record in chosen]
            )
            naive_s.append(seconds / len(chosen))

        steps: list[Callable[[], None]] = [run_model, run_pipeline, run_naive]
        for step in steps if number % 2 == 0 else reversed(steps):
            step()
        common.say(
            f"    round {number + 1}/{plan.rounds}: model only {model_s[-1]:6.2f} s, "
            f"pipeline {pipeline_s[-1]:6.2f} s for {plan.batch_size} images (its forwards "
            f"{forward_s[-1]:.2f} s, the first after {first_wait_s[-1]:.2f} s); "
            f"naive {naive_s[-1]:5.2f} s per image ({len(naive_records)} images)"
        )
    images = plan.batch_size * plan.rounds
    if outcomes.get(Outcome.ERROR) or sum(model_inputs) != images:
        raise RuntimeError(
            f"the pipeline ran the model on {sum(model_inputs)} of {images} images "
            f"({outcomes}): it would measure failures or shortcuts, not the work"
        )
    # Rates from the fastest round of each way: on a shared machine other work only
    # ever adds time, in bursts shorter than a round; the totals are kept beside them.
    rates = {
        "model_only_rate": plan.batch_size / min(model_s),
        "pipeline_rate": plan.batch_size / min(pipeline_s),
        "naive_rate": 1 / min(naive_s),
    }
    totals = {
        "model_only_rate": images / sum(model_s),
        "pipeline_rate": images / sum(pipeline_s),
        "naive_rate": len(naive_s) / sum(naive_s),  # as many images in each round
    }
    return {
        "plan": asdict(plan),
        "images": images,
        "outcomes": outcomes,
        "model_inputs": sum(model_inputs),
        "model_only_s": [round(s, 3) for s in model_s],
        "pipeline_s": [round(s, 3) for s in pipeline_s],
        "naive_s_per_image": [round(s, 3) for s in naive_s],
        "pipeline_forward_s": [round(s, 3) for s in forward_s],
        "pipeline_first_forward_after_s": [round(s, 3) for s in first_wait_s],
        "pipeline_model_busy": round(sum(forward_s) / sum(pipeline_s), 3),
        "pipeline_forwards_over_model_only": round(min(forward_s) / min(model_s), 3),
        **{name: round(rate, 2) for name, rate in rates.items()},
        **ratios(rates),
        "from_totals": {
            **{name: round(rate, 2) for name, rate in totals.items()},
            **ratios(totals),
        },
    }


def ratios(rates: dict[str, float]) -> dict[str, float]:
    pipeline, model, naive = rates["pipeline_rate"], rates["model_only_rate"], rates["naive_rate"]
    return {
        "e2e_over_model": round(pipeline / model, 3),
        "e2e_over_naive": round(pipeline / naive, 2),
        "model_over_naive": round(model / naive, 2),
    }


def run(quick: bool) -> dict[str, Any]:
    heavy, light = plans(quick, torch.cuda.is_available())
    settings = Settings()
    cap = min(settings.fetch_concurrency, HOSTS * settings.fetch_per_host)
    paths = (max(heavy.rounds, light.rounds) + 1) * max(heavy.batch_size, light.batch_size)
    figures: dict[str, Any] = {
        "latency_s": LATENCY,
        "hosts": HOSTS,
        "fetch_per_host": settings.fetch_per_host,
        "fetch_concurrency": settings.fetch_concurrency,
        "network_ceiling_rate": cap / LATENCY,
        "preview": "x".join(map(str, PREVIEW_SIZE)),
        "preview_kb": round(len(preview_jpeg(0)) / 1024, 1),
        "inference_batch": DEFAULT_INFERENCE_BATCH,
    }
    with (
        common.database_server() as base,
        common.peers("images", str(HOSTS), str(paths), str(LATENCY)) as served,
    ):
        for plan in (heavy, light):
            common.say(
                f"  {plan.architecture} ({plan.role}), input {INPUT_SIZE}, inference batch "
                f"{DEFAULT_INFERENCE_BATCH}, {plan.rounds} batch(es) of {plan.batch_size} records:"
            )
            figures[plan.role] = measure(plan, base, served["hosts"])
        with common.peers("images", "1", str(paths), str(LATENCY)) as one:
            common.say(f"  {light.architecture} again, every image from ONE host:")
            figures["one_host"] = measure(light, base, one["hosts"])
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    lines = [
        f"  providers: {figures['hosts']} local hosts (127.0.0.10-{9 + figures['hosts']}, all "
        f"allow-listed), each answering after {figures['latency_s'] * 1000:.0f} ms; "
        f"{figures['preview']} JPEG previews ({figures['preview_kb']} KB); fetcher defaults: "
        f"{figures['fetch_per_host']} per host, {figures['fetch_concurrency']} in all -> at most "
        f"{figures['network_ceiling_rate']:.0f} images/s from the network"
    ]
    for role in ("heavy", "light", "one_host"):
        part = figures[role]
        first = sum(part["pipeline_first_forward_after_s"]) / part["plan"]["rounds"]
        totals = part["from_totals"]
        lines += [
            f"  {part['plan']['architecture']}: model only {part['model_only_rate']:.2f} images/s "
            f"| pipeline {part['pipeline_rate']:.2f} images/s ({part['database']}, "
            f"{part['device']}, {part['torch_threads']} torch threads) | naive "
            f"{part['naive_rate']:.2f} images/s | decode {part['decode_ms_per_image']} ms per "
            "preview on one core",
            f"    in the pipeline the model works {part['pipeline_model_busy']:.0%} of the time; "
            f"its forwards take {part['pipeline_forwards_over_model_only']:.2f}x their time "
            f"alone; the first starts {first:.2f} s into a batch",
            f"    (rates are from each way's fastest round; from all rounds: e2e_over_model "
            f"{totals['e2e_over_model']:.2f}, e2e_over_naive {totals['e2e_over_naive']:.2f})",
        ]
    return lines


def summary(figures: dict[str, Any]) -> list[common.Figure]:
    heavy, light = figures["heavy"], figures["light"]
    lines = []
    for suffix, part in (("", heavy), ("_light", light)):
        name = part["plan"]["architecture"]
        lines.append(
            common.Figure(
                f"e2e_over_model{suffix}",
                part["e2e_over_model"],
                f">= {MODEL_TARGET}" if part is heavy else None,
                note=name,
            )
        )
    lines.append(
        common.Figure(
            "e2e_over_model_one_host",
            figures["one_host"]["e2e_over_model"],
            note=f"{light['plan']['architecture']}, every image from one host at 200 ms",
        )
    )
    for suffix, part in (("", heavy), ("_light", light)):
        lines.append(
            common.Figure(
                f"e2e_over_naive{suffix}",
                part["e2e_over_naive"],
                f">= {NAIVE_TARGET}",
                note=f"{part['plan']['architecture']}; model only over naive, the most any "
                f"pipeline could reach here: {part['model_over_naive']:.1f}x",
            )
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    return common.stand_alone(__doc__, "one batch per model", run, report, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
