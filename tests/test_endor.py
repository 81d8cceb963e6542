"""Endor format and pruning. Reference: the pruned dense tensor (bit for bit), and the pruned
dense model's run (same tokens, bit-identical logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload import endor, native
from offload.prune import heldout_text, calibration_text, prune_mask, prune_weight


@pytest.fixture(params=["native", "numpy"], autouse=True)
def decode_path(request, monkeypatch):
    """Every test runs on both CPU decodes: the compiled kernel (offload/native.py) and numpy."""
    native.endor_kernel.cache_clear()
    if request.param == "numpy":
        monkeypatch.setenv("EDGE_RT_NATIVE", "0")
    elif native.endor_kernel() is None:
        pytest.skip("no native Endor kernel here (no C compiler)")
    yield request.param
    native.endor_kernel.cache_clear()


def _pruned(N, K, dtype, seed=0, sparsity=0.5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g).to(dtype)
    w = prune_weight(w, sparsity)
    flat = w.view(-1)
    flat[1] = -0.0  # a kept negative zero must survive
    return w


def _parts(e: endor.EndorTensor) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in e.records().items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,tile", [((70, 37), 16), ((256, 64), 256), ((5, 8), 2)])
def test_decode_equals_pruned_dense_bit_for_bit(dtype, shape, tile):
    w = _pruned(*shape, dtype)
    e = endor.encode(w, tile_rows=tile)
    assert e.values.size == int((w.view(endor.BITS[dtype]) != 0).sum())
    out = endor.decode(_parts(e), e.spec())
    assert out.dtype == dtype and torch.equal(_bits(out), _bits(w))
    # the torch path (used on CUDA) on the same records
    plane = torch.empty(shape, dtype=endor.BITS[dtype])
    endor._scatter_torch(_parts(e)["bitmap"], _parts(e)["values"].view(plane.dtype), plane)
    assert torch.equal(_bits(plane), _bits(w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_rows_widens_exactly(dtype):
    w = _pruned(100, 24, dtype)
    e = endor.encode(w, tile_rows=8)
    for r0, r1 in [(0, 8), (16, 40), (96, 100)]:
        out = torch.empty(r1 - r0, 24, dtype=torch.float32)
        endor.decode_rows(_parts(e), e.spec(), r0, r1, out)
        assert torch.equal(_bits(out), _bits(w[r0:r1].float()))
    with pytest.raises(ValueError, match="tile-aligned"):
        endor.decode_rows(_parts(e), e.spec(), 3, 8, torch.empty(5, 24))


@pytest.mark.parametrize("shape,tile", [((1, 1), 1), ((3, 13), 1), ((29, 37), 3), ((64, 9), 7), ((40, 200), 16),
                                        ((257, 65), 256), ((300, 72), 64)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
def test_vectorized_decode_odd_shapes_and_tiles(shape, tile, density):
    """Whole-range CPU decode (and every tile-aligned row range of it, widened or not) equals the
    pruned tensor bit for bit: K not a multiple of 8, partial last tiles, empty and full rows."""
    N, K = shape
    g = torch.Generator().manual_seed(N * 1000 + K)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    w = torch.where(torch.rand(N, K, generator=g) < density, w, torch.zeros((), dtype=w.dtype))
    if N > 2:
        w[1] = 0  # an empty row
        w[2] = torch.randn(K, generator=g).to(w.dtype) + 10  # a full row
    w.view(-1)[0] = -0.0  # a kept negative zero
    e = endor.encode(w, tile_rows=tile)
    full = endor.decode(_parts(e), e.spec(), torch.full((N * K + 5,), float("nan"), dtype=w.dtype))
    assert torch.equal(_bits(full), _bits(w))
    tiles = list(range(0, N, tile)) + [N]
    for a in range(0, len(tiles) - 1, 2):
        for b in (a + 1, len(tiles) - 1):
            r0, r1 = tiles[a], tiles[b]
            for out_dtype in (torch.bfloat16, torch.float32):
                out = torch.full((r1 - r0, K), float("nan"), dtype=out_dtype)  # garbage, as a reused scratch
                endor.decode_rows(_parts(e), e.spec(), r0, r1, out)
                assert torch.equal(_bits(out), _bits(w[r0:r1].to(out_dtype))), (r0, r1, out_dtype)


def test_decode_rows_fp16_and_fp32_values():
    for dtype in (torch.float16, torch.float32):
        w = _pruned(50, 21, dtype)
        e = endor.encode(w, tile_rows=5)
        out = torch.empty(20, 21, dtype=torch.float32)
        endor.decode_rows(_parts(e), e.spec(), 10, 30, out)
        assert torch.equal(_bits(out), _bits(w[10:30].float()))


def test_int8_values_equal_their_reference():
    w = _pruned(40, 32, torch.bfloat16)
    e = endor.encode(w, tile_rows=16, values="int8")
    q, s = endor.quantize_rows(w)
    ref = endor.dequantize_rows(q, s, torch.bfloat16)
    assert torch.equal(_bits(endor.decode(_parts(e), e.spec())), _bits(ref))
    out = torch.empty(16, 32)
    endor.decode_rows(_parts(e), e.spec(), 16, 32, out)
    assert torch.equal(out, ref[16:32].float())
    assert torch.equal(q == 0, w == 0)  # pruned positions stay pruned
    assert e.nbytes < w.numel() * 2 * 0.7


def test_bytes_at_half_sparsity():
    w = _pruned(512, 512, torch.bfloat16)
    e = endor.encode(w)
    dense = w.numel() * 2
    assert abs(e.nbytes / dense - (0.5 + 1 / 16)) < 0.01  # 2 d + 1/8 bytes per weight


def test_corrupt_tile_offsets_are_caught():
    w = _pruned(32, 16, torch.bfloat16)
    e = endor.encode(w, tile_rows=8)
    parts = _parts(e)
    parts["tile_offsets"] = parts["tile_offsets"].clone()
    parts["tile_offsets"][1] += 1
    with pytest.raises(ValueError, match="tile 0"):
        endor.decode(parts, e.spec())
    with pytest.raises(ValueError, match="tile 0"):  # a range starting at the bad tile, widened
        endor.decode_rows(parts, e.spec(), 0, 16, torch.empty(16, 16))
    parts = _parts(e)  # a flipped bitmap bit in tile 2: counts no longer match the offsets
    parts["bitmap"] = parts["bitmap"].clone()
    parts["bitmap"][17, 0] ^= 1
    with pytest.raises(ValueError, match="tile 2"):
        endor.decode(parts, e.spec())
    with pytest.raises(ValueError, match="tile 0"):  # relative to the range decoded
        endor.decode_rows(parts, e.spec(), 16, 24, torch.empty(8, 16))
    parts = _parts(e)
    parts["values"] = parts["values"][:-1]
    with pytest.raises(ValueError, match="values"):
        endor.decode(parts, e.spec())


def test_row_chunks_cover_tiles_evenly():
    from offload.loader import row_chunks

    for n_rows, k, unit, limit, parts in [(3072, 576, 256, 1 << 19, 2), (960, 576, 256, 1 << 19, 2),
                                          (576, 1536, 256, 1 << 19, 2), (49152, 576, 256, 1 << 19, 3),
                                          (70, 37, 16, 64 * 16, 2), (5, 8, 2, 1, 4), (1, 1, 256, 1, 2)]:
        chunks = row_chunks(n_rows, k, unit, limit, parts)
        assert chunks[0][0] == 0 and chunks[-1][1] == n_rows
        assert all(a < b and b == c for (a, b), (c, _) in zip(chunks, chunks[1:] + [(n_rows, None)]))
        assert all(r0 % unit == 0 for r0, _ in chunks)
        units = -(-n_rows // unit)
        assert all((r1 - r0) * k <= max(limit, unit * k) for r0, r1 in chunks)  # at least one unit
        assert len(chunks) % parts == 0 or len(chunks) == units  # a share per worker where units allow
        sizes = [-(-(r1 - r0) // unit) for r0, r1 in chunks]
        assert max(sizes) - min(sizes) <= 1


def test_linear_pool_runs_every_chunk_once_and_raises_worker_errors():
    from offload.loader import LinearPool

    pool = LinearPool(3, 4, torch.float32, torch.device("cpu"))
    try:
        seen, scratches = [], set()

        def fn(i, scratch):
            assert torch.is_inference_mode_enabled()  # the caller's mode, on every worker
            seen.append(i)
            scratches.add(scratch.data_ptr())

        with torch.inference_mode():
            pool.run(fn, 50)
            pool.run(fn, 1)
        assert sorted(seen) == [0] + list(range(50)) and len(scratches) <= 3

        def bad(i, scratch):
            if i == 7:
                raise ValueError("chunk 7")

        with pytest.raises(ValueError, match="chunk 7"):
            pool.run(bad, 20)
        seen.clear()
        with torch.inference_mode():
            pool.run(fn, 5)  # still usable
        assert sorted(seen) == list(range(5))
    finally:
        pool.close()


def test_pool_leaves_the_callers_threads_alone(tiny_stores, restore_threads):
    import threading

    import edge_rt

    _, stores = tiny_stores
    llm = edge_rt.load(stores["endor"], device="cpu", n_ctx=64, threads=2)
    assert llm.backend.model.linear_pool.workers == 2 and torch.get_num_threads() == 2
    llm.generate("def f", max_tokens=3)
    assert torch.get_num_threads() == 2  # the forward runs with one intra-op thread, then restores
    got = []
    t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))  # torch's default for new threads
    t.start()
    t.join()
    assert got == [2]


def test_prune_mask_per_row_and_wanda_scores():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    keep = prune_mask(score, 0.5)
    assert keep.tolist() == [[True, False, True, False], [False, False, True, True]]  # ties: lowest index first
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    norms = torch.tensor([10.0, 1.0, 0.1, 1.0])
    assert prune_weight(w, 0.5).tolist() == [[0.0, -2.0, 3.0, 0.0]]  # magnitude
    assert prune_weight(w, 0.5, norms).tolist() == [[1.0, -2.0, 0.0, 0.0]]  # |W| * ||X||
    big = prune_weight(torch.randn(64, 100), 0.3)
    assert ((big == 0).sum(1) == 30).all()


def test_calibration_and_heldout_text_do_not_overlap():
    c, h = calibration_text(), heldout_text()
    assert len(c) > 10_000 and len(h) > 10_000
    assert h[:2000] not in c and c[-2000:] not in h


# --- model level: compress a tiny GGUF, Endor vs pruned dense -------------------------------


@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory):
    from offload.prune import compress_model
    from gguf_fixtures import write_tiny_gguf

    d = tmp_path_factory.mktemp("endor")
    src = write_tiny_gguf(d / "tiny.gguf", "tiny-qwen2", qtype="F16", seed=3)
    stores = {}
    for name, fmt, values in [("endor", "endor", "native"), ("dense", "dense", "native"), ("int8", "endor", "int8")]:
        stores[name] = compress_model(src, d / f"{name}.ews", sparsity=0.5, fmt=fmt, values=values, tile_rows=16)
    return src, stores


def test_endor_store_decodes_to_the_pruned_dense_store(tiny_stores):
    from offload.loader import target_records, tensor_table
    from offload.store import Store

    _, stores = tiny_stores
    e, d = Store.open(stores["endor"]), Store.open(stores["dense"])
    te, td = tensor_table(e), tensor_table(d)
    assert te.keys() == td.keys()
    n_endor = 0
    for target, spec in te.items():
        ref = d.read_tensor(target)
        if spec["format"] == "endor":
            n_endor += 1
            parts = {k: e.read_tensor(r.name) for k, r in target_records(e, target, spec).items()}
            got = endor.decode(parts, spec)
            assert 0.45 < float((ref == 0).float().mean()) < 0.55
        else:
            got = e.read_tensor(target)
        assert torch.equal(_bits(got), _bits(ref)), target
    assert n_endor == 4 * 3  # 4 linear layers x 3 blocks


def test_wanda_differs_from_magnitude(tiny_stores, tmp_path):
    from offload.prune import compress_model
    from offload.store import Store

    src, stores = tiny_stores
    mag = compress_model(src, tmp_path / "mag.ews", sparsity=0.5, fmt="dense", method="magnitude")
    a, b = Store.open(stores["dense"]), Store.open(mag)
    assert a.meta["prune"]["method"] == "wanda" and b.meta["prune"]["method"] == "magnitude"
    name = "layers.0.ffn.w13.weight"
    assert not np.array_equal(a.read(name), b.read(name))


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("threads", [1, 2])  # linear workers: the caller alone; the caller and a helper
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16 widened per chunk; bf16 as stored
@pytest.mark.parametrize("scratch", [1 << 19, 64 * 16])  # few chunks per matrix; many 16-row chunks
def test_endor_run_equals_pruned_dense_run(tiny_stores, monkeypatch, restore_threads, scratch, dtype, threads):
    import edge_rt
    from offload import loader

    monkeypatch.setattr(loader, "SCRATCH_ELEMENTS", scratch)
    monkeypatch.setattr(loader, "CHUNK_ROWS", 16)
    _, stores = tiny_stores
    prompt = "def f(x): return x"
    runs = {}
    for name in ("dense", "endor"):
        llm = edge_rt.load(stores[name], device="cpu", n_ctx=64, dtype=dtype, threads=threads)
        assert llm.backend.model.linear_pool.workers == threads
        ids = llm.encode(prompt)
        logits = llm.backend.forward(ids, all_logits=True)
        llm.reset()
        out = llm.generate(prompt, max_tokens=12, ignore_eos=True)
        runs[name] = (logits, out.token_ids)
    assert torch.equal(runs["endor"][0], runs["dense"][0])
    assert runs["endor"][1] == runs["dense"][1] and len(runs["dense"][1]) == 12


def test_linear_pool_decodes_ahead(restore_threads):
    """A job's `ahead` decodes the next job's last chunk (helper) and first chunk (caller's
    scratch); the named run multiplies them as they are, any other run or a failed decode ahead
    decodes every chunk itself."""
    import time

    from offload.loader import LinearPool

    n, records, owner = 4, {}, object()
    seen: dict[int, tuple[float, bool]] = {}

    def fn(i, scratch, ready=False):  # a chunk's "rows" are its index written into the scratch
        if not ready:
            scratch.fill_(i)
        seen[i] = (float(scratch[0]), ready)

    def decode(i, scratch):
        if i == n - 1:
            time.sleep(0.02)  # the caller is done with its scratch before chunk 0 is decoded into it
        scratch.fill_(i)

    def bad(i, scratch):
        raise ValueError("corrupt chunk")

    pool = LinearPool(2, 8, torch.float32, torch.device("cpu"))
    try:
        for ahead, key, ready in ((decode, (owner, records), {0, n - 1}), (decode, (object(), records), set()),
                                  (decode, (owner, {}), set()), (bad, (owner, records), set())):
            pool.run(lambda i, scratch: None, 2, key=("previous", records), ahead=((owner, records), n, ahead))
            time.sleep(0.1)  # the helper has decoded ahead
            seen.clear()
            pool.run(fn, n, key=key)
            assert {i: v for i, (v, _) in seen.items()} == {i: float(i) for i in range(n)}  # every chunk, its own rows
            assert {i for i, (_, r) in seen.items() if r} == ready
    finally:
        pool.close()


def test_decode_ahead_used_and_bit_identical(tiny_stores, monkeypatch, restore_threads):
    """An Endor run decodes chunks ahead between a block's linears, and gives the same logits as
    a run with decoding ahead off. (The tiny store keeps every layer resident even at its minimum
    budget; streamed layers run the same code, tests/test_offload.py and the benchmark store.)"""
    import edge_rt
    from offload import loader

    monkeypatch.setattr(loader, "SCRATCH_ELEMENTS", 64 * 16)
    monkeypatch.setattr(loader, "CHUNK_ROWS", 16)
    _, stores = tiny_stores
    used = []
    run = loader.LinearPool.run

    def counted(self, fn, n, key=None, ahead=None):
        used.append(key is not None and loader._same(key, self._ahead))
        return run(self, fn, n, key, ahead)

    monkeypatch.setattr(loader.LinearPool, "run", counted)
    logits = []
    for off in (False, True):
        if off:
            monkeypatch.setattr(loader.OffloadLinear, "_ahead", lambda self: None)
        llm = edge_rt.load(stores["endor"], device="cpu", n_ctx=64, dtype="bfloat16", threads=2)
        assert llm.backend.model.linear_pool.workers == 2
        logits.append(llm.backend.forward(llm.encode("def f(x): return x"), all_logits=True))
        if not off:
            assert sum(used) >= 3 * llm.backend.model.args.num_hidden_layers  # wo, w13, w2 of every block
    assert torch.equal(logits[0], logits[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent GPU machine)")
def test_cuda_decode_and_streamed_run(tiny_stores):
    import edge_rt

    w = _pruned(300, 72, torch.bfloat16)
    e = endor.encode(w, tile_rows=64)
    parts = {k: v.cuda() for k, v in _parts(e).items()}
    assert torch.equal(_bits(endor.decode(parts, e.spec()).cpu()), _bits(w))
    _, stores = tiny_stores
    runs = []
    for budget in (None, 1):  # 1 byte: refused below the minimum; use the minimum instead
        try:
            llm = edge_rt.load(stores["endor"], device="cuda", n_ctx=64, budget=budget)
        except edge_rt.EdgeRTError as err:
            minimum = int(str(err).split("(")[1].split(" bytes")[0])
            llm = edge_rt.load(stores["endor"], device="cuda", n_ctx=64, budget=minimum)
        ids = llm.encode("def f(x): return x")
        runs.append((llm.backend.forward(ids, all_logits=True), llm.generate("def f", max_tokens=8).token_ids))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_native_kernel_builds_and_is_used(decode_path, tmp_path, monkeypatch):
    """With a C compiler on PATH the kernel builds (into $EDGE_RT_HOME/native) and decodes bf16
    rows; without one, decoding falls back to numpy with one warning and the same bits."""
    import shutil

    monkeypatch.setenv("EDGE_RT_HOME", str(tmp_path))
    native.endor_kernel.cache_clear()
    w = _pruned(64, 40, torch.bfloat16)
    e = endor.encode(w, tile_rows=16)
    p = _parts(e)
    plane = torch.empty(64 * 40, dtype=torch.int16)
    if decode_path == "numpy":
        assert native.endor_kernel() is None
        assert not endor._scatter_native(e.bitmap, p["values"].view(torch.int16), e.tile_offsets, 16, plane, 64, 40)
        monkeypatch.delenv("EDGE_RT_NATIVE")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        native.endor_kernel.cache_clear()
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert native.endor_kernel() is None
        assert torch.equal(_bits(endor.decode(p, e.spec())), _bits(w))
        return
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    assert native.endor_kernel() is not None and list((tmp_path / "native").glob("endor_kernel-*.so"))
    assert endor._scatter_native(e.bitmap, p["values"].view(torch.int16), e.tile_offsets, 16, plane, 64, 40)
    assert torch.equal(_bits(plane), _bits(w))
    wide = torch.full((64 * 40,), -1, dtype=torch.int32)  # bf16 widened to fp32 in the same call
    assert endor._scatter_native(e.bitmap, p["values"].view(torch.int16), e.tile_offsets, 16, wide, 64, 40)
    assert torch.equal(_bits(wide), _bits(w.float()))
    # data that do not check out are left to the numpy path, which names the error
    assert not endor._scatter_native(e.bitmap, p["values"].view(torch.int16)[:-1], e.tile_offsets, 16, plane, 64, 40)
    bad = e.tile_offsets.copy()
    bad[2] += 1
    assert not endor._scatter_native(e.bitmap, p["values"].view(torch.int16), bad, 16, plane, 64, 40)


def test_linear_workers_default_follows_the_decode(decode_path, monkeypatch, restore_threads):
    """One linear worker where the native decode is built, torch's threads where it is not;
    `threads=` of load and $EDGE_RT_LINEAR_WORKERS choose; a bad value is a one-line error."""
    from edge_rt.errors import InvalidOptionError
    from offload.loader import LINEAR_WORKERS_ENV, linear_workers

    monkeypatch.delenv(LINEAR_WORKERS_ENV, raising=False)
    torch.set_num_threads(2)
    assert linear_workers("cpu") == (1 if decode_path == "native" else 2)
    assert linear_workers("cpu", 3) == 3 and linear_workers("cuda", 3) == 1
    monkeypatch.setenv(LINEAR_WORKERS_ENV, "2")
    assert linear_workers("cpu") == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(LINEAR_WORKERS_ENV, bad)
        with pytest.raises(InvalidOptionError, match=LINEAR_WORKERS_ENV):
            linear_workers("cpu")
