"""How many CPUs this process may really use: its affinity mask and its cgroup CPU quota.

`os.cpu_count()` is the host's count. In a container limited to 4 CPUs on a
64-core host it says 64, and sizing thread pools by it oversubscribes the 4:
torch's inference gets several times slower, and 64 decodes at once multiply
the peak memory for nothing. The quota is read the way the kernel applies it:
from the cgroup this process is in (found through /proc/self/cgroup and the
cgroup mounts in /proc/self/mountinfo) and every cgroup above it, v2's
`cpu.max` or v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`, the smallest
winning. A fractional quota is rounded up, as the JVM and Go do: two threads
can use a quota of 1.5 CPUs, one cannot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

PROC_SELF = Path("/proc/self")


def usable_cpus(proc: Path = PROC_SELF) -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota; at least 1."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = count or 1
    quota = cgroup_cpu_quota(proc)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return count


def feeders_per_gpu(setting: int, gpus: int, proc: Path = PROC_SELF) -> int:
    """Feeder processes (decoding, `enrichment.media.feeders`) per GPU: `setting`
    (ENRICH_FEEDERS_PER_GPU) if set.

    Otherwise one per usable CPU of the GPU's share, less one for the process that
    fetches, runs the model and writes: most of a feed's CPU is Python holding its
    process's GIL (80-95% by bench_feed's estimate), so one process uses little
    more than one core however many threads it has, and cores are used by
    processes. 1 (as on 2 CPUs) means no feeder: the fetcher's handler threads decode.
    See docs/throughput.md.
    """
    if setting > 0:
        return setting
    return max(1, usable_cpus(proc) // max(1, gpus) - 1)


def cgroup_cpu_quota(proc: Path = PROC_SELF) -> float | None:
    """The CPUs (quota / period) this process's cgroups allow, or None where none is set."""
    quotas = [
        quota
        for version, directory, top in _cpu_cgroups(proc)
        for quota in _quotas_up_to(version, directory, top)
    ]
    return min(quotas, default=None)


def _cpu_cgroups(proc: Path) -> Iterator[tuple[int, Path, Path]]:
    """(cgroup version, this process's cgroup directory, the mount point) for the CPU controller."""
    try:
        memberships = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return
    paths: dict[int, str] = {}  # cgroup version -> this process's path in that hierarchy
    for line in memberships:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            paths.setdefault(2, path)
        elif "cpu" in controllers.split(","):
            paths[1] = path
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        root, mount_point = fields[3], fields[4]
        kind, options = fields[separator + 1], fields[separator + 3].split(",")
        version = 2 if kind == "cgroup2" else 1 if kind == "cgroup" and "cpu" in options else 0
        if version in paths:
            top = Path(_unescape(mount_point))
            yield version, _inside(top, _unescape(root), paths[version]), top


def _inside(mount_point: Path, mount_root: str, path: str) -> Path:
    """Where `path` (as /proc/self/cgroup names it) is under a mount of `mount_root`."""
    if mount_root != "/":
        if path != mount_root and not path.startswith(mount_root.rstrip("/") + "/"):
            return mount_point  # a container's own cgroup mounted as the root
        path = path[len(mount_root) :]
    return mount_point / path.lstrip("/")


def _quotas_up_to(version: int, directory: Path, top: Path) -> Iterator[float]:
    """The quota set at `directory` and at each cgroup above it, up to the mount point."""
    while True:
        quota = _quota_v2(directory) if version == 2 else _quota_v1(directory)
        if quota is not None:
            yield quota
        if directory == top or top not in directory.parents:
            return
        directory = directory.parent


def _quota_v2(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _quota_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field
