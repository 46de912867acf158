"""Shared helpers for the benchmarks: repository on sys.path, machine description, tables, percentiles.

Each benchmark is a script (`python bench/NAME.py`); this module is imported as `_common` from
the bench folder, so nothing here is part of the engine's package.
"""
from __future__ import annotations

import os
import platform
import random
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dep_engine.llm import cpu_model  # noqa: E402  (after the offline settings above)


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line() -> str:
    """One line saying where the figures come from (the load average says how shared the machine was)."""
    import numpy

    parts = [f"CPU: {cpu_model()}", f"{os.cpu_count()} logical cores", f"{memory_gib():.1f} GiB RAM",
             f"Python {platform.python_version()}", f"numpy {numpy.__version__}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    parts.append(f"load average {load_average()}")
    return " | ".join(parts)


def header(title: str, note: str = "") -> None:
    print("=" * 100)
    print(title)
    print(machine_line())
    if note:
        print(note)
    print("=" * 100, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without needing numpy here."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """A plain fixed-width table; floats are printed as given (format them before)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)))
    sys.stdout.flush()


def _numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("%", "").replace("x", "").replace("+", "").replace("-", "")
    try:
        float(stripped)
        return True
    except ValueError:
        return False


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def held_out_requests(engine, n: int, seed: int = 0) -> list:
    """`n` bundled users' held-out requests (their latest review is the target, everything before it
    the profile, the target's time the peers' cut-off), users drawn with a fixed seed."""
    users = sorted(engine.users)
    random.Random(seed).shuffle(users)
    return [engine.user_request(u) for u in users[:n]]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_status_mib(pid: int, *fields: str) -> dict[str, float]:
    """The named memory fields of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...) in MiB; {} if the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {name: int(rest.split()[0]) / 1024 for name, _, rest in (line.partition(":") for line in lines)
            if name in fields}


def rss_mib(pid: int | None = None) -> float:
    """Current resident memory of a process (this one by default)."""
    return proc_status_mib(pid or os.getpid(), "VmRSS").get("VmRSS", float("nan"))
