"""The model against an independent reference, and the loaders against each other.

A tiny random model is written as a Hugging Face folder (safetensors + config.json) and as a GGUF
converted the way llama.cpp's convert_hf_to_gguf.py does it (Q/K rows permuted for llama). Both
must load to the same logits, and those logits must match a naive per-position reference
implementation written from the Hugging Face modeling code's equations.
"""

import json
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from safetensors.torch import save_file

from edge_rt.kv.cache import make_caches
from edge_rt.loading.gguf import open_gguf
from edge_rt.loading.hf import open_hf_folder
from edge_rt.loading.weights import build_model
from edge_rt.models.llama import PRESETS, ModelArgs, preset

CPU = torch.device("cpu")


def random_hf_state(args: ModelArgs, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    d, f = args.hidden_size, args.intermediate_size
    sd = {"model.embed_tokens.weight": r(args.vocab_size, d), "model.norm.weight": 1 + r(d)}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(d)
        sd[p + "post_attention_layernorm.weight"] = 1 + r(d)
        sd[p + "self_attn.q_proj.weight"] = r(args.q_dim, d)
        sd[p + "self_attn.k_proj.weight"] = r(args.kv_dim, d)
        sd[p + "self_attn.v_proj.weight"] = r(args.kv_dim, d)
        sd[p + "self_attn.o_proj.weight"] = r(d, args.q_dim)
        if args.attention_bias:
            sd[p + "self_attn.q_proj.bias"] = r(args.q_dim)
            sd[p + "self_attn.k_proj.bias"] = r(args.kv_dim)
            sd[p + "self_attn.v_proj.bias"] = r(args.kv_dim)
        sd[p + "mlp.gate_proj.weight"] = r(f, d)
        sd[p + "mlp.up_proj.weight"] = r(f, d)
        sd[p + "mlp.down_proj.weight"] = r(d, f)
    if not args.tie_word_embeddings:
        sd["lm_head.weight"] = r(args.vocab_size, d)
    return sd


def reference_logits(args: ModelArgs, sd: dict, tokens: list[int]) -> torch.Tensor:
    """Naive fp64 forward, one head and one position at a time (HF LlamaModel equations)."""
    sd = {k: v.double() for k, v in sd.items()}
    hd, H, Hkv = args.head_dim, args.num_attention_heads, args.num_key_value_heads

    def rms(x, w):
        return x / torch.sqrt((x * x).mean() + args.rms_norm_eps) * w

    def rope(v, pos):  # HF rotate_half convention on one head vector [hd]
        out = torch.empty_like(v)
        for i in range(hd // 2):
            theta = pos / (args.rope_theta ** (2 * i / hd))
            a, b = v[i], v[i + hd // 2]
            out[i] = a * math.cos(theta) - b * math.sin(theta)
            out[i + hd // 2] = b * math.cos(theta) + a * math.sin(theta)
        return out

    def lin(name, x):
        y = sd[name + ".weight"] @ x
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    xs = [sd["model.embed_tokens.weight"][t] for t in tokens]
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        ks, vs, new = [], [], []
        for pos, x in enumerate(xs):
            h = rms(x, sd[p + "input_layernorm.weight"])
            q = lin(p + "self_attn.q_proj", h).view(H, hd)
            k = lin(p + "self_attn.k_proj", h).view(Hkv, hd)
            v = lin(p + "self_attn.v_proj", h).view(Hkv, hd)
            ks.append(torch.stack([rope(k[j], pos) for j in range(Hkv)]))
            vs.append(v)
            heads = []
            for j in range(H):
                kvh = j // (H // Hkv)
                qj = rope(q[j], pos)
                scores = torch.stack([qj @ ks[t][kvh] for t in range(pos + 1)]) / math.sqrt(hd)
                w = torch.softmax(scores, 0)
                heads.append(sum(w[t] * vs[t][kvh] for t in range(pos + 1)))
            x = x + sd[p + "self_attn.o_proj.weight"] @ torch.cat(heads)
            h = rms(x, sd[p + "post_attention_layernorm.weight"])
            g = lin(p + "mlp.gate_proj", h)
            x = x + lin(p + "mlp.down_proj", torch.nn.functional.silu(g) * lin(p + "mlp.up_proj", h))
            new.append(x)
        xs = new
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return torch.stack([head @ rms(x, sd["model.norm.weight"]) for x in xs]).float()


def write_hf_folder(path, args: ModelArgs, sd):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in args.to_dict().items() if k != "extra" and v is not None}
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))


def permute_for_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What convert_hf_to_gguf.py does to llama Q/K rows (interleaved rope layout)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path, args: ModelArgs, sd, qtype=QT.F32):
    from gguf import quants as gq

    arch = args.model_type
    w = GGUFWriter(str(path), arch)
    w.add_block_count(args.num_hidden_layers)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)
    for name, t in sd.items():
        gname = name
        for hf, gg in HF_TO_GGUF.items():
            if name.startswith("model.layers."):
                i = name.split(".")[2]
                rest = name.split(".", 3)[3]
                if rest.startswith(hf):
                    gname = f"blk.{i}." + gg + rest[len(hf):]
                    break
            elif name == hf:
                gname = gg
                break
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            t = permute_for_gguf(t, args.num_attention_heads if ".attn_q." in gname else args.num_key_value_heads)
        arr = t.float().numpy()
        if qtype != QT.F32 and arr.ndim == 2 and "token_embd" not in gname:
            w.add_tensor(gname, gq.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_logits(model, tokens, chunks=None):
    a = model.args
    caches = make_caches(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, 64, torch.float32, CPU)
    chunks = chunks or [len(tokens)]
    out, pos = [], 0
    with torch.inference_mode():
        for n in chunks:
            out.append(model(torch.tensor([tokens[pos : pos + n]]), caches, pos)[0])
            pos += n
    return torch.cat(out)


@pytest.mark.parametrize("name,overrides", [("tiny", {}), ("tiny-qwen2", {}), ("tiny", {"attention_bias": True})])
def test_model_matches_naive_reference_and_loaders_agree(tmp_path, name, overrides):
    args = preset(name, **overrides)
    sd = random_hf_state(args, seed=1)
    tokens = [5, 17, 300, 2, 77, 77, 1, 511, 42, 9]
    ref = reference_logits(args, sd, tokens)

    write_hf_folder(tmp_path / "hf", args, sd)
    hf = open_hf_folder(tmp_path / "hf")
    m_hf = build_model(hf.args, hf.tensors, torch.float32, CPU, 64)
    hf_logits = run_logits(m_hf, tokens)
    assert torch.allclose(hf_logits, ref, atol=2e-4, rtol=0), (hf_logits - ref).abs().max()

    write_gguf(tmp_path / "m.gguf", args, sd)
    gg = open_gguf(tmp_path / "m.gguf")
    assert gg.args.num_key_value_heads == args.num_key_value_heads
    m_gg = build_model(gg.args, gg.tensors, torch.float32, CPU, 64)
    # GGUF (permuted Q/K for llama, un-permuted at load) gives the same numbers as the HF folder
    assert torch.equal(run_logits(m_gg, tokens), hf_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_chunks_equal_uncached(tmp_path, dtype):
    args = preset("tiny")
    sd = random_hf_state(args, seed=2)
    write_gguf(tmp_path / "m.gguf", args, sd, qtype=QT.Q4_1)
    gg = open_gguf(tmp_path / "m.gguf")
    model = build_model(gg.args, gg.tensors, dtype, CPU, 64)
    tokens = list(range(3, 40))
    full = run_logits(model, tokens)
    inc = run_logits(model, tokens, chunks=[20] + [1] * 5 + [4, 8])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(full, inc, atol=tol * full.abs().max(), rtol=0)
    assert torch.equal(full.argmax(-1), inc.argmax(-1))


def test_quantized_gguf_close_to_dense_reference(tmp_path):
    """Q4_1 weights kept packed (Int4Linear, bf16) vs the same weights dequantized to fp32."""
    args = preset("tiny")
    sd = random_hf_state(args, seed=3)
    write_gguf(tmp_path / "q.gguf", args, sd, qtype=QT.Q4_1)
    gg = open_gguf(tmp_path / "q.gguf")
    packed = build_model(gg.args, gg.tensors, torch.bfloat16, CPU, 64, quantized=True)
    dense = build_model(gg.args, gg.tensors, torch.float32, CPU, 64, quantized=False)
    assert type(packed.layers[0].attn.wqkv).__name__ == "Int4Linear"
    tokens = list(range(10, 30))
    a, b = run_logits(packed, tokens), run_logits(dense, tokens)
    # bf16 activations: 0.03 of the largest logit measured; native_vnni also rounds each 32-wide
    # group of activations to int8 (as llama.cpp does): 0.05 measured
    tol = 0.08 if packed.layers[0].attn.wqkv.kernel == "native_vnni" else 0.05
    assert (a - b).abs().max() < tol * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_estimate_matches_loaded_bytes(smollm2_path):
    from edge_rt.api import open_model
    from edge_rt.memory.estimate import weight_bytes

    src = open_model(smollm2_path)
    model = build_model(src.args, src.tensors, torch.bfloat16, CPU, 256)
    seen, loaded = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if n != "rope"]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            loaded += t.numel() * t.element_size()
    est = weight_bytes(src.tensors, src.args, torch.bfloat16, device=CPU)
    assert abs(est - loaded) <= 0.01 * loaded, (est, loaded)
    assert src.args.num_parameters() == pytest.approx(134.5e6, rel=0.01)


def test_estimate_follows_the_dense_int4_fallback(smollm2_path, monkeypatch):
    """Where no packed int4 kernel runs (MPS, CUDA fp16), Int4Linear holds a dequantized weight: the
    estimate for that device must count it (it once counted packed bytes, 3.5x too few)."""
    from edge_rt.api import open_model
    from edge_rt.loading import weights
    from edge_rt.memory import estimate

    src = open_model(smollm2_path)
    packed = estimate.weight_bytes(src.tensors, src.args, torch.bfloat16, device=CPU)
    monkeypatch.setattr(weights, "int4_kernel_for", lambda device, dtype, k: ("dense", 8))
    monkeypatch.setattr(estimate, "int4_kernel_for", lambda device, dtype, k: ("dense", 8))
    model = build_model(src.args, src.tensors, torch.bfloat16, CPU, 256)
    loaded = sum(t.numel() * t.element_size() for n, t in
                 list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n != "rope"])
    est = estimate.weight_bytes(src.tensors, src.args, torch.bfloat16, device=CPU)
    assert est == loaded and est > 2 * packed


def test_gguf_rope_freqs_tensor_scales_frequencies(tmp_path):
    """Llama 3.1-style rope_freqs divisors: all 2.0 must equal linear rope scaling by 2."""
    from edge_rt.models.llama import rope_table

    args = preset("tiny")
    sd = random_hf_state(args, seed=4)
    sd["rope_freqs.weight"] = torch.full((args.head_dim // 2,), 2.0)
    write_gguf(tmp_path / "r.gguf", args, sd)
    gg = open_gguf(tmp_path / "r.gguf")
    assert gg.args.rope_scaling["rope_type"] == "freq_factors"
    linear = preset("tiny", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert torch.equal(rope_table(gg.args, 32), rope_table(linear, 32))
    assert not torch.equal(rope_table(gg.args, 32), rope_table(args, 32))
    model = build_model(gg.args, gg.tensors, torch.float32, CPU, 64)
    assert torch.isfinite(run_logits(model, [1, 2, 3])).all()


@pytest.mark.parametrize("H,Hkv,hd", [(9, 3, 64), (4, 2, 16), (4, 1, 128)])
def test_native_attention_matches_sdpa_and_each_row_equals_a_one_query_call(H, Hkv, hd):
    """The C decode attention: close to PyTorch's SDPA, and row t of a T-query call is bit for bit
    the one-query call over keys 0..S-T+t (what makes speculative verify chunks exact)."""
    import torch.nn.functional as F

    from edge_rt.models import native_kernels
    from edge_rt.models.llama import per_query_attention

    _native_or_skip()
    g = torch.Generator().manual_seed(hd)
    for S, T in [(1, 1), (13, 1), (37, 5), (64, 8), (300, 16)]:
        cache = torch.randn(2, 1, Hkv, S + 40, hd, generator=g)  # a cache with spare capacity
        k, v = cache[0, :, :, :S], cache[1, :, :, :S]
        qk = torch.randn(1, T, H + Hkv, hd, generator=g)  # q rows inside the fused q/k tensor
        q = qk[:, :, :H]
        out = native_kernels.attention(q, k, v, 1 / math.sqrt(hd))
        ref = per_query_attention(q.transpose(1, 2), k, v).transpose(1, 2).reshape(1, T, H * hd)
        assert torch.allclose(out, ref, atol=2e-6, rtol=1e-5), (out - ref).abs().max()
        if T == 1:
            sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=H != Hkv)
            assert torch.allclose(out, sdpa.transpose(1, 2).reshape(1, 1, H * hd), atol=2e-6, rtol=1e-5)
        for t in range(T):
            n = S - T + t + 1
            one = native_kernels.attention(q[:, t : t + 1], k[:, :, :n], v[:, :, :n], 1 / math.sqrt(hd))
            assert torch.equal(out[:, t], one[:, 0])


def test_native_attention_off_falls_back_to_sdpa(tmp_path, monkeypatch):
    """EDGE_RT_NATIVE=0 (or no compiler): the model runs PyTorch's SDPA, with logits close to the
    native kernel's; bf16 caches and other devices never take the native path."""
    from edge_rt.models import native_kernels

    args = preset("tiny")
    sd = random_hf_state(args, seed=4)
    write_gguf(tmp_path / "m.gguf", args, sd)
    gg = open_gguf(tmp_path / "m.gguf")
    model = build_model(gg.args, gg.tensors, torch.float32, CPU, 64)
    tokens = list(range(3, 30))
    chunks = [10] + [1] * 9 + [8]
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("EDGE_RT_NATIVE", flag)
        native_kernels._kernel.cache_clear()
        if flag == "0":
            assert not native_kernels.available()
        runs[flag] = run_logits(model, tokens, chunks=chunks)
    native_kernels._kernel.cache_clear()
    monkeypatch.delenv("EDGE_RT_NATIVE")
    assert torch.allclose(runs["0"], runs["1"], atol=1e-5 * runs["0"].abs().max(), rtol=0)
    # what the fused decode attention does not take, the model runs through PyTorch
    from edge_rt.kv.cache import KVCache

    cache = KVCache(1, 2, 16, 64, torch.float32, "cpu")
    qkv, cos = torch.zeros(1, 1, 8 * 16), torch.zeros(1, 1, 16)
    assert native_kernels.fusable(qkv, cos, cache, 16) == native_kernels.available()
    assert not native_kernels.fusable(qkv, cos, KVCache(1, 2, 16, 64, torch.bfloat16, "cpu"), 16)  # bf16 cache
    assert not native_kernels.fusable(qkv, cos, cache, 12)  # head size not a multiple of 8
    assert not native_kernels.fusable(qkv.to(torch.float16), cos, cache, 16)


def test_native_add_rms_norm_matches_torch_and_the_unfused_add():
    """The C residual add + RMSNorm: close to PyTorch's, rows independent of each other, and the
    same bits whether the add is fused (x, y) or done first by PyTorch (x + y, None)."""
    import torch.nn.functional as F

    from edge_rt.models import native_kernels

    _native_or_skip()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 7, 576, generator=g) * 3
    w = torch.randn(576, generator=g)
    for ydt, odt in [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]:
        y = torch.randn(1, 7, 576, generator=g).to(ydt)
        h, out = native_kernels.add_rms_norm(x, y, w, 1e-5, odt)
        assert torch.equal(h, x + y) and out.dtype == odt
        ref = F.rms_norm(x + y, (576,), w, 1e-5)
        assert torch.allclose(out.float(), ref, rtol=1e-2 if odt == torch.bfloat16 else 1e-5, atol=1e-5)
        h2, out2 = native_kernels.add_rms_norm(x + y, None, w, 1e-5, odt)
        assert torch.equal(out2, out)
        row = native_kernels.add_rms_norm(x[:, 3:4].contiguous(), y[:, 3:4].contiguous(), w, 1e-5, odt)[1]
        assert torch.equal(row[0, 0], out[0, 3])
    # what it does not take: the caller runs PyTorch
    assert native_kernels.add_rms_norm(x.bfloat16(), None, w, 1e-5, torch.bfloat16) is None
    assert native_kernels.add_rms_norm(x[..., :500], None, w[:500], 1e-5, torch.float32) is None  # not contiguous


def test_native_silu_mul_matches_torch():
    import torch.nn.functional as F

    from edge_rt.models import native_kernels

    _native_or_skip()
    g = torch.Generator().manual_seed(6)
    gu = (torch.randn(1, 5, 2 * 96, generator=g) * 4).bfloat16()
    gu[0, 0, :4] = torch.tensor([0.0, -90.0, 90.0, -0.5])  # zero, saturated tails, a negative
    out = native_kernels.silu_mul(gu)
    gate, up = gu.float().split(96, dim=-1)
    ref = F.silu(gate.bfloat16()) * up.bfloat16()  # PyTorch's bf16 path
    assert out.dtype == torch.bfloat16 and out.shape == (1, 5, 96)
    assert (out != ref).float().mean() < 0.02  # the same bits almost everywhere (exp differs in the last bit)
    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-6)
    assert native_kernels.silu_mul(gu.float()) is None  # fp32 is PyTorch's


def _native_or_skip():
    """Skip where the native kernels are off on purpose (EDGE_RT_NATIVE=0) or cannot be built (no
    C compiler); where a compiler exists they must build."""
    import os
    import shutil

    from edge_rt.models import native_kernels

    if os.environ.get("EDGE_RT_NATIVE", "1") == "0":
        pytest.skip("native kernels turned off (EDGE_RT_NATIVE=0)")
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    assert native_kernels.available()
