"""py-spy the server while the load runs, and sum up where its time went."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import procs
from .config import RunConfig

Profiler = tuple[subprocess.Popen[bytes], Path]


def start_profiler(cfg: RunConfig, watch: procs.ProcWatch | None) -> Profiler | None:
    """py-spy the server (all its Python processes) while the load runs."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not cfg.profile or watch is None or not Path(spy).exists():
        return None
    cfg.out.mkdir(parents=True, exist_ok=True)
    out = cfg.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.label or cfg.kind}-profile.txt"
    cmd = [spy, "record", "--pid", str(watch.root.pid), "--subprocesses", "--rate", "200",
           "--duration", str(int(cfg.duration) + 1), "--format", "raw", "--output", str(out),
           "--nonblocking"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, out


async def finish_profiler(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    for _ in range(100):
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.1)
    else:
        proc.terminate()
    return {"collapsed_stacks": str(out), "top_self": profile_top(out)}


def profile_top(path: Path, n: int = 25) -> list[tuple[str, float]]:
    """The functions with the most self time in a py-spy collapsed-stack file (% of samples)."""
    own: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
    return [(f, round(100 * c / total, 2)) for f, c in own.most_common(n)] if total else []
