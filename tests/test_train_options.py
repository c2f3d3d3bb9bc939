"""`enrich model train`: rates that are not finite positive numbers, and an --out that
cannot be created, are refused before any training (issue 15)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from enrichment.cli.base import FiniteFloat
from enrichment.cli.model import check_creatable
from enrichment.errors import OutputError
from tests.conftest import enrich


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    path = tmp_path / "set.csv"
    path.write_text("image,labels\na.png,map\n")
    return path


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lr", "nan", "'nan' is not a finite number"),
        ("--lr", "-0.01", "-0.01 must be above 0"),
    ],
)
def test_a_rate_that_is_not_a_finite_positive_number_is_refused(
    tmp_path: Path, labelled: Path, option: str, value: str, message: str
) -> None:
    output = tmp_path / "model"
    result = enrich(
        "model", "train", "--data", str(labelled), "--out", str(output), option, value, env={}
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: Invalid value for '{option}': {message}"]
    assert not output.exists()


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        (FiniteFloat(0, 10, low_open=True), "inf", "'inf' is not a finite number"),
        (FiniteFloat(0, 10, low_open=True), "0", "0 must be above 0"),
        (FiniteFloat(0, 10), "-1", "-1 must be at least 0"),
        (FiniteFloat(0, 10), "NaN", "'NaN' is not a finite number"),
        (FiniteFloat(0, 0.9, low_open=True), "1.5", "1.5 must be at most 0.9"),
        (FiniteFloat(0, 10), "x", "'x' is not a valid float"),
    ],
)
def test_finite_float_refuses_what_float_range_lets_through(
    kind: FiniteFloat, value: str, message: str
) -> None:
    with pytest.raises(click.BadParameter, match=message):
        kind.convert(value, None, None)
    assert FiniteFloat(0, 10).convert("0", None, None) == 0.0


def test_an_output_that_cannot_be_created_is_one_line_before_training(
    tmp_path: Path, labelled: Path
) -> None:
    result = enrich(
        "model", "train", "--data", str(labelled), "--out", "/proc/no-such/model", env={}
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("Error: cannot create /proc/no-such/model: ")


def test_check_creatable_makes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"cannot create {blocker}/model: {blocker} is not a"):
        check_creatable(blocker / "model")
    check_creatable(tmp_path / "new" / "deeper" / "model")  # creatable: fine, and not made
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]
