"""bench_scale's worker: times one operation at a time, the way people run it, in one process.

Started by bench_scale.py (`python benchmarks/scale_worker.py`); it imports the
`enrich` command and the review app once, says it is ready, then reads one
JSON request a line ({"url", "step", "params"}) and answers each with one line
({"seconds", "detail", "rss_mb"} or {"error"}). Commands run in-process through
click's runner and the review app's routes through Flask's test client, so the
time is the command's own, without interpreter start-up. It imports neither
torch nor benchmarks/common.py, so its peak RSS is the command's, as in
`enrich export`. bench_scale kills it when a step runs past its timeout.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class Target:
    """One database as the `enrich` command and the review app see it."""

    def __init__(self, url: str, scratch: Path) -> None:
        from click.testing import CliRunner

        from enrichment import bootstrap
        from enrichment.review.app import create_app

        self.env = {"DATABASE_URL": url}
        self.settings = bootstrap.read_settings({**os.environ, **self.env})
        self.db = bootstrap.open_database(self.settings)
        self.scratch = scratch
        self.runner = CliRunner()
        self.client = create_app(self.db, self.settings, scratch / "cache").test_client()
        self.rollout: Rollout | None = None

    def enrich(self, *arguments: str) -> str:
        """`enrich ARGUMENTS` in this process; its output (stdout and stderr)."""
        from enrichment.cli import cli

        result = self.runner.invoke(cli, list(arguments), env=self.env)
        if result.exit_code != 0:
            failure = result.exception
            raised = (
                "".join(traceback.format_exception(failure))
                if failure is not None and not isinstance(failure, SystemExit)
                else ""
            )
            raise RuntimeError(
                f"enrich {' '.join(arguments)} exited {result.exit_code}: "
                f"{result.output[-1500:]}{raised}"
            )
        return result.output

    def get(self, path: str) -> Any:
        response = self.client.get(path)
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:1500]}")
        return response

    def queue(self, query: str) -> dict[str, Any]:
        page = self.get(f"/api/queue?{query}").get_json()
        return {"items": len(page["items"]), "total": page["total"], "after": page["next_after"]}


def lines(text: str) -> dict[str, int]:
    return {"lines": len(text.splitlines())}


def written(text: str) -> dict[str, int]:
    found = re.search(r"wrote (\d+) annotations", text)
    return {"annotations": int(found.group(1)) if found else -1}


def sweep(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """A worker's look for batches whose worker stopped beating (`worker.tasks.keep`)."""
    from enrichment.store.batches import claim_stale_batches

    return {"claimed": len(claim_stale_batches(target.db, 120.0))}


def run_end_check(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """After a batch, whether its run is complete (`runs.complete_run_if_done`, as a worker
    checks after every batch), for the run over every record with its last batch still to
    finish, as near the end of a run. Only the check is timed; the run is restored after."""
    import sqlalchemy as sa

    from enrichment.store.runs import complete_run_if_done
    from enrichment.store.schema import Batch, BatchStatus, Run, RunStatus

    run_id = params["run"]
    with target.db.transaction() as session:
        last = session.scalars(
            sa.select(Batch).where(Batch.run_id == run_id).order_by(Batch.seq.desc()).limit(1)
        ).one()
        run = session.get(Run, run_id)
        assert run is not None and last.status == BatchStatus.DONE
        last.status, run.status = BatchStatus.QUEUED, RunStatus.RUNNING
        last_id = last.id
    try:
        began = time.perf_counter()
        completed = complete_run_if_done(target.db, run_id)
        seconds = time.perf_counter() - began
    finally:
        with target.db.transaction() as session:
            session.get(Batch, last_id).status = BatchStatus.DONE
            session.get(Run, run_id).status = RunStatus.COMPLETED
    return {"seconds": seconds, "completed": completed}


def report_run(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """`enrich report` without its thumbnails (fetching them would reach the internet):
    write_report's gather, render and write."""
    from enrichment.files import write_atomically
    from enrichment.report.report import gather, render

    report = gather(target.db, params["run"], 4)
    page = render(report, {})
    write_atomically(target.scratch / "report.html", page.encode("utf-8"))
    return {"classes": len(report.classes), "bytes": len(page)}


def export_all(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    out = target.scratch / "everything.jsonld"
    found: dict[str, Any] = written(target.enrich("export", "--out", str(out)))
    found["file_mb"] = round(out.stat().st_size / 2**20, 1)
    out.unlink()
    return found


def status_json(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    document = json.loads(target.enrich("status", "--run", str(params["run"]), "--json"))
    return {"records_done": document["records_done"]}


def review_record(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    view = target.get(f"/api/record?id={quote(params['record_id'])}").get_json()
    return {"items": len(view["items"])}


def publish_dry(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    output = target.enrich("publish", "--dry-run", "--dataset", params["probe"])
    return {"summary": output.splitlines()[-1]}


def export_probe(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    out = str(target.scratch / "probe.jsonld")
    return written(target.enrich("export", "--dataset", params["probe"], "--out", out))


def recalibrated(target: Target, version: str) -> None:
    """The version registered again with every threshold 0.01 higher, as a run after `enrich
    model calibrate` registers it: each call is a real change, so each try relabels."""
    from enrichment.store.schema import ModelRow
    from enrichment.store.writes import register_model

    with target.db.transaction() as session:
        model = session.get(ModelRow, version)
        assert model is not None, f"no model {version}"
        thresholds = [round(min(float(t) + 0.01, 0.99), 6) for t in model.thresholds]
        register_model(
            session,
            version,
            model.name,
            model.architecture,
            model.classes,
            thresholds,
            model.top_k_fallback,
        )


def relabel_chunk(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """A recalibration's first chunk: the longest a batch write of the version waits."""
    from enrichment.store.relabel import Relabelled, relabel_some

    recalibrated(target, params["version"])
    changed = Relabelled()
    relabel_some(target.db, params["version"], changed)
    return {"results": changed.results}


def recalibrate(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """A recalibration registered and every result of the version decided again."""
    from enrichment.store.relabel import finish_relabelling

    recalibrated(target, params["version"])
    done = finish_relabelling(target.db, [params["version"]])[params["version"]]
    return {"results": done.results, "removed": done.removed, "added": done.added}


ROLLOUT_BATCH = 128  # records a batch, as a run cuts them


class Rollout:
    """A run of a new model version over the large dataset, as GPU workers write it while
    the version rolls out: each batch loaded, its images' digests looked up for scores the
    version already gave (the dedupe), its outcomes written and the batch marked done, each
    in its own transaction as `runs/pipeline.py` does. Each try writes the next batch."""

    def __init__(self, target: Target, params: dict[str, Any]) -> None:
        from enrichment.runs.service import europeana_scope
        from enrichment.sources.europeana import dataset_query
        from enrichment.store.schema import ModelRow, Run, RunStatus, dataset_range, utc_now
        from enrichment.store.writes import register_model

        self.db = target.db
        self.version = params["new_version"]
        with self.db.transaction() as session:
            model = session.get(ModelRow, params["version"])
            assert model is not None, f"no model {params['version']}"
            register_model(
                session,
                self.version,
                model.name,
                model.architecture,
                model.classes,
                model.thresholds,
                model.top_k_fallback,
            )
            run = Run(
                kind="on_demand",
                scope=europeana_scope([dataset_query(params["large"])]),
                model_version=self.version,
                status=RunStatus.RUNNING,
                queue="enrich.on_demand",
                started_at=utc_now(),
            )
            session.add(run)
            session.flush()
            self.run_id = run.id
            self.keys = [entry["key"] for entry in model.classes]
            self.concepts = [entry["concept"] for entry in model.classes]
            self.thresholds = [float(value) for value in model.thresholds]
        self.after, self.end = dataset_range(params["large"])
        self.seq = 0

    def next_batch(self) -> int:
        """The next ROLLOUT_BATCH records of the dataset, as a queued batch of the run."""
        import sqlalchemy as sa

        from enrichment.store.schema import Batch, BatchStatus, RecordRow

        with self.db.transaction() as session:
            ids = session.scalars(
                sa.select(RecordRow.id)
                .where(RecordRow.id > self.after, RecordRow.id < self.end)
                .order_by(RecordRow.id)
                .limit(ROLLOUT_BATCH)
            ).all()
            if len(ids) < ROLLOUT_BATCH:
                raise RuntimeError("the large dataset has no records left for another batch")
            self.after = ids[-1]
            self.seq += 1
            batch = Batch(
                run_id=self.run_id, seq=self.seq, status=BatchStatus.QUEUED, record_ids=list(ids)
            )
            session.add(batch)
            session.flush()
            return batch.id

    def outcome(self, record_id: str) -> Any:
        """A plausible classification of the record: scores drawn from its id, labels at or
        above their thresholds, a new image digest."""
        from enrichment.store.schema import Outcome
        from enrichment.store.writes import LabelScore, RecordOutcome

        draw = random.Random(record_id)
        # float32, as the classifier's sigmoid gives them (and as they are stored).
        scores = numpy.array([draw.random() ** 10 for _ in self.keys], numpy.float32).tolist()
        labels = [
            LabelScore(key, concept, score)
            for key, concept, score, threshold in zip(
                self.keys, self.concepts, scores, self.thresholds, strict=True
            )
            if score >= threshold
        ]
        return RecordOutcome(
            record_id=record_id,
            status=Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD,
            scores=scores,
            labels=labels,
            image_sha256=hashlib.sha256(f"{self.version} {record_id}".encode()).hexdigest(),
        )


def write_batch(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """One batch of a new version's run written: the worker's three transactions."""
    from enrichment.store.batches import finish_batch, start_batch, stored_scores

    if target.rollout is None:
        target.rollout = Rollout(target, params)
    rollout = target.rollout
    batch_id = rollout.next_batch()
    attempt = start_batch(rollout.db, batch_id, 3, heartbeat=True, version=rollout.version)
    assert attempt is not None
    outcomes = [rollout.outcome(record.id) for record in attempt.records]
    known = stored_scores(rollout.db, rollout.version, [o.image_sha256 for o in outcomes])
    finish_batch(rollout.db, batch_id, rollout.run_id, rollout.version, outcomes)
    return {
        "records": len(outcomes),
        "labels": sum(len(o.labels) for o in outcomes),
        "known": len(known),
    }


def retire(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """`enrich model retire` of the later version: a rollout rolled back, every result of the
    version removed a chunk at a time and the earlier version's current again."""
    output = target.enrich("model", "retire", params["retired_version"], "--yes")
    found = re.search(r"retired: (\d+) results", output)
    return {"results": int(found.group(1)) if found else -1}


STEPS: dict[str, Callable[[Target, dict[str, Any]], dict[str, Any]]] = {
    "status": lambda t, p: lines(t.enrich("status")),
    "status_run_json": status_json,
    "results_record": lambda t, p: lines(t.enrich("results", "--record", p["record_id"])),
    "results_probe": lambda t, p: lines(t.enrich("results", "--dataset", p["probe"])),
    "export_probe": export_probe,
    "publish_dry_probe": publish_dry,
    "results_large_json": lambda t, p: lines(
        t.enrich("results", "--dataset", p["large"], "--json")
    ),
    "sweep": sweep,
    "run_end_check": run_end_check,
    "review_record": review_record,
    "queue_dataset": lambda t, p: t.queue(f"dataset={p['probe']}"),
    "queue_class": lambda t, p: t.queue(f"label={p['class']}"),
    "queue_class_offset": lambda t, p: t.queue(f"label={p['class']}&offset={p['offset']}"),
    "queue_class_after": lambda t, p: t.queue(f"label={p['class']}&after={quote(p['after'])}"),
    "queue_default": lambda t, p: t.queue(""),
    "audit_class": lambda t, p: t.queue(f"label={p['class']}&audit=1"),
    "progress_class": lambda t, p: t.get(f"/api/progress?label={p['class']}").get_json(),
    "progress_dataset": lambda t, p: t.get(f"/api/progress?dataset={p['probe']}").get_json(),
    "stats_page": lambda t, p: {"bytes": len(t.get("/stats").data)},
    "review_stats": lambda t, p: {
        "classes": len(json.loads(t.enrich("review", "stats", "--json")))
    },
    "report_run": report_run,
    "export_all": export_all,
    "relabel_chunk": relabel_chunk,
    "recalibrate": recalibrate,
    "write_batch": write_batch,
    "retire": retire,
}


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: getrusage's maxrss would count the parent's, which it
    keeps across the fork and exec that started this one)."""
    status = Path("/proc/self/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def serve() -> None:
    """Import everything once, then time each step sent on stdin; answers on stdout."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nothing else reaches the protocol
    import click.testing  # noqa: F401

    import enrichment.cli
    import enrichment.report.report
    import enrichment.review.app  # noqa: F401

    scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    targets: dict[str, Target] = {}
    protocol.write(json.dumps({"ready": True, "rss_mb": peak_rss_mb()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            url = request["url"]
            if url not in targets:
                targets[url] = Target(url, scratch / str(len(targets)))
            began = time.perf_counter()
            detail = STEPS[request["step"]](targets[url], request["params"])
            # A step that sets up and restores around what it times says how long that took.
            seconds = detail.pop("seconds", time.perf_counter() - began)
            answer = {"seconds": seconds, "detail": detail}
        except Exception:
            answer = {"error": traceback.format_exc(limit=-8)}
        answer["rss_mb"] = peak_rss_mb()
        gc.collect()  # engines the commands opened close their connections, as at exit
        protocol.write(json.dumps(answer, default=str) + "\n")


if __name__ == "__main__":
    serve()
