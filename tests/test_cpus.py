"""The CPUs a process may use (affinity, cgroup v1 and v2 quotas), and decode slots sized by them.

The cgroup trees are built in a temporary directory, with /proc/self's `cgroup`
and `mountinfo` written to point into it, as a container or a systemd slice
would show them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enrichment.media import decode
from enrichment.media.cpus import cgroup_cpu_quota, usable_cpus
from enrichment.media.decode import DecodeSlots


def fake_proc(tmp_path: Path, memberships: list[str], mounts: list[str]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("".join(f"{line}\n" for line in memberships))
    (proc / "mountinfo").write_text("".join(f"{line}\n" for line in mounts))
    return proc


def write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text + "\n")


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)


def test_cgroup_v2_takes_the_smallest_quota_on_the_path_rounded_up(
    tmp_path: Path, eight_cpus: None
) -> None:
    root = tmp_path / "unified"
    write(root / "system.slice", cpu__max="150000 100000")  # 1.5 CPUs for the whole slice
    write(root / "system.slice" / "enrich.service", cpu__max="max 100000")
    proc = fake_proc(
        tmp_path,
        ["0::/system.slice/enrich.service"],
        [f"30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"],
    )
    assert cgroup_cpu_quota(proc) == 1.5
    assert usable_cpus(proc) == 2, "two threads can use 1.5 CPUs; one cannot"


def test_cgroup_v1_quota_in_a_container_that_sees_its_own_cgroup_as_the_root(
    tmp_path: Path, eight_cpus: None
) -> None:
    mount = tmp_path / "cpu,cpuacct"
    write(mount, cpu__cfs_quota_us="300000", cpu__cfs_period_us="100000")
    proc = fake_proc(
        tmp_path,
        ["12:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc", "0::/"],
        [
            "40 31 0:35 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
            f"41 31 0:36 /docker/abc {mount} rw,nosuid - cgroup cgroup rw,cpu,cpuacct",
        ],
    )
    assert cgroup_cpu_quota(proc) == 3.0
    assert usable_cpus(proc) == 3


def test_cgroup_v1_without_a_quota_leaves_the_affinity(tmp_path: Path, eight_cpus: None) -> None:
    mount = tmp_path / "cpu"
    write(mount / "batch", cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    write(mount, cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    proc = fake_proc(
        tmp_path, ["2:cpu:/batch"], [f"32 31 0:29 / {mount} rw - cgroup cgroup rw,cpu"]
    )
    assert cgroup_cpu_quota(proc) is None
    assert usable_cpus(proc) == 8


def test_the_affinity_mask_caps_a_larger_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    root = tmp_path / "cgroup"
    write(root, cpu__max="800000 100000")
    proc = fake_proc(tmp_path, ["0::/"], [f"30 23 0:26 / {root} rw - cgroup2 cgroup2 rw"])
    assert usable_cpus(proc) == 2


def test_no_cgroup_information_leaves_the_affinity(tmp_path: Path, eight_cpus: None) -> None:
    assert usable_cpus(tmp_path / "no-such-proc") == 8


def test_this_machine() -> None:
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


def test_decode_slots_are_a_share_of_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "usable_cpus", lambda: 8)
    slots = DecodeSlots()
    assert slots.size == 8, "one process alone decodes on every usable CPU"
    slots.share_with(3)
    assert slots.size == 2
    slots.share_with(16)
    assert slots.size == 1, "never none"


def test_share_cpus_resizes_this_processs_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "usable_cpus", lambda: 4)
    monkeypatch.setattr(decode, "DECODE_SLOTS", DecodeSlots())
    held = decode.DECODE_SLOTS.slot()
    held.acquire()  # a decode under way keeps the slot it took
    decode.share_cpus(2)
    assert decode.DECODE_SLOTS.size == 2
    held.release()
