"""Load a BitStack store at a memory budget, and resize it live.

Budget arithmetic (kept here: the shared planner, edge_rt/memory/planner.py, places whole layers;
from it this file takes the activation rule and the n_ctx choices):

    footprint(P) = resident base tensors (embedding, head, norms, input scales, rope table)
                 + KV cache at full context (n_ctx positions, every layer)
                 + activations of one forward (the planner's ModelLayout.activation_bytes)
                 + weight workspace: keep=True -> every kept weight (fp32 grid sums);
                                     keep=False -> the largest weight rebuilt during a forward;
                                     both: one block's term scratch (BitStackModel.scratch)
                 + bytes of the first P blocks of the store's order

and a budget B loads the longest prefix P with footprint(P) <= B. The minimum model holds the
first block of every matrix; a budget below it is refused with the minimum in the message.
Blocks are stored in load order, so growing reads the records order[P:P'] and nothing else;
shrinking drops the last blocks of their matrices (the per-matrix order is a prefix). With
keep=True a resize touches only the changed blocks: each one's term is added to or subtracted
from its layer's kept sums, exact on the grid of offload/bitstack.py, so the result has the bits
of a fresh load at the new budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from edge_rt.errors import InvalidOptionError, ModelFormatError
from edge_rt.models.linear import Int4Linear, Int8Embedding, swap_linear
from offload.bitstack import BitStackLinear, TermScratch, block_from_bytes, block_nbytes
from offload.bitstack_compress import FORMAT_VERSION, MatrixSpec, block_name

AUTO_FRACTION = 0.5  # --budget auto: this share of (free memory + what the model already holds)
AUTO_HYSTERESIS = 16 * 10**6  # the auto follower resizes only for changes larger than this (16 MB)
KV_MODES = ("refresh", "keep")
RECONSTRUCT = ("rebuild", "keep")


@dataclass
class Footprint:
    """Planned bytes of a loaded BitStack model."""

    budget: int | None
    base: int  # resident tensors other than blocks and kept weights
    kv_cache: int
    activations: int
    workspace: int  # kept weights (keep=True) or the rebuild workspace (keep=False)
    blocks: int
    n_blocks: int

    @property
    def fixed(self) -> int:
        return self.base + self.kv_cache + self.activations + self.workspace

    @property
    def total(self) -> int:
        return self.fixed + self.blocks

    def to_dict(self) -> dict:
        return {"budget": self.budget, "total": self.total, "base": self.base, "kv_cache": self.kv_cache,
                "activations": self.activations, "workspace": self.workspace, "blocks": self.blocks,
                "n_blocks": self.n_blocks}


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t is None or t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def rebuild_workspace(out: int, inp: int) -> int:
    """Bytes of the weight BitStackLinear.build_weight rebuilds: the fp32 grid sums [out, in]
    (the per-block scratch is the model's shared TermScratch, counted apart)."""
    return out * inp * 4


class BitStackModel:
    """The blocks side of a loaded BitStack model: which prefix is resident, and resizing it."""

    def __init__(self, store, net, device: torch.device, dtype: torch.dtype, keep: bool,
                 n_ctx: int, kv_dtype: torch.dtype):
        meta = store.meta["bitstack"]
        self.store, self.net, self.device, self.dtype, self.keep = store, net, device, dtype, keep
        self.rank = int(meta["rank"])
        self.specs = [MatrixSpec(**m) for m in meta["matrices"]]
        self.order = [tuple(x) for x in meta["order"]]
        self.cum = [0] + [int(c) for c in meta["cum_bytes"]]
        self.min_blocks = int(meta["min_blocks"])
        self.loaded = 0  # blocks of `order` resident (a prefix)
        self.budget: int | None = None  # the budget the model was last sized for (None: full size)
        self.modules = {n: m for n, m in net.named_modules() if isinstance(m, BitStackLinear)}
        self.kv_dtype = kv_dtype
        self.scratch = TermScratch()  # one block's term, shared by every layer
        self.scratch.reserve(self._scratch_numel(), device)
        for m in self.modules.values():
            m.scratch = self.scratch
        self._fixed = self._fixed_bytes(n_ctx, kv_dtype)

    def _scratch_numel(self) -> int:
        return max(s.rows * s.cols for s in self.specs)

    def _fixed_bytes(self, n_ctx: int, kv_dtype: torch.dtype) -> Footprint:
        """Everything but the blocks, at context n_ctx (the rope table is sized for n_ctx too)."""
        from edge_rt.memory.estimate import kv_bytes

        a = self.net.args
        mods = {}
        for s in self.specs:
            mods.setdefault(s.module, []).append(s)
        sizes = [rebuild_workspace(sum(p.rows for p in ps), ps[0].cols) for ps in mods.values()]
        work = (sum(sizes) if self.keep else max(sizes)) + TermScratch.nbytes_for(self._scratch_numel())
        rope = self.net.rope
        base = tensor_bytes(self.net) - rope.numel() * rope.element_size() + n_ctx * 2 * a.head_dim * 4
        return Footprint(None, base, kv_bytes(a, n_ctx, kv_dtype), activation_bytes(a, n_ctx, self.dtype),
                         work, 0, 0)

    def min_bytes_at(self, n_ctx: int) -> int:
        """The minimum footprint if the model ran at context n_ctx."""
        return self._fixed_bytes(n_ctx, self.kv_dtype).fixed + self.cum[self.min_blocks]

    # --- planning ----------------------------------------------------------------------------

    @property
    def min_bytes(self) -> int:
        return self._fixed.fixed + self.cum[self.min_blocks]

    @property
    def full_bytes(self) -> int:
        return self._fixed.fixed + self.cum[-1]

    def footprint(self, n_blocks: int | None = None, budget: int | None = None) -> Footprint:
        n = self.loaded if n_blocks is None else n_blocks
        f = self._fixed
        return Footprint(budget, f.base, f.kv_cache, f.activations, f.workspace, self.cum[n], n)

    def plan(self, budget: int) -> int:
        """Blocks to load for a budget in bytes: the longest prefix that fits."""
        if budget < self.min_bytes:
            raise InvalidOptionError(
                f"budget {_mb(budget)} is below the minimum of this BitStack model: {_mb(self.min_bytes)} "
                f"({self.min_bytes} bytes; full size {_mb(self.full_bytes)})")
        room = budget - self._fixed.fixed
        lo, hi = self.min_blocks, len(self.order)
        while lo < hi:  # largest n with cum[n] <= room
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.cum[mid] <= room else (lo, mid - 1)
        return lo

    # --- loading and resizing -----------------------------------------------------------------

    def set_blocks(self, n: int, refresh: bool = True) -> dict:
        """Make the first n blocks of the order resident: read only the missing ones, free the rest.

        refresh=False leaves kept weights stale (the loader refreshes them once at the end).
        """
        t0 = time.perf_counter()
        changed: set[str] = set()
        rebuild: set[tuple[str, int]] = set()  # parts whose sums left the grid's range: sum afresh
        if n > self.loaded:
            new = [(j, i, self._read_block(j, i)) for j, i in self.order[self.loaded : n]]  # all or nothing
            read_s = time.perf_counter() - t0
            for j, i, blk in new:
                spec = self.specs[j]
                mod = self.modules[spec.module]
                if len(mod.parts[spec.part]) != i:
                    raise ModelFormatError(f"{self.store.path}: block order is corrupt at {block_name(spec, i)}")
                mod.push(spec.part, blk, update=refresh)
                changed.add(spec.module)
        else:
            read_s = 0.0
            for j, i in reversed(self.order[n : self.loaded]):
                spec = self.specs[j]
                if not self.modules[spec.module].pop(spec.part, update=refresh):
                    rebuild.add((spec.module, spec.part))
                changed.add(spec.module)
        for name, part in sorted(rebuild):
            self.modules[name].rebuild_part(part)
        grew = n - self.loaded
        self.loaded = n
        return {"blocks": n, "changed_blocks": abs(grew), "changed_modules": len(changed), "read_s": read_s,
                "rebuilt_parts": len(rebuild), "seconds": time.perf_counter() - t0}

    def _read_block(self, j: int, i: int):
        spec = self.specs[j]
        blk = block_from_bytes(self.store.read(block_name(spec, i)), spec.rows, spec.cols, self.rank)
        if self.device.type != "cpu":
            blk = type(blk)(*(t.to(self.device) for t in (blk.signs, blk.u, blk.v)))
        return blk

    def resize(self, budget: int) -> dict:
        """Load the longest prefix that fits `budget` bytes; returns timings and the footprint."""
        n = self.plan(budget)
        info = self.set_blocks(n)
        self.budget = budget
        return info | {"footprint": self.footprint(budget=budget).to_dict()}

    def measured_bytes(self) -> dict:
        """Bytes really held by the model's tensors (base, blocks, kept weights)."""
        blocks = sum(m.block_bytes() for m in self.modules.values())
        kept = sum(m.cache_bytes() for m in self.modules.values())
        return {"base": tensor_bytes(self.net), "blocks": blocks, "kept_weights": kept,
                "scratch": self.scratch.nbytes()}

    def counts(self) -> list[int]:
        return [len(self.modules[s.module].parts[s.part]) for s in self.specs]


def activation_bytes(args, n_ctx: int, dtype: torch.dtype) -> int:
    """Activation scratch of one forward, by the shared planner's rule (ModelLayout.activation_bytes)."""
    from edge_rt.memory.planner import ModelLayout

    widest = max(2 * args.intermediate_size, args.q_dim + 2 * args.kv_dim)
    layout = ModelLayout(0, (), 0, 0, args.hidden_size, widest, args.num_attention_heads, args.vocab_size,
                         _elt(dtype))
    return layout.activation_bytes(n_ctx)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def parse_budget(budget) -> int | str:
    """"auto" stays "auto"; sizes like "90MB" / "1.5GiB" / 123456 become bytes."""
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        return "auto"
    from edge_rt.memory.sizes import parse_size

    return parse_size(budget)


def is_bitstack_store(path) -> bool:
    """True when `path` is a weight store of kind "bitstack" (reads only its header)."""
    from offload.store import Store, is_store

    if not is_store(path):
        return False
    with Store.open(path) as st:
        return st.kind == "bitstack"


def auto_budget(current: int = 0) -> int:
    """The budget `auto` means now: AUTO_FRACTION of (available memory + what we already hold)."""
    import psutil

    return int(AUTO_FRACTION * (psutil.virtual_memory().available + current))


# --- building the model ------------------------------------------------------------------------


def _base_model(store, args, dtype: torch.dtype, device: torch.device, n_ctx: int, keep: bool):
    """The model with every always-resident tensor assigned and empty BitStackLinear modules."""
    from edge_rt.loading.quants import int8_as_int4
    from edge_rt.loading.weights import INT4_GROUP, int4_kernel_for
    from edge_rt.models.llama import Transformer, rope_table

    meta = store.meta["bitstack"]
    with torch.device("meta"):
        net = Transformer(args)
    q = store.read_tensor("embed.q").clone()
    d = store.read_tensor("embed.d").clone()
    group = int(meta["embed_group"])
    packed = dtype in (torch.float16, torch.bfloat16)
    if packed:
        net.embed = Int8Embedding(q, d, group, dtype, device)
    else:
        w = (q.float() * d.repeat_interleave(group, dim=1)).to(device, dtype)
        net.embed = nn.Embedding.from_pretrained(w, freeze=True)
    if "lm_head.weight" in store.records:
        w = store.read_tensor("lm_head.weight").to(device, dtype)
        head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device="meta")
        head.weight = nn.Parameter(w, requires_grad=False)
    elif packed:
        kernel, tiles = int4_kernel_for(device, dtype, 2 * q.shape[1])
        head = Int4Linear(*int8_as_int4(q, d), INT4_GROUP, None, dtype, device, input_repeat=2,
                          kernel=kernel, inner_k_tiles=tiles)
    else:
        head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device="meta")
        head.weight = net.embed.weight
    swap_linear(net, "lm_head", head)
    for name, p in list(net.named_parameters()):
        if "norm" in name:
            owner, _, kind = name.rpartition(".")
            w = store.read_tensor(name).to(device, torch.float32).clone()
            setattr(net.get_submodule(owner), kind, nn.Parameter(w, requires_grad=False))
    mods = {}
    for m in meta["matrices"]:
        mods.setdefault(m["module"], []).append(m)
    for name, parts in mods.items():
        bias = store.read_tensor(name + ".bias").to(device) if name + ".bias" in store.records else None
        scale = store.read_tensor(name + ".scale").to(device).clone()
        rows = [p["rows"] for p in sorted(parts, key=lambda p: p["part"])]
        swap_linear(net, name, BitStackLinear(rows, parts[0]["cols"], scale, dtype, keep, bias))
    net.register_buffer("rope", rope_table(args, n_ctx).to(device), persistent=False)
    net.compute_dtype = dtype
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        if t.is_meta:
            raise ModelFormatError(f"{store.path}: BitStack store lacks tensor {name}")
    return net.eval().requires_grad_(False)


def check_meta(store) -> dict:
    meta = store.meta.get("bitstack")
    if not isinstance(meta, dict):
        raise ModelFormatError(f"{store.path}: BitStack store has no bitstack metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{store.path}: BitStack format version {meta.get('format_version')!r} is not "
                               f"supported (this edge-rt reads {FORMAT_VERSION})")
    try:
        n = len(meta["order"])
        ok = len(meta["cum_bytes"]) == n == len(meta["block_bytes"]) and 0 < meta["min_blocks"] <= n
    except (KeyError, TypeError):
        ok = False
    if ok:
        ok = _order_ok(meta)
    if not ok:
        raise ModelFormatError(f"{store.path}: BitStack metadata is inconsistent (order / size index)")
    return meta


def _order_ok(meta: dict) -> bool:
    """Every block once, block i+1 of a matrix after block i, first blocks first, sizes summed."""
    try:
        specs, k = meta["matrices"], int(meta["rank"])
        nxt = [0] * len(specs)
        total = 0
        for n, (j, i) in enumerate(meta["order"]):
            if nxt[j] != i or (n < meta["min_blocks"]) != (i == 0):
                return False
            nxt[j] += 1
            size = block_nbytes(specs[j]["rows"], specs[j]["cols"], k)
            total += size
            if meta["block_bytes"][n] != size or meta["cum_bytes"][n] != total:
                return False
        return meta["min_blocks"] == len(specs)
    except (KeyError, TypeError, ValueError, IndexError):
        return False


def load_bitstack(source, device, dtype: torch.dtype, n_ctx: int | None, budget=None, keep: bool = False,
                  kv_dtype: torch.dtype = torch.float32, progress=None, max_ctx: int | None = None):
    """Build (net, BitStackModel, n_ctx) from a store opened with offload.store.open_store_model.

    Args:
        source: the StoreModel (kind "bitstack").
        device: a devices.Device.
        dtype: compute dtype.
        n_ctx: context length (the KV cache is counted at this length); None with a budget picks
            the largest of the planner's CTX_CHOICES (<= max_ctx) whose minimum fits.
        budget: bytes, a size string, "auto", or None for the full model.
        keep: keep reconstructed weights (fast forwards, more memory) instead of rebuilding them.
        kv_dtype: KV cache dtype (counted in the budget).
        progress: progress(done, total) over the blocks read.
        max_ctx: the largest context allowed (default: the model's).
    """
    from edge_rt.memory.planner import CTX_CHOICES
    from edge_rt.models.llama import rope_table

    store = source.store
    check_meta(store)
    tdev = device.torch_device
    max_ctx = max_ctx or source.args.max_position_embeddings
    b = None if budget is None else parse_budget(budget)
    net = _base_model(store, source.args, dtype, tdev, n_ctx or min(max_ctx, 4096), keep)
    stack = BitStackModel(store, net, tdev, dtype, keep, n_ctx or min(max_ctx, 4096), kv_dtype)
    if b == "auto":
        b = min(auto_budget(), stack.full_bytes)
    if n_ctx is None:
        n_ctx = min(max_ctx, 4096)
        if b is not None:
            for c in [c for c in CTX_CHOICES if c <= max_ctx]:
                n_ctx = c
                if stack.min_bytes_at(c) <= b:
                    break
        net.register_buffer("rope", rope_table(source.args, n_ctx).to(tdev), persistent=False)
        stack._fixed = stack._fixed_bytes(n_ctx, kv_dtype)
    n = len(stack.order) if b is None else stack.plan(b)
    stack.budget = b
    step = 256
    for k in range(0, n, step):
        stack.set_blocks(min(n, k + step), refresh=False)
        if progress:
            progress(min(n, k + step), n)
    for m in stack.modules.values():
        m.refresh()
    return net, stack, n_ctx


class BudgetFollower:
    """`--budget auto` after loading: follow free memory with hysteresis.

    poll() computes the auto budget from psutil and resizes when it differs from the current
    footprint by more than `hysteresis` bytes (clamped to [minimum, full]); it skips a poll while
    the model is busy. start() runs poll() every `interval` seconds on a daemon thread.
    """

    def __init__(self, llm, hysteresis: int = AUTO_HYSTERESIS, interval: float = 2.0, available=None):
        self.llm, self.hysteresis, self.interval = llm, hysteresis, interval
        self.available = available  # callable -> bytes (tests fake it); default psutil
        self.events: list[dict] = []
        self._stop = None

    def target(self) -> int:
        stack = self.llm.bitstack
        current = stack.footprint().total
        if self.available is None:
            t = auto_budget(current)
        else:
            t = int(AUTO_FRACTION * (self.available() + current))
        return max(stack.min_bytes, min(stack.full_bytes, t))

    def poll(self) -> dict | None:
        stack = self.llm.bitstack
        target = self.target()
        if abs(target - stack.footprint().total) <= self.hysteresis:
            return None
        lock = self.llm.engine.lock
        if not lock.acquire(blocking=False):
            return None
        try:
            if self.llm.engine.busy:
                return None
            info = self.llm.resize(target)
        finally:
            lock.release()
        self.events.append(info)
        return info

    def start(self) -> "BudgetFollower":
        import threading

        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.interval):
                self.poll()

        threading.Thread(target=loop, name="bitstack-budget", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()


def load_llm(source, device, dtype: torch.dtype, n_ctx: int | None = None, budget=None, keep: bool = False,
             max_ctx: int | None = None, progress=None):
    """An api.LLM over a BitStack store (api.load's branch for store kind "bitstack").

    The LLM gets `.bitstack` (the BitStackModel), which LLM.resize uses.
    """
    from backends.torch_backend import TorchBackend
    from edge_rt.api import LLM

    kv_dtype = torch.float32 if device.kind == "cpu" else dtype
    t0 = time.perf_counter()
    net, stack, n_ctx = load_bitstack(source, device, dtype, n_ctx, budget, keep, kv_dtype, progress, max_ctx)
    backend = TorchBackend(net, device.torch_device, n_ctx, kv_dtype=kv_dtype)
    llm = LLM(source, source.tokenizer(), backend, device, dtype, True, time.perf_counter() - t0)
    llm.bitstack = stack
    return llm
