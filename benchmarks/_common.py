"""What every benchmark script shares: JSON-line output and the machine facts of its header line.

The scripts are run as ``python benchmarks/NAME.py``, so this module is imported by its plain name.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from typing import Any

OUT = sys.stdout  # JSON lines only; third-party output is redirected to stderr by the scripts


def emit(record: dict[str, Any]) -> None:
    """Write one JSON line to the real stdout and flush (so partial runs still leave their lines)."""
    OUT.write(json.dumps(record) + "\n")
    OUT.flush()


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """CPU, core count, load and Python version: the fields a header line records so runs can be compared."""
    return {
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ``ru_maxrss`` in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def ratio_line(bench: str, name: str, num: float | None, den: float | None, target: float | None, **extra: Any) -> dict:
    """A summary line: ``num / den`` against ``target`` (``met`` is None when either side is missing)."""
    ratio = None if not num or not den else num / den
    met = None if ratio is None or target is None else bool(ratio >= target)
    return {"bench": bench, "summary": name, **extra, "ratio": ratio, "target": target, "met": met}
