"""The streamer: a background thread that reads layers from a store ahead of the compute.

Layers not resident on the device are visited in a fixed cyclic order (one forward visits each
once, in order). The reader thread fills `slots` reused buffers, so it runs up to slots - 1
layers ahead of the compute and keeps prefetching across forwards (the first layers of the next
token are read while the current one finishes). Reads use O_DIRECT when asked, so the disk, not
the page cache, is measured.

On CUDA the disk reads land in pinned host buffers and are copied to device buffers with
asynchronous copies on a side stream; events order copy -> compute -> next copy into the same
slot. Layers of the host tier (pinned RAM) take the same path without the disk read.

If a forward stops half way (an exception), the next `acquire` sees that the layer it asks for
is not the one next in line, and restarts the reader at that layer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from offload.store import RecordInfo, Store, aligned_buffer

POLL_S = 0.05  # how often a blocked reader checks for shutdown


@dataclass
class StreamStats:
    """Counters since the last `reset_stats` (seconds are wall time)."""

    layers_read: int = 0
    bytes_read: int = 0
    read_s: float = 0.0  # reader thread: disk reads, checksums and copies
    stall_s: float = 0.0  # compute thread: waiting for a layer that was not ready yet

    @property
    def hidden_fraction(self) -> float:
        """Share of the reader's time the compute did not wait for (1.0: I/O fully hidden)."""
        return 1.0 - min(self.stall_s / self.read_s, 1.0) if self.read_s else 1.0


def _view(buf: torch.Tensor, r: RecordInfo) -> torch.Tensor:
    """A record's dtype and shape over the first nbytes of a uint8 buffer."""
    return buf[: r.nbytes].view(getattr(torch, r.dtype)).view(r.shape)


class Streamer:
    """Reads `order`'s layers into reused slots; `acquire(layer)` / `release(layer)` around their use."""

    def __init__(self, store: Store, order: list[int], records: dict[int, dict[str, RecordInfo]],
                 device: torch.device, slots: int = 2, direct: bool = True, verify: bool = True,
                 host: dict[int, dict[str, torch.Tensor]] | None = None):
        """
        Args:
            store: the open store.
            order: streamed layer indices in forward order.
            records: layer -> {key: RecordInfo} (key: the record name without "layers.{i}.").
            device: where the compute runs.
            slots: reused buffers (>= 2: one in use, one being filled).
            direct: O_DIRECT reads.
            verify: check record checksums on every read.
            host: layer -> {key: pinned host tensor} for host-tier layers (copied, not read).
        """
        if slots < 2:
            raise ValueError("the streamer needs at least 2 slots")
        self.store, self.order, self.records = store, list(order), records
        self.device, self.direct, self.verify = device, direct, verify
        self.host = host or {}
        self.position = {layer: k for k, layer in enumerate(self.order)}
        self.nslots = slots
        self.stats = StreamStats()
        self.cuda = device.type == "cuda"
        keys = sorted({k for layer in self.order for k in records[layer]})
        size = {k: max(records[layer][k].nbytes for layer in self.order if k in records[layer]) for k in keys}
        self._host_bufs = [{k: self._host_buffer(size[k]) for k in keys} for _ in range(slots)]
        self._dev_bufs = self._host_bufs if device.type == "cpu" else [
            {k: torch.empty(size[k], dtype=torch.uint8, device=device) for k in keys} for _ in range(slots)]
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(device)
            self._copied = [torch.cuda.Event() for _ in range(slots)]
            self._consumed = [None] * slots
        self._thread: threading.Thread | None = None
        self._start(0)

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        if self.cuda:  # pinned (page-aligned) memory: O_DIRECT target and async H2D source
            return torch.empty(max(-(-nbytes // 4096) * 4096, 4096), dtype=torch.uint8, pin_memory=True)
        return torch.from_numpy(aligned_buffer(nbytes))

    # --- the reader thread -----------------------------------------------------------------

    def _start(self, seq: int) -> None:
        self._stop = threading.Event()
        self._free = [threading.Semaphore(1) for _ in range(self.nslots)]
        self._ready = [threading.Semaphore(0) for _ in range(self.nslots)]
        self._slot_layer: list[int | None] = [None] * self.nslots
        self._error: BaseException | None = None
        self._seq = seq  # consumer's next sequence number
        self._thread = threading.Thread(target=self._run, args=(seq,), name="edge-rt-streamer", daemon=True)
        self._thread.start()

    def _run(self, seq: int) -> None:
        n = len(self.order)
        while not self._stop.is_set():
            s = seq % self.nslots
            while not self._free[s].acquire(timeout=POLL_S):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            layer = self.order[seq % n]
            try:
                self._load(layer, s)
            except BaseException as e:  # handed to the consumer, which raises it
                self._error = e
                self._slot_layer[s] = layer
                self._ready[s].release()
                return
            self._slot_layer[s] = layer
            self._ready[s].release()
            seq += 1

    def _load(self, layer: int, s: int) -> None:
        t0 = time.perf_counter()
        recs = self.records[layer]
        src = self.host.get(layer)
        if src is None:
            for k, r in recs.items():
                self.store.read(r.name, out=self._host_bufs[s][k].numpy(), direct=self.direct, verify=self.verify)
            self.stats.bytes_read += sum(r.nbytes for r in recs.values())
        if self.device.type != "cpu":
            self._to_device(recs, s, src)
        self.stats.layers_read += 1
        self.stats.read_s += time.perf_counter() - t0

    def _to_device(self, recs: dict[str, RecordInfo], s: int, src: dict | None) -> None:
        if not self.cuda:  # MPS and others: synchronous copies
            for k, r in recs.items():
                data = src[k] if src is not None else self._host_bufs[s][k][: r.nbytes]
                self._dev_bufs[s][k][: r.nbytes].copy_(data.reshape(-1).view(torch.uint8))
            return
        with torch.cuda.stream(self._copy_stream):
            if self._consumed[s] is not None:  # the compute that used this slot must be done
                self._copy_stream.wait_event(self._consumed[s])
            for k, r in recs.items():
                data = src[k] if src is not None else self._host_bufs[s][k][: r.nbytes]
                self._dev_bufs[s][k][: r.nbytes].copy_(data.reshape(-1).view(torch.uint8), non_blocking=True)
            self._copied[s].record(self._copy_stream)
        self._copied[s].synchronize()  # the pinned staging buffer is reused by the next read

    # --- the compute side ------------------------------------------------------------------

    def acquire(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's records as tensors on the device (views of a slot), waiting if needed."""
        pos = self.position[layer]
        if self._seq % len(self.order) != pos or self._error is not None or not self._thread.is_alive():
            self.restart(pos)
        s = self._seq % self.nslots
        t0 = time.perf_counter()
        self._ready[s].acquire()
        self.stats.stall_s += time.perf_counter() - t0
        if self._error is not None:
            err = self._error
            self.restart(pos)
            raise err
        if self._slot_layer[s] != layer:  # cannot happen while forwards visit layers in order
            raise RuntimeError(f"streamer slot holds layer {self._slot_layer[s]}, layer {layer} was asked for")
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[s])
        return {k: _view(self._dev_bufs[s][k], r) for k, r in self.records[layer].items()}

    def release(self, layer: int) -> None:
        """The compute is done with the layer (on CUDA: once the queued work finishes)."""
        s = self._seq % self.nslots
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._consumed[s] = ev
        self._seq += 1
        self._free[s].release()

    def restart(self, pos: int) -> None:
        """Stop the reader and start it again at order position `pos`."""
        self.close()
        self._start(pos)

    def close(self) -> None:
        """Stop the reader thread (the buffers stay until the streamer is dropped)."""
        if self._thread is not None:
            self._stop.set()
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None

    def reset_stats(self) -> None:
        self.stats = StreamStats()


def host_copy(t: np.ndarray | torch.Tensor, pinned: bool) -> torch.Tensor:
    """A host tensor (pinned when asked) holding a copy of t's bytes as uint8."""
    src = torch.from_numpy(np.ascontiguousarray(t).reshape(-1).view(np.uint8)) if isinstance(t, np.ndarray) else t
    out = torch.empty(src.numel() * src.element_size(), dtype=torch.uint8, pin_memory=pinned)
    out.copy_(src.reshape(-1).view(torch.uint8))
    return out
