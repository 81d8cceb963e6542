"""Codecs: edge-rt's decoders against gguf.quants (llama.cpp's reference), bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from edge_rt.loading import quants
from edge_rt.models.linear import Int4Linear, dequantize_int4


def _quantized(qtype, shape=(48, 256), seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0, size=(shape[0], 1))).astype(np.float32)
    if qtype == QT.F32:
        return w.view(np.uint8).reshape(shape[0], -1)
    if qtype == QT.F16:
        return w.astype(np.float16).view(np.uint8).reshape(shape[0], -1)
    return gq.quantize(w, qtype)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_decoders_bit_exact_against_gguf_quants(qtype):
    shape = (48, 256)
    raw = _quantized(qtype, shape)
    ref = gq.dequantize(raw, qtype).reshape(shape) if qtype not in (QT.F32, QT.F16) else (
        raw.view(np.float32 if qtype == QT.F32 else np.float16).astype(np.float32).reshape(shape))
    ours = quants.dequantize(raw, qtype, shape).numpy()
    assert ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K])
def test_k_quants_decode_through_reference(qtype):
    shape = (4, 512)
    rng = np.random.default_rng(1)
    # random K-quant blocks: any byte pattern is a valid block apart from NaN/inf scales
    block_bytes = gq.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // 256 * block_bytes), dtype=np.uint8)
    ref = gq.dequantize(raw, qtype).reshape(shape)
    ours = quants.dequantize(raw, qtype, shape).numpy()
    assert np.array_equal(ours, ref, equal_nan=True)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1])
def test_int4_split_reconstructs_exactly(qtype):
    shape = (32, 128)
    raw = _quantized(qtype, shape, seed=2)
    q, scale, zero = quants.split_int4(raw, qtype, shape)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    ref = torch.from_numpy(gq.dequantize(raw, qtype).reshape(shape))
    # (q - 8) * d + (m + 8d) == d*q + m only up to fp32 rounding; the codes and scales are exact
    assert torch.allclose(dequantize_int4(q, scale, zero, 32), ref, rtol=0, atol=1e-5 * ref.abs().max())


def test_int8_as_two_int4_halves_is_exact():
    shape = (16, 64)
    raw = _quantized(QT.Q8_0, shape, seed=3)
    q8, d = quants.split_q8_0(raw, shape)
    codes, scale, zero = quants.int8_as_int4(q8, d)
    assert codes.shape == (16, 128) and int(codes.max()) <= 15
    w2 = dequantize_int4(codes, scale, zero, 32)  # [N, 2K]: the input is repeated twice
    recon = w2[:, :64] + w2[:, 64:]
    ref = torch.from_numpy(gq.dequantize(raw, QT.Q8_0).reshape(shape))
    assert torch.equal(recon, ref)


@pytest.mark.parametrize("kernel", ["cpu", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_out", [64, 40])  # 40: not a multiple of 16, padded inside
def test_int4_linear_matches_dequantized_matmul(dtype, n_out, kernel):
    torch.manual_seed(0)
    K = 96
    q = torch.randint(0, 16, (n_out, K), dtype=torch.uint8)
    scale = torch.rand(n_out, K // 32) * 0.05
    zero = torch.randn(n_out, K // 32) * 0.05
    lin = Int4Linear(q, scale, zero, 32, None, dtype, torch.device("cpu"), kernel=kernel)
    assert hasattr(lin, "packed") == (kernel == "cpu")
    x = torch.randn(3, 5, K).to(dtype)
    w = dequantize_int4(q, scale.to(dtype).float(), zero.to(dtype).float(), 32)
    ref = x.float() @ w.t()
    out = lin(x)
    assert out.shape == (3, 5, n_out) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.float(), ref, atol=tol * ref.abs().max(), rtol=0)


def test_int4_kernel_choice_per_device(monkeypatch):
    from edge_rt.loading.weights import int4_kernel_for

    assert int4_kernel_for(torch.device("cpu"), torch.bfloat16, 576)[0] in ("cpu", "native", "native_bf16",
                                                                          "native_vnni")
    assert int4_kernel_for(torch.device("mps"), torch.float16, 576)[0] == "dense"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    cuda = torch.device("cuda", 0)
    assert int4_kernel_for(cuda, torch.bfloat16, 1536) == ("cuda", 8)  # 1536 = 128 * 12
    assert int4_kernel_for(cuda, torch.bfloat16, 576) == ("cuda", 4)  # 576 = 64 * 9
    assert int4_kernel_for(cuda, torch.bfloat16, 96) == ("cuda", 2)
    assert int4_kernel_for(cuda, torch.float16, 1536)[0] == "dense"  # tinygemm takes bf16 only
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert int4_kernel_for(cuda, torch.bfloat16, 1536)[0] == "dense"


def _native_int4_or_skip(variant="native"):
    from edge_rt.models import native_kernels
    from edge_rt.native import enabled, has_avx512_bf16, has_avx512_vnni, simd_level

    if not enabled() or simd_level() != "avx2":
        pytest.skip("the native int4 kernel needs AVX2 + FMA and EDGE_RT_NATIVE unset")
    if variant == "native_bf16" and not has_avx512_bf16():
        pytest.skip("the native_bf16 int4 kernel needs AVX-512 BF16")
    if variant == "native_vnni" and not has_avx512_vnni():
        pytest.skip("the native_vnni int4 kernel needs AVX-512 VNNI")
    assert native_kernels.int4_available(variant), "the native int4 kernel failed to build"


def quantize_rows_q8(x: torch.Tensor) -> torch.Tensor:
    """The native_vnni kernel's view of x [..., K]: each 32-wide group scaled to -127..127 by its
    largest magnitude, rounded half to even, and scaled back (llama.cpp's activation
    quantization), in fp32."""
    g = x.float().unflatten(-1, (-1, 32))
    amax = g.abs().amax(-1, keepdim=True)
    # tensor / tensor: IEEE division, as the kernel divides (PyTorch computes scalar / tensor through
    # a reciprocal, one ulp off at times, which moves a product onto a rounding tie)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / 127.0)).flatten(-2)


@pytest.mark.parametrize("variant", ["native", "native_bf16", "native_vnni"])
@pytest.mark.parametrize("n_out,K,repeat", [(64, 96, 1), (40, 64, 1), (77, 160, 1), (48, 64, 2), (1024, 576, 1)])
def test_native_int4_matches_dequantized_matmul_and_is_row_invariant(n_out, K, repeat, variant):
    """The native kernels against the fp32 dequantized product (for native_vnni, of x as it
    quantizes it to int8), and every row of a T-row call bit-identical to the same row alone
    (what an exact speculative verify chunk relies on)."""
    _native_int4_or_skip(variant)
    g = torch.Generator().manual_seed(n_out + K)
    q = torch.randint(0, 16, (n_out, K * repeat), generator=g, dtype=torch.uint8)
    scale = torch.rand(n_out, K * repeat // 32, generator=g) * 0.05
    zero = torch.randn(n_out, K * repeat // 32, generator=g) * 0.05
    lin = Int4Linear(q, scale, zero, 32, None, torch.bfloat16, torch.device("cpu"), input_repeat=repeat,
                     kernel=variant)
    w = dequantize_int4(q, scale.bfloat16().float(), zero.bfloat16().float(), 32)
    w = sum(w[:, i * K:(i + 1) * K] for i in range(repeat))
    x = torch.randn(1, 11, K, generator=g).bfloat16()
    xr = quantize_rows_q8(x) if variant == "native_vnni" else x.float()
    ref = xr @ w.t()
    out = lin(x)
    assert out.shape == (1, 11, n_out) and out.dtype == torch.bfloat16
    # bf16 output: one rounding of the fp32 sum (8 bits), plus fp32 summation noise
    assert torch.allclose(out.float(), ref, atol=1e-5 * ref.abs().max(), rtol=2 ** -8)
    if variant == "native_vnni":  # and the int8 activations stay close to the bf16 ones
        exact = x.float() @ w.t()
        assert ((out.float() - exact).norm() / exact.norm()) < 0.02
    for T in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11):
        rows = lin(x[:, :T])
        assert torch.equal(rows, torch.cat([lin(x[:, t:t + 1]) for t in range(T)], dim=1)), T
        assert torch.equal(rows, out[:, :T])


def test_native_int4_rejects_a_width_it_cannot_take():
    _native_int4_or_skip()
    from edge_rt.models import native_kernels

    codes, sz = torch.zeros(1, 48, 8, dtype=torch.uint8), torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 32"):
        native_kernels.int4_matmul(torch.zeros(1, 48, dtype=torch.bfloat16), codes, sz, 16)
    with pytest.raises(ValueError, match="native int4 kernel takes"):
        Int4Linear(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2), torch.zeros(16, 2), 32, None,
                   torch.float32, torch.device("cpu"), kernel="native")


def test_int4_kernel_policy_follows_the_cpu(monkeypatch):
    """native_vnni where the CPU has AVX-512 VNNI, else native_bf16 where it has AVX-512 BF16; else
    native where PyTorch's kernels run at AVX2 level, PyTorch's where they run AVX-512;
    EDGE_RT_INT4_KERNEL overrides; a bad value is a one-line error. GGUF Q8_0 stays int8
    (Int8Linear) on the same AVX-512 kernel."""
    import edge_rt.native as native
    from edge_rt.loading.weights import int4_kernel_for, int8_kernel_for
    from edge_rt.models import native_kernels

    monkeypatch.delenv("EDGE_RT_INT4_KERNEL", raising=False)  # the automatic choice first
    cpu = torch.device("cpu")
    has = native_kernels.int4_available()
    native_or_cpu = "native" if has else "cpu"
    monkeypatch.setattr(native, "has_avx512_bf16", lambda: has)
    monkeypatch.setattr(native, "has_avx512_vnni", lambda: has)
    assert int4_kernel_for(cpu, torch.bfloat16, 576) == ("native_vnni" if has else "cpu", 8)
    assert int8_kernel_for("native_vnni") == "native_vnni"
    assert int8_kernel_for("native_bf16") == ("native_bf16" if has else None)
    assert int8_kernel_for("native") is None and int8_kernel_for("cpu") is None
    monkeypatch.setenv("EDGE_RT_INT4_KERNEL", "native_bf16")
    assert int4_kernel_for(cpu, torch.bfloat16, 576) == ("native_bf16" if has else "cpu", 8)
    monkeypatch.setenv("EDGE_RT_INT4_KERNEL", "native")
    assert int4_kernel_for(cpu, torch.bfloat16, 576) == (native_or_cpu, 8)
    monkeypatch.delenv("EDGE_RT_INT4_KERNEL")
    monkeypatch.setattr(native, "has_avx512_vnni", lambda: False)
    assert int4_kernel_for(cpu, torch.bfloat16, 576) == ("native_bf16" if has else "cpu", 8)
    monkeypatch.setattr(native, "has_avx512_bf16", lambda: False)
    assert int8_kernel_for("native_bf16") is None  # no AVX-512 BF16: Q8_0 runs as two 4-bit halves
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert int4_kernel_for(cpu, torch.bfloat16, 576) == (native_or_cpu, 8)
    assert int4_kernel_for(cpu, torch.float32, 576) == ("cpu", 8)  # the native kernels take bf16 only
    assert int4_kernel_for(cpu, torch.bfloat16, 48) == ("cpu", 8)  # nor widths off 32
    for name in ("native_vnni", "native_bf16"):  # not on this CPU: the next one down
        monkeypatch.setenv("EDGE_RT_INT4_KERNEL", name)
        assert int4_kernel_for(cpu, torch.bfloat16, 576) == (native_or_cpu, 8)
    monkeypatch.delenv("EDGE_RT_INT4_KERNEL")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert int4_kernel_for(cpu, torch.bfloat16, 576) == ("cpu", 8)
    monkeypatch.setenv("EDGE_RT_INT4_KERNEL", "native")
    assert int4_kernel_for(cpu, torch.bfloat16, 576) == (native_or_cpu, 8)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("EDGE_RT_INT4_KERNEL", "pytorch")
    assert int4_kernel_for(cpu, torch.bfloat16, 576) == ("cpu", 8)
    monkeypatch.setenv("EDGE_RT_INT4_KERNEL", "fast")
    with pytest.raises(ValueError, match="EDGE_RT_INT4_KERNEL='fast'"):
        int4_kernel_for(cpu, torch.bfloat16, 576)


@pytest.mark.parametrize("kernel", ["native_bf16", "native_vnni"])
@pytest.mark.parametrize("n_out,K", [(40, 64), (77, 160), (1024, 576)])
def test_int8_linear_matches_q8_0_dequantized_and_is_row_invariant(n_out, K, kernel):
    """Int8Linear (GGUF Q8_0 on the AVX-512 BF16 or VNNI kernel) against d * q in fp32 (for VNNI,
    with x rounded to int8 per group as the kernel rounds it), row-invariant."""
    _native_int4_or_skip(kernel)
    from edge_rt.models.linear import Int8Linear

    g = torch.Generator().manual_seed(n_out)
    q = torch.randint(-128, 128, (n_out, K), generator=g).to(torch.int8)
    d = torch.rand(n_out, K // 32, generator=g) * 0.01
    lin = Int8Linear(q, d, None, torch.bfloat16, torch.device("cpu"), kernel=kernel)
    w = q.float() * d.bfloat16().float().repeat_interleave(32, dim=1)
    x = torch.randn(2, 6, K, generator=g).bfloat16()
    ref = (quantize_rows_q8(x) if kernel == "native_vnni" else x.float()) @ w.t()
    out = lin(x)
    assert out.shape == (2, 6, n_out) and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=1e-5 * ref.abs().max(), rtol=2 ** -8)
    exact = x.float() @ w.t()
    assert ((out.float() - exact).norm() / exact.norm()) < 0.02
    rows = x.reshape(12, K)
    for T in (1, 2, 3, 5, 8, 9, 12):
        assert torch.equal(lin(rows[:T]), torch.cat([lin(rows[t:t + 1]) for t in range(T)])), T
    with pytest.raises(ValueError, match="32-wide groups"):
        Int8Linear(q[:, :48], d[:, :1], None, torch.bfloat16, torch.device("cpu"), kernel=kernel)
    with pytest.raises(ValueError, match="int8 kernel must be"):
        Int8Linear(q, d, None, torch.bfloat16, torch.device("cpu"), kernel="pytorch")
