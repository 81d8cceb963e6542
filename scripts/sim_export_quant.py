"""Torch simulation of ExecuTorch quantization schemes on edge-rt's model (no export).

Each scheme swaps the model's linear layers for a module that computes what the XNNPACK kernels
would compute, then compares with the fp32 torch backend (dense weights): top-1 agreement and max
|logit diff| on the `edge-rt verify` prompt set, and perplexity on the first --ppl-tokens pydoc
tokens in windows of 512 (plus top-1 over those tokens, a larger sample).

The layer weights of the default GGUF are Q4_1 (w = d*q + m per 32 inputs), which splits exactly
into a symmetric int4 part and a per-group offset:
    w = d*(q-8) + (m + 8d)   =>   x @ W^T = x @ Wsym^T + groupsum(x) @ O^T
where Wsym has int4 codes q-8 and one scale d per group (what XNNPACK's qb4w kernel stores; its
block scales are bf16) and O [N, K/32] is m + 8d. Activations of the Wsym product: fp32, int8 per
token (asymmetric, XNNPACK qd8 / torchao's int8_asym_per_token), or "hilo": two int8 rows, x on
its own int8 grid and the remainder (what edge_rt/export/et_quant.py exports).

Run (JSON on stdout, one line per scheme on stderr as it finishes; ~1 min per scheme on 2 cores):
    nice -n 10 .venv/bin/python scripts/sim_export_quant.py [--schemes a,b,...] [--ppl-tokens 1024]
The figures in docs/EXPORT.md ("The ExecuTorch schemes") are one run of every scheme.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32


def act_q(x: torch.Tensor) -> torch.Tensor:
    """int8 asymmetric per-token quantize-dequantize (the range always contains 0)."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zp = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = (torch.round(x / scale) + zp).clamp(-128, 127)
    return (q - zp) * scale


def groupsum(x: torch.Tensor) -> torch.Tensor:
    # x: [..., K] -> [..., K/32]
    return x.unflatten(-1, (-1, GROUP)).sum(-1)


def per_channel_int8(w: torch.Tensor) -> torch.Tensor:
    s = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(w / s).clamp(-127, 127) * s


def quantized_product(x: torch.Tensor, w: torch.Tensor, act: str) -> torch.Tensor:
    """x @ w^T with activations as the kernel sees them: fp32, int8 per token, or hi/lo int8 pair.

    hilo: x_hi = act_q(x) lies on an int8 grid the kernel reproduces exactly, x_lo = x - x_hi is
    quantized again; both go through the same int8 x int4 product (2T rows) and are summed.
    """
    if act == "fp32":
        return F.linear(x, w)
    if act == "int8":
        return F.linear(act_q(x), w)
    hi = act_q(x)
    return F.linear(act_q(hi), w) + F.linear(act_q(x - hi), w)


class SimSplitLinear(nn.Module):
    """x @ Wsym^T (activations per `act`) + groupsum(x) @ O^T (fp32, or int8 weights and activations)."""

    def __init__(self, codes, scale, offset, act: str, offset_mode: str, bf16_scale: bool):
        super().__init__()
        s = scale.to(torch.bfloat16).float() if bf16_scale else scale
        self.w = codes.float() * s.repeat_interleave(GROUP, 1)  # [N, K]
        self.o = offset  # [N, K/32] or None
        self.act, self.offset_mode = act, offset_mode
        if offset is not None and offset_mode == "int8":
            self.o = per_channel_int8(offset)

    def forward(self, x):
        y = quantized_product(x, self.w, self.act)
        if self.o is not None:
            g = groupsum(x)
            y = y + F.linear(act_q(g) if self.offset_mode == "int8" else g, self.o)
        return y


class SimDenseLinear(nn.Module):
    def __init__(self, w, act: str):
        super().__init__()
        self.w, self.act = w, act

    def forward(self, x):
        return quantized_product(x, self.w, self.act)


def layer_parts(src, target):
    """(codes int8 [N, K] in -8..7, scale [N, K/32], offset [N, K/32]) of a Q4_1/Q4_0 weight."""
    parts = [s for _, s in sorted(src.tensors[target], key=lambda p: p[0])]
    split = [p.int4() for p in parts]
    q, d, zero = (torch.cat(x) for x in zip(*split))
    return q.to(torch.int8) - 8, d, zero


def head_module(src, w: torch.Tensor, head: dict, offset_mode: str, bf16_scale: bool) -> nn.Module:
    """The output projection: Q8_0 values (exact), as two exact int4 halves, or per-channel int8."""
    if head["weights"] == "exact":
        return SimDenseLinear(w, head["act"])
    if head["weights"] == "per_channel_int8":
        return SimDenseLinear(per_channel_int8(w), head["act"])
    # split8: q = 16*hi + lo, w = 16d*hi + d*(lo-8) + 8d over the input repeated twice
    from edge_rt.loading.quants import int8_as_int4

    q8, d = src.tensors["embed.weight"][0][1].int8()
    codes, scale, zero = int8_as_int4(q8, d)  # codes 0..15, w = (codes-8)*scale + zero over [x, x]
    lin = SimSplitLinear(codes.to(torch.int8) - 8, scale, zero, head["act"], offset_mode, bf16_scale)
    return nn.Sequential(Repeat2(), lin)


class Repeat2(nn.Module):
    def forward(self, x):
        return torch.cat([x, x], -1)


def scheme_act(scheme: dict, layer: int, kind: str, n_layers: int) -> str:
    """Activation mode of one layer linear: act_by keys "3.w2", "w2", "first" / "last", else act."""
    by = scheme.get("act_by", {})
    edge = "first" if layer == 0 else "last" if layer == n_layers - 1 else None
    for key in (f"{layer}.{kind}", kind, edge):
        if key in by:
            return by[key]
    return scheme.get("act", "int8")


def apply_scheme(model, src, scheme: dict, originals: dict) -> None:
    from edge_rt.models.linear import swap_linear

    for name, lin in originals.items():
        swap_linear(model, name, lin)
    offset, bf16 = scheme.get("offset", "fp32"), scheme.get("bf16_scale", True)
    for name in originals:
        if name == "lm_head":
            head = scheme.get("head")
            if head:
                swap_linear(model, name, head_module(src, originals[name].weight.detach(), head, offset, bf16))
            continue
        layer, kind = int(name.split(".")[1]), name.rsplit(".", 1)[1]
        codes, d, off = layer_parts(src, name + ".weight")
        act = scheme_act(scheme, layer, kind, len(model.layers))
        swap_linear(model, name, SimSplitLinear(codes, d, off, act, offset, bf16))


def evaluate(llm, prompts, ref_logits, ppl_ids, ref_ppl_logits) -> dict:
    be = llm.backend
    agree = total = 0
    max_diff = 0.0
    for ids, ref in zip(prompts, ref_logits):
        be.reset()
        out = be.forward(ids, all_logits=True)
        max_diff = max(max_diff, (out - ref).abs().max().item())
        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0]
    nll, cnt, agree_p = 0.0, 0, 0
    for chunk, ref in zip(ppl_windows(ppl_ids), ref_ppl_logits):
        be.reset()
        out = be.forward(chunk, all_logits=True)
        lp = torch.log_softmax(out[:-1].float(), -1)
        nll -= lp.gather(1, torch.tensor(chunk[1:])[:, None]).sum().item()
        cnt += len(chunk) - 1
        agree_p += int((out.argmax(-1) == ref.argmax(-1)).sum())
    be.reset()
    return {"top1": agree / total, "max_diff": max_diff, "ppl": float(torch.tensor(nll / cnt).exp()),
            "top1_pydoc": agree_p / len(ppl_ids)}


def ppl_windows(ids, window=512):
    return [ids[s : s + window] for s in range(0, len(ids) - 1, window) if len(ids[s : s + window]) >= 2]


# name -> scheme. act: activations of the layer linears' int4 product (fp32 | int8 | hilo);
# act_by: per kind ("w2") or layer.kind ("3.w2") overrides; head: None (fp32 dense) or
# {"weights": exact | split8 | per_channel_int8, "act": ...}; offset: fp32 | int8 (per-channel int8
# O with int8 per-token group sums); bf16_scale: XNNPACK's qb4w block scales are bf16.
HEAD8 = {"weights": "split8", "act": "hilo"}  # the exported output projection: exact 4-bit halves, hi/lo rows
SCHEMES = {
    "exact_weights_fp32_act": {"act": "fp32", "bf16_scale": False},
    "exact_weights_bf16_scale_fp32_act": {"act": "fp32"},
    "a_int8_act_head_fp32": {},
    "a_w2_fp32_act": {"act_by": {"w2": "fp32"}},
    "a_w2_hilo": {"act_by": {"w2": "hilo"}},
    "a_wqkv_fp32_act": {"act_by": {"wqkv": "fp32"}},
    "a_wo_fp32_act": {"act_by": {"wo": "fp32"}},
    "a_w13_fp32_act": {"act_by": {"w13": "fp32"}},
    "a_first_last_fp32_act": {"act_by": {"first": "fp32", "last": "fp32"}},
    "b_head_exact_int8_act": {"head": {"weights": "exact", "act": "int8"}},
    "c_offset_int8": {"offset": "int8"},
    "w2_hilo_head8": {"act_by": {"w2": "hilo"}, "head": HEAD8},
    "w2_w13_hilo_head8": {"act_by": {"w2": "hilo", "w13": "hilo"}, "head": HEAD8},
    "hilo_head_fp32": {"act": "hilo"},
    "hilo_head8": {"act": "hilo", "head": HEAD8},  # what edge_rt/export/et_quant.py exports
    "hilo_head8_fp32_scales": {"act": "hilo", "head": HEAD8, "bf16_scale": False},
    "hilo_head8_int8_act": {"act": "hilo", "head": {"weights": "split8", "act": "int8"}},
    "hilo_head8_offset_int8": {"act": "hilo", "head": HEAD8, "offset": "int8"},
    "hilo_head_per_channel_int8": {"act": "hilo", "head": {"weights": "per_channel_int8", "act": "hilo"}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--extra", default=None, help="JSON dict name -> scheme (the SCHEMES keys), added to the run")
    a = ap.parse_args()
    import pydoc_data.topics as t

    import edge_rt
    from edge_rt.export.runtime import VERIFY_PROMPTS

    schemes = dict(SCHEMES) | (json.loads(a.extra) if a.extra else {})
    llm = edge_rt.load(a.model, device="cpu", dtype="float32", quantized=False, n_ctx=512)
    model, src = llm.backend.model, llm.source
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    prompts = [llm.tokenizer.encode(p, parse_special=True) for p in VERIFY_PROMPTS]
    text = "\n\n".join(t.topics[k] for k in sorted(t.topics))
    ppl_ids = llm.tokenizer.encode(text)[: a.ppl_tokens]
    be = llm.backend
    with torch.no_grad():
        ref_logits = []
        for ids in prompts:
            be.reset()
            ref_logits.append(be.forward(ids, all_logits=True))
        ref_ppl_logits = []
        for chunk in ppl_windows(ppl_ids):
            be.reset()
            ref_ppl_logits.append(be.forward(chunk, all_logits=True))
        results = {"reference": evaluate(llm, prompts, ref_logits, ppl_ids, ref_ppl_logits)}
        print(json.dumps({"reference": results["reference"]}), file=sys.stderr, flush=True)
        for name in a.schemes.split(","):
            t0 = time.perf_counter()
            apply_scheme(model, src, schemes[name], originals)
            r = evaluate(llm, prompts, ref_logits, ppl_ids, ref_ppl_logits)
            r["ppl_ratio"] = r["ppl"] / results["reference"]["ppl"]
            results[name] = r | {"scheme": schemes[name], "s": round(time.perf_counter() - t0, 1)}
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
