"""`enrich review label-studio export` writes as every other output is written: a failure is one
line naming the path, the previous good files stay, and a device is never replaced by a file."""

from __future__ import annotations

import json
import resource
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.errors import OutputError
from enrichment.review.exchange import write_label_studio
from enrichment.store.database import Database
from enrichment.store.review_queue import QueueFilter
from tests.test_review_api import SCORES, build_review_db

EVERYTHING = QueueFilter(state="any")
PREVIOUS_TASKS = '[{"data": {"image": "http://images.test/previous.png"}}]'
PREVIOUS_CONFIG = "<View/>\n"


@pytest.fixture(scope="module")
def review_db(tmp_path_factory: pytest.TempPathFactory, image_host) -> Iterator[Database]:
    db = build_review_db(f"sqlite:///{tmp_path_factory.mktemp('ls')}/ls.sqlite3", image_host)
    yield db
    db.dispose()


@pytest.fixture
def previous(tmp_path: Path) -> tuple[Path, Path]:
    """A good export of an earlier day: its tasks and its config."""
    tasks, config = tmp_path / "tasks.json", tmp_path / "tasks.xml"
    tasks.write_text(PREVIOUS_TASKS)
    config.write_text(PREVIOUS_CONFIG)
    return tasks, config


@contextmanager
def disk_full_after(size: int) -> Iterator[None]:
    """A full disk as a writer meets it: writing past `size` bytes of a file fails (EFBIG)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def assert_unchanged(tasks: Path, config: Path) -> None:
    assert tasks.read_text() == PREVIOUS_TASKS and config.read_text() == PREVIOUS_CONFIG
    assert sorted(path.name for path in tasks.parent.iterdir()) == ["tasks.json", "tasks.xml"]


def test_an_export_replaces_the_previous_one_whole(
    review_db: Database, previous: tuple[Path, Path]
) -> None:
    tasks, config = previous
    assert write_label_studio(review_db, EVERYTHING, tasks, config) == len(SCORES)
    assert {task["data"]["record_id"] for task in json.loads(tasks.read_text())} == set(SCORES)
    assert config.read_text().startswith("<View>")
    assert sorted(path.name for path in tasks.parent.iterdir()) == ["tasks.json", "tasks.xml"]


def test_a_full_disk_leaves_the_previous_export_in_place(
    review_db: Database, previous: tuple[Path, Path]
) -> None:
    tasks, config = previous
    with disk_full_after(len(PREVIOUS_TASKS)), pytest.raises(OutputError) as refused:
        write_label_studio(review_db, EVERYTHING, tasks, config)
    assert str(refused.value) == f"cannot write {tasks}: File too large"
    assert_unchanged(tasks, config)


def test_a_device_is_written_through_first_and_never_replaced(
    review_db: Database, previous: tuple[Path, Path]
) -> None:
    tasks, config = previous
    full = Path("/dev/full")
    for out, labelling in [(full, config), (tasks, full)]:
        with pytest.raises(OutputError) as refused:
            write_label_studio(review_db, EVERYTHING, out, labelling)
        assert str(refused.value) == "cannot write /dev/full: No space left on device"
        assert stat.S_ISCHR(full.stat().st_mode)
        assert_unchanged(tasks, config)  # the device failed first: the files were not touched
    assert write_label_studio(review_db, EVERYTHING, Path("/dev/null"), config) == len(SCORES)
    assert stat.S_ISCHR(Path("/dev/null").stat().st_mode)
    assert config.read_text().startswith("<View>")


def test_an_unusable_path_is_named_and_nothing_is_left(review_db: Database, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for out, reason in [
        (tmp_path / "missing" / "tasks.json", "No such file or directory"),
        (a_file / "tasks.json", "Not a directory"),
    ]:
        with pytest.raises(OutputError) as refused:
            write_label_studio(review_db, EVERYTHING, out, tmp_path / "tasks.xml")
        assert str(refused.value) == f"cannot write {out}: {reason}"
    assert [path.name for path in tmp_path.iterdir()] == ["a-file"]


def test_a_symlink_stays_a_link_to_the_new_export(
    review_db: Database, previous: tuple[Path, Path]
) -> None:
    tasks, config = previous
    link = tasks.with_name("latest.json")
    link.symlink_to(tasks.name)
    write_label_studio(review_db, EVERYTHING, link, config)
    assert link.is_symlink() and link.readlink() == Path("tasks.json")
    assert len(json.loads(tasks.read_text())) == len(SCORES)


def test_export_failures_from_the_command_line_are_one_line(image_host, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ls.sqlite3"
    build_review_db(url, image_host).dispose()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    missing = outputs / "missing" / "tasks.json"
    for options, message in [
        (
            ["--out", "/dev/full", "--config", str(outputs / "config.xml")],
            "cannot write /dev/full: No space left on device",
        ),
        (
            ["--out", str(outputs / "tasks.json"), "--config", "/dev/full"],
            "cannot write /dev/full: No space left on device",
        ),
        (["--out", str(missing)], f"cannot write {missing}: No such file or directory"),
    ]:
        done = CliRunner().invoke(
            cli, ["review", "label-studio", "export", *options], env={"DATABASE_URL": url}
        )
        assert (done.exit_code, done.output) == (1, f"Error: {message}\n")
    no_config = CliRunner().invoke(
        cli, ["review", "label-studio", "export", "--out", "/dev/stdout"], env={"DATABASE_URL": url}
    )
    assert no_config.exit_code == 2 and "give --config when --out is a device" in no_config.output
    assert not Path("/dev/full.xml").exists() and not Path("/dev/stdout.xml").exists()
    # A mistyped class is named (it wrote no task, exit 0), and nothing is written.
    unknown = CliRunner().invoke(
        cli,
        ["review", "label-studio", "export", "--out", str(outputs / "t.json"), "--class", "mapp"],
        env={"DATABASE_URL": url},
    )
    assert unknown.exit_code != 0 and "no model has the class mapp" in unknown.output
    assert list(outputs.iterdir()) == []
