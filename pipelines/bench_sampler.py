"""What a benchmark's processes use, sampled from ``/proc`` (Linux) in a thread: the CPU
seconds of a process tree (a process and every descendant: a local Ray's daemons, its
workers and their decoder children, or a process pool), the machine's busy share of its
cores over the same interval, and the tree's peak memory.

Memory is PSS (proportional set size, ``/proc/<pid>/smaps_rollup``): shared pages are split
between the processes that map them, so Ray's object store (shared memory mapped by the
raylet and every worker) counts once, and the sum over the tree is what it occupies.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, int] | None:
    """``(parent pid, start time, utime + stime in ticks)`` of a live process, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _role(pid: int, root: int) -> str:
    """What a process of a prepare run is: the driver, a Ray worker, a decoder child (a
    ``python -c`` under a worker), or one of Ray's daemons (GCS, raylet, agents)."""
    if pid == root:
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if cmd[0].startswith(b"ray::") and b"Agent" not in cmd[0]:
        return "workers"
    if len(cmd) > 1 and cmd[1] == b"-c":
        return "decoders"
    return "ray daemons"


def tree(root: int) -> dict[int, tuple[int, int]]:
    """``{pid: (start time, cpu ticks)}`` of ``root`` and all its live descendants."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            got = _stat(int(entry.name))
            if got is not None:
                stats[int(entry.name)] = got
    out, todo = {}, [root]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid][1:]
            todo += children.get(pid, [])
    return out


def _machine() -> tuple[int, int]:
    """``(busy, total)`` jiffies over all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


class TreeSampler:
    """``with TreeSampler(pid) as s: ...``; then ``s.cpu_s`` (the tree's CPU seconds in the
    block), ``s.cores`` (their average number of busy cores), ``s.machine_busy`` (the share
    of all the machine's cores busy, anyone's work), ``s.peak_pss_mb`` (with ``memory``)."""

    def __init__(self, root: int | None = None, *, interval_s: float = 0.2, memory: bool = False):
        self.root = root or os.getpid()
        self.interval_s, self.memory = interval_s, memory
        self.cpu_s = self.cores = self.machine_busy = self.seconds = 0.0
        self.peak_pss_mb = 0.0
        self.peak_parts: dict[str, tuple[float, int]] = {}  # role: (PSS, processes)
        self.history: list[tuple[float, float]] = []  # (seconds, total PSS MB) per sample
        self._base: dict[tuple[int, int], int] = {}
        self._last: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        procs = tree(self.root)
        for pid, (start, ticks) in procs.items():
            self._last[(pid, start)] = ticks
        if self.memory:
            parts: dict[str, float] = {}
            counts: dict[str, int] = {}
            for pid in procs:
                role = _role(pid, self.root)
                parts[role] = parts.get(role, 0.0) + _pss_kb(pid) / 1024
                counts[role] = counts.get(role, 0) + 1
            self.history.append((time.perf_counter() - self._t0, sum(parts.values())))
            if sum(parts.values()) > self.peak_pss_mb:
                self.peak_pss_mb = sum(parts.values())
                self.peak_parts = {k: (v, counts[k]) for k, v in parts.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> TreeSampler:
        self._base = {(pid, start): ticks for pid, (start, ticks) in tree(self.root).items()}
        self._machine0, self._t0 = _machine(), time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0
        ticks = sum(t - self._base.get(key, 0) for key, t in self._last.items())
        self.cpu_s = ticks / TICKS
        self.cores = self.cpu_s / self.seconds if self.seconds else 0.0
        busy1, total1 = _machine()
        busy0, total0 = self._machine0
        self.machine_busy = (busy1 - busy0) / max(1, total1 - total0)
