"""CPU time of other processes, from /proc, for the benchmarks that print CPU per instance
or per study beside the wall-clock rate."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int | str) -> tuple[str, list[str]] | None:
    """(command name, the fields after it) of /proc/PID/stat; None once the process is gone."""
    try:
        name, rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
    except (OSError, ValueError):
        return None
    return name.split("(", 1)[-1], rest.split()


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU-seconds of one process so far ((0, 0) once it is gone)."""
    stat = stat_fields(pid)
    if stat is None:
        return 0.0, 0.0
    fields = stat[1]
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds of one process so far (0 once it is gone)."""
    return sum(cpu_split(pid))
