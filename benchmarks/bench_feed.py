"""Feeding the model from one host: the case of real runs (Europeana's thumbnail service).

Every way below classifies the same N distinct 400x300 JPEG previews served by
ONE local host (`peers.py images 1 N LATENCY`), with the fetcher's defaults
(only the loopback allow-listed), timed side by side in this run.

The one host plays Europeana's thumbnail service and has its default limit
(`api.europeana.eu=256`, see `settings_for`); everything else is the default.

- pipeline, stand-in model: the in-process dispatcher (the overlapped stages of
  `enrichment.runs.inprocess`) with a model that costs a fixed 0.3 ms per image,
  what a GPU's resnet50 costs, over a host answering after 200 ms and over one
  answering at once: `feed_latency_hidden` is their ratio;
- decode only: the same bytes, already in memory, decoded to model input on
  every core (a thread per core): the most any feed could deliver here;
  `feed_over_decode` is the 200 ms pipeline over it;
- pipeline without fetching: the stand-in pipeline with every image's bytes
  and SHA-256 already in memory (`MemoryFetcher`: only the download is
  skipped; the handler threads still decode each one), what the feed would
  move if downloads cost nothing: `feed_without_fetch_over_decode` is its
  ceiling here, and the part of the gap that fetching accounts for;
- img2dataset (installed by this benchmark into its own virtualenv, pinned), on
  the same host and URLs, `--processes_count` = cores, resizing to 224:
  `feed_over_img2dataset` is the 200 ms pipeline over it; the same pipeline
  with the real CPU model (the demo model) is reported beside it;
- feeder processes: the stand-in pipeline with its decoding in 2 feeder
  processes (`ENRICH_FEEDERS_PER_GPU=2`, `enrichment.media.feeders`) beside the
  same run decoding on the handler threads (=1), at 0 and 200 ms, in images/s and
  CPU ms per image (this process and its feeders together);
- through Celery: a real `enrich worker` on Redis and PostgreSQL with the demo
  model, against the in-process dispatcher with the same model, both at 200 ms.

Where the CPU goes (`CpuClock`): in the stand-in runs every stage's call is
wrapped, on the thread that runs it, with that thread's own CPU clock
(`getrusage(RUSAGE_THREAD)`, user and system apart): fetch (the fetcher's event
loop thread, all its life: the hosts' turns, the SSRF guard, HTTP, the SHA-256),
decode (`decode`), start
(counting the attempt, submitting the images), classify (the stand-in model,
stored-score look-ups, thresholds), write (`commit_batch`) and schedule
(`service.start`: reading the records, cutting batches). The process's own
`getrusage(RUSAGE_SELF)` over the run less their sum is "the rest": thread
hand-offs, name lookups, queues, the GIL's own switching. All as CPU
milliseconds per image, which load on the machine changes far less than rates.

The GIL's share is estimated, not measured: Python code holds the GIL, while
the kernel (system time: sockets, futexes) and Pillow's decode and resize run
without it. So the GIL-held CPU per image is taken as the user time of every
stage but decode, plus decode's own serial share, found by decoding the same
bytes on one thread and on every core (Amdahl: a decode that scales by S on N
cores holds the GIL for a share (N/S - 1)/(N - 1) of its time). One process
can never move more images per second than 1000 / (GIL ms per image): that is
the ceiling printed beside it.

    python benchmarks/bench_feed.py [--quick] [--stand-in-only | --feeders-only]
    python benchmarks/bench_feed.py --gpu [--quick | --dry-run]   # gpu.sh

Not a test: it measures time, which the tests never do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import common
import numpy as np
import sqlalchemy as sa
import torch
from bench_scale import CLASS_WEIGHTS, STATUS_SHARES, scores_for
from peers import PICTURES, distinct, preview_jpeg

from enrichment import bootstrap
from enrichment.config import DEFAULT_HOST_LIMITS, Settings
from enrichment.media.cpus import feeders_per_gpu, usable_cpus
from enrichment.media.decode import Preprocessing, decode
from enrichment.media.fetch import Fetcher, FetchResult
from enrichment.model.classifier import Classifier
from enrichment.model.spec import ModelSpec
from enrichment.runs import inprocess, pipeline, service
from enrichment.runs.schedule import ModelIdentity, RunKind
from enrichment.store.database import Database
from enrichment.store.writes import LabelScore
from enrichment.thresholds import DecisionRule, decide

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "demo" / "model"
LATENCY = 0.2
STAND_IN_SECONDS = 0.0003  # per image: resnet50 in bf16 on a recent GPU
IMG2DATASET = "img2dataset==1.47.0"
IMG2DATASET_VENV = Path(
    os.environ.get("BENCH_IMG2DATASET_VENV", Path.home() / ".cache" / "enrich-bench-img2dataset")
)
THUMBNAIL_LIMIT = dict(DEFAULT_HOST_LIMITS)["api.europeana.eu"]
TARGETS = {"feed_latency_hidden": 0.8, "feed_over_img2dataset": 1.0, "feed_over_decode": 0.6}


class StandInModel:
    """A model that costs a fixed time per image and decides like the real one.

    What a GPU would cost, on a machine that has none: the feed, not the
    model, is then what the rate measures.
    """

    def __init__(self, seconds_per_image: float) -> None:
        self.spec = ModelSpec(
            name="stand-in",
            architecture="resnet50",
            input_size=224,
            classes=common.vocabulary_labels(),
        )
        self.version = "stand-in@000000000000"
        self.seconds = seconds_per_image
        self.thresholds = np.asarray([label.threshold for label in self.spec.classes])
        self.rule = DecisionRule.of(self.thresholds, 0)
        weights = np.array([CLASS_WEIGHTS.get(label.key, 1) for label in self.spec.classes])
        self.weights = weights / weights.sum()
        self.rng = np.random.default_rng(26)
        self.drawing = threading.Lock()

    def scores(self, inputs: np.ndarray) -> np.ndarray:
        """Scores shaped like the pilot's (`bench_scale.scores_for`): 60 % of images labelled,
        with 1 to 3 labels, a few classes near their thresholds, the rest near 0.

        What the pipeline does after the model (labels, the review index, the write)
        costs by the labels and review items a result has, so a stand-in whose every
        class sat at its threshold (20 labels an image) measured 15 times the real
        rows. (The previews are 8 pictures repeated, so the scores are drawn, not
        derived from the pixels: every chunk would score alike.)
        """
        time.sleep(self.seconds * len(inputs))
        with self.drawing:
            labelled = self.rng.random(len(inputs)) < STATUS_SHARES[0]
            statuses = np.where(labelled, 0, 1)
            scores, _ = scores_for(self.rng, statuses, self.thresholds, self.weights)
        return scores

    def labels_of(self, scores: np.ndarray) -> list[list[LabelScore]]:
        chosen = decide(scores, self.thresholds, 0).tolist()
        return [
            [
                LabelScore(label.key, label.concept, score)
                for label, score, given in zip(self.spec.classes, row, choice, strict=True)
                if given
            ]
            for row, choice in zip(
                np.asarray(scores, dtype=np.float64).tolist(), chosen, strict=True
            )
        ]


class MemoryFetcher(Fetcher):
    """A fetcher whose downloads are already done: `bodies` by URL, hashed once up front.

    Only the download (the event loop's HTTP, the host's turns, the guard, the
    SHA-256) is skipped: `fetch_then` hands each result to a handler thread as
    ever, which decodes it, so a run over it is the pipeline without fetching.
    """

    def __init__(self, settings: Settings, bodies: dict[str, bytes]) -> None:
        super().__init__(settings)
        self._fetched = {
            url: FetchResult(url=url, content=body, sha256=hashlib.sha256(body).hexdigest())
            for url, body in bodies.items()
        }

    def _start(self, url: str) -> Future[FetchResult]:
        fetched: Future[FetchResult] = Future()
        fetched.set_result(self._fetched[url])
        return fetched


def served_bodies(host: str, count: int) -> dict[str, bytes]:
    """What `peers.py images 1 count` serves at `host`, by the URL `write_records` gives it."""
    pictures = [preview_jpeg(seed) for seed in range(PICTURES)]
    return {
        f"{host}/img/{number}.jpg": distinct(pictures[number % PICTURES], number)
        for number in range(count)
    }


STAGES = ("fetch", "decode", "start", "classify", "write", "schedule")


def _cpu(who: int) -> tuple[float, float]:
    usage = resource.getrusage(who)
    return usage.ru_utime, usage.ru_stime


class CpuClock:
    """CPU seconds (user, system) by pipeline stage, each on the thread that runs it.

    Installed by patching the stage functions where the pipeline looks them up,
    for the duration of one run (`installed`); see the module docstring.
    """

    def __init__(self) -> None:
        self.user = dict.fromkeys(STAGES, 0.0)
        self.system = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    def wrap(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            user, system = _cpu(resource.RUSAGE_THREAD)
            try:
                return function(*args, **kwargs)
            finally:
                after_user, after_system = _cpu(resource.RUSAGE_THREAD)
                with self._lock:
                    self.user[stage] += after_user - user
                    self.system[stage] += after_system - system

        return timed

    @contextmanager
    def installed(self) -> Iterator[CpuClock]:
        patches = [
            (Fetcher, "_run_loop", "fetch"),  # the event loop's thread, for the fetcher's life
            (pipeline, "decode", "decode"),
            (inprocess, "begin_batch", "start"),
            (inprocess, "classify_started", "classify"),
            (inprocess, "commit_batch", "write"),
            (service, "start", "schedule"),
        ]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for (owner, name, stage), (_, _, original) in zip(patches, originals, strict=True):
            setattr(owner, name, self.wrap(stage, original))
        try:
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def cpu_by_stage(clock: CpuClock, process: tuple[float, float], count: int) -> dict[str, Any]:
    """CPU ms per image by stage, the rest, user/system apart, and the GIL estimate's inputs."""
    per_image = 1000.0 / count
    user_total, system_total = process
    stages = {
        stage: round((clock.user[stage] + clock.system[stage]) * per_image, 3) for stage in STAGES
    }
    rest_user = user_total - sum(clock.user.values())
    rest_system = system_total - sum(clock.system.values())
    stages["rest"] = round((rest_user + rest_system) * per_image, 3)
    python_user = sum(clock.user[s] for s in STAGES if s != "decode") + max(0.0, rest_user)
    return {
        "ms_per_image": stages,
        "total_ms": round((user_total + system_total) * per_image, 3),
        "user_ms": round(user_total * per_image, 3),
        "system_ms": round(system_total * per_image, 3),
        "python_user_ms": round(python_user * per_image, 3),  # user time outside decode
        "decode_ms": round((clock.user["decode"] + clock.system["decode"]) * per_image, 3),
        "decode_user_ms": round(clock.user["decode"] * per_image, 3),
    }


def write_records(path: Path, host: str, count: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for number in range(count):
            row = {"id": f"/9200001/item_{number:06d}", "image_url": f"{host}/img/{number}.jpg"}
            handle.write(json.dumps(row) + "\n")
    return path


def settings_for(url: str, host: str | None = None) -> Settings:
    """The defaults, with the one `host` standing for Europeana's thumbnail service.

    Nearly every real image comes from `api.europeana.eu`, which has a limit of its
    own by default (`DEFAULT_HOST_LIMITS`, 256 at once); the local host that plays
    its part gets the same, rather than the ceiling of an unknown museum server
    (64 at once: 320 images/s at 200 ms, under what two cores decode). On a GPU,
    batches of 512 so that enough images are in flight to feed it.
    """
    batch_size = 512 if torch.cuda.is_available() else Settings.batch_size
    limits = DEFAULT_HOST_LIMITS
    if host is not None:
        limits = ((urlsplit(host).hostname or host, THUMBNAIL_LIMIT), *DEFAULT_HOST_LIMITS)
    return Settings(
        database_url=url,
        fetch_allow=("127.0.0.0/8",),
        batch_size=batch_size,
        fetch_host_limits=limits,
    )


def in_process(
    base_url: str,
    host: str,
    count: int,
    model: Any,
    tmp: Path,
    clock: CpuClock | None = None,
    feeders: int = 0,
    host_pid: int | None = None,
    without_fetching: bool = False,
) -> dict[str, Any]:
    """One run of `count` records through the in-process dispatcher; model already loaded.

    With a `clock`, the run's CPU time is taken apart by stage (`cpu_by_stage`).
    `feeders`: ENRICH_FEEDERS_PER_GPU for the run (0: the default). `cpu_ms_per_image`
    counts this process and its feeders (children, reaped as the dispatcher closes);
    `host_cpu_ms_per_image` the image host's process (`host_pid`), which shares this
    machine's cores although a real provider's server would not. `without_fetching`:
    the images come from memory (`MemoryFetcher`), not from `host`.
    """
    with common.fresh_database(base_url) as url:
        db = Database(url)
        db.upgrade()
        records = write_records(tmp / f"records-{time.monotonic_ns()}.jsonl", host, count)
        settings = dataclasses.replace(settings_for(url, host), feeders_per_gpu=feeders)
        began = time.perf_counter()
        cpu_began = _cpu(resource.RUSAGE_SELF)
        children_began = _cpu(resource.RUSAGE_CHILDREN)
        host_began = common.process_cpu(host_pid) if host_pid else 0.0
        with (
            clock.installed() if clock is not None else _nothing(),
            _dispatcher(settings, model, host, count, without_fetching) as dispatcher,
        ):
            progress = service.start(
                db,
                settings,
                service.records_scope(records),
                RunKind.ON_DEMAND,
                ModelIdentity(model.version, model.spec),
                dispatcher,
                settings.batch_size,
            )
        seconds = time.perf_counter() - began
        cpu_ended = _cpu(resource.RUSAGE_SELF)
        children_ended = _cpu(resource.RUSAGE_CHILDREN)
        host_spent = common.process_cpu(host_pid) - host_began if host_pid else None
        errors = _errors(db, progress.run_id)
        db.dispose()
    spent = sum(cpu_ended) - sum(cpu_began) + sum(children_ended) - sum(children_began)
    figures = {
        "seconds": round(seconds, 2),
        "rate": round(count / seconds, 1),
        "errors": errors,
        "cpu_ms_per_image": round(1000 * spent / count, 3),
        "cores_busy": round(spent / seconds, 2),
    }
    if host_spent is not None:
        figures["host_cpu_ms_per_image"] = round(1000 * host_spent / count, 3)
    if clock is not None:
        process = (cpu_ended[0] - cpu_began[0], cpu_ended[1] - cpu_began[1])
        figures["cpu"] = cpu_by_stage(clock, process, count)
        figures["cpu"]["cores_busy"] = round(sum(process) / seconds, 2)
    return figures


def _dispatcher(
    settings: Settings, model: Any, host: str, count: int, without_fetching: bool
) -> Any:
    """The dispatcher a run gets, or the same over a `MemoryFetcher` of `host`'s images."""
    if not without_fetching:
        return bootstrap.in_process_dispatcher(settings, model)
    return inprocess.InProcessDispatcher(
        model,
        MemoryFetcher(settings, served_bodies(host, count)),
        settings.max_attempts,
        inference_batch=settings.inference_batch,
        show_progress=False,
        decoding=bootstrap.new_decoding(settings, model),
    )


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _errors(db: Database, run_id: int) -> dict[str, int]:
    with db.engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT coalesce(error_reason, status), count(*) FROM results"
                " WHERE run_id = :id GROUP BY 1"
            ),
            {"id": run_id},
        ).all()
    found = dict(rows)
    if sum(found.values()) == 0 or any(key not in ("labelled", "below_threshold") for key in found):
        raise RuntimeError(f"the run did not classify every image: {found}")
    return found


def decode_only(count: int, preprocessing: Preprocessing) -> dict[str, Any]:
    """The same bytes decoded from memory, one thread per core: the CPU's ceiling.

    Also on one thread (a quarter of the images), for decode's serial share (the GIL's).
    """
    pictures = [preview_jpeg(seed) for seed in range(PICTURES)]
    bodies = [distinct(pictures[number % PICTURES], number) for number in range(count)]
    cores = usable_cpus()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(lambda body: decode(body, preprocessing), bodies[:cores]))  # warm
        began = time.perf_counter()
        cpu_began = sum(_cpu(resource.RUSAGE_SELF))
        # Each input dropped as it comes, as the pipeline drops a chunk's once classified:
        # keeping all 3,000 (1.8 GB) made every one fresh memory, ~150 page faults an image
        # (10-30 % more CPU per image, measured), which no feed pays.
        for _ in pool.map(lambda body: decode(body, preprocessing), bodies):
            pass
        seconds = time.perf_counter() - began
        cpu_ms = (sum(_cpu(resource.RUSAGE_SELF)) - cpu_began) * 1000 / count
    alone = bodies[: max(1, count // 4)]
    began = time.perf_counter()
    for body in alone:
        decode(body, preprocessing)
    one_thread_rate = len(alone) / (time.perf_counter() - began)
    rate = count / seconds
    speedup = rate / one_thread_rate
    serial = 1.0 if cores == 1 else min(1.0, max(0.0, (cores / speedup - 1) / (cores - 1)))
    return {
        "seconds": round(seconds, 2),
        "rate": round(rate, 1),
        "threads": cores,
        "cpu_ms_per_image": round(cpu_ms, 3),
        "one_thread_rate": round(one_thread_rate, 1),
        "serial_share": round(serial, 3),
    }


def gil_estimate(cpu: dict[str, Any], decode_serial: float) -> dict[str, float]:
    """GIL-held ms per image (see the module docstring), its share, and one process's ceiling.

    Bounded whatever the load: at least the user time outside decode (decode
    wholly free of the GIL), at most that plus decode's user time. The point
    estimate between them takes decode's serial share, which only a quiet machine
    measures well (on a busy one the second core is not free, and it reads high).
    """
    held = cpu["python_user_ms"] + cpu["decode_user_ms"] * decode_serial
    return {
        "low_ms": round(cpu["python_user_ms"], 3),
        "high_ms": round(cpu["python_user_ms"] + cpu["decode_user_ms"], 3),
        "held_ms": round(held, 3),
        "share": round(held / cpu["total_ms"], 3) if cpu["total_ms"] else 0.0,
        "ceiling_images_s": round(1000 / held, 1) if held else float("inf"),
    }


def img2dataset(host: str, count: int, tmp: Path) -> dict[str, Any]:
    """img2dataset on the same URLs, from its own pinned virtualenv (made on first use)."""
    binary = IMG2DATASET_VENV / "bin" / "img2dataset"
    if not binary.exists():
        common.say(f"    installing {IMG2DATASET} into {IMG2DATASET_VENV} ...")
        subprocess.run([sys.executable, "-m", "venv", str(IMG2DATASET_VENV)], check=True)
        subprocess.run(
            [str(IMG2DATASET_VENV / "bin" / "pip"), "install", "-q", IMG2DATASET], check=True
        )
    urls = tmp / "urls.txt"
    urls.write_text("".join(f"{host}/img/{number}.jpg\n" for number in range(count)))
    out = tmp / f"img2dataset-{time.monotonic_ns()}"
    cores = usable_cpus()
    began = time.perf_counter()
    subprocess.run(
        [
            str(binary),
            "--url_list",
            str(urls),
            "--input_format",
            "txt",
            "--output_folder",
            str(out),
            "--output_format",
            "files",
            "--processes_count",
            str(cores),
            "--thread_count",
            "64",
            "--image_size",
            "224",
            "--resize_mode",
            "center_crop",
            "--timeout",
            "20",
            "--retries",
            "0",
            "--disallowed_header_directives",
            "[]",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    seconds = time.perf_counter() - began
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    succeeded = sum(stat.get("successes", 0) for stat in stats)
    if succeeded < count * 0.99:
        raise RuntimeError(f"img2dataset fetched {succeeded} of {count} images")
    return {
        "seconds": round(seconds, 2),
        "rate": round(count / seconds, 1),
        "processes": cores,
        "successes": succeeded,
    }


def through_celery(
    base_url: str, host: str, count: int, tmp: Path, model_dir: Path
) -> dict[str, Any]:
    """A real `enrich worker` (Redis, PostgreSQL, the demo model); timed from `enrich run`."""
    from tests.services import CeleryWorker

    with common.fresh_database(base_url) as url, common.redis_server() as broker:
        env = {
            "DATABASE_URL": url,
            "CELERY_BROKER_URL": broker,
            "ENRICH_MODEL": str(model_dir),
            "ENRICH_FETCH_ALLOW": "127.0.0.0/8",
            "ENRICH_BATCH_SIZE": str(settings_for(url).batch_size),
            "ENRICH_FETCH_HOST_LIMITS": ",".join(
                f"{name}={limit}" for name, limit in settings_for(url, host).fetch_host_limits
            ),
        }
        full_env = {**os.environ, **env}
        enrich = [sys.executable, "-m", "enrichment"]
        subprocess.run([*enrich, "db", "upgrade"], env=full_env, check=True, capture_output=True)
        worker = CeleryWorker(env, tmp / "worker.log")
        try:
            records = write_records(tmp / "celery.jsonl", host, count)
            began = time.perf_counter()
            started = subprocess.run(
                [*enrich, "run", "--records", str(records), "--json"],
                env=full_env,
                check=True,
                capture_output=True,
                text=True,
            )
            run_id = json.loads(started.stdout)["id"]
            db = Database(url)
            done = threading.Event()
            while not done.wait(0.2):
                with db.engine.connect() as connection:
                    status = connection.execute(
                        sa.text("SELECT status FROM runs WHERE id = :id"), {"id": run_id}
                    ).scalar()
                if status in ("completed", "failed"):
                    break
                if time.perf_counter() - began > 600:
                    raise RuntimeError("the Celery run did not finish in 10 minutes")
            seconds = time.perf_counter() - began
            errors = _errors(db, run_id)
            db.dispose()
        finally:
            worker.stop()
    return {"seconds": round(seconds, 2), "rate": round(count / seconds, 1), "errors": errors}


def feeder_cases() -> list[int]:
    """ENRICH_FEEDERS_PER_GPU values to compare: 1 (decoding on the handler threads), 2, and
    this machine's default where that is more (15 on 16 cores)."""
    return sorted({1, 2, feeders_per_gpu(0, 1)})


def feeder_runs(
    base: str, hosts: dict[str, str], count: int, model: Any, tmp: Path
) -> dict[str, dict[str, Any]]:
    """The stand-in pipeline decoding on the handler threads and in feeder processes, side by side.

    Interleaved (threads, feeders, threads, feeders) by latency, so that a change in
    the machine's load meanwhile touches both alike.
    """
    figures: dict[str, dict[str, Any]] = {}
    for latency, host in hosts.items():
        for feeders in feeder_cases():
            common.say(f"  stand-in model, {latency}, ENRICH_FEEDERS_PER_GPU={feeders}")
            figures[f"{latency}, feeders={feeders}"] = in_process(
                base, host, count, model, tmp, feeders=feeders
            )
    return figures


def run(quick: bool, stand_in_only: bool = False, feeders_only: bool = False) -> dict[str, Any]:
    """On a CPU the real model is the demo model; on a GPU, resnet50 (bf16, channels_last).

    `stand_in_only`: the stand-in runs and decode only, with the CPU by stage (a few minutes).
    `feeders_only`: the feeder-process runs beside the in-thread ones, nothing else.
    """
    cuda = torch.cuda.is_available()
    count = (600 if quick else 3000) * (4 if cuda else 1)
    figures: dict[str, Any] = {"images": count, "latency_s": LATENCY, "cores": usable_cpus()}
    figures["load_average"] = [round(load, 2) for load in os.getloadavg()]
    defaults = settings_for("sqlite://")
    figures["defaults"] = {
        "fetch_per_host": defaults.fetch_per_host,
        "fetch_per_host_max": defaults.fetch_per_host_max,
        "fetch_concurrency": defaults.fetch_concurrency,
        "batch_size": defaults.batch_size,
    }
    stand_in = StandInModel(STAND_IN_SECONDS)
    with (
        tempfile.TemporaryDirectory(prefix="bench-feed-") as directory,
        common.database_server() as base,
        common.peers("images", "1", str(count), str(LATENCY)) as slow,
        common.peers("images", "1", str(count), "0") as fast,
    ):
        tmp = Path(directory)
        slow_host, fast_host = slow["hosts"][0], fast["hosts"][0]
        hosts = {"0 ms": fast_host, "200 ms": slow_host}
        if not feeders_only:
            # First, in a process that has run nothing yet: after the runs below, the same
            # decode measured 15-35 % slower in this process (cause not found).
            common.say("  decode only, every core, then one thread")
            figures["decode_only"] = decode_only(count, stand_in.spec.preprocessing)
        figures["feeders"] = feeder_runs(base, hosts, count, stand_in, tmp)
        if feeders_only:
            return figures
        common.say(f"  {count} images from one host; stand-in model, 200 ms then no latency")
        # Decoding on the handler threads, where the clock sees it (feeders are other processes).
        figures["stand_in_slow"] = in_process(
            base, slow_host, count, stand_in, tmp, CpuClock(), feeders=1, host_pid=slow["pid"]
        )
        figures["stand_in_fast"] = in_process(
            base, fast_host, count, stand_in, tmp, CpuClock(), feeders=1, host_pid=fast["pid"]
        )
        common.say("  the same without fetching: every image already in memory")
        figures["stand_in_no_fetch"] = in_process(
            base, fast_host, count, stand_in, tmp, CpuClock(), feeders=1, without_fetching=True
        )
        if not stand_in_only:
            _real_model_runs(figures, base, slow_host, fast_host, count, tmp, cuda)
    serial = figures["decode_only"]["serial_share"]
    for key in ("stand_in_slow", "stand_in_fast", "stand_in_no_fetch"):
        figures[key]["gil"] = gil_estimate(figures[key]["cpu"], serial)
    slow_rate = figures["stand_in_slow"]["rate"]
    figures["feed_latency_hidden"] = round(slow_rate / figures["stand_in_fast"]["rate"], 3)
    figures["feed_over_decode"] = round(slow_rate / figures["decode_only"]["rate"], 3)
    figures["feed_without_fetch_over_decode"] = round(
        figures["stand_in_no_fetch"]["rate"] / figures["decode_only"]["rate"], 3
    )
    figures["feed_cpu_over_decode"] = round(
        figures["decode_only"]["cpu_ms_per_image"] / figures["stand_in_fast"]["cpu"]["total_ms"], 3
    )
    if stand_in_only:
        return figures
    figures["demo_latency_hidden"] = round(
        figures["demo_slow"]["rate"] / figures["demo_fast"]["rate"], 3
    )
    if "rate" in figures["img2dataset"]:
        i2d = figures["img2dataset"]["rate"]
        figures["feed_over_img2dataset"] = round(slow_rate / i2d, 3)
        figures["feed_over_img2dataset_cpu_model"] = round(figures["demo_slow"]["rate"] / i2d, 3)
    figures["feed_celery_over_inprocess"] = round(
        figures["celery_slow"]["rate"] / figures["demo_slow"]["rate"], 3
    )
    return figures


def _real_model_runs(
    figures: dict[str, Any],
    base: str,
    slow_host: str,
    fast_host: str,
    count: int,
    tmp: Path,
    cuda: bool,
) -> None:
    """The real model's runs: in process, img2dataset beside them, and through Celery."""
    if cuda:
        from bench_e2e import make_model

        model_dir = tmp / "resnet50"
        real = make_model(model_dir, "resnet50")
    else:
        model_dir, real = DEMO_MODEL, Classifier.load(DEMO_MODEL)
    figures["real_model"] = f"{real.spec.architecture} on {real.device}"
    common.say(f"  {figures['real_model']}, 200 ms then no latency")
    figures["demo_slow"] = in_process(base, slow_host, count, real, tmp)
    figures["demo_fast"] = in_process(base, fast_host, count, real, tmp)
    common.say("  img2dataset, 200 ms")
    try:
        figures["img2dataset"] = img2dataset(slow_host, count, tmp)
    except (subprocess.CalledProcessError, RuntimeError, OSError) as error:
        figures["img2dataset"] = {"error": str(error)[:300]}
    common.say(f"  a real Celery worker with {figures['real_model']}, 200 ms")
    figures["celery_slow"] = through_celery(base, slow_host, count, tmp, model_dir)


def feeders_report(figures: dict[str, Any]) -> list[str]:
    lines = [
        "  decoding on the handler threads (feeders=1) and in feeder processes, stand-in model"
        " (CPU: this process and its feeders):"
    ]
    for case, part in figures["feeders"].items():
        lines.append(
            f"    {case:<24} {part['rate']:8.1f} images/s ({part['seconds']} s), "
            f"{part['cpu_ms_per_image']:.2f} CPU ms per image, {part['cores_busy']:.2f} cores busy"
        )
    return lines


def report(figures: dict[str, Any]) -> list[str]:
    d = figures["defaults"]
    load = ", ".join(f"{value:g}" for value in figures.get("load_average", []))
    lines = [
        f"  {figures['images']} distinct 400x300 JPEGs from ONE local host, "
        f"{figures['cores']} cores (load average {load} at the start); the host at "
        f"api.europeana.eu's limit ({THUMBNAIL_LIMIT} at once), the other fetcher defaults: "
        f"{d['fetch_per_host']} per unknown host at first, up to {d['fetch_per_host_max']} "
        f"while it keeps pace, {d['fetch_concurrency']} in all; batches of {d['batch_size']}"
    ]
    real = figures.get("real_model", "")
    for key, title in (
        ("stand_in_slow", "pipeline, stand-in model (0.3 ms/image), 200 ms"),
        ("stand_in_fast", "pipeline, stand-in model, no latency"),
        ("stand_in_no_fetch", "pipeline, stand-in model, images already in memory"),
        ("decode_only", "decode only, from memory, every core"),
        ("demo_slow", f"pipeline, {real}, 200 ms"),
        ("demo_fast", f"pipeline, {real}, no latency"),
        ("img2dataset", f"{IMG2DATASET}, 200 ms"),
        ("celery_slow", f"Celery worker (Redis, PostgreSQL), {real}, 200 ms"),
    ):
        part = figures.get(key)
        if part is None:
            continue
        if "rate" in part:
            host = part.get("host_cpu_ms_per_image")
            beside = f"; the host {host:.2f} CPU ms per image" if host is not None else ""
            lines.append(
                f"    {title:<58} {part['rate']:8.1f} images/s ({part['seconds']} s{beside})"
            )
        else:
            lines.append(f"    {title:<58} not run: {part.get('error')}")
    lines += feeders_report(figures)
    return lines + (cpu_report(figures) if "stand_in_fast" in figures else [])


def gil_range(gil: dict[str, float]) -> str:
    return f"{gil['low_ms']:.2f}-{gil['high_ms']:.2f}"


def cpu_report(figures: dict[str, Any]) -> list[str]:
    """The CPU table: ms per image by stage, process totals, the GIL estimate."""
    decoding = figures["decode_only"]
    columns = ("fetch", "decode", "start", "classify", "write", "schedule", "rest")
    lines = [
        "  CPU ms per image (process CPU time, by stage; user+system):",
        "    " + f"{'case':<14}" + "".join(f"{c:>9}" for c in columns) + f"{'total':>9}"
        f"{'user':>8}{'sys':>8}{'cores':>7}{'GIL ms':>8}{'(range)':>13}{'GIL %':>7}{'ceiling':>9}",
    ]
    for key, title in (
        ("stand_in_fast", "0 ms"),
        ("stand_in_slow", "200 ms"),
        ("stand_in_no_fetch", "no fetching"),
    ):
        cpu, gil = figures[key]["cpu"], figures[key]["gil"]
        stages = cpu["ms_per_image"]
        lines.append(
            "    "
            + f"{title:<14}"
            + "".join(f"{stages[c]:9.2f}" for c in columns)
            + f"{cpu['total_ms']:9.2f}{cpu['user_ms']:8.2f}{cpu['system_ms']:8.2f}"
            f"{cpu['cores_busy']:7.2f}{gil['held_ms']:8.2f}"
            f"{f'({gil_range(gil)})':>13}{100 * gil['share']:6.0f}%"
            f"{gil['ceiling_images_s']:9.0f}"
        )
    lines.append(
        f"    decode only from memory: {decoding['cpu_ms_per_image']:.2f} ms per image, "
        f"{decoding['one_thread_rate']:.0f} images/s on one thread, "
        f"{decoding['rate']:.0f} on {decoding['threads']}: serial (GIL) share "
        f"{decoding['serial_share']:.2f}"
    )
    lines.append(
        "    (cores: process CPU over wall time; GIL ms: user time outside decode plus decode's"
        " serial share, between decode free of the GIL and decode's user time all under it;"
        " ceiling: 1000 / GIL ms, images/s one process can reach)"
    )
    return lines


def feeders_summary(figures: dict[str, Any]) -> list[common.Figure]:
    """Feeder processes over the handler threads, by rate, at each latency and feeder count."""
    runs = figures["feeders"]
    lines = []
    for case, part in runs.items():
        latency, feeders = case.split(", feeders=")
        if feeders == "1":
            continue
        threads = runs[f"{latency}, feeders=1"]
        lines.append(
            common.Figure(
                f"feed_feeders{feeders}_over_threads_{latency.replace(' ', '')}",
                round(part["rate"] / threads["rate"], 3),
                note=f"stand-in model, one host at {latency}: {feeders} feeder processes over "
                f"in-thread decoding, {figures['cores']} cores",
            )
        )
    return lines


def summary(figures: dict[str, Any]) -> list[common.Figure]:
    if "stand_in_fast" not in figures:
        return feeders_summary(figures)
    fast_cpu = figures["stand_in_fast"]["cpu"]
    lines = [
        *feeders_summary(figures),
        common.Figure(
            "feed_latency_hidden",
            figures["feed_latency_hidden"],
            f">= {TARGETS['feed_latency_hidden']}",
            note="one host, stand-in model: 200 ms over no latency",
        ),
        common.Figure(
            "feed_cpu_per_image",
            round(1000 * fast_cpu["total_ms"]),
            unit="us",
            note=f"process CPU per image, one host, no latency; GIL held "
            f"{figures['stand_in_fast']['gil']['held_ms']:.2f} ms of it (estimate)",
        ),
        common.Figure(
            "feed_cpu_over_decode",
            figures["feed_cpu_over_decode"],
            note="decode's CPU per image over the whole feed's (1.0: the feed costs only decode)",
        ),
        common.Figure(
            "feed_without_fetch_over_decode",
            figures["feed_without_fetch_over_decode"],
            note="stand-in model, every image already in memory, over decoding from memory: "
            "feed_over_decode's ceiling if downloads cost nothing",
        ),
    ]
    if "demo_slow" not in figures:
        return [
            *lines,
            common.Figure(
                "feed_over_decode",
                figures["feed_over_decode"],
                f">= {TARGETS['feed_over_decode']}",
                note="stand-in model at 200 ms over decoding from memory on every core",
            ),
        ]
    lines += [
        common.Figure(
            "feed_latency_hidden_cpu_model",
            figures["demo_latency_hidden"],
            note=f"the same with {figures['real_model']}",
        ),
        common.Figure(
            "feed_end_to_end_rate",
            figures["demo_slow"]["rate"],
            ">= 3000" if "cuda" in figures["real_model"] else None,
            unit="images/s",
            note=f"{figures['real_model']}, one host at 200 ms",
        ),
    ]
    if "feed_over_img2dataset" in figures:
        lines += [
            common.Figure(
                "feed_over_img2dataset",
                figures["feed_over_img2dataset"],
                f">= {TARGETS['feed_over_img2dataset']}",
                note="stand-in model; one host at 200 ms",
            ),
            common.Figure(
                "feed_over_img2dataset_cpu_model",
                figures["feed_over_img2dataset_cpu_model"],
                note=figures["real_model"],
            ),
        ]
    lines += [
        common.Figure(
            "feed_over_decode",
            figures["feed_over_decode"],
            f">= {TARGETS['feed_over_decode']}",
            note="stand-in model at 200 ms over decoding from memory on every core",
        ),
        common.Figure(
            "feed_celery_over_inprocess",
            figures["feed_celery_over_inprocess"],
            note=f"{figures['real_model']}, 200 ms: Celery "
            f"{figures['celery_slow']['rate']:.0f} images/s, "
            f"in-process {figures['demo_slow']['rate']:.0f}",
        ),
    ]
    return lines


def run_gpu(quick: bool, dry_run: bool = False) -> dict[str, Any]:
    """gpu.sh's part: resnet50 (bf16, channels_last) fed from one host, against the model alone.

    Also the batched GPU decode (`Classifier.batch_decoder`) of the same previews
    against the CPU path on every core, with their mean difference in pixel units.
    `dry_run`: 64 images, so that `gpu.sh --dry-run` checks all of it on a CPU.
    """
    count = 64 if dry_run else 3000 if quick else 12000
    figures: dict[str, Any] = {"images": count, "latency_s": LATENCY, "cores": usable_cpus()}
    figures["load_average"] = [round(load, 2) for load in os.getloadavg()]
    with (
        tempfile.TemporaryDirectory(prefix="bench-feed-gpu-") as directory,
        common.database_server() as base,
        common.peers("images", "1", str(count), str(LATENCY)) as slow,
    ):
        tmp = Path(directory)
        from bench_e2e import make_model

        real = make_model(tmp / "resnet50", "resnet50")
        figures["real_model"] = f"{real.spec.architecture} on {real.device}"
        # Before any pipeline run, as in `run`: after one, the same decode measured 15-35 %
        # slower in the same process, which would flatter the pipeline's figures beside it.
        common.say("  decoding the previews on the CPU path, every core, then one thread")
        figures["decode_only"] = decode_only(min(count, 3000), real.spec.preprocessing)
        inference_batch = settings_for("sqlite://").inference_batch
        common.say(f"  model only: {figures['real_model']}, batches of {inference_batch}")
        figures["model_only"] = model_only(real, count, inference_batch)
        common.say(f"  {count} images from one host at 200 ms: {figures['real_model']}")
        figures["gpu_slow"] = in_process(base, slow["hosts"][0], count, real, tmp, CpuClock())
        feeding = min(count, 3000)  # three runs of it: within gpu.sh's 6 minutes
        figures["feeders"] = feeder_runs(
            base, {"200 ms": slow["hosts"][0]}, feeding, StandInModel(STAND_IN_SECONDS), tmp
        )
        common.say("  decoding the previews batched on the model's device")
        figures["decode_batched"] = batched_decode(real, min(count, 2048))
    figures["gpu_slow"]["gil"] = gil_estimate(
        figures["gpu_slow"]["cpu"], figures["decode_only"]["serial_share"]
    )
    figures["feed_over_model"] = round(
        figures["gpu_slow"]["rate"] / figures["model_only"]["rate"], 3
    )
    return figures


def model_only(classifier: Any, count: int, batch: int) -> dict[str, Any]:
    """`scores` alone on inputs already decoded, as many images as the feed moves."""
    inputs = np.random.default_rng(0).standard_normal(
        (batch, 3, classifier.spec.input_size, classifier.spec.input_size), dtype=np.float32
    )
    for _ in range(3):
        classifier.scores(inputs)  # warm: cuDNN picks its kernels
    rounds = max(1, count // batch)
    began = time.perf_counter()
    for _ in range(rounds):
        classifier.scores(inputs)
    seconds = time.perf_counter() - began
    return {"seconds": round(seconds, 2), "rate": round(rounds * batch / seconds, 1)}


def batched_decode(classifier: Any, count: int) -> dict[str, Any]:
    """`Classifier.batch_decoder` over the previews in batches of 256, and its difference."""
    pictures = [preview_jpeg(seed) for seed in range(PICTURES)]
    bodies = [distinct(pictures[number % PICTURES], number) for number in range(count)]
    decoder = classifier.batch_decoder()
    decoder.decode(bodies[:256])  # warm
    began = time.perf_counter()
    for start in range(0, count, 256):
        decoded = decoder.decode(bodies[start : start + 256])
    if decoded.inputs.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    preprocessing = classifier.spec.preprocessing
    std = np.asarray(preprocessing.std, dtype=np.float32)[:, None, None] * 255.0
    sample = decoder.decode(bodies[:64]).inputs.float().cpu().numpy()
    reference = np.stack([decode(body, preprocessing) for body in bodies[:64]])
    difference = float(np.abs((sample - reference) * std).mean())
    return {
        "seconds": round(seconds, 2),
        "rate": round(count / seconds, 1),
        "on_gpu": decoder.on_gpu,
        "mean_abs_diff": round(difference, 3),
    }


def report_gpu(figures: dict[str, Any]) -> list[str]:
    load = ", ".join(f"{value:g}" for value in figures["load_average"])
    batched = figures["decode_batched"]
    lines = [
        f"  {figures['images']} distinct 400x300 JPEGs from ONE local host at 200 ms, "
        f"{figures['cores']} cores (load average {load} at the start)",
    ]
    for key, title in (
        ("model_only", f"model only, {figures['real_model']}"),
        ("gpu_slow", f"pipeline, {figures['real_model']}, 200 ms"),
        ("decode_batched", "decode, batched " + ("on the GPU" if batched["on_gpu"] else "(CPU)")),
        ("decode_only", "decode, CPU path, every core"),
    ):
        part = figures[key]
        lines.append(f"    {title:<58} {part['rate']:8.1f} images/s ({part['seconds']} s)")
    cpu, gil = figures["gpu_slow"]["cpu"], figures["gpu_slow"]["gil"]
    stages = ", ".join(f"{stage} {ms:.2f}" for stage, ms in cpu["ms_per_image"].items())
    lines += [
        f"    pipeline CPU ms per image: {stages}; total {cpu['total_ms']:.2f} "
        f"({cpu['cores_busy']:.2f} cores busy), GIL held {gil['held_ms']:.2f} "
        f"({gil_range(gil)}, estimate)",
        f"    batched decode differs from the CPU path by {batched['mean_abs_diff']} on average "
        "(0..255 pixel units; tolerance 2.0)",
    ]
    return lines + feeders_report(figures)


def summary_gpu(figures: dict[str, Any]) -> list[common.Figure]:
    return [
        *feeders_summary(figures),
        common.Figure(
            "feed_end_to_end_rate",
            figures["gpu_slow"]["rate"],
            ">= 3000",
            unit="images/s",
            note=f"{figures['real_model']}, one host at 200 ms, one process",
        ),
        common.Figure(
            "feed_over_model",
            figures["feed_over_model"],
            note=f"the same over the model alone ({figures['model_only']['rate']:.0f} images/s)",
        ),
        common.Figure(
            "decode_batched_over_cpu",
            round(figures["decode_batched"]["rate"] / figures["decode_only"]["rate"], 3),
            note=f"decode on the model's device (batches of 256) over the CPU path on every core;"
            f" mean difference {figures['decode_batched']['mean_abs_diff']} (<= 2.0)",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stand_in_only = "--stand-in-only" in argv
    if "--gpu" in argv:  # gpu.sh: CUDA, or a CPU with --dry-run
        dry_run = "--dry-run" in argv
        argv = [arg for arg in argv if arg not in ("--gpu", "--dry-run")]
        return common.stand_alone(
            __doc__,
            "3,000 images instead of 12,000",
            lambda quick: run_gpu(quick, dry_run),
            report_gpu,
            summary_gpu,
            argv,
        )
    feeders_only = "--feeders-only" in argv
    argv = [arg for arg in argv if arg not in ("--stand-in-only", "--feeders-only")]
    return common.stand_alone(
        __doc__,
        "600 images instead of 3,000",
        lambda quick: run(quick, stand_in_only, feeders_only),
        report,
        summary,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
