"""The machine a benchmark ran on, as every result file names it (DESIGN §5).

Benchmarks run as scripts (``python -P bench/NAME.py``) and put this folder on sys.path to import it.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def cpu_model() -> str:
    """/proc/cpuinfo's model name, e.g. `AMD EPYC`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_name() -> str:
    """E.g. `amd-epyc-2c` (CPU model slug and core count): the suffix of a results file's name."""
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    return f"{slug}-{os.cpu_count()}c"


def process_cpu_seconds(pid: int) -> float:
    """A process's CPU time so far, user + system (/proc/<pid>/stat): a cost the machine's other load does not
    move, unlike a latency."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
