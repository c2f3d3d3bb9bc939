"""The layout's promises: stages in sub-packages, small modules, torch only where a model runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOOSE_MODULES = {"__init__.py", "__main__.py", "config.py", "errors.py", "files.py"}

# Runs a command in this interpreter and prints which heavy modules it imported.
PROBE = """
import json, runpy, sys
sys.argv = {argv!r}
code = 0
try:
    {body}
except SystemExit as exit:
    code = exit.code or 0
heavy = sorted(name for name in ("torch", "torchvision", "celery", "worker") if name in sys.modules)
print("\\nIMPORTED " + json.dumps(heavy))
print("EXIT " + json.dumps(code))
"""


def imported(
    argv: list[str], body: str, env: dict[str, str] | None = None, exit_code: int = 0
) -> list[str]:
    code = PROBE.format(argv=argv, body=body)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    exited = json.loads(next(line for line in lines if line.startswith("EXIT ")).split()[1])
    assert exited == exit_code, f"{argv} exited {exited}: {result.stderr}"
    line = next(line for line in lines if line.startswith("IMPORTED "))
    return json.loads(line.removeprefix("IMPORTED "))


def test_importing_the_celery_app_loads_no_torch() -> None:
    """The beat and scheduler processes import worker.app (and its tasks) without a model."""
    heavy = imported(["celery"], "import worker.app, worker.tasks")
    assert "celery" in heavy  # the probe sees what it imports
    assert "torch" not in heavy and "torchvision" not in heavy


# On a new database `status` ends with "no runs yet" (exit 1), `export` with an empty
# collection: both have done their real work by then.
@pytest.mark.parametrize(("command", "exit_code"), [(["status"], 1), (["export"], 0)])
def test_reporting_commands_load_neither_torch_nor_celery(
    command: list[str], exit_code: int, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "CELERY_BROKER_URL": ""}
    body = "from enrichment.cli import main; main()"
    heavy = imported(["enrich", *command], body, env, exit_code)
    assert heavy == [], f"`enrich {' '.join(command)}` imported {heavy}"


def test_in_process_runs_load_torch_and_not_celery(tmp_path: Path) -> None:
    """The probe can fail: a command that classifies does import torch."""
    body = "import enrichment.runs.inprocess"
    assert imported(["x"], body) == ["torch", "torchvision"]


def test_no_module_over_600_lines_and_only_the_shared_loose_modules() -> None:
    long = {
        str(path.relative_to(ROOT)): count
        for folder in ("enrichment", "worker")
        for path in (ROOT / folder).rglob("*.py")
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert long == {}
    loose = {path.name for path in (ROOT / "enrichment").glob("*.py")}
    assert loose <= LOOSE_MODULES, loose - LOOSE_MODULES


def test_enrichment_never_imports_worker() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "enrichment").rglob("*.py")
        if any(
            line.lstrip().startswith(("from worker", "import worker"))
            for line in path.read_text(encoding="utf-8").splitlines()
        )
    ]
    assert offenders == []


def test_urllib3_is_pinned_below_the_major_version_the_ssrf_guard_was_written_for() -> None:
    """The SSRF guard subclasses urllib3 internals; a new major version must be a decision."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (pin,) = [
        Requirement(line) for line in project["dependencies"] if Requirement(line).name == "urllib3"
    ]
    assert not pin.specifier.contains("3.0.0")
    assert pin.specifier.contains(version("urllib3"))
