"""The checked, atomically written cache of arrays that every data module builds once and then reads.

Each cached array is a flat little-endian binary file `<name>.bin` plus a JSON sidecar `<name>.json`
(format, split, key, n items, dtype, byte size, sha256 of the .bin, created). Files are written to a
temporary name in the same folder, fsync'ed and renamed; the sidecar is written last. On load the
sidecar, the key, the size and (optionally) the sha256 are checked: anything wrong is reported with its
reason and the caller rebuilds, never uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

CACHE_FORMAT = 1  # bump when the document or token rules change: old caches then no longer match


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Run write(fileobj) on a temporary file next to `path`, fsync it, rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; caches may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_array(path: Path, chunks: Iterable[np.ndarray], key: dict, split: str, dtype: str) -> dict:
    """Write `chunks` (1-D arrays) as one flat array of `dtype` (e.g. "uint16") at `path`, then its
    sidecar `path.with_suffix(".json")`. Returns the sidecar dict."""
    h = hashlib.sha256()
    n = 0

    def write(f: BinaryIO) -> None:
        nonlocal n
        for chunk in chunks:
            b = np.asarray(chunk).astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()
            f.write(b)
            h.update(b)
            n += len(chunk)

    atomic_write(path, write)
    meta = {
        "format": CACHE_FORMAT,
        "split": split,
        "key": key,
        "n_tokens": n,
        "dtype": dtype,
        "bytes": np.dtype(dtype).itemsize * n,
        "sha256": h.hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def check_array(
    path: Path, key: dict, split: str, dtype: str, verify_checksum: bool
) -> tuple[dict | None, str]:
    """(sidecar, "") if `path` is a complete array of `dtype` for `key`, else (None, reason)."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None, "no sidecar" if path.exists() else "missing"
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable sidecar ({e})"
    if meta.get("format") != CACHE_FORMAT or meta.get("split") != split or meta.get("key") != key:
        return None, "sidecar key does not match this configuration"
    if meta.get("dtype") != dtype or meta.get("bytes") != np.dtype(dtype).itemsize * meta.get("n_tokens", -1):
        return None, "sidecar dtype/size fields are inconsistent"
    if not path.is_file():
        return None, "token file missing"
    st = path.stat()
    if st.st_size != meta["bytes"]:
        return None, f"size {st.st_size} bytes, sidecar says {meta['bytes']}"
    if verify_checksum and sha256_file(path) != meta["sha256"]:
        return None, "sha256 mismatch"
    return meta, ""


def open_array(path: Path, meta: dict) -> np.memmap:
    """The checked array at `path` as a read-only memmap of its sidecar's dtype and length."""
    return np.memmap(
        path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r", shape=(meta["n_tokens"],)
    )


def key_digest(key: dict) -> str:
    """A short stable name for a cache key (its JSON's sha256, 16 hex digits)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
