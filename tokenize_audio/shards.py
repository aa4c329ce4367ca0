"""Webdataset shards and atomic writes.

One sample per document: `tokens.npy` (uint32 ids) and `json` (metadata). A shard is written to a
temporary name and renamed when complete, with a JSON sidecar holding its statistics, so a re-run
can keep finished shards and rebuild the manifest without reading them.

Every file and directory written here ends with the mode the umask gives (0644 / 0755 under the
usual 022): temporary files are created 0600 and renaming keeps that mode, so it is set before the
rename (a shared project group must be able to read shards, manifests and checkpoints).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path

import numpy as np

from tokenize_audio.errors import SodaError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask. POSIX can only read it by setting it, so it is swapped for 0o077 (never a
    looser mode for a file another thread creates meanwhile) and restored at once, under a lock."""
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _set_umask_mode(fd_or_path, directory: bool = False) -> None:
    mode = (0o777 if directory else 0o666) & ~current_umask()
    with contextlib.suppress(NotImplementedError, PermissionError):  # filesystems without modes refuse chmod
        if isinstance(fd_or_path, int):
            os.fchmod(fd_or_path, mode)
        else:
            os.chmod(fd_or_path, mode)


def apply_umask_tree(root: Path) -> None:
    """Give every file and folder under `root` the umask's mode: for what a library wrote into an atomic directory
    through temporary files of its own (safetensors' weights come out 0600)."""
    for p in Path(root).rglob("*"):
        if not p.is_symlink():
            _set_umask_mode(p, directory=p.is_dir())


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a binary file open on a temporary name beside `path`; on success it replaces `path`.

    The temporary file lives in the destination directory (never $TMPDIR: a small node-local /tmp must
    not fail a large write, and the rename stays atomic). On exit it is flushed, fsynced and given the
    umask's mode, then renamed over `path`; on any exception it is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)  # reopened by name, so `f.name` is the temporary path (for error messages)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            _set_umask_mode(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: Path):
    """Yield a temporary sibling directory; on success it replaces `path` in one rename (umask mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        apply_umask_tree(tmp)
        _set_umask_mode(tmp, directory=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_shard(path: Path, samples: list[tuple[str, np.ndarray, dict]]) -> None:
    """Write `(key, token_ids, metadata)` samples as a webdataset tar, atomically."""
    import webdataset as wds

    path = Path(path)
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0) as sink:  # fixed mtime: the same input gives byte-identical shards
        for key, tokens, meta in samples:
            sink.write({"__key__": key, "tokens.npy": np.asarray(tokens, dtype=np.uint32), "json": meta})
    atomic_write_bytes(path, buf.getvalue())


def read_shard(path: Path):
    """Yield `(key, token_ids, metadata)` from a shard written by `write_shard`.

    Shards are data, possibly made by someone else: only the members the format defines are read,
    `tokens.npy` through numpy without pickle and `json` as JSON; other members are ignored. Read with
    tarfile, not webdataset: its default decoders unpickle `.pyd`/`.pkl` members (running code) and its
    URLs run `pipe:` commands. A sample without `tokens.npy` is not a document and is passed over.
    """
    try:
        with tarfile.open(path, mode="r|*") as tar:
            key, members = None, {}
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, suffix = base.partition(".")  # webdataset's rule: the key ends at the first dot
                if not member.isfile() or not dot:
                    continue
                this = f"{folder}/{stem}" if folder else stem
                if this != key:
                    if key is not None:
                        yield from _document(path, key, members)
                    key, members = this, {}
                if suffix in ("tokens.npy", "json"):
                    members[suffix] = tar.extractfile(member).read()
            if key is not None:
                yield from _document(path, key, members)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise SodaError(f"shard {path} is unreadable ({err})") from None


def _document(path: Path, key: str, members: dict):
    if "tokens.npy" not in members:
        return
    try:
        tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
        meta = json.loads(members["json"]) if "json" in members else {}
    except (ValueError, UnicodeDecodeError, EOFError, OSError) as err:  # JSONDecodeError is a ValueError
        raise SodaError(f"shard {path}: document {key} is unreadable ({err})") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise SodaError(f"shard {path}: document {key} holds {tokens.dtype} {tokens.shape}, not a 1-D id array")
    if not isinstance(meta, dict):
        raise SodaError(f"shard {path}: document {key} has JSON metadata that is not an object")
    yield key, tokens, meta
