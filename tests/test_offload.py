"""Weight store, planner, streamer and offloaded runs.

References: the bytes written (store round trips), the same weights fully in memory (offloaded
runs: same tokens, bit-identical logits), the planner's own minimum (budget refusals).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_rt.errors import InvalidOptionError, ModelFormatError, ModelNotFoundError
from offload.store import ALIGN, MAGIC, PREAMBLE, Store, StoreWriter, aligned_buffer

# --- store -----------------------------------------------------------------------------------


def _write_sample(path, n=3):
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal((5 + i, 7)).astype(np.float32) for i in range(n)}
    bf = torch.randn(3, 9, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with StoreWriter(path, "dense", {"hello": [1, 2]}) as w:
        for k, a in arrays.items():
            w.add(k, a, meta={"i": k})
        w.add("bf", bf)
        w.add("empty", np.zeros((0, 4), np.int8))
    return arrays, bf


def test_store_round_trip(tmp_path):
    p = tmp_path / "s.ews"
    arrays, bf = _write_sample(p)
    s = Store.open(p)
    assert s.kind == "dense" and s.meta == {"hello": [1, 2]} and s.version == 1
    for k, a in arrays.items():
        assert np.array_equal(s.read(k), a)
        assert np.array_equal(s.read(k, direct=True), a)
        assert s.records[k].offset % ALIGN == 0 and s.records[k].meta == {"i": k}
    t = s.read_tensor("bf", direct=True)
    assert t.dtype == torch.bfloat16 and torch.equal(t.view(torch.int16), bf.view(torch.int16))
    assert s.read("empty").shape == (0, 4)
    buf = aligned_buffer(4096 * 2)
    out = s.read("t1", out=buf, direct=True)
    assert np.shares_memory(out, buf) and np.array_equal(out, arrays["t1"])
    assert not (tmp_path / "s.ews.tmp").exists()


def test_store_truncated(tmp_path):
    p = tmp_path / "s.ews"
    _write_sample(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(ModelFormatError, match="truncated"):
        Store.open(p)
    p.write_bytes(data[:100])
    with pytest.raises(ModelFormatError, match="truncated"):
        Store.open(p)


def test_store_flipped_byte_names_the_record(tmp_path):
    p = tmp_path / "s.ews"
    _write_sample(p)
    s = Store.open(p)
    off = s.records["t2"].offset + 5
    s.close()
    data = bytearray(p.read_bytes())
    data[off] ^= 0x10
    p.write_bytes(bytes(data))
    s = Store.open(p)
    assert np.array_equal(s.read("t0"), Store.open(p).read("t0"))
    with pytest.raises(ModelFormatError, match="checksum mismatch in record 't2'"):
        s.read("t2")
    with pytest.raises(ModelFormatError, match="'t2'"):
        s.read("t2", direct=True)


def test_store_flipped_header_byte(tmp_path):
    p = tmp_path / "s.ews"
    _write_sample(p)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="header checksum"):
        Store.open(p)


def test_store_missing_file_and_not_a_store(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such store"):
        Store.open(tmp_path / "nope.ews")
    (tmp_path / "x").write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelFormatError, match="bad magic"):
        Store.open(tmp_path / "x")


def test_store_exception_leaves_nothing(tmp_path):
    p = tmp_path / "s.ews"
    with pytest.raises(RuntimeError):
        with StoreWriter(p, "endor", {}) as w:
            w.add("a", np.ones(10000, np.float32))
            raise RuntimeError("interrupted")
    assert not p.exists() and not (tmp_path / "s.ews.tmp").exists()


def test_store_killed_writer_never_leaves_a_valid_store(tmp_path):
    """A writer killed mid-write (SIGKILL: no cleanup runs) leaves only the .tmp, which does not open."""
    p = tmp_path / "s.ews"
    code = (
        "import numpy as np, os, signal, sys\n"
        "from offload.store import StoreWriter\n"
        f"with StoreWriter({str(p)!r}, 'dense', {{}}) as w:\n"
        "    w.add('a', np.ones(1 << 20, np.float32))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode != 0
    assert not p.exists()
    tmp = tmp_path / "s.ews.tmp"
    assert tmp.exists()
    with pytest.raises(ModelFormatError, match="bad magic"):
        Store.open(tmp)


def test_store_rejects_bad_records(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        with StoreWriter(tmp_path / "a", "dense") as w:
            w.add("x", np.ones(3))
            w.add("x", np.ones(3))
    with pytest.raises(ValueError, match="kind"):
        StoreWriter(tmp_path / "b", "zip")
    assert not (tmp_path / "a").exists()


def _rewrite_header(p, mutate):
    """Rewrite the store's header JSON (with a valid checksum) after `mutate(header_dict)`."""
    data = bytearray(p.read_bytes())
    magic, version, flags, h_off, h_len, _crc, _size = PREAMBLE.unpack(bytes(data[: PREAMBLE.size]))
    h = json.loads(bytes(data[h_off:]))
    mutate(h)
    header = json.dumps(h).encode()
    out = bytes(data[:h_off]) + header
    pre = PREAMBLE.pack(magic, version, flags, h_off, len(header), zlib.crc32(header), len(out))
    p.write_bytes(pre + out[PREAMBLE.size :])


@pytest.mark.parametrize("mutate,match", [
    (lambda h: h["records"][0].update(offset=h["records"][0]["offset"] + 1), "outside"),
    (lambda h: h["records"][0].update(offset=10**12), "outside"),
    (lambda h: h["records"][0].update(nbytes=3), "do not match"),
    (lambda h: h["records"][0].update(dtype="complex"), "malformed"),
    (lambda h: h["records"][1].update(offset=h["records"][0]["offset"]), "overlap"),
    (lambda h: h["records"].append(h["records"][0]), "twice"),
    (lambda h: h.update(kind="zip"), "not valid"),
    (lambda h: h.pop("records"), "not valid"),
])  # fmt: skip
def test_store_header_consistency(tmp_path, mutate, match):
    p = tmp_path / "s.ews"
    _write_sample(p)
    _rewrite_header(p, mutate)
    with pytest.raises(ModelFormatError, match=match):
        Store.open(p)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_store_header_fuzz(tmp_path_factory, data):
    """Random byte edits in the preamble and header: opening either works or raises ModelFormatError."""
    p = tmp_path_factory.mktemp("fuzz") / "s.ews"
    if not p.exists():
        _write_sample(p, n=2)
    raw = bytearray(p.read_bytes())
    s = Store.open(p)
    h_off = PREAMBLE.unpack(bytes(raw[: PREAMBLE.size]))[3]
    s.close()
    regions = [(0, PREAMBLE.size), (h_off, len(raw))]
    for _ in range(data.draw(st.integers(1, 4))):
        lo, hi = data.draw(st.sampled_from(regions))
        i = data.draw(st.integers(lo, hi - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    q = p.with_suffix(".fz")
    q.write_bytes(bytes(raw))
    try:
        s = Store.open(q)
    except ModelFormatError:
        return
    for name in s.records:  # whatever opens must read or fail cleanly
        try:
            s.read(name)
        except ModelFormatError:
            pass
    s.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_store_header_json_fuzz(tmp_path_factory, blob):
    """Arbitrary header bytes with a valid checksum: ModelFormatError, never another exception."""
    p = tmp_path_factory.mktemp("fz") / "s.ews"
    h_off = ALIGN
    pre = PREAMBLE.pack(MAGIC, 1, 0, h_off, len(blob), zlib.crc32(blob), h_off + len(blob))
    p.write_bytes(pre + b"\0" * (h_off - PREAMBLE.size) + blob)
    try:
        Store.open(p).close()
    except ModelFormatError:
        pass


# --- sizes and planner -----------------------------------------------------------------------


def test_parse_size():
    from edge_rt.memory.sizes import parse_size

    assert parse_size("64MB") == 64 * 10**6
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(" 512 k ") == 512 * 1024
    assert parse_size(123456) == 123456
    assert parse_size("64mib") == 64 * 2**20
    for bad in ["", "MB", "-5MB", "10XB", "0", 0, -1, "1e3", True, None, float("nan")]:
        with pytest.raises(InvalidOptionError):
            parse_size(bad, "budget")


def _layout(n=4, layer=100, fixed=50, scratch=0):
    from edge_rt.memory.planner import LayerWeights, ModelLayout

    return ModelLayout(fixed_bytes=fixed, layers=tuple(LayerWeights(i, layer) for i in range(n)),
                       decode_scratch_bytes=scratch, kv_bytes_per_position=1, hidden_size=1, widest=1, heads=1,
                       vocab_size=1, act_elt=1)


def test_planner_places_layers_and_refuses_below_minimum():
    from edge_rt.memory.planner import minimum_budget, plan_memory

    lay = _layout()
    act = lay.activation_bytes(64)
    base = 50 + 64 + act
    full = plan_memory(lay, "cpu", None, n_ctx=64)
    assert full.resident == (0, 1, 2, 3) and full.streamed == () and full.device_bytes == base + 400
    assert minimum_budget(lay, "cpu", 64) == base + 200  # two stream buffers of the largest layer
    p = plan_memory(lay, "cpu", base + 200, n_ctx=64)
    assert p.resident == () and p.streamed == (0, 1, 2, 3) and p.slots == 2 and p.device_bytes == base + 200
    p = plan_memory(lay, "cpu", base + 350, n_ctx=64)
    assert p.resident == (0,) and p.streamed == (1, 2, 3) and p.device_bytes <= base + 350
    assert p.io_bytes_per_forward == 300
    with pytest.raises(InvalidOptionError, match=rf"minimum of .* \({base + 200} bytes\)"):
        plan_memory(lay, "cpu", base + 199, n_ctx=64)
    tiny = plan_memory(_layout(n=1, layer=10), "cpu", 50 + 64 + act + 10, n_ctx=64)  # resident beats streaming
    assert tiny.resident == (0,)


def test_planner_host_tier_and_context_choice():
    from edge_rt.memory.planner import plan_memory

    lay = _layout(n=6)
    act = lay.activation_bytes(64)
    base = 50 + 64 + act
    p = plan_memory(lay, "cuda", base + 200, cpu_budget=200 + 250, n_ctx=64)
    # pinned staging (2 x 100) first, then two layers in host RAM
    assert p.resident == () and p.host == (0, 1) and p.streamed == (2, 3, 4, 5) and p.host_bytes == 400
    p = plan_memory(lay, "cpu", base + 200, cpu_budget=250, n_ctx=64)  # CPU: host tier used in place
    assert p.host == (0, 1) and p.device_bytes == base + 200 + 200
    with pytest.raises(InvalidOptionError, match="needs a"):
        plan_memory(lay, "cpu", None, cpu_budget=10)
    p = plan_memory(lay, "cpu", base + 200 + 200, max_ctx=8192)  # n_ctx picked to fit
    assert p.n_ctx in (64, 128, 256) and p.device_bytes <= base + 400


# --- offloaded runs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    from gguf_fixtures import write_tiny_gguf

    d = tmp_path_factory.mktemp("off")
    return write_tiny_gguf(d / "tiny.gguf", "tiny", qtype="F32", seed=5, num_hidden_layers=4,
                           max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_store(tiny_src):
    from offload.prune import compress_model

    return compress_model(tiny_src, tiny_src.with_suffix(".ews"), sparsity=0.0, fmt="dense", dtype="float32")


def _run(llm, prompt="def add(a, b): return a + b"):
    ids = llm.encode(prompt)
    logits = llm.backend.forward(ids, all_logits=True)
    steps = [llm.backend.forward([t]) for t in (5, 17, 99)]  # single-token decode steps
    llm.reset()
    out = llm.generate(prompt, max_tokens=16, ignore_eos=True)
    return torch.cat([logits] + steps), out.token_ids


def test_offloaded_run_equals_in_memory_run(tiny_src, tiny_store):
    """Streamed (any budget) == the store fully in memory == the GGUF file loaded in fp32."""
    import edge_rt
    from offload.loader import model_layout
    from offload.store import open_store_model

    # A store's forward runs with one intra-op thread (its linears on the LinearPool's workers);
    # the GGUF reference too: one-row products on 2 intra-op threads round differently.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _run(edge_rt.load(tiny_src, device="cpu", dtype="float32", quantized=False, n_ctx=64))
    finally:
        torch.set_num_threads(n)
    sm = open_store_model(tiny_store)
    lay = model_layout(sm.store, sm.args, torch.float32, torch.float32, "cpu")
    from edge_rt.memory.planner import minimum_budget

    low = minimum_budget(lay, "cpu", 64)
    for budget in (None, low, low + lay.layers[0].stored_bytes):
        llm = edge_rt.load(tiny_store, device="cpu", n_ctx=64, budget=budget)
        assert llm.plan.device_bytes <= (budget or 1 << 62)
        got = _run(llm)
        assert torch.equal(got[0], ref[0]) and got[1] == ref[1] and len(got[1]) == 16
        if budget is not None:
            s = llm.backend.model.feed.streamer
            assert s.stats.layers_read > 0 and s.stats.bytes_read > 0
    assert llm.plan.resident == (0,) and llm.plan.streamed == (1, 2, 3)
    llm = edge_rt.load(tiny_store, device="cpu", n_ctx=64, budget=low, cpu_budget=2 * lay.layers[0].stored_bytes)
    assert llm.plan.host == (0, 1) and llm.plan.streamed == (2, 3)  # CPU: the host tier is kept in RAM
    got = _run(llm)
    assert torch.equal(got[0], ref[0]) and got[1] == ref[1]


def test_streamer_recovers_from_an_aborted_forward(tiny_store):
    import edge_rt

    llm = edge_rt.load(tiny_store, device="cpu", n_ctx=64, budget=_min_budget(tiny_store))
    want = _run(llm)
    llm.reset()
    net = llm.backend.model
    block = net.layers[2]
    boom = block.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        llm.backend.forward([1, 2, 3])
    boom.remove()
    llm.reset()
    assert torch.equal(_run(llm)[0], want[0])


def test_switch_interval_is_lowered_while_a_reader_runs_and_restored(tiny_store):
    """Two streamed models, one closed after the other: the interval is low while either reads,
    the caller's own value again once both readers stopped (restarts included)."""
    import sys

    import edge_rt
    from offload import streamer as sm

    before = sys.getswitchinterval()
    assert before > sm.SWITCH_INTERVAL_S
    a = edge_rt.load(tiny_store, device="cpu", n_ctx=64, budget=_min_budget(tiny_store))
    b = edge_rt.load(tiny_store, device="cpu", n_ctx=64, budget=_min_budget(tiny_store))
    sa, sb = a.backend.model.feed.streamer, b.backend.model.feed.streamer
    assert sys.getswitchinterval() == pytest.approx(sm.SWITCH_INTERVAL_S)
    sa.restart(0)
    _run(a)
    sa.close()
    assert sys.getswitchinterval() == pytest.approx(sm.SWITCH_INTERVAL_S)  # b still reads
    sb.close()
    assert sys.getswitchinterval() == before
    sb.close()  # closing twice changes nothing
    assert sys.getswitchinterval() == before


def _min_budget(store_path):
    from edge_rt.memory.planner import minimum_budget
    from offload.loader import model_layout
    from offload.store import open_store_model

    sm = open_store_model(store_path)
    return minimum_budget(model_layout(sm.store, sm.args, torch.float32, torch.float32, "cpu"), "cpu", 64)


def test_budget_faults(tiny_src, tiny_store, tmp_path):
    import edge_rt

    low = _min_budget(tiny_store)
    with pytest.raises(InvalidOptionError, match=rf"minimum of .*\({low} bytes\)"):
        edge_rt.load(tiny_store, device="cpu", n_ctx=64, budget=low - 1)
    with pytest.raises(InvalidOptionError, match="compress"):
        edge_rt.load(tiny_src, device="cpu", n_ctx=64, budget="10KB")  # a plain file must fit whole
    with pytest.raises(InvalidOptionError, match="budget"):
        edge_rt.load(tiny_store, device="cpu", budget="lots")
    with pytest.raises(ModelNotFoundError):
        edge_rt.load(tmp_path / "missing.ews", device="cpu", budget="1GB")


def test_corrupt_streamed_record_names_the_tensor(tiny_store, tmp_path):
    import shutil

    import edge_rt

    bad = tmp_path / "bad.ews"
    shutil.copy(tiny_store, bad)
    s = Store.open(bad)
    off = s.records["layers.3.ffn.w2.weight"].offset + 7
    s.close()
    data = bytearray(bad.read_bytes())
    data[off] ^= 0x40
    bad.write_bytes(bytes(data))
    llm = edge_rt.load(bad, device="cpu", n_ctx=64, budget=_min_budget(tiny_store))  # layer 3 streams
    with pytest.raises(ModelFormatError, match="checksum mismatch in record 'layers.3.ffn.w2.weight'"):
        llm.generate("hello", max_tokens=2)
    with pytest.raises(ModelFormatError, match="'layers.3.ffn.w2.weight'"):
        edge_rt.load(bad, device="cpu", n_ctx=64)  # read whole at load: the same error


def _flip_last_byte(path, record):
    s = Store.open(path)
    r = s.records[record]
    s.close()
    with open(path, "r+b") as fh:  # the last byte: the last slice a "sampled" check visits
        fh.seek(r.offset + r.nbytes - 1)
        b = fh.read(1)
        fh.seek(r.offset + r.nbytes - 1)
        fh.write(bytes([b[0] ^ 0x01]))


def test_streamer_reads_each_layer_in_one_request(tiny_store, monkeypatch):
    import edge_rt
    from offload.streamer import read_span

    calls = []
    real = Store.read_range
    monkeypatch.setattr(Store, "read_range", lambda self, off, n, *a, **k: calls.append((off, n)) or real(
        self, off, n, *a, **k))
    llm = edge_rt.load(tiny_store, device="cpu", n_ctx=64, budget=_min_budget(tiny_store))
    s = llm.backend.model.feed.streamer
    llm.generate("hello", max_tokens=3, ignore_eos=True)
    spans = {s.span[i][0]: s.span[i][1] for i in s.order}
    assert calls and all(spans[off] == n for off, n in calls)  # one request per layer read, of its span
    for i in s.order:
        recs = s.records[i].values()
        assert s.span[i][1] == read_span(recs) and read_span(recs) % ALIGN == 0
        assert read_span(recs) - sum(r.nbytes for r in recs) < ALIGN * (len(recs) + 2)  # padding only
    assert llm.plan.slot_bytes == max(n for _, n in s.span.values())
    assert llm.plan.io_bytes_per_forward == sum(n for _, n in s.span.values())


@pytest.mark.parametrize("verify,within", [("every", 3), ("sampled", 11)])
def test_checksums_catch_corruption_after_the_first_read(tiny_store, tmp_path, monkeypatch, verify, within):
    """A record corrupted on disk after its first (full) check is caught by the later reads: on
    the next read ("every"), or within SAMPLE_SLICES reads ("sampled"), naming the record."""
    import shutil

    import edge_rt
    from offload import streamer as streamer_mod

    monkeypatch.setattr(streamer_mod, "SAMPLE_MIN_BYTES", 0)  # sample even the tiny model's records
    path = tmp_path / "later.ews"
    shutil.copy(tiny_store, path)
    llm = edge_rt.load(path, device="cpu", n_ctx=64, budget=_min_budget(tiny_store))  # layer 3 streams
    s = llm.backend.model.feed.streamer
    assert s.verify == "sampled"
    s.verify = verify
    llm.generate("hello", max_tokens=2, ignore_eos=True)  # every streamed layer read and checked in full
    _flip_last_byte(path, "layers.3.ffn.w2.weight")
    with pytest.raises(ModelFormatError, match="checksum mismatch in record 'layers.3.ffn.w2.weight'"):
        for _ in range(within):
            llm.reset()
            llm.generate("hello", max_tokens=1, ignore_eos=True)


def test_checksums_off_reads_corrupt_records(tiny_store, tmp_path):
    import shutil

    import edge_rt

    path = tmp_path / "off.ews"
    shutil.copy(tiny_store, path)
    _flip_last_byte(path, "layers.3.ffn.w2.weight")
    llm = edge_rt.load(path, device="cpu", n_ctx=64, budget=_min_budget(tiny_store))
    s = llm.backend.model.feed.streamer
    s.verify = "off"
    s.restart(0)  # drop what the reader prefetched with checks on
    s.reset_stats()
    assert len(llm.generate("hello", max_tokens=2, ignore_eos=True).token_ids) == 2
    assert s.stats.verify_s == 0.0


def test_planner_slots_hold_whole_layer_reads():
    from edge_rt.memory.planner import LayerWeights, ModelLayout, minimum_budget, plan_memory

    lay = ModelLayout(fixed_bytes=50, layers=tuple(LayerWeights(i, 100, 120) for i in range(4)),
                      decode_scratch_bytes=0, kv_bytes_per_position=1, hidden_size=1, widest=1, heads=1,
                      vocab_size=1, act_elt=1)
    base = 50 + 64 + lay.activation_bytes(64)
    assert minimum_budget(lay, "cpu", 64) == base + 2 * 120  # a stream buffer holds a layer's read span
    p = plan_memory(lay, "cpu", base + 240 + 100, n_ctx=64)
    assert p.resident == (0,) and p.slot_bytes == 120 and p.io_bytes_per_forward == 3 * 120
    assert p.device_bytes == base + 240 + 100  # resident layers cost their stored bytes


def test_linear_workers_fall_back_to_one_at_a_tight_budget(tiny_src, tmp_path):
    """bf16 weights computed in fp32 need a scratch per worker: a budget that fits one scratch
    but not two loads with one worker instead of refusing."""
    import edge_rt
    from edge_rt.memory.planner import minimum_budget
    from offload.loader import model_layout
    from offload.prune import compress_model
    from offload.store import open_store_model

    path = compress_model(tiny_src, tmp_path / "bf16.ews", sparsity=0.0, fmt="dense", dtype="bfloat16")
    sm = open_store_model(path)
    n = torch.get_num_threads()
    try:
        lows = {w: minimum_budget(model_layout(sm.store, sm.args, torch.float32, torch.float32, "cpu", w), "cpu", 64)
                for w in (1, 2)}
        assert lows[1] < lows[2]
        for budget, workers in ((lows[2], 2), (lows[1], 1)):
            llm = edge_rt.load(path, device="cpu", n_ctx=64, budget=budget, threads=2)
            assert llm.backend.model.linear_pool.workers == workers and llm.plan.device_bytes <= budget
        with pytest.raises(InvalidOptionError, match=rf"minimum of .*\({lows[1]} bytes\)"):
            edge_rt.load(path, device="cpu", n_ctx=64, budget=lows[1] - 1, threads=2)
    finally:
        torch.set_num_threads(n)


def test_truncated_store_refused_at_load(tiny_store, tmp_path):
    import edge_rt

    bad = tmp_path / "short.ews"
    bad.write_bytes(tiny_store.read_bytes()[:-100])
    with pytest.raises(ModelFormatError, match="truncated"):
        edge_rt.load(bad, device="cpu", budget="1GB")


def test_cli_compress_inspect_run(tiny_src, tmp_path):
    from typer.testing import CliRunner

    from edge_rt.cli import app

    runner = CliRunner()
    out = tmp_path / "c.ews"
    r = runner.invoke(app, ["compress", str(tiny_src), "--prune", "0.5", "--format", "endor", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(out), "--json"])
    info = json.loads(r.stdout)
    assert info["kind"] == "endor" and len(info["per_layer"]) == 4 and info["per_layer"][0]["formats"] == "endor"
    r = runner.invoke(app, ["run", "hi", "-m", str(out), "--budget", "1MB", "-n", "4", "--json", "--n-ctx", "64"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["generated_tokens"] == 4
    r = runner.invoke(app, ["run", "hi", "-m", str(out), "--budget", "10KB"])
    assert r.exit_code == 2 and "minimum of" in r.output
    r = runner.invoke(app, ["compress", str(tiny_src), "--prune", "1.5", "-o", str(tmp_path / "x.ews")])
    assert r.exit_code == 2 and "--prune" in r.output and not (tmp_path / "x.ews").exists()


# --- the real model: streamed == in memory, and peak RSS within the budget -------------------

# Peak RSS may exceed budget + runtime baseline by at most this (allocator slack, thread stacks,
# decode temporaries): measured 13-20 MiB on SmolLM2-135M (docs/OFFLOAD.md).
RSS_SLACK = 32 * 2**20

_RSS_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
mode, path, budget = sys.argv[1], sys.argv[2], sys.argv[3]
import edge_rt
if mode == "baseline":  # the runtime without weights: imports, tokenizer, a model skeleton
    from edge_rt.models.llama import Transformer
    from offload.store import open_store_model
    import offload.loader, backends.torch_backend
    sm = open_store_model(path)
    sm.tokenizer().encode("hello")
    with torch.device("meta"):
        Transformer(sm.args)
    n = 0
else:
    llm = edge_rt.load(path, device="cpu", budget=int(budget), n_ctx=64)
    n = len(llm.generate("The capital of France is", max_tokens=16, ignore_eos=True).token_ids)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve (the parent's peak would leak in)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak": int(hwm.split()[1]) * 1024, "tokens": n}))
"""


def _peak_rss(mode, path, budget=0):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode, str(path), str(budget)], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def real_store(smollm2_path, tmp_path_factory):
    from offload.prune import compress_model

    d = tmp_path_factory.mktemp("real")
    return compress_model(smollm2_path, d / "smollm2-endor.ews", sparsity=0.5, fmt="endor", method="magnitude")


def test_real_model_streamed_equals_in_memory(real_store):
    import edge_rt

    from offload.loader import model_layout
    from edge_rt.memory.planner import minimum_budget
    from offload.store import open_store_model

    sm = open_store_model(real_store)
    low = minimum_budget(model_layout(sm.store, sm.args, torch.float32, torch.float32, "cpu"), "cpu", 64)
    runs = [_run(edge_rt.load(real_store, device="cpu", n_ctx=64, budget=b), "The capital of France is")
            for b in (None, low)]
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_real_model_peak_rss_within_budget(real_store):
    from edge_rt.memory.planner import minimum_budget
    from offload.loader import model_layout
    from offload.store import open_store_model

    sm = open_store_model(real_store)
    low = minimum_budget(model_layout(sm.store, sm.args, torch.float32, torch.float32, "cpu"), "cpu", 64)
    base = _peak_rss("baseline", real_store)["peak"]
    for budget in (low, low + 24 * 2**20):
        got = _peak_rss("run", real_store, budget)
        assert got["tokens"] == 16
        over = got["peak"] - base - budget
        print(f"budget {budget / 2**20:.1f} MiB: peak {got['peak'] / 2**20:.1f} MiB, runtime {base / 2**20:.1f} MiB, "
              f"over budget + runtime {over / 2**20:.1f} MiB")
        assert over <= RSS_SLACK


def test_interrupted_compress_leaves_no_store(tiny_src, tmp_path, monkeypatch):
    from offload import prune

    calls = []
    real = prune._write_tensor

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C half way through the tensors
        return real(*a, **k)

    monkeypatch.setattr(prune, "_write_tensor", flaky)
    out = tmp_path / "half.ews"
    with pytest.raises(KeyboardInterrupt):
        prune.compress_model(tiny_src, out, sparsity=0.5, fmt="endor", method="magnitude")
    assert not out.exists() and not (tmp_path / "half.ews.tmp").exists()
