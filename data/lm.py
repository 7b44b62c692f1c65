"""Language-modelling data: documents -> one token stream per split -> (x, y) windows.

Pipeline (`LMDataModule`):
  1. documents from a source (`data.corpus`: the Hub, local text files/tarballs, or the embedded stdlib
     corpus), split into "train" and "validation";
  2. tokenized with `Dataset.map(batched=True, num_proc=...)` (`data.tokenizer`), EOS after each document,
     and written once per split as a flat uint16 token file `<split>.bin` plus a JSON sidecar
     `<split>.json` in `<cache_dir>/tokens/<slug>-<key>/`;
  3. read through `np.memmap` as windows of seq_len + 1 tokens: window i is tokens[i*seq_len :
     (i+1)*seq_len + 1], x = window[:-1], y = window[1:]. Batches are (x, y), both int64 of shape
     (batch_size, seq_len), batch_size being the micro-batch per device. Every token is a target once.

Token cache. The key is a JSON dict of: the source identity (Hub name/config; or a sha256 over the
local/stdlib files' names and bytes), the tokenizer identity (kind + sha256 of its files), sample_by and
the split rule. Files are written to a temporary name in the same folder, fsync'ed and renamed; the
sidecar (key, split, n_tokens, dtype, byte size, sha256 of the .bin) is written last. On load the sidecar,
the key, the file size and (unless verify_checksum=False) the sha256 are checked; anything wrong is
logged and the split is rebuilt, never used.

Training order (deterministic and resumable). A "data epoch" e is the permutation
``np.random.default_rng([seed, e]).permutation(n_windows)``; its first N * B * W entries (N = n_windows //
(B*W) micro-batches per rank, B = batch_size, W = world size) are viewed as (N, W, B): micro-batch i of
rank r is ``perm.reshape(N, W, B)[i, r]``. Ranks read disjoint windows; the union of the W micro-batches
i is the global micro-batch i a single process with batch B*W would read. Lightning's epochs are these
epochs (the sampler's ``set_epoch``).

Resume rule. When `train_dataloader()` is built, the start position is derived from the trainer:
``steps_per_epoch = ceil(num_training_batches / accumulate_grad_batches)`` (Lightning's own count, which
steps the optimizer on a partial accumulation at the end of an epoch), then ``epoch, step =
divmod(trainer.global_step, steps_per_epoch)`` and the first micro-batch is ``step *
accumulate_grad_batches`` of that epoch. (When an epoch's batch count is a multiple of
accumulate_grad_batches, this is simply ``global_step * accumulate_grad_batches * batch_size`` samples per
rank into the sequence of epochs.) Lightning restores `global_step` from the checkpoint
before it builds the train loader (``fit(ckpt_path=...)``), so a resumed run reads exactly the batches
an uninterrupted one would have read, provided the checkpoint was taken at an optimizer-step boundary
(ModelCheckpoint's ``every_n_train_steps``, end of epoch, validation at a step boundary). The train
loader's ``state_dict()`` (saved by Lightning in the checkpoint) records what the order depends on
(seed, seq_len, batch size, world size, cache key); a resume with different values logs a warning,
since the batches then differ from the uninterrupted run's.

Validation: windows 0..n_val-1 in order, n_val = all windows or ``val_tokens // seq_len``, rounded down
to a multiple of W; rank r reads windows r, r + W, r + 2W, ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data import corpus
from data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the document or token rules change: old caches then no longer match
SPLITS = ("train", "validation")
DEFAULT_CACHE_DIR = "~/.cache/flashattn-repro"


# ----------------------------------------------------------------------------- token files


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
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


def write_token_file(ds, path: Path, key: dict, split: str) -> dict:
    """Write the "ids" column of `ds` (lists of uint16 ids) as one flat little-endian uint16 file,
    then its sidecar `path.with_suffix(".json")`. Returns the sidecar dict."""
    h = hashlib.sha256()
    n = 0

    def write(f):
        nonlocal n
        for table in ds.with_format("arrow").iter(batch_size=65536):
            for chunk in table.column("ids").chunks:
                ids = chunk.flatten().to_numpy(zero_copy_only=False).astype("<u2", copy=False)
                b = ids.tobytes()
                f.write(b)
                h.update(b)
                n += ids.size

    _atomic_write(path, write)
    meta = {
        "format": CACHE_FORMAT,
        "split": split,
        "key": key,
        "n_tokens": n,
        "dtype": "uint16",
        "bytes": 2 * n,
        "sha256": h.hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def check_token_file(path: Path, key: dict, split: str, verify_checksum: bool) -> tuple[dict | None, str]:
    """(sidecar, "") if `path` is a complete token file for `key`, else (None, reason)."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None, "no sidecar" if path.exists() else "missing"
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable sidecar ({e})"
    if meta.get("format") != CACHE_FORMAT or meta.get("split") != split or meta.get("key") != key:
        return None, "sidecar key does not match this configuration"
    if meta.get("dtype") != "uint16" or meta.get("bytes") != 2 * meta.get("n_tokens", -1):
        return None, "sidecar dtype/size fields are inconsistent"
    if not path.is_file():
        return None, "token file missing"
    st = path.stat()
    if st.st_size != meta["bytes"]:
        return None, f"size {st.st_size} bytes, sidecar says {meta['bytes']}"
    if verify_checksum and _sha256_file(path) != meta["sha256"]:
        return None, "sha256 mismatch"
    return meta, ""


def _encode(batch: dict[str, list], tokenizer) -> dict[str, list]:
    docs = [t for t in batch["text"] if t and t.strip()]
    return {"ids": tokenizer.encode_documents(docs)}


# ----------------------------------------------------------------------------- windows and samplers


class TokenWindows(Dataset):
    """Windows of a token file: item i is (x, y), int64 tensors of shape (seq_len,), with
    x = tokens[i*seq_len : (i+1)*seq_len] and y = tokens[i*seq_len + 1 : (i+1)*seq_len + 1]."""

    def __init__(self, path: Path, n_tokens: int, seq_len: int):
        self.path, self.n_tokens, self.seq_len = Path(path), n_tokens, seq_len
        self._tokens = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype="<u2", mode="r", shape=(self.n_tokens,))
        w = torch.from_numpy(self._tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


class TrainSampler(DistributedSampler):
    """Window indices for one rank, in the order of the module docstring (a pure function of seed and
    epoch). Epoch `start_epoch` begins at micro-batch `start_batch` (resume); other epochs at 0.
    Length: the full epoch, N * batch_size, so Lightning's batch counters stay aligned on resume.
    A DistributedSampler subclass, so Lightning does not wrap it in another one under DDP."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                 start_epoch: int = 0, start_batch: int = 0):  # fmt: skip
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.n_windows = len(dataset)
        self.batches_per_epoch = self.n_windows // (batch_size * world_size)
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.epoch = start_epoch  # the loader may be iterated before Lightning calls set_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N, batch_size) window indices of this rank for `epoch`, from micro-batch 0."""
        n, w, b = self.batches_per_epoch, self.num_replicas, self.batch_size
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return perm[: n * w * b].reshape(n, w, b)[:, self.rank]

    def __iter__(self):
        first = self.start_batch if self.epoch == self.start_epoch else 0
        return iter(self.epoch_order(self.epoch)[first:].reshape(-1).tolist())


class ValSampler(DistributedSampler):
    """Windows rank, rank + W, rank + 2W, ... below n_val (a multiple of W)."""

    def __init__(self, dataset: Dataset, n_val: int, rank: int, world_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True)
        self.n_val = n_val

    def __len__(self) -> int:
        return self.n_val // self.num_replicas

    def __iter__(self):
        return iter(range(self.rank, self.n_val, self.num_replicas))


class TrainLoader(DataLoader):
    """DataLoader whose state (what the order depends on) Lightning saves in checkpoints; on resume
    `load_state_dict` warns if it changed. The position itself comes from the trainer (see module doc)."""

    order: dict = {}  # set by LMDataModule.train_dataloader()

    def state_dict(self) -> dict:
        return dict(self.order)

    def load_state_dict(self, state: dict) -> None:
        changed = {k: (state.get(k), v) for k, v in self.order.items() if state.get(k) != v}
        if changed:
            log.warning(
                "resuming with different data-order settings %s (checkpoint -> now): the resumed run does "
                "not see the batches the interrupted run would have seen.",
                changed,
            )


def lightning_epoch_batches(loader_batches: int, limit_train_batches: int | float) -> int:
    """Batches Lightning runs per epoch given `limit_train_batches` (as its `_parse_num_batches`)."""
    if isinstance(limit_train_batches, int):
        return min(loader_batches, limit_train_batches)
    return int(loader_batches * limit_train_batches)


def resume_position(global_step: int, accumulate: int, epoch_batches: int) -> tuple[int, int]:
    """(epoch, first micro-batch in it) after `global_step` optimizer steps (see module doc)."""
    steps_per_epoch = math.ceil(epoch_batches / accumulate)
    epoch, step = divmod(global_step, steps_per_epoch)
    return epoch, step * accumulate


# ----------------------------------------------------------------------------- the DataModule


class LMDataModule(L.LightningDataModule):
    """Token windows for causal LM training; see the module docstring for the pipeline, cache, order and
    resume rules.

    Args:
        source: "stdlib" (embedded corpus, no files), "local" (files) or "hub" (Hugging Face Hub).
        path: local source: a file, a folder (*.txt, recursive), a tarball, or a path through a tarball;
            or a list of them. Relative paths are under `data_root`.
        val_path: local source: explicit validation files (same forms); if None, validation is split off.
        hub_name, hub_config: hub source: the dataset (e.g. "Skylion007/openwebtext") and its config.
        sample_by: "document" (one document per file), "line" (one per line) or "paragraph" (blank-line
            separated). Hub rows are documents as they are.
        test_size, split_seed: the validation split when there is none: train_test_split(test_size,
            seed=split_seed, shuffle=True) on documents. 0.0005/2357 is OpenWebText's; tiny corpora need
            a larger fraction, e.g. 0.05.
        tokenizer: "bytes", "gpt2" (the Hub) or a folder with the GPT-2 BPE files (see data.tokenizer).
        vocab_size: optional; if given it must equal the tokenizer's (it lets configs interpolate it).
        seq_len: tokens per example; batch_size: examples per micro-batch per device.
        num_workers: DataLoader workers; seed: training order seed.
        val_tokens: cap on validation tokens (None: the whole split).
        data_root: folder for relative local paths. cache_dir: token cache (default
            $FLASHREPRO_CACHE or ~/.cache/flashattn-repro).
        num_proc: tokenization processes (None: by corpus size and CPU count).
        verify_checksum: sha256-check token files on load (turn off for 9B-token OpenWebText if slow).
        stdlib_max_bytes: size cap of the stdlib corpus.
        rank, world_size: this process's shard; None: from the trainer (global_rank, world_size), else 0/1.
    """

    def __init__(
        self,
        source: str = "stdlib",
        path: str | list[str] | None = None,
        val_path: str | list[str] | None = None,
        hub_name: str | None = None,
        hub_config: str | None = None,
        sample_by: str = "document",
        test_size: float | int = 0.05,
        split_seed: int = 2357,
        tokenizer: str = "bytes",
        vocab_size: int | None = None,
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 1234,
        val_tokens: int | None = None,
        data_root: str = ".",
        cache_dir: str | None = None,
        num_proc: int | None = None,
        verify_checksum: bool = True,
        stdlib_max_bytes: int = 16_000_000,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if source not in ("stdlib", "local", "hub"):
            raise ValueError(f"data.source={source!r}: use 'stdlib', 'local' or 'hub'.")
        if source == "local" and not path:
            raise ValueError("data.source=local needs data.path (a file, folder or tarball of text).")
        if source == "hub" and not hub_name:
            raise ValueError("data.source=hub needs data.hub_name (e.g. Skylion007/openwebtext).")
        if sample_by not in corpus.SAMPLE_BY:
            raise ValueError(f"data.sample_by={sample_by!r}: use one of {corpus.SAMPLE_BY}.")
        if isinstance(test_size, bool) or not (
            (isinstance(test_size, int) and test_size >= 1)
            or (isinstance(test_size, float) and 0 < test_size < 1)
        ):
            raise ValueError(
                f"data.test_size={test_size!r}: use a fraction in (0, 1) or a document count >= 1."
            )
        for k, v in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"data.{k}={v!r}: must be a positive integer.")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"rank={rank}, world_size={world_size}: give both, with 0 <= rank < world_size.")
        self.source, self.sample_by, self.tokenizer_spec = source, sample_by, tokenizer
        self.hub_name, self.hub_config = hub_name, hub_config
        self.test_size, self.split_seed = test_size, split_seed
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.val_tokens, self.num_proc, self.verify_checksum = val_tokens, num_proc, verify_checksum
        self.stdlib_max_bytes = stdlib_max_bytes
        self._rank, self._world_size = rank, world_size
        self.data_root = Path(os.path.expanduser(data_root))
        self.cache_dir = Path(
            os.path.expanduser(cache_dir or os.environ.get("FLASHREPRO_CACHE", DEFAULT_CACHE_DIR))
        )
        self.paths = [path] if isinstance(path, str) else list(path or [])
        self.val_paths = [val_path] if isinstance(val_path, str) else list(val_path or [])
        if source == "local":
            for p in self.paths + self.val_paths:
                corpus.check_path(p, self.data_root)
        self._vocab_size = vocab_size
        self._tokenizer = None
        self._source: dict | None = None  # identity, description, files
        self._meta: dict[str, dict] = {}
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None

    # --- tokenizer and source identity ---------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tok = load_tokenizer(self.tokenizer_spec, self.data_root, self.cache_dir)
            if self._vocab_size is not None and self._vocab_size != tok.vocab_size:
                raise ValueError(
                    f"data.vocab_size={self._vocab_size} but tokenizer={self.tokenizer_spec!r} has "
                    f"{tok.vocab_size} tokens. Fix: set data.vocab_size={tok.vocab_size} (or null)."
                )
            if tok.vocab_size > 65536:
                raise ValueError(f"vocab_size {tok.vocab_size} does not fit the uint16 token files.")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (the configured value if given; it is checked on load)."""
        return self._vocab_size if self._vocab_size is not None else self.tokenizer.vocab_size

    def _source_info(self) -> dict:
        """{"identity": ..., "desc": str, "train": files, "validation": files} (files: local/stdlib)."""
        if self._source is not None:
            return self._source
        if self.source == "hub":
            ident = {"kind": "hub", "name": self.hub_name, "config": self.hub_config}
            info = {
                "identity": ident,
                "desc": f"hub {self.hub_name}" + (f"/{self.hub_config}" if self.hub_config else ""),
            }
        elif self.source == "stdlib":
            files, nbytes = corpus.stdlib_files(self.stdlib_max_bytes)
            sha = corpus.content_sha256(files)
            ident = {
                "kind": "stdlib",
                "max_bytes": self.stdlib_max_bytes,
                "n_files": len(files),
                "sha256": sha,
            }
            desc = (
                f"stdlib corpus: Python {platform.python_version()}, {len(files)} files, {nbytes / 1e6:.1f} MB, "
                f"sha256 {sha}"
            )
            info = {"identity": ident, "desc": desc, "train": [p for _, p in files]}
        else:
            train = corpus.named_files([self._resolve(p) for p in self.paths])
            val = corpus.named_files([self._resolve(p) for p in self.val_paths]) if self.val_paths else []
            ident = {"kind": "local", "sha256": corpus.content_sha256(train)}
            if val:
                ident["val_sha256"] = corpus.content_sha256(val)
            desc = f"local {self.paths} ({len(train)} files" + (
                f", validation {len(val)} files)" if val else ")"
            )
            info = {
                "identity": ident,
                "desc": desc,
                "train": [p for _, p in train],
                "validation": [p for _, p in val],
            }
        self._source = info
        return info

    def _resolve(self, p: str) -> Path:
        return corpus.resolve_path(p, self.data_root, self.cache_dir, what="data")

    def cache_key(self) -> dict:
        """The token-cache key (see module docstring)."""
        info = self._source_info()
        explicit_val = bool(info.get("validation"))
        split = (
            {"explicit_validation": True}
            if explicit_val
            else {"test_size": self.test_size, "seed": self.split_seed}
        )
        return {
            "source": info["identity"],
            "tokenizer": self.tokenizer.identity,
            "sample_by": self.sample_by,
            "split": split,
        }

    def token_dir(self) -> Path:
        key = self.cache_key()
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = {"stdlib": "stdlib", "hub": str(self.hub_name).replace("/", "_"), "local": "local"}[
            self.source
        ]
        return self.cache_dir / "tokens" / f"{name}-{self.tokenizer.identity['kind']}-{digest}"

    # --- building the cache ---------------------------------------------------------------------------

    def _documents(self):
        info = self._source_info()
        if self.source == "hub":
            return corpus.hub_documents(self.hub_name, self.hub_config, self.test_size, self.split_seed)
        hf_cache = self.cache_dir / "hf-datasets"
        ident = info["identity"]
        ds = corpus.local_documents(
            info["train"], self.sample_by, f"{ident['sha256']}-v{CACHE_FORMAT}", hf_cache
        )
        if info.get("validation"):
            fingerprint = f"{ident['val_sha256']}-v{CACHE_FORMAT}"
            val = corpus.local_documents(info["validation"], self.sample_by, fingerprint, hf_cache)
            return {"train": ds, "validation": val}
        return corpus.split_train_validation(ds, self.test_size, self.split_seed, info["desc"])

    def _build(self, out: Path, key: dict) -> None:
        log.info(
            "building token cache %s (%s, tokenizer %s)",
            out,
            self._source_info()["desc"],
            self.tokenizer_spec,
        )
        out.mkdir(parents=True, exist_ok=True)
        docs = self._documents()
        tok = self.tokenizer
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".map-"))
        try:
            for split in SPLITS:
                ds = docs[split]
                n_proc = self.num_proc or max(1, min(os.cpu_count() or 1, 16, len(ds) // 2000))
                tokenized = ds.map(
                    _encode,
                    batched=True,
                    batch_size=256,
                    fn_kwargs={"tokenizer": tok},
                    remove_columns=ds.column_names,
                    num_proc=n_proc if n_proc > 1 else None,
                    cache_file_name=str(tmp / f"{split}.arrow"),
                    load_from_cache_file=False,
                    desc=f"tokenizing {split}",
                )
                meta = write_token_file(tokenized, out / f"{split}.bin", key, split)
                log.info(
                    "wrote %s: %d tokens (%d documents)", out / f"{split}.bin", meta["n_tokens"], len(ds)
                )
                del tokenized
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _token_files(self) -> dict[str, dict]:
        """Sidecars of the train/validation token files, building them if absent or invalid."""
        if self._meta:
            return self._meta
        key = self.cache_key()
        out = self.token_dir()
        metas = {}
        for split in SPLITS:
            meta, why = check_token_file(out / f"{split}.bin", key, split, self.verify_checksum)
            if meta is None:
                if why != "missing":
                    log.warning("token cache %s is invalid (%s): rebuilding it", out / f"{split}.bin", why)
                break
            metas[split] = meta
        if len(metas) < len(SPLITS):
            self._build(out, key)
            metas = {}
            for split in SPLITS:
                meta, why = check_token_file(out / f"{split}.bin", key, split, self.verify_checksum)
                if meta is None:
                    raise RuntimeError(
                        f"token cache {out / f'{split}.bin'} is invalid right after building it: {why}"
                    )
                metas[split] = meta
        self._meta = metas
        return metas

    # --- Lightning hooks ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the token cache if needed (Lightning calls this on one process per node)."""
        self._token_files()

    def setup(self, stage: str | None = None) -> None:
        metas = self._token_files()
        out = self.token_dir()
        self.train_set = TokenWindows(out / "train.bin", metas["train"]["n_tokens"], self.seq_len)
        self.val_set = TokenWindows(out / "validation.bin", metas["validation"]["n_tokens"], self.seq_len)
        _, world = self._rank_world()
        for name, ds, need in (
            ("train", self.train_set, self.batch_size * world),
            ("validation", self.val_set, world),
        ):
            if len(ds) < need:
                raise ValueError(
                    f"the {name} split has {ds.n_tokens} tokens = {len(ds)} windows of seq_len={self.seq_len}, "
                    f"fewer than the {need} needed (batch_size x world_size). Fix: lower data.seq_len or "
                    "data.batch_size, or use more data."
                )
        log.info(
            "data: %s | tokenizer %s (vocab %d) | train %d tokens, validation %d tokens | %d train windows of "
            "%d+1 | cache %s",
            self._source_info()["desc"], self.tokenizer_spec, self.tokenizer.vocab_size, metas["train"]["n_tokens"],
            metas["validation"]["n_tokens"], len(self.train_set), self.seq_len, out,
        )  # fmt: skip

    def _rank_world(self) -> tuple[int, int]:
        if self._world_size is not None:
            return self._rank, self._world_size
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _start(self, sampler_batches: int) -> tuple[int, int]:
        t = self.trainer
        if t is None or t.global_step == 0:
            return 0, 0
        epoch_batches = lightning_epoch_batches(sampler_batches, t.limit_train_batches)
        epoch, batch = resume_position(t.global_step, t.accumulate_grad_batches, epoch_batches)
        log.info(
            "train loader starts at epoch %d, micro-batch %d (global_step %d x accumulate_grad_batches %d)",
            epoch, batch, t.global_step, t.accumulate_grad_batches,
        )  # fmt: skip
        return epoch, batch

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> TrainLoader:
        if self.train_set is None:
            self.setup("fit")
        rank, world = self._rank_world()
        start_epoch, start_batch = self._start(len(self.train_set) // (self.batch_size * world))
        sampler = TrainSampler(
            self.train_set, self.batch_size, rank, world, self.seed, start_epoch, start_batch
        )
        loader = TrainLoader(self.train_set, sampler=sampler, drop_last=True, **self._loader_kwargs())
        loader.order = {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": world,
            "cache_key_sha256": hashlib.sha256(
                json.dumps(self.cache_key(), sort_keys=True).encode()
            ).hexdigest(),
        }
        return loader

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        rank, world = self._rank_world()
        n_val = len(self.val_set)
        if self.val_tokens is not None:
            n_val = min(n_val, max(1, self.val_tokens // self.seq_len))
        n_val -= n_val % world
        if n_val == 0:
            raise ValueError(
                f"data.val_tokens={self.val_tokens} leaves no validation window for {world} rank(s)."
            )
        return DataLoader(
            self.val_set, sampler=ValSampler(self.val_set, n_val, rank, world), **self._loader_kwargs()
        )
