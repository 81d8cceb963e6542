"""Weight stores: one file of named, aligned tensor records with a checksummed header.

Layout (format version 1, little-endian):

    [0, 4096)            preamble: PREAMBLE struct (magic, version, header offset/length/crc32,
                         file size), zero padded
    [4096, ...)          records, each starting at a multiple of ALIGN (4096) so that O_DIRECT
                         reads land on whole pages; zero padding in between
    [header_offset, EOF) header: UTF-8 JSON {"kind", "meta", "records": [...]}

Each record entry holds name, dtype, shape, nbytes, offset, crc32 (of its bytes) and its own
meta dict. The header goes last because record offsets are only known once every record is
written; the preamble pointing at it is written after it, then the file is fsynced and renamed
into place. A crash before that leaves only `path + ".tmp"`, never a file that opens as valid.

Store meta["model"] holds what loading needs without the original model file (`model_meta`):
{"args": ModelArgs.to_dict(), "format": "gguf" | "hf", "tokenizer": GGUF tokenizer metadata or
the HF tokenizer files' text, "source": original path}.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edge_rt.errors import ModelFormatError, ModelNotFoundError, one_line

MAGIC = b"EDGERTWS"  # edge-rt weight store
VERSION = 1
ALIGN = 4096
PREAMBLE = struct.Struct("<8sIIQQIQ")  # magic, version, flags, header_offset, header_len, header_crc, file_size
KINDS = ("dense", "endor", "bitstack")
MAX_HEADER_BYTES = 1 << 30  # a header larger than this is corrupt, not a store

# dtype name -> numpy storage dtype. bfloat16 has no numpy type: it is stored and returned as
# uint16 bit patterns (`read_tensor` views it as torch.bfloat16).
DTYPES = {
    "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64,
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
    "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "bool": np.bool_,
}  # fmt: skip
# Hugging Face tokenizer files kept in a store built from an HF folder (loading/tokenizer.py reads them).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# GGUF metadata keys the tokenizer needs (Tokenizer.from_gguf_metadata).
GGUF_TOKENIZER_PREFIXES = ("tokenizer.", "general.architecture")


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer of at least `nbytes`, padded to ALIGN (usable for O_DIRECT reads)."""
    size = max(_round_up(nbytes), ALIGN)
    return np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)


def _torch_dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _as_bytes_array(array) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """(contiguous uint8 view, dtype name, shape) of a numpy array or torch tensor."""
    if type(array).__module__.startswith("torch"):
        import torch

        t = array.detach().cpu().contiguous()
        name = _torch_dtype_name(t)
        if name not in DTYPES:
            raise ValueError(f"dtype {name} cannot be stored")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        return raw, name, tuple(t.shape)
    a = np.ascontiguousarray(array)
    name = a.dtype.name
    if name not in DTYPES:
        raise ValueError(f"dtype {name} cannot be stored")
    return a.reshape(-1).view(np.uint8), name, tuple(a.shape)


@dataclass(frozen=True)
class RecordInfo:
    """One record of a store, as its header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int
    crc32: int
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes,
                "offset": self.offset, "crc32": self.crc32, "meta": self.meta}


class StoreWriter:
    """Write a store atomically: `with StoreWriter(path, kind, meta) as w: w.add(name, array)`.

    Records go to `path + ".tmp"`; a clean exit writes the header and preamble, fsyncs and renames
    it to `path` (then fsyncs the folder). An exception removes the temp file.
    """

    def __init__(self, path: str | os.PathLike, kind: str, meta: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"store kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.path = Path(path)
        self.tmp = Path(str(self.path) + ".tmp")
        self.kind = kind
        self.meta = dict(meta or {})
        json.dumps(self.meta)  # fail now, not after gigabytes are written
        self.records: dict[str, RecordInfo] = {}
        self._fh = None
        self._pos = ALIGN

    def __enter__(self) -> "StoreWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.tmp, "wb")
        self._fh.write(b"\0" * ALIGN)  # preamble placeholder: an unfinished file has no magic
        return self

    def add(self, name: str, array, meta: dict | None = None) -> RecordInfo:
        """Append one record (numpy array or torch tensor; bfloat16 tensors kept bit for bit)."""
        if self._fh is None:
            raise RuntimeError("StoreWriter.add outside its `with` block")
        if not isinstance(name, str) or not name:
            raise ValueError(f"record name must be a non-empty string, got {name!r}")
        if name in self.records:
            raise ValueError(f"record {name!r} added twice")
        meta = dict(meta or {})
        json.dumps(meta)
        raw, dtype, shape = _as_bytes_array(array)
        offset = _round_up(self._pos)
        self._fh.write(b"\0" * (offset - self._pos))
        self._fh.write(memoryview(raw))
        self._pos = offset + raw.nbytes
        info = RecordInfo(name, dtype, shape, int(raw.nbytes), offset, zlib.crc32(memoryview(raw)), meta)
        self.records[name] = info
        return info

    def _finish(self) -> None:
        header = json.dumps({"kind": self.kind, "meta": self.meta,
                             "records": [r.to_json() for r in self.records.values()]}).encode()
        header_offset = _round_up(self._pos)
        self._fh.write(b"\0" * (header_offset - self._pos))
        self._fh.write(header)
        size = header_offset + len(header)
        self._fh.seek(0)
        self._fh.write(PREAMBLE.pack(MAGIC, VERSION, 0, header_offset, len(header), zlib.crc32(header), size))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._finish()
                return
            except BaseException:
                self._abort()
                raise
        self._abort()

    def _abort(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)


class Store:
    """A weight store opened for reading. Use `Store.open(path)`; thread-safe reads (pread)."""

    def __init__(self, path: Path, fd: int, kind: str, meta: dict, version: int, records: dict[str, RecordInfo]):
        self.path, self._fd = path, fd
        self.kind, self.meta, self.version, self.records = kind, meta, version, records
        self._direct_fd: int | None = None
        self._direct_ok = hasattr(os, "O_DIRECT")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        """Open and validate a store (magic, version, header checksum, record bounds).

        Raises:
            ModelNotFoundError for a missing file, ModelFormatError naming the problem otherwise.
        """
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{p}: no such store file") from None
        except OSError as e:
            raise ModelFormatError(f"{p}: cannot open ({one_line(e)})") from None
        try:
            return cls(p, fd, *_parse(p, fd))
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def record(self, name: str) -> RecordInfo:
        try:
            return self.records[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: store has no record {name!r}") from None

    def read(self, name: str, out: np.ndarray | None = None, direct: bool = False, verify: bool = True) -> np.ndarray:
        """Read one record as a numpy array of its dtype and shape (bfloat16 as uint16 bits).

        Args:
            name: record name.
            out: optional buffer (any contiguous array with at least nbytes bytes) to read into;
                the result is a view of it. For direct reads pass one from `aligned_buffer`.
            direct: bypass the page cache (O_DIRECT; where that is unavailable or `out` is not
                page-aligned, a normal read followed by posix_fadvise DONTNEED).
            verify: check the record's crc32.
        Raises:
            ModelFormatError naming the record on a checksum mismatch or a short read.
        """
        r = self.record(name)
        need = _round_up(r.nbytes) if direct else r.nbytes
        if out is None:
            buf = aligned_buffer(r.nbytes) if direct else np.empty(r.nbytes, np.uint8)
        else:
            buf = out.reshape(-1).view(np.uint8)
            if buf.nbytes < r.nbytes:
                raise ValueError(f"buffer of {buf.nbytes} bytes is too small for record {name!r} ({r.nbytes})")
        got = self._read_into(buf, r.offset, r.nbytes, need, direct)
        if got < r.nbytes:
            raise ModelFormatError(f"{self.path}: record {name!r} is truncated ({got} of {r.nbytes} bytes)")
        data = buf[: r.nbytes]
        if verify and zlib.crc32(memoryview(data)) != r.crc32:
            raise self.corrupt(name)
        return data.view(DTYPES[r.dtype]).reshape(r.shape)

    def read_range(self, offset: int, nbytes: int, out: np.ndarray, direct: bool = False) -> np.ndarray:
        """Read `nbytes` of the file at `offset` (both multiples of ALIGN for an O_DIRECT read) into
        `out` in one request, unverified: the caller checks the records it covers (`corrupt`).

        Returns:
            uint8 view of out's first nbytes. Raises ModelFormatError on a short read.
        """
        buf = out.reshape(-1).view(np.uint8)
        if buf.nbytes < nbytes:
            raise ValueError(f"buffer of {buf.nbytes} bytes is too small for {nbytes} bytes")
        got = self._read_into(buf, offset, nbytes, nbytes, direct)
        if got < nbytes:
            raise ModelFormatError(f"{self.path}: short read at offset {offset} ({got} of {nbytes} bytes)")
        return buf[:nbytes]

    def corrupt(self, name: str) -> ModelFormatError:
        """The error for a record whose bytes do not match its checksum."""
        return ModelFormatError(f"{self.path}: checksum mismatch in record {name!r} (the store is corrupt)")

    def read_tensor(self, name: str, out: np.ndarray | None = None, direct: bool = False, verify: bool = True):
        """`read` as a torch tensor of the record's dtype (bfloat16 included); shares memory."""
        import torch

        r = self.record(name)
        a = self.read(name, out=out, direct=direct, verify=verify)
        t = torch.from_numpy(a.reshape(-1).view(np.uint8))
        return t.view(getattr(torch, r.dtype)).view(r.shape) if r.nbytes else torch.empty(r.shape, dtype=getattr(torch, r.dtype))

    def _read_into(self, buf: np.ndarray, offset: int, nbytes: int, need: int, direct: bool) -> int:
        aligned = buf.ctypes.data % ALIGN == 0 and buf.nbytes >= need and offset % ALIGN == 0
        if direct and aligned and self._direct_ok:
            fd = self._open_direct()
            if fd is not None:
                return min(_pread_all(fd, memoryview(buf)[:need], offset), nbytes)
        got = _pread_all(self._fd, memoryview(buf)[:nbytes], offset)
        if direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        return got

    def _open_direct(self) -> int | None:
        if self._direct_fd is None:
            try:
                self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # tmpfs and some others refuse O_DIRECT
                self._direct_ok = False
                return None
        return self._direct_fd

    def evict(self) -> None:
        """Drop this file's pages from the page cache (posix_fadvise DONTNEED), for cold reads."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def nbytes(self, prefix: str = "") -> int:
        """Total bytes of the records whose names start with `prefix`."""
        return sum(r.nbytes for n, r in self.records.items() if n.startswith(prefix))


def _pread_all(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _parse(p: Path, fd: int) -> tuple[str, dict, int, dict[str, RecordInfo]]:
    size = os.fstat(fd).st_size
    pre = os.pread(fd, PREAMBLE.size, 0)
    if len(pre) < PREAMBLE.size:
        raise ModelFormatError(f"{p}: too short to be an edge-rt store ({size} bytes)")
    magic, version, _flags, h_off, h_len, h_crc, f_size = PREAMBLE.unpack(pre)
    if magic != MAGIC:
        raise ModelFormatError(f"{p}: not an edge-rt store (bad magic)")
    if version != VERSION:
        raise ModelFormatError(f"{p}: store format version {version} is not supported (this edge-rt reads {VERSION})")
    if f_size != size:
        raise ModelFormatError(f"{p}: store is truncated or extended ({size} bytes, header says {f_size})")
    if h_off < ALIGN or h_len > MAX_HEADER_BYTES or h_off + h_len != size:
        raise ModelFormatError(f"{p}: store header location is corrupt")
    header = os.pread(fd, h_len, h_off)
    if len(header) != h_len or zlib.crc32(header) != h_crc:
        raise ModelFormatError(f"{p}: store header checksum mismatch (the header is corrupt)")
    try:
        h = json.loads(header.decode("utf-8"))
        kind, meta, entries = h["kind"], h["meta"], h["records"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{p}: store header is not valid ({one_line(e)})") from None
    if kind not in KINDS or not isinstance(meta, dict) or not isinstance(entries, list):
        raise ModelFormatError(f"{p}: store header is not valid (kind {kind!r})")
    records = {}
    for e in entries:
        r = _record(p, e, h_off)
        if r.name in records:
            raise ModelFormatError(f"{p}: record {r.name!r} appears twice")
        records[r.name] = r
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in records.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ModelFormatError(f"{p}: records {a!r} and {b!r} overlap")
    return kind, meta, version, records


def _record(p: Path, e, limit: int) -> RecordInfo:
    """Validate one header entry: types, dtype, size consistent with shape, inside the data area."""
    try:
        name, dtype, shape = e["name"], e["dtype"], e["shape"]
        nbytes, offset, crc, meta = e["nbytes"], e["offset"], e["crc32"], e.get("meta", {})
    except (KeyError, TypeError):
        raise ModelFormatError(f"{p}: a store record entry is malformed") from None
    ints = [nbytes, offset, crc, *(shape if isinstance(shape, list) else [None])]
    if (not isinstance(name, str) or dtype not in DTYPES or not isinstance(shape, list) or not isinstance(meta, dict)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints)):
        raise ModelFormatError(f"{p}: store record {str(name)[:80]!r} has a malformed entry")
    numel = 1
    for s in shape:
        numel *= s
    if numel * np.dtype(DTYPES[dtype]).itemsize != nbytes:
        raise ModelFormatError(f"{p}: record {name!r}: {nbytes} bytes do not match shape {shape} of {dtype}")
    if offset % ALIGN or offset < ALIGN or offset + nbytes > limit:
        raise ModelFormatError(f"{p}: record {name!r} lies outside the data area of the file")
    return RecordInfo(name, dtype, tuple(shape), nbytes, offset, crc, meta)


# --- what loading needs from a store without the original model file -------------------------


def model_meta(source) -> dict:
    """meta["model"] for a store made from `source` (an api.ModelSource)."""
    if source.format == "gguf":
        tok = {k: _jsonable(v) for k, v in source.metadata.items() if k.startswith(GGUF_TOKENIZER_PREFIXES)}
    else:
        tok = {n: (source.path / n).read_text(encoding="utf-8") for n in HF_TOKENIZER_FILES
               if (source.path / n).is_file()}
    return {"args": source.args.to_dict(), "format": source.format, "tokenizer": tok, "source": str(source.path)}


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


@dataclass
class StoreModel:
    """A store opened as a model source (the parts of api.ModelSource that loading uses)."""

    path: Path
    format: str  # "store"
    args: object  # ModelArgs
    store: Store
    source_format: str  # "gguf" | "hf": how the tokenizer is described
    tokenizer_meta: dict
    tensors: dict = field(default_factory=dict)
    file_types: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def tokenizer(self):
        """The model's tokenizer, rebuilt from the store's meta."""
        from edge_rt.loading.tokenizer import Tokenizer

        if self.source_format == "gguf":
            return Tokenizer.from_gguf_metadata(self.tokenizer_meta)
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            for n, text in self.tokenizer_meta.items():
                if n in HF_TOKENIZER_FILES:
                    Path(d, n).write_text(text, encoding="utf-8")
            return Tokenizer.from_hf_folder(d)


def is_store(path: str | os.PathLike) -> bool:
    """True when `path` is a file starting with the store magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def open_store_model(path: str | os.PathLike) -> StoreModel:
    """Open a store and the model description in its meta (ModelFormatError when it has none)."""
    from edge_rt.models.llama import ModelArgs

    store = Store.open(path)
    m = store.meta.get("model")
    try:
        args = ModelArgs(**m["args"])
        args.validate()
        fmt, tok = m["format"], m["tokenizer"]
        if fmt not in ("gguf", "hf") or not isinstance(tok, dict):
            raise ValueError(f"format {fmt!r}")
    except (TypeError, KeyError, ValueError) as e:
        store.close()
        raise ModelFormatError(f"{store.path}: store has no valid model description ({one_line(e)})") from None
    types = {}
    for r in store.records.values():
        types[r.dtype] = types.get(r.dtype, 0) + 1
    return StoreModel(store.path, "store", args, store, fmt, tok, file_types=types, metadata=store.meta)
