"""Webdataset shards: written and read here only, and atomic writes.

One sample per document: `tokens.npy` (uint32 ids) and `json` (metadata). A shard is written to a
temporary name and renamed when complete, with a JSON sidecar holding its statistics, so a re-run
can keep finished shards and rebuild the manifest without reading them.

Every file and directory written here ends with the mode the umask gives (0644 / 0755 under the
usual 022): temporary files are created 0600 and renaming keeps that mode, so it is set before the
rename (a shared project group must be able to read shards, manifests and checkpoints).
"""

from __future__ import annotations

import contextlib
import glob
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


# --------------------------------------------------------------------------------------------
# Reading: the one reader of the format, for local shards and URLs alike
# --------------------------------------------------------------------------------------------
class BadShard(SodaError):
    """A missing or corrupt shard found while streaming."""


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def expand_shards(location: str) -> list[str]:
    """A brace pattern, glob or single path/URL -> the shard list; local shards must exist."""
    import braceexpand

    names = list(braceexpand.braceexpand(location))
    if is_url(location):
        return names
    found: list[str] = []
    for name in names:
        matches = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
        missing = [m for m in matches if not Path(m).is_file()]
        if not matches or missing:
            raise SodaError(f"--data {location}: shard {missing[0] if missing else name} not found")
        found.extend(matches)
    return found


def open_shard(url: str):
    """A binary stream of a local file, or of a URL through webdataset's openers (http(s), pipe:, ...)."""
    if is_url(url):
        import webdataset as wds

        return wds.gopen(url)
    return open(url, "rb")


def shard_documents(url: str, start: int = 0, vocab_size: int | None = None):
    """Yield `(index, token_ids as int64)` for the documents of one shard, from document `start` on; ids
    outside `vocab_size` make the shard bad (BadShard)."""
    for index, _, tokens, _ in _documents(url, start, vocab_size, meta=False):
        yield index, tokens.astype(np.int64)


def read_shard(path):
    """Yield `(key, token_ids, metadata)` from a shard written by `write_shard`."""
    for _, key, tokens, meta in _documents(str(path), 0, None, meta=True):
        yield key, tokens, meta


def _documents(url: str, start: int, vocab_size: int | None, meta: bool):
    """`(index, key, tokens, metadata)` per document of a shard from document `start` on.

    Shards are data, possibly made by someone else: only the members the format defines are read,
    `tokens.npy` through numpy without pickle and `json` as JSON (when `meta`); other members are ignored, as
    is a sample without `tokens.npy` (not a document). Read with tarfile, not webdataset: its default
    decoders unpickle `.pyd`/`.pkl` members (running code). tarfile ends an archive silently at the first
    damaged header after the first member, so a local shard's tail is checked too: only zero padding may
    follow the last member.
    """
    index = -1
    try:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, members = None, {}
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, suffix = base.partition(".")  # webdataset's rule: the key ends at the first dot
                if not member.isfile() or not dot:
                    continue
                this = f"{folder}/{stem}" if folder else stem
                if this != key:
                    if "tokens.npy" in members:
                        index += 1
                        if index >= start:
                            yield index, key, *_decode(key, members, vocab_size)
                    key, members = this, {}
                if suffix == "tokens.npy" and not meta:  # nothing else to wait for: the document is complete
                    index += 1
                    if index >= start:
                        yield index, key, *_decode(key, {suffix: tar.extractfile(member).read()}, vocab_size)
                elif suffix == "tokens.npy" or suffix == "json" and meta:  # skipped documents are not read
                    members[suffix] = tar.extractfile(member).read() if index + 1 >= start else b""
            if "tokens.npy" in members:
                index += 1
                if index >= start:
                    yield index, key, *_decode(key, members, vocab_size)
            end = tar.offset
        if not is_url(url):
            with open(url, "rb") as f:
                f.seek(end)
                if f.read().strip(b"\0"):
                    raise ValueError("damaged data after the last readable document (truncated or corrupt)")
    except (tarfile.TarError, ValueError, EOFError, OSError) as e:
        raise BadShard(f"shard {url} is unreadable after document {index}: {e}") from None


def _decode(key: str, members: dict, vocab_size: int | None) -> tuple[np.ndarray, dict]:
    try:
        tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
        meta = json.loads(members["json"]) if "json" in members else {}
    except (ValueError, UnicodeDecodeError, EOFError, OSError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"document {key} is unreadable ({err})") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ValueError(f"document {key} holds {tokens.dtype} {tokens.shape}, not a 1-D id array")
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"document {key} holds id {int(tokens.max())}, outside the vocabulary of {vocab_size:,}")
    if not isinstance(meta, dict):
        raise ValueError(f"document {key} has JSON metadata that is not an object")
    return tokens, meta


# --------------------------------------------------------------------------------------------
# Seeking: where each document's ids lie, so a reader takes any slice without reading the rest
# --------------------------------------------------------------------------------------------
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i8"), ("dtype", "S4")])  # one row per document


def index_shard(path: str) -> np.ndarray:
    """One INDEX_DTYPE row per document of a local shard, in `shard_documents`' order: the byte offset of its ids
    (past the `.npy` header), their count and dtype. Reads only tar and `.npy` headers; a damaged or truncated shard
    raises BadShard (the same checks as reading it whole, bar the ids' range, which `read_ids` checks)."""
    rows, key, size = [], None, os.path.getsize(path)
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, suffix = base.partition(".")
                if not member.isfile() or not dot or suffix != "tokens.npy":
                    continue
                this = f"{folder}/{stem}" if folder else stem
                if this == key:  # a second tokens.npy of one sample: the reader keeps the first
                    continue
                key = this
                f.seek(member.offset_data)
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                if len(shape) != 1 or dtype.kind not in "iu" or dtype.hasobject:
                    raise ValueError(f"document {this} holds {dtype} {shape}, not a 1-D id array")
                start = f.tell()
                if start + shape[0] * dtype.itemsize > min(size, member.offset_data + member.size):
                    raise ValueError(f"document {this} is truncated")
                rows.append((start, shape[0], dtype.str.encode()))
            end = tar.offset
            f.seek(end)
            if f.read().strip(b"\0"):
                raise ValueError("damaged data after the last readable document (truncated or corrupt)")
    except (tarfile.TarError, ValueError, EOFError, OSError) as e:
        raise BadShard(f"shard {path} is unreadable after document {len(rows) - 1}: {e}") from None
    return np.array(rows, dtype=INDEX_DTYPE)


def read_ids(path: str, row, start: int, stop: int, vocab_size: int | None = None) -> np.ndarray:
    """Ids `start:stop` (int64) of the document `row` (an `index_shard` row) of a local shard; ids outside
    `vocab_size` make the shard bad (BadShard)."""
    dtype = np.dtype(row["dtype"].decode())
    try:
        with open(path, "rb") as f:
            f.seek(int(row["offset"]) + start * dtype.itemsize)
            data = f.read((stop - start) * dtype.itemsize)
    except OSError as e:
        raise BadShard(f"shard {path} is unreadable: {e.strerror or e}") from None
    if len(data) != (stop - start) * dtype.itemsize:
        raise BadShard(f"shard {path} is shorter than its index says (changed since it was indexed?)")
    ids = np.frombuffer(data, dtype=dtype).astype(np.int64)
    if vocab_size is not None and ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise BadShard(f"shard {path}: a document holds id {int(ids.max())}, outside the vocabulary of "
                       f"{vocab_size:,}")
    return ids
