"""Shared fixtures. Tests run offline; the real model comes from `edge-rt pull` (setup.sh).

Tests that compare with llama-cpp-python are marked `llamacpp`. They skip only where the
extra is not installed *and* we are not in CI: in CI (CI=true) a missing llama-cpp-python or a
missing model fails the run instead of skipping silently.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def smollm2_path():
    from edge_rt.errors import ModelNotFoundError
    from edge_rt.loading.resolve import default_model_path

    try:
        return str(default_model_path())
    except ModelNotFoundError as e:
        if IN_CI:
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"llama-cpp-python is required in CI: {e}")
        pytest.skip("llama-cpp-python not installed (pip install -e '.[llamacpp]')")
    return llama_cpp


@pytest.fixture(scope="session")
def llama_ref(smollm2_path, llama_cpp_module):
    """llama.cpp's own run of the default GGUF: the reference for tokens and logits."""
    return llama_cpp_module.Llama(
        smollm2_path, n_ctx=4096, n_threads=2, n_batch=512, logits_all=True, verbose=False
    )


@pytest.fixture(scope="session")
def pydoc_text():
    """Offline English text on every machine: Python's own pydoc topics."""
    import pydoc_data.topics as t

    return "\n\n".join(t.topics[k] for k in sorted(t.topics))
