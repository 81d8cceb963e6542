"""Build a model from a "dense" or "endor" weight store, following the memory plan.

The fixed weights (embedding, norms, output head, biases) are read once. Every block's linear
layers become `OffloadLinear` modules whose stored records (dense weight, or Endor bitmap +
values) are handed to them by a forward pre-hook on the block: from device memory for resident
layers, from the streamer for the others. On CPU a linear layer's output rows are computed in
chunks by a pool of worker threads (`LinearPool`), each decoding its chunk of Endor rows just
before use into its own small scratch, so a layer never exists decoded in full.

The store's tensor table (meta["tensors"]: target -> {"format", "shape", "dtype", "layer", ...})
says what each target is made of; nothing is inferred from record names.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edge_rt.errors import InvalidOptionError, ModelFormatError
from edge_rt.memory.planner import LayerWeights, ModelLayout, Plan, plan_memory
from edge_rt.models.linear import swap_linear
from edge_rt.models.llama import Transformer, rope_table
from offload import endor, native
from offload.store import RecordInfo, Store, StoreModel
from offload.streamer import Streamer, read_span

LAYER_MODULES = ("attn.wqkv", "attn.wo", "ffn.w13", "ffn.w2")  # offload.prune.PRUNED: the streamed linears


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_table(store: Store) -> dict[str, dict]:
    table = store.meta.get("tensors")
    if not isinstance(table, dict) or not table:
        raise ModelFormatError(f"{store.path}: store has no tensor table")
    return table


def target_records(store: Store, target: str, spec: dict) -> dict[str, RecordInfo]:
    """Suffix -> record of one target ("" for a dense tensor, "bitmap", "values", ... for Endor)."""
    if spec.get("format") == "dense":
        return {"": store.record(target)}
    if spec.get("format") == "endor":
        out = {s: store.record(f"{target}.{s}") for s in endor.RECORDS[:3]}
        if spec.get("values") == "int8":
            out["scales"] = store.record(f"{target}.scales")
        return out
    raise ModelFormatError(f"{store.path}: tensor {target} has unknown format {spec.get('format')!r}")


def layer_records(store: Store, table: dict) -> dict[int, dict[str, RecordInfo]]:
    """Layer -> {key: record}, key = record name without "layers.{i}." (what the streamer moves)."""
    out: dict[int, dict[str, RecordInfo]] = {}
    for target, spec in table.items():
        layer = spec.get("layer")
        if layer is None:
            continue
        prefix = f"layers.{layer}."
        for r in target_records(store, target, spec).values():
            out.setdefault(layer, {})[r.name.removeprefix(prefix)] = r
    return out


def scratch_elements(table: dict, stored: torch.dtype, compute: torch.dtype, device_kind: str) -> int:
    """Elements of one worker's scratch: CPU, a chunk of at most SCRATCH_ELEMENTS weights;
    accelerators, the largest matrix that is decoded or widened (Endor weights, or stored dtype
    != compute dtype). 0 when every weight is used as stored."""
    need = [s for t, s in table.items() if s.get("layer") is not None and
            (s["format"] == "endor" or getattr(torch, s["dtype"]) != compute)]
    if stored != compute and "lm_head.weight" not in table:  # the tied head is widened too
        need.append(table["embed.weight"])
    elif "lm_head.weight" in table and getattr(torch, table["lm_head.weight"]["dtype"]) != compute:
        need.append(table["lm_head.weight"])
    if not need:
        return 0
    if device_kind != "cpu":
        return max(s["shape"][0] * s["shape"][1] for s in need)
    return max(max(r1 - r0 for r0, r1 in row_chunks(s["shape"][0], s["shape"][1], _unit(s), SCRATCH_ELEMENTS))
               * s["shape"][1] for s in need)


LINEAR_WORKERS_ENV = "EDGE_RT_LINEAR_WORKERS"


def linear_workers(device_kind: str, requested: int | None = None) -> int:
    """Threads that compute the linear layers (each runs one intra-op thread). Not on CPU: 1 (the
    caller's thread queues the work). On CPU: `requested` (the `threads=` of `edge_rt.load`), else
    $EDGE_RT_LINEAR_WORKERS, else 1 where the native Endor decode is built and torch's intra-op
    thread count where it is not. Why 1: with the native decode (0.12 ns a weight) a chunk's work is
    about as long as handing it to a helper thread and back, and on SmolLM2 on 2 cores one worker
    ran faster (Endor warm 12.7 against 9.9 tok/s with two, cold 10.6 against 9.7; medians of
    scripts/bench_offload_probes.py workers), leaving the second core to the reader (docs/OFFLOAD.md)."""
    if device_kind != "cpu":
        return 1
    if requested:
        return requested
    env = os.environ.get(LINEAR_WORKERS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise InvalidOptionError(f"{LINEAR_WORKERS_ENV} must be an integer >= 1, got {env!r}")
        return int(env)
    return 1 if native.endor_kernel() is not None else max(torch.get_num_threads(), 1)


def model_layout(store: Store, args, compute: torch.dtype, kv_dtype: torch.dtype, device_kind: str,
                 workers: int | None = None) -> ModelLayout:
    """The planner's view of a store (`workers`: linear_workers(device_kind) when None)."""
    table = tensor_table(store)
    layers = layer_records(store, table)
    if sorted(layers) != list(range(args.num_hidden_layers)):
        raise ModelFormatError(f"{store.path}: store has streamable weights for layers {sorted(layers)[:5]}..., "
                               f"the model has {args.num_hidden_layers}")
    fixed = sum(r.nbytes for t, s in table.items() if s.get("layer") is None
                for r in target_records(store, t, s).values())
    stored = getattr(torch, store.meta.get("dtype", "bfloat16"))
    workers = linear_workers(device_kind) if workers is None else workers
    scratch = workers * scratch_elements(table, stored, compute, device_kind) * _elt(compute)
    return ModelLayout(
        fixed_bytes=fixed,
        layers=tuple(LayerWeights(i, sum(r.nbytes for r in layers[i].values()), read_span(layers[i].values()))
                     for i in range(args.num_hidden_layers)),
        decode_scratch_bytes=scratch,
        kv_bytes_per_position=2 * args.num_hidden_layers * args.kv_dim * _elt(kv_dtype),
        hidden_size=args.hidden_size, widest=max(2 * args.intermediate_size, args.q_dim + 2 * args.kv_dim),
        heads=args.num_attention_heads, vocab_size=args.vocab_size, act_elt=_elt(compute),
    )


SCRATCH_ELEMENTS = 1 << 19  # CPU: rows are decoded / widened / multiplied in chunks of at most this many weights
# Dense chunks are aligned like Endor tiles (endor.DEFAULT_TILE_ROWS), so a dense store and an
# Endor store of the same weights run the same chunked products: bit-identical logits.
CHUNK_ROWS = endor.DEFAULT_TILE_ROWS


def _unit(spec: dict) -> int:
    """Rows a chunk boundary must be a multiple of: the Endor tile, or CHUNK_ROWS for dense weights."""
    return spec["tile_rows"] if spec["format"] == "endor" else CHUNK_ROWS


def row_chunks(n_rows: int, k: int, unit: int, max_elements: int, parts: int = 1) -> list[tuple[int, int]]:
    """Row ranges of whole `unit`s (the last may be short) of at most `max_elements` weights (at
    least one unit), as even as the units allow; their number a multiple of `parts` where the
    units allow it (so `parts` workers get equal shares)."""
    units = -(-n_rows // unit)
    per = max(max_elements // (k * unit), 1)  # units per chunk at most
    n = min(max(-(-units // per), parts), units)
    if n % parts and -(-n // parts) * parts <= units:
        n = -(-n // parts) * parts
    bounds = [min(i * units // n * unit, n_rows) for i in range(n)] + [n_rows]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class _Job:
    fn: object  # fn(i, scratch[, ready]): ready=True when chunk i's rows are already in scratch
    n: int  # chunks taken from the counter: 0 .. n - 1
    counter: object  # itertools.count: the next chunk to take (next() is atomic under the GIL)
    inference: bool  # inference / grad mode are per thread: helpers take the caller's
    grad: bool
    key: tuple | None = None  # (owner, records): what the job computes (see LinearPool.run)
    reserved: int | None = None  # the chunk the first helper decoded ahead: its own, not in the counter
    first: bool = False  # chunk 0 was decoded ahead into the caller's scratch: the caller's, not in the counter
    ahead: tuple | None = None  # (key, n, decode(i, scratch)) for the first helper once its share is done
    error: BaseException | None = None


_BUSY = (None, None)  # LinearPool._first while the helper decodes chunk 0 (matches no key)


def _same(a: tuple | None, b: tuple | None) -> bool:
    """Keys are (owner, records) compared by identity (records are a dict of tensors)."""
    return a is not None and b is not None and a[0] is b[0] and a[1] is b[1]


class LinearPool:
    """Computes the row chunks of the offloaded linear layers on `workers` threads: the calling
    thread and workers - 1 helpers, each with its own scratch (a chunk of decoded / widened rows).

    On CPU every worker runs torch with one intra-op thread: decoding a chunk (the native kernel
    or numpy + torch, GIL released) and its product run in parallel across chunks, and no intra-op thread pool spins
    beside them (one-row bf16 products on 2 intra-op threads cost 30-40x the CPU time of one
    thread here: docs/OFFLOAD.md). The model's forward runs with one intra-op thread on the
    calling thread for the same reason (`single_intra_op_thread`). On accelerators there is one
    worker, the calling thread, which only queues the work.

    Decoding ahead: a job may name the next job (`ahead`). Once its share of the job is done,
    the first helper decodes the next job's last chunk into its own scratch and then, unless
    the next run has already begun, its first chunk into the caller's scratch, while the caller
    runs the serial code between the two jobs (attention, norms) and the helper would otherwise
    wait. If the next run is the one named (same owner, same records), those chunks are only
    multiplied, the last by the helper, the first by the caller (which waits for a decode of it
    under way: no longer than decoding it itself); a chunk whose decode ahead failed is decoded
    again. Any other run first waits for a decode ahead still going and drops it.
    """

    def __init__(self, workers: int, scratch_elements: int, dtype: torch.dtype, device: torch.device):
        self.workers = workers
        self.scratch = [torch.empty(max(scratch_elements, 1), dtype=dtype, device=device) for _ in range(workers)]
        self._job: _Job | None = None
        self._go = [threading.Semaphore(0) for _ in range(workers - 1)]
        self._done = threading.Semaphore(0)  # one release per helper per job
        self._waiting = 0  # helpers of the current job the caller has not yet seen finish
        self._ahead: tuple | None = None  # key the first helper decodes / decoded ahead
        self._ahead_lock = threading.Lock()  # held by the first helper while it decodes ahead
        self._claim = threading.Lock()  # orders the caller's cancel against the helper starting chunk 0
        self._cancel = False  # the next run has begun: do not start decoding into the caller's scratch
        self._first: tuple | None = None  # chunk 0 in the caller's scratch: None, _BUSY or the key decoded
        self._caller_free = True  # the caller is done with its scratch for the current job
        threads = torch.get_num_threads()
        self._threads = [threading.Thread(target=self._work, args=(k,), name=f"edge-rt-linear-{k + 1}", daemon=True)
                         for k in range(workers - 1)]
        for t in self._threads:
            t.start()
        for _ in self._threads:  # each helper has set its intra-op threads (which also sets torch's
            self._done.acquire()  # default for new threads): restore that default
        torch.set_num_threads(threads)

    def run(self, fn, n: int, key: tuple | None = None, ahead: tuple | None = None) -> None:
        """Call fn(i, scratch) for i in range(n), spread over the workers; return when all are done.

        Args:
            key: (owner, records) of this job, matched by identity against the previous job's
                `ahead`; if it matches, chunk n - 1 (the first helper's) and perhaps chunk 0 (the
                caller's) were decoded ahead, and fn is called with ready=True for them.
            ahead: (key of the next job, its number of chunks, decode(i, scratch)).
        """
        self._wait_helpers()  # a call interrupted while waiting (Ctrl-C): its helpers finish first
        with self._claim:
            self._caller_free = False
        helpers = min(len(self._threads), n - 1)
        reserved, first = (n - 1 if helpers and _same(key, self._ahead) else None), False
        if reserved is None:
            self.settle()
        else:
            with self._claim:
                self._cancel = True
                busy = self._first is not None
            if busy:  # the helper is decoding (or has decoded) chunk 0 into scratch[0]
                with self._ahead_lock:
                    first = _same(self._first, key)
        self._ahead = ahead[0] if ahead is not None and helpers else None
        job = _Job(fn, n if reserved is None else n - 1, itertools.count(1 if first else 0),
                   torch.is_inference_mode_enabled(), torch.is_grad_enabled(), key, reserved, first,
                   ahead if helpers else None)
        self._job, self._waiting = job, helpers
        for k in range(helpers):
            self._go[k].release()
        try:
            self._take(job, self.scratch[0], caller=True)
            with self._claim:
                self._caller_free = True
        finally:
            self._wait_helpers()
            self._job = None
        if job.error is not None:
            raise job.error

    def settle(self) -> None:
        """Wait for a decode ahead still going, and drop it."""
        with self._ahead_lock:
            self._ahead = None

    def _take(self, job: _Job, scratch: torch.Tensor, first_helper: bool = False, decoded: tuple | None = None,
              caller: bool = False) -> None:
        try:
            if job.first and caller:  # chunk 0, decoded ahead into the caller's scratch
                job.fn(0, scratch, True)
            if job.reserved is not None and first_helper:  # its own chunk
                if _same(decoded, job.key):
                    job.fn(job.reserved, scratch, True)
                else:
                    job.fn(job.reserved, scratch)
            while job.error is None and (i := next(job.counter)) < job.n:
                job.fn(i, scratch)
        except BaseException as e:  # the caller raises it once every worker has stopped
            job.error = job.error or e

    def _wait_helpers(self) -> None:
        while self._waiting:
            self._done.acquire()
            self._waiting -= 1

    def _work(self, k: int) -> None:
        torch.set_num_threads(1)  # this thread's intra-op threads (the caller's are left alone)
        self._done.release()
        decoded = None  # key of the chunk decoded ahead into this helper's scratch
        while True:
            self._go[k].acquire()
            job = self._job
            if job is None:
                return
            with torch.inference_mode(job.inference), torch.set_grad_enabled(job.grad):
                self._take(job, self.scratch[k + 1], k == 0, decoded)
                decoded = None
                if k == 0 and job.ahead is not None:
                    decoded = self._decode_ahead(job.ahead)
                    continue
            self._done.release()

    def _decode_ahead(self, ahead: tuple) -> tuple | None:
        """First helper, its share of a job done: release the caller, decode the next job's last
        chunk into its scratch, then its first into the caller's if the caller is done with its
        scratch and the next run has not begun.
        Returns the key if the last chunk was decoded."""
        key, n, decode = ahead
        self._ahead_lock.acquire()  # before the caller sees this job done: settle waits for it
        with self._claim:
            self._cancel, self._first = False, None
        self._done.release()
        decoded = None
        try:
            try:
                decode(n - 1, self.scratch[1])
                decoded = key
            except Exception:  # the run that needs the chunk decodes it again (and raises)
                pass
            with self._claim:
                if self._cancel or not self._caller_free or n < 2:
                    return decoded
                self._first = _BUSY
            try:
                decode(0, self.scratch[0])
                self._first = key
            except Exception:
                self._first = None
            return decoded
        finally:
            self._ahead_lock.release()

    def close(self) -> None:
        """Stop the helper threads and wait for them (idempotent). Runs at interpreter exit too
        (weakref.finalize): a helper still alive when the interpreter finalizes can abort the process."""
        self._wait_helpers()
        self.settle()
        self._job = None
        for g in self._go:
            g.release()
        for t in self._threads:
            t.join()
        self._go = []
        self._threads = []

    @property
    def native_ids(self) -> list[int]:
        """OS thread ids of the helpers (for per-thread CPU accounting)."""
        return [t.native_id for t in self._threads]


def single_intra_op_thread(model: nn.Module) -> None:
    """Run `model`'s forward with one torch intra-op thread on the calling thread (restored after)."""
    forward, ref = type(model).forward, weakref.ref(model)  # no reference cycle through the instance

    @functools.wraps(forward)
    def run(*args, **kwargs):
        n = torch.get_num_threads()
        if n == 1:
            return forward(ref(), *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return forward(ref(), *args, **kwargs)
        finally:
            torch.set_num_threads(n)

    model.forward = run


class OffloadLinear(nn.Module):
    """A linear layer whose stored weight records are set per use (`held.parts`) by its block's hooks.

    On CPU the output rows are computed in chunks (whole Endor tiles, at most SCRATCH_ELEMENTS
    weights, their number a multiple of the pool's workers) by the LinearPool: a dense weight in
    the compute dtype is used in place, others (Endor; bf16 weights computed in fp32) are decoded
    / widened into the worker's scratch first. On accelerators there is one chunk: the whole matrix.
    """

    def __init__(self, key: str, spec: dict, bias: torch.Tensor | None, pool: LinearPool, compute: torch.dtype,
                 chunked: bool):
        super().__init__()
        self.key, self.spec = key, spec  # key: "attn.wqkv.weight" (record names are key + suffix)
        self.out_features, self.in_features = spec["shape"]
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute))
        self.pool = pool  # shared by every OffloadLinear of the model
        self.compute = compute
        self.in_place = spec["format"] == "dense" and getattr(torch, spec["dtype"]) == compute
        self.chunks = row_chunks(self.out_features, self.in_features, _unit(spec), SCRATCH_ELEMENTS, pool.workers) \
            if chunked else [(0, self.out_features)]
        self.held: BlockRecords | None = None  # set by the block's hooks (_hook_blocks)
        self.next: OffloadLinear | None = None  # the block's next linear (_hook_blocks): its last chunk is decoded ahead

    def _parts(self) -> dict[str, torch.Tensor]:
        parts = None if self.held is None else self.held.parts
        if parts is None:
            raise RuntimeError(f"{self.key}: weights used outside their block's forward")
        if self.spec["format"] == "dense":
            return {"": parts[self.key]}
        return {s: parts[f"{self.key}.{s}"] for s in endor.RECORDS if f"{self.key}.{s}" in parts}

    def _rows(self, parts: dict, r0: int, r1: int, scratch: torch.Tensor) -> torch.Tensor:
        """Weight rows [r0, r1) in the compute dtype: the stored rows, or decoded into `scratch`."""
        if self.in_place:
            return parts[""][r0:r1]
        out = scratch[: (r1 - r0) * self.in_features].view(r1 - r0, self.in_features)
        if self.spec["format"] == "dense":
            return out.copy_(parts[""][r0:r1])
        if out.device.type == "cpu":
            return endor.decode_rows(parts, self.spec, r0, r1, out)
        same = out.dtype == getattr(torch, self.spec["dtype"])  # accelerators: one chunk, torch decode
        return endor.decode(parts, self.spec, out) if same else out.copy_(endor.decode(parts, self.spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._parts()
        if len(self.chunks) == 1:
            return F.linear(x, self._rows(parts, 0, self.out_features, self.pool.scratch[0]), self.bias)
        x2 = x.reshape(-1, self.in_features)  # [T, K]
        y = x2.new_empty(x2.shape[0], self.out_features)  # [T, N]

        def chunk(i: int, scratch: torch.Tensor, ready: bool = False) -> None:
            r0, r1 = self.chunks[i]
            b = None if self.bias is None else self.bias[r0:r1]
            w = scratch[: (r1 - r0) * self.in_features].view(r1 - r0, self.in_features) if ready \
                else self._rows(parts, r0, r1, scratch)
            y[:, r0:r1] = F.linear(x2, w, b)

        self.pool.run(chunk, len(self.chunks), key=(self, self.held.parts), ahead=self._ahead())
        return y.view(*x.shape[:-1], self.out_features)

    def _ahead(self) -> tuple | None:
        """(key, chunks, decode(i, scratch)) of the next linear, for the pool to decode its chunks
        ahead while the caller runs the code between the two; None where there is nothing to decode."""
        nxt = self.next
        if nxt is None or nxt.in_place or len(nxt.chunks) < 2:
            return None
        parts = nxt._parts()
        return (nxt, self.held.parts), len(nxt.chunks), lambda i, scratch: nxt._rows(parts, *nxt.chunks[i], scratch)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.spec['format']}, chunks={len(self.chunks)}"


class ChunkedHead(nn.Module):
    """The output head over a weight kept elsewhere (the tied embedding), computed chunk by chunk
    of vocabulary rows by the LinearPool; widened into the worker's scratch when its dtype is not
    the compute dtype."""

    def __init__(self, weight: torch.Tensor, pool: LinearPool, compute: torch.dtype, max_elements: int):
        super().__init__()
        self.weight = weight  # [V, D], shared with the embedding
        self.pool = pool
        self.widen = weight.dtype != compute
        V, D = weight.shape
        # widened: chunks that fit a scratch; used in place: one chunk per worker
        self.chunks = row_chunks(V, D, CHUNK_ROWS, max_elements if self.widen else -(-V * D // pool.workers),
                                 pool.workers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        V, D = self.weight.shape
        x2 = x.reshape(-1, D)  # [T, D]
        y = x2.new_empty(x2.shape[0], V)  # [T, V]

        def chunk(i: int, scratch: torch.Tensor) -> None:
            r0, r1 = self.chunks[i]
            w = self.weight[r0:r1]
            if self.widen:
                w = scratch[: (r1 - r0) * D].view(r1 - r0, D).copy_(w)
            y[:, r0:r1] = F.linear(x2, w)

        self.pool.run(chunk, len(self.chunks))
        return y.view(*x.shape[:-1], V)


@dataclass
class LayerFeed:
    """Hands each block its stored records: resident ones from memory, the others from the streamer."""

    resident: dict[int, dict[str, torch.Tensor]]
    streamer: Streamer | None

    def acquire(self, layer: int) -> dict[str, torch.Tensor]:
        if layer in self.resident:
            return self.resident[layer]
        return self.streamer.acquire(layer)

    def release(self, layer: int) -> None:
        if layer not in self.resident:
            self.streamer.release(layer)


def _read(store: Store, r: RecordInfo, device: torch.device, pinned: bool = False) -> torch.Tensor:
    """One record as a tensor on `device`, read straight into its final (host) memory."""
    host = torch.empty(r.nbytes, dtype=torch.uint8, pin_memory=pinned)
    store.read(r.name, out=host.numpy())
    t = host.view(getattr(torch, r.dtype)).view(r.shape) if r.nbytes else host.view(getattr(torch, r.dtype)).reshape(r.shape)
    return t if pinned else t.to(device)


def _read_fixed(store: Store, target: str, spec: dict, device: torch.device) -> torch.Tensor:
    if spec.get("format") != "dense":
        raise ModelFormatError(f"{store.path}: fixed tensor {target} is not stored dense")
    return _read(store, store.record(target), device)


def _read_layer(store: Store, recs: dict[str, RecordInfo], device: torch.device, pinned: bool = False) -> dict:
    return {k: _read(store, r, device, pinned) for k, r in recs.items()}


def build_offloaded(sm: StoreModel, device: torch.device, device_kind: str, dtype: torch.dtype,
                    kv_dtype: torch.dtype, n_ctx: int | None, max_ctx: int, budget: int | None,
                    cpu_budget: int | None, direct: bool = True, prefetch: int = 1,
                    progress=None, workers: int | None = None) -> tuple[Transformer, Plan]:
    """Plan memory for a dense/Endor store and build the model that follows the plan
    (`workers`: linear workers asked for, see linear_workers).

    Returns:
        (model, plan); model.feed holds the LayerFeed (and its streamer, if any layer streams).
    """
    store, args = sm.store, sm.args
    table = tensor_table(store)
    stored = getattr(torch, store.meta.get("dtype", "bfloat16"))
    if dtype.itemsize < stored.itemsize:
        raise InvalidOptionError(f"this store holds {str(stored).removeprefix('torch.')} weights; compute dtype "
                                 f"{str(dtype).removeprefix('torch.')} would round them (use it or a wider one)")
    workers, layout, plan = _plan(store, args, dtype, kv_dtype, device_kind, n_ctx, max_ctx, budget, cpu_budget,
                                  prefetch, workers)
    with torch.device("meta"):
        model = Transformer(args)
    fixed = [(t, s) for t, s in table.items() if s.get("layer") is None]
    total = len(fixed) + len(plan.resident) + len(plan.host)
    done = 0
    for target, spec in fixed:
        if progress:
            progress(done, total)
        module_name, _, kind = target.rpartition(".")
        t = _read_fixed(store, target, spec, device)
        owner = model.get_submodule(module_name)
        want = tuple(getattr(owner, kind).shape) if getattr(owner, kind, None) is not None else None
        if want is not None and tuple(t.shape) != want:
            raise ModelFormatError(f"{store.path}: tensor {target} has shape {tuple(t.shape)}, the config implies {want}")
        if isinstance(owner, nn.Linear) and kind == "bias" and module_name.split(".", 2)[-1] in LAYER_MODULES:
            owner.bias = nn.Parameter(t, requires_grad=False)  # moved into the OffloadLinear below
        else:
            setattr(owner, kind, nn.Parameter(t, requires_grad=False))
        done += 1
    cpu = device_kind == "cpu"
    pool = LinearPool(workers, layout.decode_scratch_bytes // (_elt(dtype) * workers), dtype, device)
    weakref.finalize(model, pool.close)  # the worker threads stop when the model is dropped
    model.linear_pool = pool
    if cpu:  # one-row products on several intra-op threads only spin (LinearPool)
        single_intra_op_thread(model)
    _swap_linears(model, table, pool, dtype, chunked=cpu)
    head_w = model.lm_head.weight if "lm_head.weight" in table else model.embed.weight  # tied: the embedding
    if cpu or head_w.dtype != dtype:
        limit = SCRATCH_ELEMENTS if cpu else pool.scratch[0].numel()
        swap_linear(model, "lm_head", ChunkedHead(head_w, pool, dtype, limit))
    elif "lm_head.weight" not in table:
        head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device="meta")
        head.weight = model.embed.weight
        swap_linear(model, "lm_head", head)
    records = layer_records(store, table)
    resident = {}
    for i in plan.resident + (plan.host if device_kind == "cpu" else ()):
        if progress:
            progress(done, total)
        resident[i] = _read_layer(store, records[i], device)
        done += 1
    host = {}
    if device_kind != "cpu":
        for i in plan.host:
            host[i] = _read_layer(store, records[i], device, pinned=device.type == "cuda")
            done += 1
    order = [i for i in range(args.num_hidden_layers) if i not in resident]
    streamer = Streamer(store, order, {i: records[i] for i in order}, device, slots=max(plan.slots, 2),
                        direct=direct, host=host) if order else None
    model.feed = LayerFeed(resident, streamer)
    if streamer is not None:  # the reader thread stops when the model is dropped
        weakref.finalize(model, streamer.close)
    _hook_blocks(model)
    model.register_buffer("rope", rope_table(args, plan.n_ctx).to(device), persistent=False)
    model.compute_dtype = dtype
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p is not None and p.is_meta:
            raise ModelFormatError(f"{store.path}: store lacks tensor {name}")
    if progress:
        progress(total, total)
    return model.eval().requires_grad_(False), plan


def _plan(store, args, dtype, kv_dtype, device_kind, n_ctx, max_ctx, budget, cpu_budget,
          prefetch, requested: int | None = None) -> tuple[int, ModelLayout, Plan]:
    """(workers, layout, plan): every linear worker has its own scratch, so a tight budget may
    only fit one worker, or a longer context (n_ctx picked by the planner) with one: then one."""
    tries, err = [], None
    for workers in dict.fromkeys((linear_workers(device_kind, requested), 1)):
        layout = model_layout(store, args, dtype, kv_dtype, device_kind, workers)
        try:
            tries.append((workers, layout, plan_memory(layout, device_kind, budget, cpu_budget, n_ctx=n_ctx,
                                                       max_ctx=max_ctx, prefetch=prefetch)))
        except InvalidOptionError as e:
            err = e
        if layout.decode_scratch_bytes == 0:  # no scratch: the number of workers costs nothing
            break
    if not tries:
        raise err
    longest = max(p.n_ctx for _, _, p in tries)
    return next(t for t in tries if t[2].n_ctx == longest)


def _swap_linears(model: Transformer, table: dict, pool: LinearPool, compute: torch.dtype, chunked: bool) -> None:
    for i, block in enumerate(model.layers):
        for name in LAYER_MODULES:
            target = f"layers.{i}.{name}.weight"
            if target not in table:
                raise ModelFormatError(f"store lacks tensor {target}")
            old = block.get_submodule(name)
            bias = old.bias if old.bias is not None and not old.bias.is_meta else None
            if old.bias is not None and bias is None:
                raise ModelFormatError(f"store lacks the bias tensors for layers.{i}.{name}")
            swap_linear(block, name, OffloadLinear(f"{name}.weight", table[target], bias, pool, compute, chunked))


class BlockRecords:
    """The stored records of one block while it runs (None outside its forward), shared by its
    OffloadLinears: the hooks set one plain attribute, not four nn.Module attributes."""

    __slots__ = ("parts",)

    def __init__(self):
        self.parts: dict[str, torch.Tensor] | None = None


def _hook_blocks(model: Transformer) -> None:
    feed = model.feed
    for i, block in enumerate(model.layers):
        held = BlockRecords()
        linears = [block.get_submodule(n) for n in LAYER_MODULES]  # in the order the block runs them
        for a, b in zip(linears, linears[1:] + [None]):
            a.held = held
            object.__setattr__(a, "next", b)  # a plain reference: not a submodule of `a`

        def pre(mod, args, i=i, held=held):
            held.parts = feed.acquire(i)

        def post(mod, args, out, i=i, held=held):
            held.parts = None
            feed.release(i)

        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)


def describe_store(path) -> dict:
    """What `edge-rt inspect STORE` shows: kind, version, model, bytes per layer."""
    from offload.store import open_store_model

    sm = open_store_model(path)
    store, table = sm.store, tensor_table(sm.store)
    records = layer_records(store, table)
    fixed = sum(r.nbytes for t, s in table.items() if s.get("layer") is None
                for r in target_records(store, t, s).values())
    per_layer = []
    for i in sorted(records):
        formats = sorted({s["format"] for s in table.values() if s.get("layer") == i})
        per_layer.append({"layer": i, "bytes": sum(r.nbytes for r in records[i].values()), "formats": ",".join(formats)})
    info = {"path": str(store.path), "kind": store.kind, "version": store.version,
            "architecture": sm.args.model_type, "layers": sm.args.num_hidden_layers,
            "dtype": store.meta.get("dtype"), "prune": store.meta.get("prune"),
            "file_bytes": store.path.stat().st_size, "fixed_bytes": fixed, "per_layer": per_layer}
    store.close()
    return info
