"""The streamer: a background thread that reads layers from a store ahead of the compute.

Layers not resident on the device are visited in a fixed cyclic order (one forward visits each
once, in order). The reader thread fills `slots` reused buffers, so it runs up to slots - 1
layers ahead of the compute and keeps prefetching across forwards (the first layers of the next
token are read while the current one finishes). A layer's records lie next to each other in the
file, so a layer is one read request, from its first record to the end of its last, instead of
one per record (an Endor layer had 12, three of them 4 KiB tile-offset tables); the records are
views into that buffer. Reads use O_DIRECT when asked, so the disk, not the page cache, is
measured.

Checksums (`verify`): "every" checks every record's CRC32 on every read; "sampled" (the
default) checks a layer's records in full on its first read, keeping the running CRC at
SAMPLE_SLICES slice boundaries, then checks one slice of each record per later read (a
different slice each time, so every byte is checked again every SAMPLE_SLICES reads) at
1/SAMPLE_SLICES of the cost; "off" checks nothing. A mismatch raises ModelFormatError naming
the record.

On CUDA the disk reads land in pinned host buffers and are copied to device buffers with
asynchronous copies on a side stream; events order copy -> compute -> next copy into the same
slot. Layers of the host tier (pinned RAM) take the same path without the disk read.

If a forward stops half way (an exception), the next `acquire` sees that the layer it asks for
is not the one next in line, and restarts the reader at that layer.

The GIL: a read releases it, but the reader needs it back to hand the layer over and start the
next read, and with Python's default switch interval (5 ms) a busy compute thread keeps it for
up to that long, which is longer than reading a 4 MB layer. While any reader thread runs, the
interpreter's switch interval is lowered to SWITCH_INTERVAL_S (restored when the last one
stops): in the offload benchmark, interleaved with and without, Endor / dense streaming went from
1.68-1.81x to 1.96x (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import sys
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from offload.store import ALIGN, RecordInfo, Store, aligned_buffer

POLL_S = 0.05  # how often a blocked reader checks for shutdown
VERIFY = ("every", "sampled", "off")
SAMPLE_SLICES = 8  # "sampled": a record is checked again in full every this many reads
SAMPLE_MIN_BYTES = 1 << 16  # "sampled": records up to this size are checked in full on every read
SWITCH_INTERVAL_S = 0.0002  # the GIL switch interval while a reader runs (module doc)


class _SwitchInterval:
    """Counts running readers; lowers sys.setswitchinterval while there is one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._readers = 0
        self._saved: float | None = None

    def enter(self) -> None:
        with self._lock:
            if self._readers == 0 and sys.getswitchinterval() > SWITCH_INTERVAL_S:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(SWITCH_INTERVAL_S)
            self._readers += 1

    def exit(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._readers == 0 and self._saved is not None:
                sys.setswitchinterval(self._saved)
                self._saved = None


_switch = _SwitchInterval()


def read_span(records) -> int:
    """Bytes one read of a layer moves: from its first record to the end of its last, whole pages."""
    rs = list(records)
    start, end = min(r.offset for r in rs), max(r.offset + r.nbytes for r in rs)
    return -(-(end - start) // ALIGN) * ALIGN


@dataclass
class StreamStats:
    """Counters since the last `reset_stats` (seconds are wall time)."""

    layers_read: int = 0
    bytes_read: int = 0
    read_s: float = 0.0  # reader thread: disk reads, checksums and copies
    verify_s: float = 0.0  # reader thread: the checksum part of read_s
    stall_s: float = 0.0  # compute thread: waiting for a layer that was not ready yet

    @property
    def hidden_fraction(self) -> float:
        """Share of the reader's time the compute did not wait for (1.0: I/O fully hidden)."""
        return 1.0 - min(self.stall_s / self.read_s, 1.0) if self.read_s else 1.0


def _view(buf: torch.Tensor, at: int, r: RecordInfo) -> torch.Tensor:
    """A record's dtype and shape over nbytes of a uint8 buffer from byte `at`."""
    return buf[at : at + r.nbytes].view(getattr(torch, r.dtype)).view(r.shape)


class Streamer:
    """Reads `order`'s layers into reused slots; `acquire(layer)` / `release(layer)` around their use."""

    def __init__(self, store: Store, order: list[int], records: dict[int, dict[str, RecordInfo]],
                 device: torch.device, slots: int = 2, direct: bool = True, verify: str | bool = "sampled",
                 host: dict[int, dict[str, torch.Tensor]] | None = None):
        """
        Args:
            store: the open store.
            order: streamed layer indices in forward order.
            records: layer -> {key: RecordInfo} (key: the record name without "layers.{i}.").
            device: where the compute runs.
            slots: reused buffers (>= 2: one in use, one being filled).
            direct: O_DIRECT reads.
            verify: "every", "sampled" or "off" (module docstring); True means "every", False "off".
            host: layer -> {key: pinned host tensor} for host-tier layers (copied, not read).
        """
        if slots < 2:
            raise ValueError("the streamer needs at least 2 slots")
        verify = {True: "every", False: "off"}.get(verify, verify)
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        self.store, self.order, self.records = store, list(order), records
        self.device, self.direct, self.verify = device, direct, verify
        self.host = host or {}
        self.position = {layer: k for k, layer in enumerate(self.order)}
        self.nslots = slots
        self.stats = StreamStats()
        self.cuda = device.type == "cuda"
        # layer -> (file offset of its first record, bytes of its one read); record -> byte in the slot
        self.span = {i: (min(r.offset for r in records[i].values()), read_span(records[i].values()))
                     for i in self.order}
        self.at = {i: {k: r.offset - self.span[i][0] for k, r in records[i].items()} for i in self.order}
        size = max(n for _, n in self.span.values())
        self._host_bufs = [{"layer": self._host_buffer(size)} for _ in range(slots)]
        self._dev_bufs = self._host_bufs if device.type == "cpu" else [
            {"layer": torch.empty(size, dtype=torch.uint8, device=device)} for _ in range(slots)]
        self._crc_marks: dict[tuple[int, str], list[int]] = {}  # "sampled": running CRC at slice bounds
        self._reads: dict[int, int] = {}  # layer -> reads so far (picks the slice to check)
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
        self._error_seq = -1  # the sequence number whose read failed
        self._seq = seq  # consumer's next sequence number
        self._thread = threading.Thread(target=self._run, args=(seq,), name="edge-rt-streamer", daemon=True)
        _switch.enter()
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
            except BaseException as e:  # handed to the consumer, which raises it when it gets to this layer
                self._error, self._error_seq = e, seq
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
            start, nbytes = self.span[layer]
            data = self.store.read_range(start, nbytes, self._host_bufs[s]["layer"].numpy(), direct=self.direct)
            self.stats.bytes_read += nbytes
            if self.verify != "off":
                t1 = time.perf_counter()
                self._check(layer, data)
                self.stats.verify_s += time.perf_counter() - t1
        if self.device.type != "cpu":
            self._to_device(layer, recs, s, src)
        self.stats.layers_read += 1
        self.stats.read_s += time.perf_counter() - t0

    def _check(self, layer: int, data: np.ndarray) -> None:
        """Check the layer's records in `data` (its read span) against their CRC32s (policy: `verify`)."""
        n = self._reads.get(layer, 0)
        self._reads[layer] = n + 1
        for k, r in self.records[layer].items():
            rec = memoryview(data[self.at[layer][k] : self.at[layer][k] + r.nbytes])
            marks = self._crc_marks.get((layer, k))
            if self.verify == "every" or r.nbytes <= SAMPLE_MIN_BYTES:
                ok = zlib.crc32(rec) == r.crc32
            elif marks is None:  # first read: all of it, keeping the running CRC at each slice bound
                marks, crc = [0], 0
                for a, b in _slices(r.nbytes):
                    crc = zlib.crc32(rec[a:b], crc)
                    marks.append(crc)
                ok = crc == r.crc32
                if ok:
                    self._crc_marks[(layer, k)] = marks
            else:  # later reads: one slice, continuing from the CRC of everything before it
                j = (n - 1) % SAMPLE_SLICES
                a, b = _slices(r.nbytes)[j]
                ok = zlib.crc32(rec[a:b], marks[j]) == marks[j + 1]
            if not ok:
                self._crc_marks.pop((layer, k), None)  # a read again is checked in full
                raise self.store.corrupt(r.name)

    def _to_device(self, layer: int, recs: dict[str, RecordInfo], s: int, src: dict | None) -> None:
        """Copy the slot's read span (or the host-tier layer's records) to the device buffer."""
        dev = self._dev_bufs[s]["layer"]
        if src is None:
            n = self.span[layer][1]
            pairs = [(dev[:n], self._host_bufs[s]["layer"][:n])]
        else:
            pairs = [(dev[self.at[layer][k] : self.at[layer][k] + r.nbytes], src[k].reshape(-1).view(torch.uint8))
                     for k, r in recs.items()]
        if not self.cuda:  # MPS and others: synchronous copies
            for d, h in pairs:
                d.copy_(h)
            return
        with torch.cuda.stream(self._copy_stream):
            if self._consumed[s] is not None:  # the compute that used this slot must be done
                self._copy_stream.wait_event(self._consumed[s])
            for d, h in pairs:
                d.copy_(h, non_blocking=True)
            self._copied[s].record(self._copy_stream)
        self._copied[s].synchronize()  # the pinned staging buffer is reused by the next read

    # --- the compute side ------------------------------------------------------------------

    def acquire(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's records as tensors on the device (views of a slot), waiting if needed."""
        pos = self.position[layer]
        failed = self._error is not None  # a read ahead failed: the layers read before it are good
        if self._seq % len(self.order) != pos or (not failed and not self._thread.is_alive()):
            self.restart(pos)
        s = self._seq % self.nslots
        t0 = time.perf_counter()
        self._ready[s].acquire()
        self.stats.stall_s += time.perf_counter() - t0
        if self._error is not None and self._error_seq == self._seq:
            err = self._error
            self.restart(pos)
            raise err
        if self._slot_layer[s] != layer:  # cannot happen while forwards visit layers in order
            raise RuntimeError(f"streamer slot holds layer {self._slot_layer[s]}, layer {layer} was asked for")
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[s])
        buf, at = self._dev_bufs[s]["layer"], self.at[layer]
        return {k: _view(buf, at[k], r) for k, r in self.records[layer].items()}

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
            _switch.exit()

    def reset_stats(self) -> None:
        self.stats = StreamStats()


def _slices(nbytes: int) -> list[tuple[int, int]]:
    """SAMPLE_SLICES byte ranges covering a record ("sampled" verification)."""
    step = -(-nbytes // SAMPLE_SLICES)
    return [(min(j * step, nbytes), min((j + 1) * step, nbytes)) for j in range(SAMPLE_SLICES)]


def host_copy(t: np.ndarray | torch.Tensor, pinned: bool) -> torch.Tensor:
    """A host tensor (pinned when asked) holding a copy of t's bytes as uint8."""
    src = torch.from_numpy(np.ascontiguousarray(t).reshape(-1).view(np.uint8)) if isinstance(t, np.ndarray) else t
    out = torch.empty(src.numel() * src.element_size(), dtype=torch.uint8, pin_memory=pinned)
    out.copy_(src.reshape(-1).view(torch.uint8))
    return out
