"""Endor format and pruning. Reference: the pruned dense tensor (bit for bit), and the pruned
dense model's run (same tokens, bit-identical logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload import endor
from offload.prune import heldout_text, calibration_text, prune_mask, prune_weight


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


@pytest.mark.parametrize("scratch", [1 << 19, 64 * 16])  # one chunk per matrix; many 16-row chunks
def test_endor_run_equals_pruned_dense_run(tiny_stores, monkeypatch, scratch):
    import edge_rt
    from offload import loader

    monkeypatch.setattr(loader, "SCRATCH_ELEMENTS", scratch)
    monkeypatch.setattr(loader, "CHUNK_ROWS", 16)
    _, stores = tiny_stores
    prompt = "def f(x): return x"
    runs = {}
    for name in ("dense", "endor"):
        llm = edge_rt.load(stores[name], device="cpu", n_ctx=64)
        ids = llm.encode(prompt)
        logits = llm.backend.forward(ids, all_logits=True)
        llm.reset()
        out = llm.generate(prompt, max_tokens=12, ignore_eos=True)
        runs[name] = (logits, out.token_ids)
    assert torch.equal(runs["endor"][0], runs["dense"][0])
    assert runs["endor"][1] == runs["dense"][1] and len(runs["dense"][1]) == 12


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
