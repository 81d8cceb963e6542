"""Build a model from a "dense" or "endor" weight store, following the memory plan.

The fixed weights (embedding, norms, output head, biases) are read once. Every block's linear
layers become `OffloadLinear` modules whose stored records (dense weight, or Endor bitmap +
values) are handed to them by a forward pre-hook on the block: from device memory for resident
layers, from the streamer for the others. Endor records are decoded just before use into one
shared scratch matrix, so a layer never exists decoded in full.

The store's tensor table (meta["tensors"]: target -> {"format", "shape", "dtype", "layer", ...})
says what each target is made of; nothing is inferred from record names.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edge_rt.errors import InvalidOptionError, ModelFormatError
from edge_rt.memory.planner import LayerWeights, ModelLayout, Plan, plan_memory
from edge_rt.models.linear import swap_linear
from edge_rt.models.llama import Transformer, rope_table
from offload import endor
from offload.store import RecordInfo, Store, StoreModel
from offload.streamer import Streamer

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
    """Elements of the shared scratch: CPU, chunks of about SCRATCH_ELEMENTS; accelerators, the
    largest matrix that is decoded or widened (Endor weights, or stored dtype != compute dtype)."""
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
    first = [row_chunks(s["shape"][0], s["shape"][1], s.get("tile_rows") if s["format"] == "endor" else CHUNK_ROWS,
                        SCRATCH_ELEMENTS)[0] for s in need]
    return max((r1 - r0) * s["shape"][1] for (r0, r1), s in zip(first, need))


def model_layout(store: Store, args, compute: torch.dtype, kv_dtype: torch.dtype, device_kind: str) -> ModelLayout:
    """The planner's view of a store."""
    table = tensor_table(store)
    layers = layer_records(store, table)
    if sorted(layers) != list(range(args.num_hidden_layers)):
        raise ModelFormatError(f"{store.path}: store has streamable weights for layers {sorted(layers)[:5]}..., "
                               f"the model has {args.num_hidden_layers}")
    fixed = sum(r.nbytes for t, s in table.items() if s.get("layer") is None
                for r in target_records(store, t, s).values())
    stored = getattr(torch, store.meta.get("dtype", "bfloat16"))
    scratch = scratch_elements(table, stored, compute, device_kind) * _elt(compute)
    return ModelLayout(
        fixed_bytes=fixed,
        layers=tuple(LayerWeights(i, sum(r.nbytes for r in layers[i].values())) for i in range(args.num_hidden_layers)),
        decode_scratch_bytes=scratch,
        kv_bytes_per_position=2 * args.num_hidden_layers * args.kv_dim * _elt(kv_dtype),
        hidden_size=args.hidden_size, widest=max(2 * args.intermediate_size, args.q_dim + 2 * args.kv_dim),
        heads=args.num_attention_heads, vocab_size=args.vocab_size, act_elt=_elt(compute),
    )


SCRATCH_ELEMENTS = 1 << 19  # CPU: rows are decoded / widened in chunks of about this many weights
# Dense chunks are aligned like Endor tiles (endor.DEFAULT_TILE_ROWS), so a dense store and an
# Endor store of the same weights run the same chunked products: bit-identical logits.
CHUNK_ROWS = endor.DEFAULT_TILE_ROWS


def row_chunks(n_rows: int, k: int, tile_rows: int | None, scratch_elements: int) -> list[tuple[int, int]]:
    """Row ranges of at most `scratch_elements` weights (whole Endor tiles, at least one tile or row)."""
    step = max(scratch_elements // k, 1)
    if tile_rows:
        step = max(step // tile_rows, 1) * tile_rows
    return [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


class OffloadLinear(nn.Module):
    """A linear layer whose stored weight records are set per use (`parts`) by its block's hook.

    When the weight can be used as stored (dense, compute dtype = stored dtype) it is. Otherwise
    (Endor, or bf16 weights computed in fp32) the weight is decoded / widened chunk by chunk of
    rows into the shared scratch, and each chunk's outputs are computed from it.
    """

    def __init__(self, key: str, spec: dict, bias: torch.Tensor | None, scratch: list, compute: torch.dtype,
                 chunked: bool):
        super().__init__()
        self.key, self.spec = key, spec  # key: "attn.wqkv.weight" (record names are key + suffix)
        self.out_features, self.in_features = spec["shape"]
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute))
        self.scratch = scratch  # [tensor]: shared by every OffloadLinear of the model
        self.compute = compute
        self.in_place = spec["format"] == "dense" and getattr(torch, spec["dtype"]) == compute
        tile = spec.get("tile_rows") if spec["format"] == "endor" else CHUNK_ROWS
        n_scratch = scratch[0].numel()
        self.chunks = row_chunks(self.out_features, self.in_features, tile, n_scratch) if chunked else \
            [(0, self.out_features)]
        self.parts: dict[str, torch.Tensor] | None = None

    def _parts(self) -> dict[str, torch.Tensor]:
        if self.parts is None:
            raise RuntimeError(f"{self.key}: weights used outside their block's forward")
        if self.spec["format"] == "dense":
            return {"": self.parts[self.key]}
        return {s: self.parts[f"{self.key}.{s}"] for s in endor.RECORDS if f"{self.key}.{s}" in self.parts}

    def _rows(self, parts: dict, r0: int, r1: int) -> torch.Tensor:
        """Weight rows [r0, r1) in the compute dtype, in the scratch."""
        out = self.scratch[0][: (r1 - r0) * self.in_features].view(r1 - r0, self.in_features)
        if self.spec["format"] == "dense":
            return out.copy_(parts[""][r0:r1])
        if out.device.type == "cpu":
            return endor.decode_rows(parts, self.spec, r0, r1, out)
        same = out.dtype == getattr(torch, self.spec["dtype"])  # accelerators: one chunk, torch decode
        return endor.decode(parts, self.spec, out) if same else out.copy_(endor.decode(parts, self.spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._parts()
        if self.in_place:
            return F.linear(x, parts[""], self.bias)
        x2 = x.reshape(-1, self.in_features)
        if len(self.chunks) == 1:
            return F.linear(x, self._rows(parts, 0, self.out_features), self.bias)
        y = x2.new_empty(x2.shape[0], self.out_features)
        for r0, r1 in self.chunks:
            b = None if self.bias is None else self.bias[r0:r1]
            y[:, r0:r1] = F.linear(x2, self._rows(parts, r0, r1), b)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.spec['format']}, chunks={len(self.chunks)}"


class WidenedHead(nn.Module):
    """The output head over a stored-dtype weight (the tied embedding), widened chunk by chunk."""

    def __init__(self, weight: torch.Tensor, scratch: list, compute: torch.dtype):
        super().__init__()
        self.weight = weight  # [V, D], shared with the embedding
        self.scratch = scratch
        V, D = weight.shape
        self.chunks = row_chunks(V, D, None, scratch[0].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        V, D = self.weight.shape
        x2 = x.reshape(-1, D)
        y = x2.new_empty(x2.shape[0], V)
        for r0, r1 in self.chunks:
            w = self.scratch[0][: (r1 - r0) * D].view(r1 - r0, D).copy_(self.weight[r0:r1])
            y[:, r0:r1] = F.linear(x2, w)
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
                    progress=None) -> tuple[Transformer, Plan]:
    """Plan memory for a dense/Endor store and build the model that follows the plan.

    Returns:
        (model, plan); model.feed holds the LayerFeed (and its streamer, if any layer streams).
    """
    store, args = sm.store, sm.args
    table = tensor_table(store)
    stored = getattr(torch, store.meta.get("dtype", "bfloat16"))
    if dtype.itemsize < stored.itemsize:
        raise InvalidOptionError(f"this store holds {str(stored).removeprefix('torch.')} weights; compute dtype "
                                 f"{str(dtype).removeprefix('torch.')} would round them (use it or a wider one)")
    layout = model_layout(store, args, dtype, kv_dtype, device_kind)
    plan = plan_memory(layout, device_kind, budget, cpu_budget, n_ctx=n_ctx, max_ctx=max_ctx, prefetch=prefetch)
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
    scratch = [torch.empty(max(layout.decode_scratch_bytes // _elt(dtype), 1), dtype=dtype, device=device)]
    _swap_linears(model, table, scratch, dtype, chunked=device_kind == "cpu")
    head_w = model.lm_head.weight if "lm_head.weight" in table else model.embed.weight  # tied: the embedding
    if head_w.dtype != dtype:
        swap_linear(model, "lm_head", WidenedHead(head_w, scratch, dtype))
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


def _swap_linears(model: Transformer, table: dict, scratch: list, compute: torch.dtype, chunked: bool) -> None:
    for i, block in enumerate(model.layers):
        for name in LAYER_MODULES:
            target = f"layers.{i}.{name}.weight"
            if target not in table:
                raise ModelFormatError(f"store lacks tensor {target}")
            old = block.get_submodule(name)
            bias = old.bias if old.bias is not None and not old.bias.is_meta else None
            if old.bias is not None and bias is None:
                raise ModelFormatError(f"store lacks the bias tensors for layers.{i}.{name}")
            swap_linear(block, name, OffloadLinear(f"{name}.weight", table[target], bias, scratch, compute, chunked))


def _hook_blocks(model: Transformer) -> None:
    feed = model.feed
    for i, block in enumerate(model.layers):
        linears = [block.get_submodule(n) for n in LAYER_MODULES]

        def pre(mod, args, i=i, linears=linears):
            parts = feed.acquire(i)
            for lin in linears:
                lin.parts = parts

        def post(mod, args, out, i=i, linears=linears):
            for lin in linears:
                lin.parts = None
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
