"""Fuzzing the GGUF loader: a damaged file gives an EdgeRTError, never a crash, hang or huge allocation.

A tiny valid GGUF (tests/gguf_fixtures.py) is damaged three ways: cut short at many offsets,
hit by a few hundred seeded bit flips and byte writes, and with every length, count, type and
offset field set to huge values. Each damaged file goes through `edge_rt.api.open_model` and,
where that succeeds, through `edge_rt.load` and a two-token generation.

The cases run in worker subprocesses (two, one per core), each case under its own alarm; a
worker that dies, a case that runs past CASE_LIMIT_S, an exception that is not an EdgeRTError,
an EdgeRTError raised while handling a MemoryError, or a worker whose peak memory passes
PEAK_RSS_LIMIT fails the test and names the case.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gguf_fixtures import gguf_layout, write_tiny_gguf

CASE_LIMIT_S = 5.0  # per case, in a worker
WORKERS = 2
WORKER_TIMEOUT_S = 400  # per worker process, all its cases (about 30 s on a quiet 2-core machine; slack for a loaded CI)
PEAK_RSS_LIMIT = 1536 << 20  # torch + a tiny model take ~400 MiB; a parser allocating per corrupt count, GiBs
FLIP_CASES = 300
LOAD_DTYPES = ("float32", "bfloat16")  # alternately: dense weights, packed int4 weights
TESTS_DIR = Path(__file__).resolve().parent


# --- the worker: runs cases, prints one JSON line per case ----------------------------------------


class _CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that `except Exception` in the code under test lets it through."""


def _memory_error_inside(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, MemoryError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _run_case(path: Path, dtype: str) -> str:
    """open_model, then (if that worked) load and generate: "ok", the EdgeRTError's name, or "BUG ..."."""
    import edge_rt
    from edge_rt.api import open_model
    from edge_rt.errors import EdgeRTError

    try:
        open_model(path)
        llm = edge_rt.load(path, device="cpu", dtype=dtype)
        llm.generate("The capital", max_tokens=2, ignore_eos=True)
        return "ok"
    except EdgeRTError as e:
        if _memory_error_inside(e):
            return f"BUG MemoryError behind {type(e).__name__}: {e}"
        return type(e).__name__
    except _CaseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001 - any other exception is what this test looks for
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        return f"BUG {type(e).__name__}: {str(e)[:200]} (at {where.filename}:{where.lineno})"


def _peak_rss() -> int:
    """This worker's peak resident memory in bytes.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec. ru_maxrss would not do: a child
    forked from a large pytest process (late in the full suite) inherits the parent's high-water mark.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _worker(base_path: str, cases_path: str, scratch: str) -> None:
    """Apply each case to the base file and report: one JSON line per case on stdout."""
    import signal

    def on_alarm(signum, frame):
        raise _CaseTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    base = Path(base_path).read_bytes()
    path = Path(scratch)
    for dtype in LOAD_DTYPES:  # the undamaged file loads; this also warms up lazy imports
        assert _run_case(Path(base_path), dtype) == "ok"
    for n, case in enumerate(json.loads(Path(cases_path).read_text())):
        data = bytearray(base[: case["truncate"]] if "truncate" in case else base)
        for offset, hexbytes in case.get("patch", []):
            b = bytes.fromhex(hexbytes)
            data[offset : offset + len(b)] = b
        path.write_bytes(bytes(data))
        print(json.dumps({"start": case["id"]}), flush=True)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S * 4)
        try:
            outcome = _run_case(path, LOAD_DTYPES[n % 2])
        except _CaseTimeout:
            outcome = f"BUG still running after {CASE_LIMIT_S * 4} s"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - t0
        print(json.dumps({"id": case["id"], "outcome": outcome, "seconds": seconds, "peak_rss": _peak_rss()}),
              flush=True)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (rather than hang) when the block runs longer than `seconds` (Unix: SIGALRM)."""
    import signal

    def on_alarm(signum, frame):
        raise _CaseTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _CaseTimeout:
        pytest.fail(f"still running after {seconds} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- the cases ---------------------------------------------------------------------------------------


def _truncation_cases(layout) -> list[dict]:
    n = layout.size
    offsets = set(range(65)) | set(range(0, n, max(1, n // 50)))
    offsets |= {layout.kv_start, layout.tensor_info_start, layout.data_start - 1, layout.data_start,
                layout.data_start + 1, n - 1}
    return [{"id": f"truncate at {o} of {n}", "truncate": o} for o in sorted(offsets)]


def _flip_cases(base: bytes, layout, seed: int = 20240601) -> list[dict]:
    """Seeded damage to one byte: mostly in the header (where parsing happens), some in the tensor data."""
    rng = random.Random(seed)
    cases = []
    for i in range(FLIP_CASES):
        pos = rng.randrange(layout.data_start) if rng.random() < 0.85 else rng.randrange(layout.size)
        op = rng.random()
        if op < 0.5:
            bit = 1 << rng.randrange(8)
            what, new = f"xor {bit:#04x}", base[pos] ^ bit
        else:
            new = rng.randrange(256) if op < 0.8 else rng.choice([0x00, 0xFF])
            what = f"set {new:#04x}"
        cases.append({"id": f"flip #{i}: {what} at byte {pos}", "patch": [(pos, bytes([new]).hex())]})
    return cases


def _huge_cases(layout) -> list[dict]:
    """Every length/count/type/offset field (and the u32 hyper-parameters) set to huge values."""
    per_size = {8: [2**64 - 1, 2**63 + 1, 2**40, layout.size + 1], 4: [2**32 - 1, 2**31, 2**16 + 1, 0]}
    string_items: dict[str, list] = {}
    spans = []
    for s in layout.spans:
        if s.kind in ("count", "arraylen", "ndims", "dim", "ggml_type", "data_offset", "type"):
            spans.append(s)
        elif s.kind == "strlen":
            string_items.setdefault(s.label, []).append(s)
        elif s.kind == "value" and s.size == 4 and s.label.startswith("llama."):
            spans.append(s)
    for label, items in string_items.items():  # keys and names: all; items of a string array: ends and middle
        spans += items if label in ("key", "tensor name") else [items[0], items[len(items) // 2], items[-1]]
    cases = []
    for s in dict.fromkeys(spans):  # a one-item "array" (a plain string value) would come three times
        for v in per_size[s.size]:
            cases.append({"id": f"{s.kind} of {s.label} at byte {s.offset} = {v}",
                          "patch": [(s.offset, v.to_bytes(s.size, "little").hex())]})
    return cases


# --- running them ------------------------------------------------------------------------------------


def _run_workers(base_path: Path, cases: list[dict], tmp: Path) -> tuple[dict, list[str]]:
    """Run `cases` in WORKERS subprocesses; returns ({case id: result}, [worker problems])."""
    chunks = [cases[i::WORKERS] for i in range(WORKERS)]

    def run(k: int):
        cases_file = tmp / f"cases{k}.json"
        cases_file.write_text(json.dumps(chunks[k]))
        code = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_gguf_fuzz as t; "
                f"t._worker({str(base_path)!r}, {str(cases_file)!r}, {str(tmp / f'case{k}.gguf')!r})")
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        try:
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=WORKER_TIMEOUT_S, env=env)
            return p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return "timeout", out, ""

    with ThreadPoolExecutor(WORKERS) as pool:
        runs = list(pool.map(run, range(WORKERS)))
    results, problems = {}, []
    for rc, stdout, stderr in runs:
        started = None
        for line in stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            elif "id" in msg:
                results[msg["id"]] = msg
                started = None
        if rc != 0:
            problems.append(f"worker ended with {rc} during case {started!r}: {stderr[-2000:]}")
    return results, problems


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    """Every case of the three groups, run once: (group -> [case ids], {id: result}, problems)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    # a 1-byte-item array: the case where gguf.GGUFReader loops forever on a corrupt length
    base_path = write_tiny_gguf(tmp / "base.gguf", vocab_size=300, num_hidden_layers=1,
                                metadata={"test.flags": [True, False, True]})
    base = base_path.read_bytes()
    layout = gguf_layout(base)
    groups = {"truncate": _truncation_cases(layout), "flip": _flip_cases(base, layout), "huge": _huge_cases(layout)}
    all_cases = [c for g in groups.values() for c in g]
    t0 = time.perf_counter()
    results, problems = _run_workers(base_path, all_cases, tmp)
    print(f"{len(all_cases)} fuzz cases in {time.perf_counter() - t0:.1f} s")
    return {g: [c["id"] for c in cs] for g, cs in groups.items()}, results, problems


def _check_group(fuzz_results, group: str) -> dict:
    ids, results, problems = fuzz_results
    assert not problems, "\n".join(problems)
    missing = [i for i in ids[group] if i not in results]
    assert not missing, f"{len(missing)} cases never finished, first: {missing[0]}"
    bugs = [f"{i}: {results[i]['outcome']}" for i in ids[group] if results[i]["outcome"].startswith("BUG")]
    assert not bugs, f"{len(bugs)} cases raised something other than an EdgeRTError:\n" + "\n".join(bugs[:20])
    slow = [f"{i}: {results[i]['seconds']:.1f} s" for i in ids[group] if results[i]["seconds"] > CASE_LIMIT_S]
    assert not slow, "cases ran past the limit:\n" + "\n".join(slow[:20])
    # peak memory only grows: the first case past the limit is the one that allocated
    big = [f"{i}: {results[i]['peak_rss'] >> 20} MiB" for i in ids[group] if results[i]["peak_rss"] > PEAK_RSS_LIMIT]
    assert not big, ("worker memory passed the limit; the first such case in run order (truncate, flip, huge) "
                     "allocated it:\n" + "\n".join(big[:3]))
    counts: dict[str, int] = {}
    for i in ids[group]:
        counts[results[i]["outcome"]] = counts.get(results[i]["outcome"], 0) + 1
    return counts


def test_truncated_files_give_model_format_errors(fuzz_results):
    counts = _check_group(fuzz_results, "truncate")
    # a cut before the last tensor's end is always detected; only the very end (padding) may load
    assert counts.get("ModelFormatError", 0) >= sum(counts.values()) - 2, counts


def test_random_damage_gives_edge_rt_errors_or_a_working_model(fuzz_results):
    counts = _check_group(fuzz_results, "flip")
    assert counts.get("ok", 0) > 0 and counts.get("ModelFormatError", 0) > 0, counts  # both paths exercised


def test_huge_lengths_and_counts_fail_fast(fuzz_results):
    counts = _check_group(fuzz_results, "huge")
    assert counts.get("ModelFormatError", 0) > 0, counts


def test_huge_array_length_is_refused_before_reading(tmp_path):
    """The regression behind the layout check: gguf.GGUFReader reads a corrupt array length item
    by item, keeping a numpy view per item: forever when the items are past the end of the file
    (1-byte items), gigabytes for a real model's token_type array. edge-rt refuses it at once."""
    from edge_rt.api import open_model
    from edge_rt.errors import ModelFormatError

    path = write_tiny_gguf(tmp_path / "m.gguf", vocab_size=300, num_hidden_layers=1,
                           metadata={"test.flags": [True, False, True]})
    base = path.read_bytes()
    for label in ("test.flags", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens"):
        span = next(s for s in gguf_layout(base).of_kind("arraylen") if s.label == label)
        for n in (2**62, len(base)):
            data = bytearray(base)
            struct.pack_into("<Q", data, span.offset, n)
            path.write_bytes(bytes(data))
            with deadline(2.0), pytest.raises(ModelFormatError, match=f"length of array {label} is {n}"):
                open_model(path)


def test_block_count_that_disagrees_with_the_tensors_is_refused(tmp_path):
    """A corrupt block_count used to reach model construction: 2^32 - 1 layers on the meta device (a hang)."""
    import edge_rt
    from edge_rt.errors import ModelFormatError

    for n in (1, 3, 2**32 - 1):
        path = write_tiny_gguf(tmp_path / f"m{n}.gguf", num_hidden_layers=2, metadata={"llama.block_count": n})
        expected = f"the config says {n} layers, the file has tensors for 2"
        with deadline(10.0), pytest.raises(ModelFormatError, match=expected):
            edge_rt.load(path, device="cpu")


def test_hidden_size_that_disagrees_with_the_tensors_is_refused(tmp_path):
    """embedding_length 2^31 used to overflow torch's storage size while building the model (RuntimeError)."""
    import edge_rt
    from edge_rt.errors import ModelFormatError

    path = write_tiny_gguf(tmp_path / "m.gguf", metadata={"llama.embedding_length": 2**31})
    with deadline(10.0), pytest.raises(ModelFormatError, match="embed.weight has shape"):
        edge_rt.load(path, device="cpu")


@pytest.mark.parametrize("preset, qtype, tensor, dim, value, message", [
    # rows of Q that do not split into heads: the rope un-permutation raised RuntimeError
    ("tiny", "Q8_0", "blk.0.attn_q.weight", 1, 142, "shape (142, 64) does not split into 4 heads"),
    # parts of a fused weight of different widths: torch.cat raised RuntimeError
    ("tiny", "F16", "blk.0.attn_v.weight", 0, 202, "the parts of layers.0.attn.wqkv.weight differ in shape"),
    # a bias longer than its weight has rows: copying it raised RuntimeError
    ("tiny-qwen2", "Q8_0", "blk.0.attn_k.bias", 0, 100, "the shapes of layers.0.attn.wqkv.bias do not match"),
    # an empty tensor: reshaping its quantized blocks raised RuntimeError
    ("tiny-qwen2", "Q4_1", "blk.0.attn_q.weight", 1, 0, "blk.0.attn_q.weight has an empty dimension"),
])
def test_corrupt_tensor_shape_is_refused(tmp_path, preset, qtype, tensor, dim, value, message):
    """Shapes the fuzzing found reaching torch before any check (each one a RuntimeError before the fix)."""
    import edge_rt
    from edge_rt.errors import ModelFormatError

    path = write_tiny_gguf(tmp_path / "m.gguf", preset=preset, qtype=qtype, vocab_size=300, num_hidden_layers=1)
    data = bytearray(path.read_bytes())
    span = [s for s in gguf_layout(bytes(data)).of_kind("dim") if s.label == tensor][dim]
    struct.pack_into("<Q", data, span.offset, value)
    path.write_bytes(bytes(data))
    with deadline(10.0), pytest.raises(ModelFormatError, match=re.escape(message)):
        edge_rt.load(path, device="cpu")
