"""The layout's promises: stages in sub-packages, small modules, torch only where a model runs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from enrichment.store.database import Database

ROOT = Path(__file__).resolve().parent.parent
LOOSE_MODULES = {
    "__init__.py",
    "__main__.py",
    "bootstrap.py",
    "config.py",
    "deadline.py",
    "deadline_http.py",
    "errors.py",
    "files.py",
    "thresholds.py",
}

# The flow, top to bottom: a module may import its own package, any package on a lower
# level, and the same-level packages listed in SIDEWAYS; never one above it.
LEVELS = {
    "cli": 4,
    "worker": 4,
    "bootstrap": 4,
    "__main__": 4,
    "runs": 3,
    "publish": 3,
    "review": 3,
    "report": 3,
    "sources": 2,
    "media": 2,
    "model": 2,
    "store": 1,
    "config": 0,
    "deadline": 0,
    "deadline_http": 0,
    "errors": 0,
    "files": 0,
    "thresholds": 0,
    "enrichment": 0,  # the package itself: its version
}
# The model's own flow harvests by concept (sources) and decodes its training images (media);
# the entry points share the composition root. The loose modules at level 0 may use each other.
SIDEWAYS = {
    ("model", "sources"),
    ("model", "media"),
    ("cli", "bootstrap"),
    ("worker", "bootstrap"),
    ("__main__", "cli"),
}
# Outside store/ and migrations/, the composition root and the CLI's error boundary alone.
SQLALCHEMY_ALLOWED = {"enrichment/bootstrap.py", "enrichment/cli/base.py"}

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


def test_the_celery_app_reads_no_environment_at_import_and_is_configured_from_settings() -> None:
    """A setting that cannot be read breaks nothing at import; `configure` sets the app up."""
    body = (
        "import worker.app, worker.tasks\n"
        "    from enrichment.config import Settings\n"
        "    app = worker.app.configure(Settings(broker_url='redis://broker:6379/5'))\n"
        "    assert app.conf.broker_url == 'redis://broker:6379/5', app.conf.broker_url\n"
        "    assert worker.app.process_settings().broker_url == 'redis://broker:6379/5'"
    )
    heavy = imported(["celery"], body, {"ENRICH_VISIBILITY_TIMEOUT": "not a number"})
    assert "torch" not in heavy


# On a new database `status` ends with "no runs yet" (exit 1), `export` with an empty
# collection: both have done their real work by then.
@pytest.mark.parametrize(("command", "exit_code"), [(["status"], 1), (["export"], 0)])
def test_reporting_commands_load_neither_torch_nor_celery(
    command: list[str], exit_code: int, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    Database(url).ensure_schema()  # only a run creates one
    env = {"DATABASE_URL": url, "CELERY_BROKER_URL": ""}
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


def _package(path: Path) -> str:
    """The flow package a source file belongs to: `store` for enrichment/store/ledger.py."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "worker":
        return "worker"
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at the top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def _sources() -> list[Path]:
    return [*(ROOT / "enrichment").rglob("*.py"), *(ROOT / "worker").rglob("*.py")]


def test_no_package_imports_one_above_it_in_the_flow() -> None:
    upward = []
    for path in _sources():
        source = _package(path)
        for name in _imports(path):
            if name == "worker" or name.startswith("worker."):
                target = "worker"
            elif name == "enrichment" or name.startswith("enrichment."):
                target = name.split(".")[1] if "." in name else "enrichment"
            else:
                continue
            if target == source or (source, target) in SIDEWAYS:
                continue
            if LEVELS[target] > LEVELS[source] or LEVELS[target] == LEVELS[source] > 0:
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert upward == []


def test_only_store_the_composition_root_and_the_cli_boundary_import_sqlalchemy() -> None:
    """The probe can fail: store/ itself does import SQLAlchemy."""
    importers = {
        str(path.relative_to(ROOT))
        for path in _sources()
        if any(name.split(".")[0] == "sqlalchemy" for name in _imports(path))
    }
    assert "enrichment/store/database.py" in importers
    outside = {
        name for name in importers if not name.startswith("enrichment/store/")
    } - SQLALCHEMY_ALLOWED
    assert outside == set()


def test_settings_are_read_from_the_environment_in_one_place() -> None:
    """The composition root alone calls `Settings.from_env`: once per process, by its caller."""
    callers = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _sources()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr == "from_env"
    ]
    assert [caller.split(":")[0] for caller in callers] == ["enrichment/bootstrap.py"], callers
