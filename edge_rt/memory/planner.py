"""The memory planner: (model layout, device, budgets, options) -> Plan. A pure function.

Tiers, fastest first:
- device: the `budget`. Always holds the fixed weights (embedding, norms, output head, biases),
  the KV cache for n_ctx, activation scratch, the decode scratch (per linear worker: a chunk of rows
  on CPU, the largest decoded matrix on accelerators), and
  then whole layers in their stored form ("resident"), first layer first, while room is left.
- host RAM: the optional `cpu_budget`. On CUDA, layers held in pinned host memory and copied to
  the device per use, plus the pinned staging buffers disk reads land in. On a CPU device host
  and device memory are the same RAM: host-tier layers are used in place, and the promise is
  budget + cpu_budget.
- disk: the remaining layers stream from the store, read by a background thread into
  `slots` = prefetch + 1 reused buffers (at least one layer ahead of the compute).

The budget covers everything the planner places (weights, buffers, KV cache, activations); the
process's own runtime (interpreter, torch, tokenizer, allocator slack) is the fixed overhead
documented in docs/OFFLOAD.md. A budget below the smallest plan that works is refused with
that minimum in the message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edge_rt.errors import InvalidOptionError
from edge_rt.memory.sizes import format_size

PREFILL_CHUNK = 512  # backends.torch_backend.PREFILL_CHUNK: tokens per forward at most
CTX_CHOICES = (4096, 2048, 1024, 512, 256, 128, 64)  # n_ctx tried when a budget is set and n_ctx is not


@dataclass(frozen=True)
class LayerWeights:
    """The streamable weights of one block: its linear matrices in stored form."""

    index: int
    stored_bytes: int
    read_bytes: int = 0  # bytes one streamed read of the layer moves (its records' span, whole pages); 0: stored_bytes

    @property
    def io_bytes(self) -> int:
        return self.read_bytes or self.stored_bytes


@dataclass(frozen=True)
class ModelLayout:
    """What the planner needs to know about a model (from a store's header)."""

    fixed_bytes: int  # always resident: embedding, norms, output head, biases
    layers: tuple[LayerWeights, ...]
    decode_scratch_bytes: int  # decode / widen scratch of all linear workers; 0 when weights are used as stored
    kv_bytes_per_position: int  # all layers, K and V, in the KV dtype
    hidden_size: int
    widest: int  # widest activation row: max(2 * intermediate, q + 2 kv)
    heads: int
    vocab_size: int
    act_elt: int  # bytes per activation element (compute dtype)

    def activation_bytes(self, n_ctx: int) -> int:
        """Upper bound of activation scratch for one forward of min(n_ctx, PREFILL_CHUNK) tokens."""
        T = min(n_ctx, PREFILL_CHUNK)
        rows = T * (self.widest * self.act_elt * 4 + self.hidden_size * 4 * 4)
        scores = self.heads * T * n_ctx * 4
        return rows + scores + 4 * self.vocab_size * 4


@dataclass(frozen=True)
class Plan:
    """Where every layer's weights live and what that costs (bytes)."""

    device_kind: str
    n_ctx: int
    budget: int | None
    cpu_budget: int | None
    resident: tuple[int, ...]  # layers held on the device in stored form
    host: tuple[int, ...]  # layers held in host RAM (pinned on CUDA)
    streamed: tuple[int, ...]  # layers read from disk for every forward
    slots: int  # reused stream buffers (prefetch depth + 1); 0 when nothing streams
    slot_bytes: int  # bytes of one stream buffer (the largest streamed layer)
    kv_bytes: int
    activation_bytes: int
    device_bytes: int  # predicted peak on the device
    host_bytes: int  # predicted host RAM beyond the device tier (CUDA: host tier + pinned staging)
    minimum_budget: int  # the smallest budget that works at this n_ctx
    io_bytes_per_forward: int  # bytes read from disk per forward
    breakdown: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_cost(layout: ModelLayout, layers) -> int:
    return sum(layout.layers[i].stored_bytes for i in layers)


def _slot_bytes(layout: ModelLayout) -> int:
    """One stream buffer: the largest streamed read."""
    return max((lw.io_bytes for lw in layout.layers), default=0)


def minimum_budget(layout: ModelLayout, device_kind: str, n_ctx: int, prefetch: int = 1) -> int:
    """The smallest device budget that runs the model at n_ctx (stream all, or all resident if smaller)."""
    base = (layout.fixed_bytes + layout.kv_bytes_per_position * n_ctx + layout.activation_bytes(n_ctx)
            + layout.decode_scratch_bytes)
    stream_all = base + (prefetch + 1) * _slot_bytes(layout)
    resident_all = base + _layer_cost(layout, range(len(layout.layers)))
    return min(stream_all, resident_all) if layout.layers else base


def plan_memory(layout: ModelLayout, device_kind: str, budget: int | None = None, cpu_budget: int | None = None, *,
                n_ctx: int | None = None, max_ctx: int = 4096, prefetch: int = 1) -> Plan:
    """Place every layer's weights for the given budgets.

    Args:
        layout: the model's sizes (ModelLayout).
        device_kind: "cpu" | "cuda" | "mps" (devices.Device.kind).
        budget: device bytes (None: everything resident, no promise).
        cpu_budget: host RAM bytes for the host tier (None: no host tier).
        n_ctx: context length; None picks the largest of CTX_CHOICES (<= max_ctx) that fits.
        max_ctx: the model's largest context.
        prefetch: layers read ahead of the compute (>= 1).
    Returns:
        The Plan. Raises InvalidOptionError when the budget is below the minimum (named).
    """
    if not isinstance(prefetch, int) or prefetch < 1:
        raise InvalidOptionError(f"prefetch must be an integer >= 1, got {prefetch!r}")
    if cpu_budget is not None and budget is None:
        raise InvalidOptionError("cpu_budget needs a (device) budget too")
    if n_ctx is None:
        choices = [c for c in CTX_CHOICES if c <= max_ctx] or [max_ctx]
        fits = [c for c in choices if budget is None or minimum_budget(layout, device_kind, c, prefetch) <= budget]
        n_ctx = fits[0] if fits else choices[-1]
    need = minimum_budget(layout, device_kind, n_ctx, prefetch)
    if budget is not None and budget < need:
        largest = _slot_bytes(layout)
        raise InvalidOptionError(
            f"budget {format_size(budget)} is below the minimum of {format_size(need)} ({need} bytes) for this model "
            f"at n_ctx {n_ctx}: fixed weights {format_size(layout.fixed_bytes)}, {prefetch + 1} stream buffers of the "
            f"largest layer ({format_size(largest)}), KV cache {format_size(layout.kv_bytes_per_position * n_ctx)}, "
            f"activations {format_size(layout.activation_bytes(n_ctx))}")
    return _place(layout, device_kind, budget, cpu_budget, n_ctx, prefetch, need)


def _place(layout, device_kind, budget, cpu_budget, n_ctx, prefetch, need) -> Plan:
    n = len(layout.layers)
    kv = layout.kv_bytes_per_position * n_ctx
    act = layout.activation_bytes(n_ctx)
    base = layout.fixed_bytes + kv + act + layout.decode_scratch_bytes
    everything = base + _layer_cost(layout, range(n))
    if budget is None or everything <= budget:
        return _plan(layout, device_kind, n_ctx, budget, cpu_budget, tuple(range(n)), (), (), 0, 0, kv, act, need)
    slots = prefetch + 1
    slot_bytes = _slot_bytes(layout)
    room = budget - base - slots * slot_bytes
    resident = _fill(layout, range(n), room)
    rest = [i for i in range(n) if i not in resident]
    host: tuple[int, ...] = ()
    staging = slots * slot_bytes if device_kind != "cpu" else 0  # CPU: the slots are the staging buffers
    if cpu_budget is not None:
        host = _fill(layout, rest, cpu_budget - staging)
    streamed = tuple(i for i in rest if i not in host)
    if not streamed:  # host-tier layers still pass through the device's stream buffers on CUDA
        slots = slots if device_kind != "cpu" and host else 0
    return _plan(layout, device_kind, n_ctx, budget, cpu_budget, resident, host, streamed,
                 slots, slot_bytes if slots else 0, kv, act, need)


def _fill(layout: ModelLayout, candidates, room: int) -> tuple[int, ...]:
    """Layers (in order) that fit in `room` bytes."""
    chosen = []
    for i in candidates:
        cost = layout.layers[i].stored_bytes
        if cost <= room:
            chosen.append(i)
            room -= cost
    return tuple(chosen)


def _plan(layout, device_kind, n_ctx, budget, cpu_budget, resident, host, streamed, slots, slot_bytes,
          kv, act, need) -> Plan:
    fixed = layout.fixed_bytes
    resident_b = _layer_cost(layout, resident)
    host_b = _layer_cost(layout, host)
    buffers = slots * slot_bytes
    scratch = layout.decode_scratch_bytes
    device = fixed + resident_b + buffers + kv + act + scratch
    if device_kind == "cpu":
        device += host_b  # same RAM: host-tier layers are used in place
        host_total = 0
    else:
        host_total = host_b + (buffers if streamed else 0)  # pinned staging for disk reads
    breakdown = {"fixed_weights": fixed, "resident_layers": resident_b, "host_layers": host_b,
                 "stream_buffers": buffers, "decode_scratch": scratch, "kv_cache": kv, "activations": act}
    io = sum(layout.layers[i].io_bytes for i in streamed)
    return Plan(device_kind, n_ctx, budget, cpu_budget, tuple(resident), tuple(host), tuple(streamed), slots,
                slot_bytes, kv, act, device, host_total, need, io, breakdown)
