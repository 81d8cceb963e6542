"""Offloaded decoding under a memory budget: Endor vs our dense streaming vs HF accelerate disk offload.

SmolLM2-135M in bf16 (dequantized from the default Q4_1 GGUF), pruned with Wanda to 50% (per
row, pydoc calibration text), budget = 30% of the dense bf16 weights. Sides, all on the same
pruned weights, alternating rounds, medians:
- ours, Endor store (bitmap + bf16 nonzeros), streamed with O_DIRECT reads (cold) / page cache (warm);
- ours, dense bf16 store, same streamer;
  ours compute in bf16 like accelerate (`--dtype float32`: the CPU default before, bf16 widened);
- HF transformers + accelerate: device_map with max_memory {"cpu": budget} and offload_folder
  (disk offload) from an HF folder (config.json + model.safetensors) of the same pruned weights;
  cold: the offload folder's pages evicted with posix_fadvise(DONTNEED) before every token.
Also: bytes read from storage per token (/proc/self/io read_bytes, both sides), how much of our
read time the prefetch hides, our CPU seconds per token by thread (/proc/self/task: on a shared
machine CPU time is the steadier measure), and perplexity of the pruned vs the dense model on
held-out text.

    .venv/bin/python scripts/bench_offload.py --out bench_results/offload.json

transformers and accelerate are benchmark-only dependencies (not CI deps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _bench_common import emit, invoked_command, log, machine_info, summarize  # noqa: E402

PROMPT = "The history of the Python programming language"


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by OS thread id."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for t in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[int(t)] = (int(fields[11]) + int(fields[12])) / tick
    return out


class CpuCounters:
    """Thread CPU seconds spent inside a few functions, whichever thread calls them (--cpu-profile).

    Wrapped while installed: offload.endor.decode_rows (Endor decode), torch.nn.functional.linear
    (the products of the offloaded linears and the head), zlib.crc32 (record checksums) and
    offload.store._pread_all (the read syscalls; O_DIRECT pins pages, which costs CPU).
    """

    TARGETS = (("offload.endor", "decode_rows", "endor_decode"), ("torch.nn.functional", "linear", "matmul"),
               ("zlib", "crc32", "checksum"), ("offload.store", "_pread_all", "read_syscalls"))

    def __init__(self):
        import threading

        self.s: dict[str, float] = {}
        self._lock = threading.Lock()
        self._undo = []

    def install(self) -> None:
        import importlib

        for module, attr, label in self.TARGETS:
            owner = importlib.import_module(module)
            orig = getattr(owner, attr)
            setattr(owner, attr, self._wrap(orig, label))
            self._undo.append((owner, attr, orig))

    def _wrap(self, fn, label):
        def counted(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.thread_time() - t0
                with self._lock:
                    self.s[label] = self.s.get(label, 0.0) + dt

        return counted

    def remove(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()


def io_read_bytes() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def evict_folder(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def make_stores(work: Path, model) -> dict[str, Path]:
    from offload.prune import compress_model

    want = {"endor": ("endor", 0.5), "pruned_dense": ("dense", 0.5), "dense": ("dense", 0.0)}
    out = {}
    for name, (fmt, sparsity) in want.items():
        p = work / f"smollm2-{name}.ews"
        if not p.exists():
            log(f"compressing {name} -> {p}")
            compress_model(model, p, sparsity=sparsity, fmt=fmt, method="wanda")
        out[name] = p
    return out


# our target -> HF names and row split (edge_rt/loading/names.py HF_NAMES, inverted)
HF_SPLIT = {
    "attn.wqkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "ffn.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "attn.wo.weight": ("self_attn.o_proj.weight",),
    "ffn.w2.weight": ("mlp.down_proj.weight",),
    "attn_norm.weight": ("input_layernorm.weight",),
    "ffn_norm.weight": ("post_attention_layernorm.weight",),
}


def write_hf_folder(store_path: Path, folder: Path) -> Path:
    """The pruned dense store as an HF LlamaForCausalLM folder (config.json + model.safetensors, bf16)."""
    from safetensors.torch import save_file

    from offload.store import open_store_model

    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sm = open_store_model(store_path)
    a = sm.args
    tensors = {}
    for target in sm.store.meta["tensors"]:
        t = sm.store.read_tensor(target).clone().to(torch.bfloat16)
        if target == "embed.weight":
            tensors["model.embed_tokens.weight"] = t
        elif target == "norm.weight":
            tensors["model.norm.weight"] = t
        elif target == "lm_head.weight":
            tensors["lm_head.weight"] = t
        else:
            _, i, rest = target.split(".", 2)
            names = HF_SPLIT[rest]
            sizes = {3: [a.q_dim, a.kv_dim, a.kv_dim], 2: [a.intermediate_size] * 2, 1: [t.shape[0]]}[len(names)]
            for n, part in zip(names, t.split(sizes)):
                tensors[f"model.layers.{i}.{n}"] = part.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden_size,
              "intermediate_size": a.intermediate_size, "num_hidden_layers": a.num_hidden_layers,
              "num_attention_heads": a.num_attention_heads, "num_key_value_heads": a.num_key_value_heads,
              "head_dim": a.head_dim, "rms_norm_eps": a.rms_norm_eps, "rope_theta": a.rope_theta,
              "max_position_embeddings": a.max_position_embeddings, "vocab_size": a.vocab_size,
              "tie_word_embeddings": "lm_head.weight" not in sm.store.meta["tensors"], "hidden_act": "silu",
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def run_ours(store: Path, budget: int, tokens: int, direct: bool, dtype: str, profile: bool = False) -> dict:
    import threading

    import edge_rt

    llm = edge_rt.load(store, device="cpu", budget=budget, n_ctx=64, dtype=dtype)
    s = llm.backend.model.feed.streamer
    pool = getattr(llm.backend.model, "linear_pool", None)  # None: a checkout from before the pool (--repo)
    counters = CpuCounters() if profile else None
    s.direct = direct
    llm.generate(PROMPT, max_tokens=2, ignore_eos=True)  # warm the code paths (and, warm, the cache)
    llm.reset()
    if direct:
        s.store.evict()
    s.reset_stats()
    if counters:
        counters.install()
    io0, cpu0, threads0 = io_read_bytes(), time.process_time(), thread_cpu_s()
    try:
        out = llm.generate(PROMPT, max_tokens=tokens, ignore_eos=True)
    finally:
        if counters:
            counters.remove()
    io, cpu, threads1 = io_read_bytes() - io0, time.process_time() - cpu0, thread_cpu_s()
    st, n = s.stats, out.stats.generated_tokens
    forwards = n  # the prompt forward plus n - 1 decode steps read every streamed layer once each
    spent = {k: v - threads0.get(k, 0.0) for k, v in threads1.items()}
    main = spent.get(threading.get_native_id(), 0.0)
    reader = spent.get(s._thread.native_id, 0.0) if s._thread is not None else 0.0
    helpers = sum(spent.get(i, 0.0) for i in (pool.native_ids if pool else ()))
    res = {"decode_tokens_per_s": out.stats.decode_tps, "tokens": n, "token_ids": out.token_ids,
           "storage_read_bytes_per_token": io / forwards, "streamed_bytes_per_token": st.bytes_read / forwards,
           "read_s": st.read_s, "verify_s": getattr(st, "verify_s", None), "stall_s": st.stall_s,
           "io_hidden_fraction": st.hidden_fraction, "compute_dtype": dtype,
           "linear_workers": pool.workers if pool else None,
           # CPU seconds per token (prompt forward included), by thread: the caller (serial model code
           # plus its share of the linear chunks), the pool's helpers, the reader (reads, checksums)
           "cpu_s_per_token": {"process": cpu / forwards, "main": main / forwards, "linear_helpers": helpers / forwards,
                               "reader": reader / forwards,
                               "other": (sum(spent.values()) - main - helpers - reader) / forwards},
           "plan": {k: v for k, v in llm.plan.to_dict().items() if k in ("resident", "streamed", "device_bytes",
                                                                          "minimum_budget", "n_ctx")}}
    if counters:  # CPU seconds per token inside the counted functions (all threads), and the rest
        res["cpu_s_per_token_in"] = {k: v / forwards for k, v in sorted(counters.s.items())}
        res["cpu_s_per_token_in"]["rest"] = (cpu - sum(counters.s.values())) / forwards
    s.close()
    return res


def run_accelerate(folder: Path, offload: Path, budget: int, tokens: int, cold: bool, dtype=torch.bfloat16) -> dict:
    from transformers import AutoModelForCausalLM

    import edge_rt

    tok = edge_rt.load(None, device="cpu", n_ctx=64).tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="auto",
                                                 max_memory={"cpu": budget}, offload_folder=str(offload))
    model.eval()
    ids = torch.tensor([tok.encode(PROMPT)])
    placement = {}
    for v in model.hf_device_map.values():
        placement[str(v)] = placement.get(str(v), 0) + 1
    out_ids, times, io = [], [], 0
    with torch.inference_mode():
        past, x = None, ids
        for i in range(tokens + 1):
            if cold:  # accelerate may read offloaded weights from the offload folder or the checkpoint itself
                evict_folder(offload)
                evict_folder(folder)
            io0, t0 = io_read_bytes(), time.perf_counter()
            o = model(input_ids=x, past_key_values=past, use_cache=True)
            nxt = int(o.logits[0, -1].argmax())
            dt = time.perf_counter() - t0
            if i > 0:  # decode steps only (the first forward is the prompt)
                times.append(dt)
                io += io_read_bytes() - io0
            past, x = o.past_key_values, torch.tensor([[nxt]])
            out_ids.append(nxt)
    n = len(times)
    return {"decode_tokens_per_s": n / sum(times), "tokens": n, "token_ids": out_ids[:tokens],
            "storage_read_bytes_per_token": io / n, "device_map_counts": placement}


def perplexities(stores: dict, text_tokens: int) -> dict:
    import edge_rt
    from offload.prune import heldout_text

    out = {}
    for name in ("dense", "pruned_dense"):
        llm = edge_rt.load(stores[name], device="cpu", n_ctx=512)
        ids = llm.encode(heldout_text())[:text_tokens]
        out[name] = llm.perplexity(ids, window=512)
    return out


def cpu_profile(args, stores: dict, budget: int, dense_bytes: int) -> None:
    """Our cold sides only, alternating rounds; medians of CPU seconds per token."""
    import statistics

    import edge_rt

    sides = {"endor_cold": stores["endor"], "dense_cold": stores["pruned_dense"]}
    runs: dict[str, list] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, path in sides.items():
            res = run_ours(path, budget, args.tokens, direct=True, dtype=args.dtype, profile=True)
            runs[name].append(res)
            log(f"round {r} {name}: {res['cpu_s_per_token']['process'] * 1e3:.0f} ms CPU/token "
                f"({res['decode_tokens_per_s']:.2f} tok/s on this machine now)")
    out = {"benchmark": "offload_cpu_profile", "command": invoked_command(), "machine": machine_info(),
           "edge_rt_from": os.path.dirname(os.path.dirname(os.path.abspath(edge_rt.__file__))),
           "budget_bytes": budget, "dense_weight_bytes": dense_bytes, "our_compute_dtype": args.dtype,
           "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds, "sides": {}}
    for name, rs in runs.items():
        med = {group: {k: statistics.median(x[group].get(k, 0.0) for x in rs)
                       for k in sorted({k for x in rs for k in x[group]})}
               for group in ("cpu_s_per_token", "cpu_s_per_token_in")}
        out["sides"][name] = med | {"streamed_bytes_per_token": rs[-1]["streamed_bytes_per_token"],
                                    "linear_workers": rs[-1]["linear_workers"], "plan": rs[-1]["plan"]}
    emit(out, args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--work", default="bench_results/offload", help="stores, HF folder and offload folder")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-fraction", type=float, default=0.30)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="our compute dtype (accelerate runs bf16); float32 was the CPU default before")
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--cpu-profile", action="store_true",
                    help="only our cold sides, with CPU per token by thread and in the decode, the products, "
                         "the checksums and the read syscalls (no accelerate, no perplexity)")
    ap.add_argument("--repo", default=None,
                    help="import edge-rt from this checkout instead (e.g. a worktree of an older commit, "
                         "for before/after CPU profiles)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.repo:
        sys.path.insert(0, str(Path(args.repo).resolve()))
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stores = make_stores(work, args.model)
    from offload.store import Store

    dense_bytes = Store.open(stores["dense"]).nbytes()
    budget = int(args.budget_fraction * dense_bytes)
    if args.cpu_profile:
        return cpu_profile(args, stores, budget, dense_bytes)
    hf = write_hf_folder(stores["pruned_dense"], work / "hf-pruned")
    sides = {
        "endor_cold": lambda: run_ours(stores["endor"], budget, args.tokens, direct=True, dtype=args.dtype),
        "dense_cold": lambda: run_ours(stores["pruned_dense"], budget, args.tokens, direct=True, dtype=args.dtype),
        "endor_warm": lambda: run_ours(stores["endor"], budget, args.tokens, direct=False, dtype=args.dtype),
        "dense_warm": lambda: run_ours(stores["pruned_dense"], budget, args.tokens, direct=False, dtype=args.dtype),
    }
    if not args.skip_accelerate:
        sides["accelerate_cold"] = lambda: run_accelerate(hf, work / "hf-offload", budget, args.tokens, cold=True)
        sides["accelerate_warm"] = lambda: run_accelerate(hf, work / "hf-offload", budget, args.tokens, cold=False)
    samples: dict[str, list] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, fn in sides.items():
            res = fn()
            samples[name].append(res)
            cpu = f", {res['cpu_s_per_token']['process'] * 1e3:.0f} ms CPU/token" if "cpu_s_per_token" in res else ""
            log(f"round {r} {name}: {res['decode_tokens_per_s']:.2f} tok/s, "
                f"{res['storage_read_bytes_per_token'] / 2**20:.1f} MiB read/token{cpu}")
    result = {"benchmark": "offload", "command": invoked_command(), "machine": machine_info(),
              "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to bf16), Wanda 50% per row",
              "dense_weight_bytes": dense_bytes, "budget_bytes": budget, "budget_fraction": args.budget_fraction,
              "our_compute_dtype": args.dtype, "threads": args.threads,
              "store_bytes": {k: os.path.getsize(p) for k, p in stores.items()}, "sides": {}}
    for name, runs in samples.items():
        tps = summarize([x["decode_tokens_per_s"] for x in runs])
        result["sides"][name] = {"decode_tokens_per_s": tps, "last_run": runs[-1]}
    med = {k: v["decode_tokens_per_s"]["median"] for k, v in result["sides"].items()}
    result["speedups"] = {"endor_vs_dense_cold": med["endor_cold"] / med["dense_cold"],
                          "endor_vs_dense_warm": med["endor_warm"] / med["dense_warm"]}
    if "accelerate_cold" in med:
        result["speedups"] |= {"endor_vs_accelerate_cold": med["endor_cold"] / med["accelerate_cold"],
                               "endor_vs_accelerate_warm": med["endor_warm"] / med["accelerate_warm"],
                               "same_tokens_as_accelerate": samples["endor_cold"][-1]["token_ids"]
                               == samples["accelerate_cold"][-1]["token_ids"]}
    result["same_tokens_endor_dense"] = samples["endor_cold"][-1]["token_ids"] == samples["dense_cold"][-1]["token_ids"]
    result["bars"] = {"endor_vs_dense": 1.7, "endor_vs_accelerate": 2.0}
    log("perplexity on held-out pydoc text")
    result["perplexity_heldout"] = perplexities(stores, args.ppl_tokens) | {"tokens": args.ppl_tokens}
    emit(result, args.out)


if __name__ == "__main__":
    main()
