"""edge-rt's accelerator paths on tiny models made here, each compared with a reference.

Run on a GPU machine (scripts/gpu_check.sh); the device comes from EDGE_RT_TEST_DEVICE (default
"cuda") and the whole module skips, with the reason, where that device is not available (CI).
EDGE_RT_TEST_DEVICE=cpu runs the same tests on the CPU (the CUDA-only checks skip).

References:
- logits: the same GGUF file dequantized to fp32 on the CPU, within the tolerance of the compute
  dtype (LOGIT_TOL); greedy tokens equal it except where its top-2 margin is within the tolerance;
- packed int4 linears: the fp32 product with the dequantized weight, within bf16 rounding bounds;
- offload streaming: the same store fully resident on the same device, bit for bit; an Endor store:
  its pruned dense store on the same device, bit for bit; Endor decode: the CPU decode, bit for bit;
- BitStack resize: a fresh load at the new budget (kept weights bit for bit, same tokens);
- speculative decoding: plain greedy decoding on the same backend (or the documented refusal);
- KV reuse across chat turns: a fresh prefill of the whole history.

Measurements that are not assertions (verify batch invariance, CUDA memory) go to the JSON file
named by EDGE_RT_TEST_REPORT, when set.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import edge_rt
from devices import resolve_device
from edge_rt.errors import DeviceError, InvalidOptionError

DEVICE = os.environ.get("EDGE_RT_TEST_DEVICE", "cuda")
try:
    DEV = resolve_device(DEVICE)
except DeviceError as e:
    pytest.skip(f"EDGE_RT_TEST_DEVICE={DEVICE!r} is not available here: {e}", allow_module_level=True)

from gguf_fixtures import _CORPUS, write_tiny_gguf  # noqa: E402  (needs gguf; after the skip)

ON_CUDA = DEV.kind == "cuda"
cuda_only = pytest.mark.skipif(not ON_CUDA, reason=f"CUDA only (EDGE_RT_TEST_DEVICE={DEVICE!r})")
N_CTX = 128
PROMPT = "The capital of France is Paris; the capital of"
# Half-precision dtype the quantized paths run in: the device's own, else bf16 (packed int4 needs one).
HALF = DEV.default_dtype if DEV.default_dtype != torch.float32 else torch.bfloat16
HALF_NAME = str(HALF).removeprefix("torch.")

# max |logits - fp32 CPU reference| / max |reference|, per compute dtype. Measured on CPU with the
# device's configuration (half-precision matmuls and KV cache) on these models: bf16 0.034 (dense)
# and 0.019 (packed int4), fp16 0.0055; fp32 differs only in summation order (TF32 is off by
# default). A wrong kernel or layout is off by the logits' own size (> 0.5).
LOGIT_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}

REPORT: dict = {"device": DEV.describe(), "torch": torch.__version__}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield REPORT
    path = os.environ.get("EDGE_RT_TEST_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(REPORT, f, indent=1, default=str)


def _load(path, **kw):
    return edge_rt.load(str(path), device=DEVICE, **{"n_ctx": N_CTX, **kw})


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """Tiny random llama GGUFs (2 layers, vocab 512) in the tensor types edge-rt loads packed."""
    d = tmp_path_factory.mktemp("cuda")
    return {q: write_tiny_gguf(d / f"tiny-{q}.gguf", "tiny", qtype=q, seed=1) for q in ("Q8_0", "Q4_0", "Q4_1")}


@pytest.fixture(scope="module")
def reference(ggufs):
    """The CPU fp32 reference of each file: dequantized weights, fp32 everywhere."""
    return {q: edge_rt.load(str(p), device="cpu", dtype="float32", quantized=False, n_ctx=N_CTX)
            for q, p in ggufs.items()}


def _margin(llm, ids) -> float:
    """Top-2 logit gap of the next token after `ids` (a fresh prefill of llm)."""
    top = llm.engine.score(ids)[-1].topk(2).values
    return float(top[0] - top[1])


def assert_same_greedy(got: list[int], want: list[int], prompt: list[int], ref_llm, tol_abs: float) -> None:
    """got == want, or they part only where ref_llm's top-2 margin is within 2 * tol_abs (a near tie)."""
    assert len(got) == len(want)
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:
        return
    margin = _margin(ref_llm, prompt + want[:i])
    assert margin <= 2 * tol_abs, (f"greedy tokens part at step {i} where the reference margin is {margin:.4f} "
                                   f"(> 2 x tolerance {tol_abs:.4f}): {got} vs {want}")


def _steps(llm, ids: list[int], follow: list[int]) -> torch.Tensor:
    """Prefill logits of ids (every position), then one-token decode steps over `follow`: [T + F, V]."""
    llm.reset()
    be = llm.backend
    rows = [be.forward(ids, all_logits=True)] + [be.forward([t]) for t in follow]
    llm.reset()
    return torch.cat(rows)


# --- load on the device: logits, tokens, reporting ------------------------------------------------


def test_device_reporting(ggufs):
    from typer.testing import CliRunner

    from edge_rt.cli import app

    llm = _load(ggufs["Q8_0"])
    dev = llm.device
    assert (dev.kind, dev.label) == (DEV.kind, DEV.label) and llm.dtype == DEV.default_dtype
    line = dev.describe()
    assert line.startswith(DEV.label + " ") and "\n" not in line and str(llm.dtype).removeprefix("torch.") in line
    if ON_CUDA:
        idx = dev.index
        assert dev.name == torch.cuda.get_device_name(idx) and dev.name in line
        assert dev.total_memory == torch.cuda.mem_get_info(idx)[1] and 0 < dev.free_memory <= dev.total_memory
        want = torch.bfloat16 if torch.cuda.get_device_capability(idx) >= (8, 0) else torch.float16
        assert dev.default_dtype == want
    info = llm.info()
    assert info["device"]["device"] == DEV.label and info["device"]["kind"] == DEV.kind
    assert info["device"]["default_dtype"] == str(DEV.default_dtype).removeprefix("torch.")
    tensors = list(llm.backend.model.parameters()) + list(llm.backend.model.buffers())
    assert {t.device for t in tensors if t is not None} == {DEV.torch_device}
    llm.generate("hi", max_tokens=2)
    assert {c.keys.device for c in llm.backend.caches} == {DEV.torch_device}
    r = CliRunner().invoke(app, ["run", "hi", "-m", str(ggufs["Q8_0"]), "--device", DEVICE, "-n", "3", "--json",
                                 "--n-ctx", "64"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["device"] == DEV.label and out["dtype"] == str(DEV.default_dtype).removeprefix("torch.")
    REPORT["describe"] = line


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_logits_close_to_cpu_fp32_reference(ggufs, reference, dtype):
    """Dense weights in `dtype` on the device: prefill and decode-step logits within LOGIT_TOL."""
    ref = reference["Q8_0"]
    ids = ref.encode(PROMPT)
    follow = ref.generate(ids, max_tokens=8, ignore_eos=True).token_ids
    want = _steps(ref, ids, follow)
    llm = _load(ggufs["Q8_0"], dtype=str(dtype).removeprefix("torch."), quantized=False)
    got = _steps(llm, ids, follow)
    err = float((got - want).abs().max() / want.abs().max())
    REPORT.setdefault("logit_rel_err", {})[str(dtype)] = err
    assert err <= LOGIT_TOL[dtype], f"{dtype}: max logit error {err:.4g} of the logit scale"
    assert torch.isfinite(got).all()
    ppl, ppl_ref = llm.perplexity(ids), ref.perplexity(ids)
    assert abs(ppl - ppl_ref) / ppl_ref < 4 * LOGIT_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_greedy_tokens_equal_where_the_margin_is_large(ggufs, reference, dtype):
    ref = reference["Q8_0"]
    llm = _load(ggufs["Q8_0"], dtype=str(dtype).removeprefix("torch."), quantized=False)
    scale = float(ref.engine.score(ref.encode(PROMPT)).abs().max())
    for prompt in (PROMPT, "Once upon a time there was", "1, 2, 3 and 42"):
        ids = ref.encode(prompt)
        want = ref.generate(ids, max_tokens=24, ignore_eos=True).token_ids
        got = llm.generate(ids, max_tokens=24, ignore_eos=True).token_ids
        assert_same_greedy(got, want, ids, ref, LOGIT_TOL[dtype] * scale)


def test_generate_stream_and_chat_agree_on_device(ggufs):
    """generate, stream_pieces, stream and chat from an empty cache: the same tokens and text.

    Each call starts from llm.reset(): a reused prefix re-runs the prompt's last token as a
    one-token forward, which on a backend without batch-invariant kernels may round differently
    from the full prefill (test_chat_turns_... covers reuse)."""
    llm = _load(ggufs["Q8_0"])

    def fresh(fn, *a, **kw):
        llm.reset()
        return fn(*a, **kw)

    out = fresh(llm.generate, PROMPT, max_tokens=16, ignore_eos=True)
    assert len(out.token_ids) == 16 and out.finish_reason == "length" and out.stats.cached_tokens == 0
    pieces = list(fresh(llm.stream_pieces, PROMPT, max_tokens=16, ignore_eos=True))
    assert [p.token_id for p in pieces if p.token_id is not None] == out.token_ids
    assert pieces[-1].finish_reason == "length"
    assert "".join(fresh(llm.stream, PROMPT, max_tokens=16, ignore_eos=True)) == out.text
    # seeded sampling on device logits: the same seed, the same tokens
    a, b = (fresh(llm.generate, PROMPT, max_tokens=16, temperature=0.9, top_p=0.95, seed=7,
                  ignore_eos=True).token_ids for _ in range(2))
    assert a == b
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    c = fresh(llm.chat, msgs, max_tokens=8)
    assert c.finish_reason in ("length", "stop") and c.token_ids
    assert c.stats.prompt_tokens == len(llm.chat_ids(msgs))
    assert fresh(llm.chat, msgs, max_tokens=8).token_ids == c.token_ids


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_chat_turns_reuse_the_cache_and_equal_a_fresh_prefill(ggufs, dtype):
    """A ChatSession on the device: later turns prefill only the new text (cached_tokens), and each
    reply equals the reply to the whole history prefilled afresh (near ties excepted)."""
    name = str(dtype).removeprefix("torch.")
    llm, fresh = (_load(ggufs["Q8_0"], dtype=name, n_ctx=256) for _ in range(2))
    session = llm.session(system="You are terse.")
    scale = float(fresh.engine.score(fresh.encode(PROMPT)).abs().max())
    last_prompt = 0
    for k, user in enumerate(["Name a colour.", "And an animal?", "Now a number, please."]):
        history = [dict(m) for m in session.messages] + [{"role": "user", "content": user}]
        prompt_ids = llm.chat_ids(history)
        reply = session.send(user, max_tokens=10, ignore_eos=True)
        st = llm.last_stats
        assert st.prompt_tokens == len(prompt_ids) and len(session.messages) == len(history) + 1
        if k:  # the previous turn's prompt (and part of its reply) came from the cache
            assert st.cached_tokens >= last_prompt - 2, (st.cached_tokens, last_prompt)
        last_prompt = len(prompt_ids)
        fresh.reset()
        ref = fresh.chat(history, max_tokens=10, ignore_eos=True)
        assert ref.stats.cached_tokens == 0
        # the session's reply ids: what the engine forwarded after the prompt (all but the last)
        got = llm.engine.tokens[len(prompt_ids):]
        assert len(got) == len(ref.token_ids) - 1
        got = got + (ref.token_ids[-1:] if reply == ref.text else [-1])
        assert_same_greedy(got, ref.token_ids, prompt_ids, fresh, LOGIT_TOL[dtype] * scale)


# --- packed int4 linears ------------------------------------------------------------------------


@pytest.mark.parametrize("N,K,repeat,bias", [(64, 64, 1, False), (100, 96, 1, True), (512, 128, 1, False),
                                             (192, 256, 1, True), (64, 64, 2, False)])
def test_int4_linear_on_device_matches_dequantized_product(N, K, repeat, bias):
    """Int4Linear with the device's kernel vs x @ W^T in fp32, W dequantized from the same codes and
    the bf16-rounded scales and zeros the kernel holds; bound: bf16 rounding of weights and output."""
    from edge_rt.loading.quants import int8_as_int4
    from edge_rt.loading.weights import int4_kernel_for
    from edge_rt.models.linear import Int4Linear, dequantize_int4

    g = torch.Generator().manual_seed(N + K)
    if repeat == 2:  # Q8_0 weights: int8 codes as two 4-bit halves over the input repeated twice
        q8 = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
        d = torch.rand(N, K // 32, generator=g) * 0.02 + 1e-3
        q, scale, zero = int8_as_int4(q8, d)
    else:
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        scale = torch.rand(N, K // 32, generator=g) * 0.05 + 0.01
        zero = torch.randn(N, K // 32, generator=g) * 0.1
    b = torch.randn(N, generator=g) if bias else None
    kernel, tiles = int4_kernel_for(DEV.torch_device, HALF, q.shape[1])
    if ON_CUDA and HALF == torch.bfloat16 and torch.cuda.get_device_capability(DEV.index) >= (8, 0):
        assert kernel == "cuda"
    elif DEV.kind == "cpu":
        assert kernel in ("cpu", "native", "native_bf16")
    lin = Int4Linear(q, scale, zero, 32, b, HALF, DEV.torch_device, input_repeat=repeat, kernel=kernel,
                     inner_k_tiles=tiles)
    s_r, z_r = scale.to(HALF).float(), zero.to(HALF).float()
    w = dequantize_int4(q, s_r, z_r, 32)  # [N, K * repeat] fp32
    mag = ((q.float() - 8) * s_r.repeat_interleave(32, 1)).abs() + z_r.repeat_interleave(32, 1).abs()
    for M in (1, 5, 64):
        x = torch.randn(M, K, generator=g).to(HALF)
        xr = torch.cat([x.float()] * repeat, dim=-1)
        want = xr @ w.T + (0 if b is None else b.to(HALF).float())
        got = lin(x.to(DEV.torch_device)).float().cpu()
        assert got.shape == (M, N) and got.dtype == torch.float32
        bound = 2.0**-7 * (xr.abs() @ mag.T) + 2.0**-6 * want.abs() + 1e-4
        bad = (got - want).abs() > bound
        assert not bad.any(), f"kernel {kernel}: {int(bad.sum())} of {bad.numel()} outputs off, max err " \
                              f"{float((got - want).abs().max()):.4g}"


@pytest.mark.parametrize("qtype,dtype", [("Q4_0", HALF), ("Q4_1", HALF), ("Q8_0", HALF), ("Q4_0", torch.float16)],
                         ids=str)
def test_quantized_model_on_device_matches_dequantized_reference(ggufs, reference, qtype, dtype):
    """The file's 4-/8-bit codes kept packed on the device vs the file dequantized to fp32 on CPU."""
    from edge_rt.models.linear import Int4Linear

    llm = _load(ggufs[qtype], dtype=str(dtype).removeprefix("torch."))
    net = llm.backend.model
    lins = [m for b in net.layers for m in b.modules() if isinstance(m, (Int4Linear, torch.nn.Linear))]
    assert len(lins) == 4 * len(net.layers) and all(isinstance(m, Int4Linear) for m in lins)
    # the tied head: packed from the Q8_0 embedding; a Q4 embedding is dequantized and shared
    assert isinstance(net.lm_head, Int4Linear) == (qtype == "Q8_0")
    lins += [net.lm_head] if qtype == "Q8_0" else []
    kernels = {m.kernel for m in lins}
    want_kernel = "cpu" if DEV.kind == "cpu" else (
        "cuda" if ON_CUDA and dtype == torch.bfloat16 and torch.cuda.get_device_capability(DEV.index) >= (8, 0)
        else "dense")
    assert kernels == {want_kernel}
    REPORT.setdefault("int4_kernels", {})[f"{qtype}/{dtype}"] = sorted(kernels)
    ref = reference[qtype]
    ids = ref.encode(PROMPT)
    follow = ref.generate(ids, max_tokens=8, ignore_eos=True).token_ids
    want = _steps(ref, ids, follow)
    got = _steps(llm, ids, follow)
    err = float((got - want).abs().max() / want.abs().max())
    REPORT.setdefault("int4_logit_rel_err", {})[f"{qtype}/{dtype}"] = err
    assert err <= LOGIT_TOL[dtype], f"{qtype} {dtype}: max logit error {err:.4g} of the logit scale"
    out = llm.generate(ids, max_tokens=16, ignore_eos=True).token_ids
    assert_same_greedy(out, ref.generate(ids, max_tokens=16, ignore_eos=True).token_ids, ids, ref,
                       LOGIT_TOL[dtype] * float(want.abs().max()))


@pytest.mark.parametrize("qtype,dtype", [
    ("Q4_0", HALF), ("Q8_0", HALF), ("Q4_0", torch.float16), ("Q8_0", torch.float16),  # CUDA fp16: dense fallback
], ids=str)
def test_loaded_weight_bytes_match_the_estimate(ggufs, qtype, dtype):
    """info()'s weights_bytes (what budgets are checked against) equals the bytes the loaded model holds."""
    from offload.bitstack_load import tensor_bytes

    llm = _load(ggufs[qtype], dtype=str(dtype).removeprefix("torch."))
    net = llm.backend.model
    held = tensor_bytes(net) - net.rope.numel() * net.rope.element_size()
    assert held == llm.info()["memory"]["weights_bytes"]


# --- offload stores: streamed == resident, Endor == pruned dense ------------------------------------


STORE_LAYERS = 8  # enough that streaming two layers' buffers costs less than holding them all


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Weight stores of tiny models (magnitude pruning: no calibration text needed).

    dense: llama layers, bf16, unpruned; endor / pruned / int8: qwen2 layers (biases), half pruned,
    tile_rows 16: Endor with native values, the same weights as a dense store, int8 values.
    """
    from offload.prune import compress_model

    d = tmp_path_factory.mktemp("stores")
    llama = write_tiny_gguf(d / "l.gguf", "tiny", qtype="F32", seed=5, num_hidden_layers=STORE_LAYERS)
    qwen = write_tiny_gguf(d / "q.gguf", "tiny-qwen2", qtype="F16", seed=3, num_hidden_layers=STORE_LAYERS)
    kw = dict(method="magnitude", tile_rows=16)
    return {
        "dense": compress_model(llama, d / "dense.ews", sparsity=0.0, fmt="dense", dtype="bfloat16"),
        "endor": compress_model(qwen, d / "endor.ews", sparsity=0.5, fmt="endor", **kw),
        "pruned": compress_model(qwen, d / "pruned.ews", sparsity=0.5, fmt="dense", **kw),
        "int8": compress_model(qwen, d / "int8.ews", sparsity=0.5, fmt="endor", values="int8", **kw),
    }


def _store_run(llm, prompt=PROMPT):
    """Prefill logits, three decode steps, and 12 greedy tokens."""
    ids = llm.encode(prompt)
    logits = _steps(llm, ids, [5, 17, 99])
    return logits, llm.generate(prompt, max_tokens=12, ignore_eos=True).token_ids


def _layer_bytes(llm) -> int:
    from offload.loader import model_layout

    store = llm.source.store
    lay = model_layout(store, llm.args, llm.dtype, llm.backend.caches[0].dtype, DEV.kind)
    return max(lw.stored_bytes for lw in lay.layers)


def _budgets(path, resident) -> dict:
    """Budgets below the resident size, from the planner's own figures: everything streamed (its
    minimum), room for one layer more, and the minimum plus a host tier (pinned on CUDA) of two layers."""
    low, layer = resident.plan.minimum_budget, _layer_bytes(resident)
    assert low + layer < resident.plan.device_bytes, "the tiny store is too small to stream"
    streaming = _load(path, budget=low).plan
    staging = streaming.slots * streaming.slot_bytes if DEV.kind != "cpu" else 0  # pinned staging comes first
    return {"stream": dict(budget=low), "one_more_layer": dict(budget=low + layer),
            "host_tier": dict(budget=low, cpu_budget=staging + 2 * layer)}


@pytest.mark.parametrize("kind", ["dense", "endor", "int8"])
def test_streamed_store_is_bit_identical_to_resident(stores, kind):
    resident = _load(stores[kind])
    assert resident.plan.streamed == () and resident.plan.host == ()
    want = _store_run(resident)
    total = resident.plan.device_bytes
    for name, kw in _budgets(stores[kind], resident).items():
        llm = _load(stores[kind], **kw)
        plan = llm.plan
        assert plan.streamed or plan.host, name
        # on a CPU the host tier is the same RAM: the promise is budget + cpu_budget there
        same_ram = kw.get("cpu_budget", 0) if DEV.kind == "cpu" else 0
        assert plan.device_bytes <= kw["budget"] + same_ram and kw["budget"] < total
        # pinned staging buffers for streamed layers live in host RAM too: with a CPU budget they
        # are counted in it; without one only they may be there (no host tier)
        if DEV.kind != "cpu" and "cpu_budget" in kw:
            assert plan.host_bytes <= kw["cpu_budget"]
        elif DEV.kind != "cpu":
            assert plan.host == (), plan
        if name == "host_tier":
            assert plan.host, plan
        if name == "one_more_layer":
            assert plan.resident, plan
        got = _store_run(llm)
        assert torch.equal(got[0], want[0]), f"{kind} {name}: logits differ from the resident run"
        assert got[1] == want[1]
        s = llm.backend.model.feed.streamer
        assert s is not None and s.stats.layers_read > 0


def test_endor_store_equals_its_pruned_dense_store_on_device(stores):
    runs = {k: _store_run(_load(stores[k])) for k in ("pruned", "endor")}
    assert torch.equal(runs["endor"][0], runs["pruned"][0])
    assert runs["endor"][1] == runs["pruned"][1]


@pytest.mark.parametrize("kind", ["endor", "int8"])
def test_endor_decode_on_device_equals_cpu_decode_bit_for_bit(stores, kind):
    from offload import endor
    from offload.loader import target_records, tensor_table
    from offload.store import Store

    st = Store.open(stores[kind])
    n = 0
    for target, spec in tensor_table(st).items():
        if spec["format"] != "endor":
            continue
        parts = {k: st.read_tensor(r.name) for k, r in target_records(st, target, spec).items()}
        cpu = endor.decode(parts, spec)
        dev_parts = {k: v.to(DEV.torch_device) for k, v in parts.items()}
        dtype = getattr(torch, spec["dtype"])
        scratch = torch.full((spec["shape"][0] * spec["shape"][1] + 7,), float("nan"), dtype=dtype,
                             device=DEV.torch_device)  # reused scratch with garbage in it, as the loader's
        for got in (endor.decode(dev_parts, spec), endor.decode(dev_parts, spec, scratch)):
            assert got.device == DEV.torch_device and got.dtype == cpu.dtype
            assert torch.equal(got.cpu().view(endor.BITS[dtype]), cpu.view(endor.BITS[dtype])), target
        n += 1
    st.close()
    assert n == 4 * STORE_LAYERS  # 4 linears a layer


@cuda_only
def test_cuda_host_tier_is_pinned_and_copied_asynchronously(stores):
    """The host tier and the disk staging buffers are pinned; copies run on a side stream; and the
    memory the model holds after load stays within the plan's device bytes."""
    import gc

    resident = _load(stores["dense"])
    kw = _budgets(stores["dense"], resident)["host_tier"]
    del resident
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(DEV.index)
    llm = _load(stores["dense"], **kw)
    held = torch.cuda.memory_allocated(DEV.index) - base
    s = llm.backend.model.feed.streamer
    assert s.cuda and s.host and s._copy_stream != torch.cuda.current_stream(DEV.index)
    assert all(t.is_pinned() for layer in s.host.values() for t in layer.values())
    assert all(t.is_pinned() for slot in s._host_bufs for t in slot.values())
    assert all(t.device == DEV.torch_device for slot in s._dev_bufs for t in slot.values())
    assert held <= llm.plan.device_bytes, (held, llm.plan.to_dict())
    torch.cuda.reset_peak_memory_stats(DEV.index)
    llm.generate(PROMPT, max_tokens=8, ignore_eos=True)
    # the peak includes cuBLAS workspaces and temporaries the plan does not count: reported only
    pinned = sum(t.untyped_storage().nbytes() for layer in s.host.values() for t in layer.values()) + \
        sum(t.untyped_storage().nbytes() for slot in s._host_bufs for t in slot.values())
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})()  # torch's pinned allocator rounds up
    REPORT["host_tier"] = {"plan_device_bytes": llm.plan.device_bytes, "held_after_load": held,
                           "peak_generate": torch.cuda.max_memory_allocated(DEV.index) - base,
                           "plan_host_bytes": llm.plan.host_bytes, "pinned_tensor_bytes": pinned,
                           "host_allocator": {k: v for k, v in stats.items() if "bytes" in k},
                           "layers_read": s.stats.layers_read, "hidden_fraction": s.stats.hidden_fraction}


# --- BitStack ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bitstack_path(tmp_path_factory):
    """A BitStack store of a tiny model, calibrated on the fixture corpus (not the pydoc topics)."""
    from offload import bitstack_compress

    d = tmp_path_factory.mktemp("bitstack")
    gguf = write_tiny_gguf(d / "tiny.gguf", "tiny", qtype="F32", seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bitstack_compress, "calibration_split", lambda: (_CORPUS * 4, _CORPUS))
        bitstack_compress.compress(gguf, d / "tiny.bitstack", iters=6, rank=4, calib_windows=2, calib_len=32)
    return d / "tiny.bitstack"


def _bs(path, budget=None, keep=True):
    return _load(path, n_ctx=64, budget=budget, reconstruct="keep" if keep else "rebuild")


def test_bitstack_loads_on_device_at_two_budgets(bitstack_path):
    full = _bs(bitstack_path)
    st = full.bitstack
    lo, hi = st.min_bytes, st.full_bytes
    counts = []
    for budget in (lo + (hi - lo) // 3, lo + 2 * (hi - lo) // 3):
        llm = _bs(bitstack_path, budget)
        s = llm.bitstack
        assert s.footprint().total <= budget
        got = s.measured_bytes()
        assert got["blocks"] == s.footprint().blocks
        blocks = [t for m in s.modules.values() for p in m.parts for b in p for t in (b.signs, b.u, b.v)]
        assert blocks and {t.device for t in blocks} == {DEV.torch_device}
        assert {m.weight_cache.device for m in s.modules.values()} == {DEV.torch_device}
        counts.append(sum(s.counts()))
        assert llm.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids
    assert st.min_blocks < counts[0] < counts[1] < len(st.order)


@pytest.mark.parametrize("grow", [True, False], ids=["grow", "shrink"])
def test_bitstack_resize_in_an_open_session_equals_a_fresh_load(bitstack_path, grow):
    probe = _bs(bitstack_path)
    lo, hi = probe.bitstack.min_bytes, probe.bitstack.full_bytes
    a, b = lo + (hi - lo) // 3, lo + 2 * (hi - lo) // 3
    start, end = (a, b) if grow else (b, a)
    llm = _bs(bitstack_path, start)
    chat = llm.session(system="You are terse.")
    chat.send("Name a colour.", max_tokens=6, ignore_eos=True)
    history = [dict(m) for m in chat.messages]
    info = llm.resize(end)
    assert info["changed_blocks"] > 0 and info["rebuilt_parts"] == 0
    reply = chat.send("And an animal?", max_tokens=8, ignore_eos=True)
    after = list(llm.engine.tokens)
    fresh = _bs(bitstack_path, end)
    assert fresh.bitstack.counts() == llm.bitstack.counts()
    for name, mod in llm.bitstack.modules.items():  # kept weights bit for bit
        assert torch.equal(mod.weight_cache, fresh.bitstack.modules[name].weight_cache), name
    other = fresh.session()
    other.messages = history
    assert other.send("And an animal?", max_tokens=8, ignore_eos=True) == reply
    assert list(fresh.engine.tokens) == after


def test_bitstack_keep_and_rebuild_give_the_same_bits_on_device(bitstack_path):
    keep = _bs(bitstack_path, keep=True)
    keep.resize((keep.bitstack.min_bytes + keep.bitstack.full_bytes) // 2)
    rebuild = _bs(bitstack_path, keep=False)
    rebuild.bitstack.set_blocks(keep.bitstack.loaded)  # the same blocks, held without kept weights
    assert rebuild.bitstack.counts() == keep.bitstack.counts()
    assert all(m.weight_cache is None for m in rebuild.bitstack.modules.values())
    ids = keep.encode(PROMPT)
    assert torch.equal(keep.engine.score(ids), rebuild.engine.score(ids))


# --- speculative decoding -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec_llm(ggufs):
    return _load(ggufs["Q8_0"], n_ctx=256)


def _spec_prompts():
    import random

    rng = random.Random(0)
    out = []
    for _ in range(4):
        ids = [rng.randrange(3, 512) for _ in range(rng.randrange(4, 30))]
        out.append(ids + ids[: len(ids) // 2])  # a repeat, so n-gram lookups find matches
    return out


def test_verify_rows_and_the_exact_verify_flag(spec_llm):
    """Measured on this device: are verify() rows bit-identical to one-token forwards (chunks of
    2..16 tokens at two positions)? Where the backend claims so (exact_verify) they must be; the
    measurement is reported either way (on CUDA it says whether speculation could be enabled)."""
    llm = spec_llm
    be = llm.backend
    ids = list(range(5, 60))
    worst, exact = 0.0, True
    for start in (3, 20):
        for T in (2, 5, 12, 16):
            llm.reset()
            be.forward(ids[:start])
            singles = torch.cat([be.forward([t]) for t in ids[start : start + T]])
            be.trim(T)
            rows = be.verify(ids[start : start + T])
            exact &= torch.equal(rows, singles)
            worst = max(worst, float((rows - singles).abs().max() / singles.abs().max()))
    llm.reset()
    REPORT["verify_batch_invariant"] = {f"int4_{HALF_NAME}_measured": exact, "exact_verify_claimed": be.exact_verify,
                                        "max_rel_diff": worst}
    if be.exact_verify:
        assert exact
    assert worst <= LOGIT_TOL[HALF]


@pytest.mark.parametrize("n,k", [(960, 576), (3072, 576), (576, 1536), (49152, 1152)])
def test_int4_kernel_rows_are_batch_invariant(n, k):
    """The packed int4 kernel the device runs gives every row the same bits whatever the number of
    rows (what makes verify exact): SmolLM2's shapes (qkv, gate+up, down, the Q8_0 head's two halves)."""
    from edge_rt.loading.weights import int4_kernel_for
    from edge_rt.models.linear import Int4Linear

    kernel, tiles = int4_kernel_for(DEV.torch_device, HALF, k)
    if kernel == "dense":
        pytest.skip(f"no packed int4 kernel for {HALF} on {DEV.kind}")
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = torch.rand(n, k // 32, generator=g) * 0.02
    zero = torch.randn(n, k // 32, generator=g) * 0.01
    lin = Int4Linear(q, scale, zero, 32, None, HALF, DEV.torch_device, kernel=kernel, inner_k_tiles=tiles)
    x = torch.randn(16, k, generator=g).to(DEV.torch_device, HALF)
    with torch.inference_mode():
        singles = torch.cat([lin(x[i : i + 1]) for i in range(16)])
        for T in (2, 3, 4, 5, 8, 9, 16):
            assert torch.equal(lin(x[:T]), singles[:T]), f"{T} rows differ from one-row products"


def test_speculative_auto_equals_plain_greedy(spec_llm):
    llm = spec_llm
    for ids in _spec_prompts():
        llm.reset()  # both from an empty cache (see test_generate_stream_and_chat_agree_on_device)
        plain = llm.generate(ids, max_tokens=32, ignore_eos=True)
        llm.reset()
        auto = llm.generate(ids, max_tokens=32, ignore_eos=True, speculative="auto")
        assert auto.token_ids == plain.token_ids
        assert (auto.stats.speculative is None) == (not llm.backend.exact_verify)


@pytest.mark.parametrize("method", ["ngram", "reference", "draft", "layerskip"])
def test_explicit_speculation_is_lossless_or_refused(spec_llm, tmp_path, monkeypatch, method):
    """Exact-verify backends reproduce plain decoding token for token; others refuse in one line."""
    monkeypatch.setenv("EDGE_RT_HOME", str(tmp_path))  # no saved layer-skip set
    llm = spec_llm
    draft = write_tiny_gguf(tmp_path / "draft.gguf", qtype="Q4_0", seed=1, num_hidden_layers=1)
    opts = {"ngram": dict(speculative="ngram"), "draft": dict(speculative=f"draft:{draft}"),
            "layerskip": dict(speculative="layerskip")}.get(method)
    for ids in _spec_prompts()[:2]:
        llm.reset()
        plain = llm.generate(ids, max_tokens=24, ignore_eos=True)
        if method == "reference":
            opts = dict(speculative="reference", references=[[300, 301] + plain.token_ids[4:20]])
        if not llm.backend.exact_verify:
            with pytest.raises(InvalidOptionError, match="bit-exact") as e:
                llm.generate(ids, max_tokens=24, ignore_eos=True, **opts)
            assert "\n" not in str(e.value)
            continue
        if method == "layerskip":
            with pytest.raises(InvalidOptionError, match="layerskip-search"):
                llm.generate(ids, max_tokens=24, ignore_eos=True, **opts)
            continue
        llm.reset()
        fast = llm.generate(ids, max_tokens=24, ignore_eos=True, **opts)
        assert fast.token_ids == plain.token_ids
        assert fast.stats.speculative.method == method


# --- bad device input -----------------------------------------------------------------------------


def test_missing_cuda_index_is_one_line_naming_the_count(ggufs):
    from typer.testing import CliRunner

    from edge_rt.cli import app

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bad = f"cuda:{max(n, 7)}"
    with pytest.raises(DeviceError) as e:
        edge_rt.load(str(ggufs["Q8_0"]), device=bad)
    msg = str(e.value)
    assert "\n" not in msg
    if n:
        assert msg.startswith(f"{bad} requested but only {n} CUDA device(s) visible")
        assert f"cuda:0..cuda:{n - 1}" in msg
    else:
        assert msg.startswith("CUDA device requested but torch.cuda is not available here (")
    r = CliRunner().invoke(app, ["run", "hi", "-m", str(ggufs["Q8_0"]), "--device", bad, "-n", "2"])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="MPS device requested"):
            edge_rt.load(str(ggufs["Q8_0"]), device="mps")
