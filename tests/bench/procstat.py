"""Resident memory and CPU time of processes, read from /proc (Linux only, no extra packages)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process (its threads included)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of proc(5))


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on the machine: other sessions' backends are counted too."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def machine_busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class CpuMeter:
    """CPU used by named processes between start() and stop(), as a share of one core."""

    pids: dict[str, list[int]]
    _start: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0
    _machine: tuple[int, int] = (0, 0)

    def _sample(self) -> dict[str, float]:
        out = {}
        for name, pids in self.pids.items():
            out[name] = sum(s for s in (cpu_seconds(p) for p in pids) if s is not None)
        out["bench client"] = time.process_time()
        return out

    def start(self) -> None:
        self._start = self._sample()
        self._wall = time.monotonic()
        self._machine = machine_busy_jiffies()

    def stop(self) -> dict[str, float]:
        """Percent of one core per process over the interval, and the machine's busy percent of all cores."""
        end = self._sample()
        wall = max(time.monotonic() - self._wall, 1e-9)
        busy, total = machine_busy_jiffies()
        shares = {name: 100 * (end[name] - self._start.get(name, 0.0)) / wall for name in end}
        shares["machine (all cores)"] = 100 * (busy - self._machine[0]) / max(total - self._machine[1], 1)
        return shares
