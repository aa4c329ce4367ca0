"""Webdataset shards and atomic writes.

One sample per document: `tokens.npy` (uint32 ids) and `json` (metadata). A shard is written to a
temporary name and renamed when complete, with a JSON sidecar holding its statistics, so a re-run
can keep finished shards and rebuild the manifest without reading them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: Path):
    """Yield a temporary sibling directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
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
    """Yield `(key, token_ids, metadata)` from a shard written by `write_shard`."""
    import webdataset as wds

    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode():
        yield sample["__key__"], np.asarray(sample["tokens.npy"]), sample["json"]
