"""The checked, atomically written cache of arrays that every data module builds once and then reads.

A cache entry is one or more named 1-D numpy arrays stored under one cache key (a JSON-able dict saying
what the arrays were built from): a flat token stream, the offsets of ragged documents in it, their
labels. Array `name` is a flat little-endian binary file (e.g. `train.bin`) plus a JSON sidecar next to it
(`train.json`):

    {"format": CACHE_FORMAT, "name": name, "key": key, "dtype": "uint16", "shape": [n],
     "bytes": n * itemsize, "sha256": <of the .bin>, "created": <time>, ...caller's `info`}

Writing: the array goes to a temporary file in the same folder, is fsync'ed and renamed over the target;
the sidecar is written the same way, last. A killed build therefore leaves no sidecar that vouches for a
partial file. Loading (`load_arrays`) checks for every array of the entry the sidecar, its name, key,
dtype and size fields, the file size and (optionally) the sha256; anything wrong is reported with its
reason and the caller rebuilds the entry, never uses it. Checked arrays are `CachedArray`s: read-only
memory maps, opened lazily in each process that reads them.
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
DEFAULT_CACHE_DIR = "~/.cache/flashattn-repro"
MISSING = "missing"  # load_arrays' reason when no file of the entry exists (a first build, not an error)

# The arrays of one cache entry: name -> (file, dtype), e.g. {"train": (dir / "train.bin", "uint16")}.
ArraySpec = dict[str, tuple[Path, str]]


def cache_root(cache_dir: str | None) -> Path:
    """The cache folder: `cache_dir`, else $FLASHREPRO_CACHE, else ~/.cache/flashattn-repro."""
    return Path(os.path.expanduser(cache_dir or os.environ.get("FLASHREPRO_CACHE", DEFAULT_CACHE_DIR)))


def key_digest(key: dict, full: bool = False) -> str:
    """The sha256 of a cache key's JSON: 16 hex digits (a folder name), or all 64 with `full`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return digest if full else digest[:16]


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


def sidecar_path(path: Path) -> Path:
    """The sidecar of the array file `path`: the same name with .json for .bin."""
    return path.with_suffix(".json")


class CachedArray:
    """A checked cache array: 1-D, of its sidecar's dtype and length, read through a read-only memory map
    that is opened on first access in each process (it pickles as its path, so DataLoader workers open
    their own map instead of receiving a copy of the data). Indexing and slicing return numpy arrays;
    `np.asarray(a)` is the whole array."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = Path(path), meta
        self._map: np.ndarray | None = None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"]).newbyteorder("<")

    def __len__(self) -> int:
        return self.meta["shape"][0]

    def array(self) -> np.ndarray:
        """The memory map, shape (len,)."""
        if self._map is None:
            if len(self) == 0:  # an empty file cannot be mapped
                self._map = np.zeros(0, dtype=self.dtype)
            else:
                self._map = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(len(self),))
        return self._map

    def __getitem__(self, index):
        return self.array()[index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.array(), dtype=dtype)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}


def write_array(
    path: Path,
    name: str,
    dtype: str,
    chunks: Iterable[np.ndarray] | np.ndarray,
    key: dict,
    info: dict | None = None,
) -> CachedArray:
    """Write `chunks` (1-D arrays, concatenated in order; or one array) as one flat little-endian array of
    `dtype` (e.g. "uint16") at `path`, then its sidecar (see the module doc; `info` adds fields to it).
    Values must fit `dtype`: they are cast without a range check."""
    if isinstance(chunks, np.ndarray):
        chunks = [chunks]
    h, n = hashlib.sha256(), 0

    def write(f: BinaryIO) -> None:
        nonlocal n
        for chunk in chunks:
            b = np.asarray(chunk).astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()
            f.write(b)
            h.update(b)
            n += len(chunk)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    meta = {
        "format": CACHE_FORMAT,
        "name": name,
        "key": key,
        "dtype": dtype,
        "shape": [n],
        "bytes": np.dtype(dtype).itemsize * n,
        "sha256": h.hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(info or {}),
    }
    atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return CachedArray(path, meta)


def check_array(
    path: Path, name: str, dtype: str, key: dict, verify_checksum: bool
) -> tuple[dict | None, str]:
    """(sidecar, "") if `path` is a complete array `name` of `dtype` written for `key`, else (None, reason);
    the reason is MISSING when neither the file nor its sidecar exists."""
    side = sidecar_path(path)
    if not side.is_file():
        return None, "no sidecar" if path.exists() else MISSING
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable sidecar ({e})"
    # Token files written before arrays had names and shapes name their split and count their tokens.
    named = meta.get("name", meta.get("split"))
    if meta.get("format") != CACHE_FORMAT or named != name or meta.get("key") != key:
        return None, "sidecar key does not match this configuration"
    shape = meta.get("shape", [meta["n_tokens"]] if "n_tokens" in meta else None)
    if (
        meta.get("dtype") != dtype
        or not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int))
        or meta.get("bytes") != np.dtype(dtype).itemsize * shape[0]
    ):
        return None, "sidecar dtype/shape/size fields are inconsistent"
    if not path.is_file():
        return None, "array file missing"
    size = path.stat().st_size
    if size != meta["bytes"]:
        return None, f"size {size} bytes, sidecar says {meta['bytes']}"
    if verify_checksum and sha256_file(path) != meta["sha256"]:
        return None, "sha256 mismatch"
    return meta | {"name": named, "shape": shape}, ""


def load_arrays(
    spec: ArraySpec, key: dict, verify_checksum: bool = True
) -> tuple[dict[str, CachedArray] | None, str]:
    """The arrays of a cache entry if every one is complete and written for `key`: ({name: CachedArray},
    ""); else (None, reason): MISSING when none of them exists, else "<file>: <what is wrong>" for the
    first bad one."""
    arrays, reasons = {}, []
    for name, (path, dtype) in spec.items():
        meta, why = check_array(path, name, dtype, key, verify_checksum)
        if meta is None:
            reasons.append((path, why))
        else:
            arrays[name] = CachedArray(path, meta)
    if not reasons:
        return arrays, ""
    if len(reasons) == len(spec) and all(why == MISSING for _, why in reasons):
        return None, MISSING
    path, why = reasons[0]
    return None, f"{path}: {why}"
