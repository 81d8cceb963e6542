"""Helpers shared by the scripts/bench_*.py benchmarks: machine facts, medians, JSON output."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo on Linux (platform.processor() elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the repository, and whether the work tree has local changes (read-only git calls)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict:
    """CPU, cores, OS and the versions of the libraries every benchmark reports."""
    import torch

    import edge_rt

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "edge_rt_version": edge_rt.__version__,
        "edge_rt_commit": git_commit(),
    }


def summarize(samples: list[float]) -> dict:
    """Median, min, max and the raw samples (in run order)."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def invoked_command() -> str:
    """The command line this process was started with, shell-quoted."""
    return shlex.join([sys.executable, *sys.argv])


def emit(result: dict, out: str | None) -> None:
    """Print result as JSON on stdout and, when out is given, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def log(msg: str) -> None:
    """Progress on stderr, so stdout stays pure JSON."""
    print(msg, file=sys.stderr, flush=True)
