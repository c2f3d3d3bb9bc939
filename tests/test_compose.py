"""docker-compose.yml validates against the Compose Specification schema (no Docker engine here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec" / "compose-spec.json"
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        value = env.get(name)
        if operator in (":?", "?") and (value is None or (operator == ":?" and value == "")):
            raise KeyError(f"{name}: {argument}")
        if operator in (":-", "-") and (value is None or (operator == ":-" and value == "")):
            return argument
        return value or ""

    return VARIABLE.sub(substitute, text)


def compose_document(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate((REPO / "docker-compose.yml").read_text(), env))


def test_compose_file_validates_against_the_compose_schema() -> None:
    document = compose_document(env_file(REPO / ".env.example"))
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)  # the schema's $schema, spelled old-style
    errors = sorted(validator.iter_errors(document), key=lambda error: list(error.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_stack_has_every_role_configured_safely() -> None:
    services = compose_document(env_file(REPO / ".env.example"))["services"]
    assert set(services) == {"postgres", "redis", "migrate", "scheduler", "gpu-worker", "flower"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--requirepass" in redis_command
    worker = services["gpu-worker"]
    assert worker["command"][0] == "worker"
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert worker["deploy"]["replicas"] == 1
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert "--beat" in services["scheduler"]["command"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_missing_secrets_are_refused_like_compose_does() -> None:
    env = env_file(REPO / ".env.example")
    del env["POSTGRES_PASSWORD"]
    try:
        compose_document(env)
    except KeyError as error:
        assert "POSTGRES_PASSWORD" in str(error)
    else:
        raise AssertionError("a missing POSTGRES_PASSWORD must stop compose")
