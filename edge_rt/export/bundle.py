"""The export bundle on disk: model file, tokenizer, chat template and a checksummed manifest.

    BUNDLE/
      model.pte | model.onnx     the exported graph (static KV cache, dynamic token count)
      tokenizer.json             Hugging Face tokenizers format (read by tokenizers-cpp, ORT extensions, ...)
      tokenizer_config.json      bos/eos tokens, add_bos_token, chat_template
      chat_template.jinja        the chat template (also in tokenizer_config.json)
      manifest.json              what a runtime needs to drive the graph, and sha256 of every file

A bundle is written into a temporary folder next to its destination, every file fsynced, then
renamed into place: an interrupted export never leaves a folder that opens as a bundle.
`open_bundle` checks the manifest's format version, the presence, size and sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_rt.errors import InvalidOptionError, ModelFormatError, ModelNotFoundError, UnsupportedModelError, one_line

MANIFEST = "manifest.json"
FORMAT = "edge-rt-bundle"
FORMAT_VERSION = 1

# --format name -> (runtime recorded in the manifest, model file name)
RUNTIMES = {"executorch": ("executorch", "model.pte"), "onnx": ("onnxruntime", "model.onnx")}


@dataclass
class Bundle:
    """An opened, verified bundle."""

    path: Path
    manifest: dict

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def model_file(self) -> Path:
        return self.path / self.manifest["model_file"]


def is_bundle(path) -> bool:
    """True when `path` is a folder with a manifest.json (valid or not)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_file_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to path via a temp file, fsync and rename."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(dest: Path) -> Path:
    """A fresh temporary folder next to `dest` (same file system, so the final rename is atomic).

    Raises InvalidOptionError when the destination cannot be written.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise InvalidOptionError(f"output {dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not is_bundle(dest):
        raise InvalidOptionError(f"output folder {dest} is not empty and holds no bundle; choose another -o")
    parent = dest.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}.", suffix=".tmp"))
    except OSError as e:
        raise InvalidOptionError(f"cannot write the bundle to {dest}: {one_line(e.strerror or e)}") from None


def finish_bundle(stage: Path, dest: Path, manifest: dict) -> Path:
    """Checksum every staged file, write manifest.json, fsync, and move the folder to `dest`.

    An existing bundle at `dest` is replaced; the old one is removed only after the new one is in place.
    """
    files = {}
    for f in sorted(stage.iterdir()):
        if f.name == MANIFEST or not f.is_file():
            continue
        f.chmod(0o644)  # mkstemp makes 0600; a bundle is meant to be shipped and read by others
        _fsync_path(f)
        files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {**manifest, "files": files}
    write_file_atomic(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (stage / MANIFEST).chmod(0o644)
    stage.chmod(0o755)
    _fsync_path(stage)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(stage, dest)
    _fsync_path(dest.absolute().parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def open_bundle(path, verify: bool = True) -> Bundle:
    """Open a bundle folder and check it.

    Args:
        path: the bundle folder.
        verify: check the sha256 of every file (a few seconds for hundreds of MB).
    Returns:
        Bundle(path, manifest).
    Raises:
        ModelNotFoundError (no folder, no manifest, a listed file missing), ModelFormatError (bad
        manifest, size or checksum mismatch), UnsupportedModelError (a newer format version).
    """
    p = Path(path)
    if not p.is_dir():
        raise ModelNotFoundError(f"bundle folder {p} does not exist")
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise ModelNotFoundError(f"{p} has no {MANIFEST}: not an edge-rt bundle")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{mpath}: unreadable manifest: {one_line(e)}") from None
    if not isinstance(manifest, dict) or manifest.get("bundle_format") != FORMAT:
        raise ModelFormatError(f"{mpath}: not an edge-rt bundle manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UnsupportedModelError(f"{mpath}: bundle format version {version!r}; this edge-rt reads up to {FORMAT_VERSION}")
    for key in ("format", "model_file", "files", "args", "max_seq", "max_chunk", "tokenizer"):
        if key not in manifest:
            raise ModelFormatError(f"{mpath}: manifest lacks {key!r}")
    if manifest["format"] not in RUNTIMES:
        raise UnsupportedModelError(f"{mpath}: unknown bundle format {manifest['format']!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or manifest["model_file"] not in files:
        raise ModelFormatError(f"{mpath}: the model file is not listed in 'files'")
    for name in files:  # names and presence first: a missing file is named as missing
        if not isinstance(name, str) or Path(name).name != name:
            raise ModelFormatError(f"{mpath}: file name {name!r} is not a plain name")
        if not (p / name).is_file():
            raise ModelNotFoundError(f"bundle {p} is missing {name}")
    for name, entry in files.items():
        f = p / name
        if f.stat().st_size != entry.get("bytes"):
            raise ModelFormatError(f"bundle file {name} has {f.stat().st_size} bytes, the manifest says {entry.get('bytes')}")
        if verify and sha256_file(f) != entry.get("sha256"):
            raise ModelFormatError(f"bundle file {name} fails its sha256 check (tampered or corrupt)")
    return Bundle(p, manifest)
