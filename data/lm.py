"""Language-modelling data: documents -> one token stream per split -> (x, y) windows.

Pipeline (`LMDataModule`):
  1. documents from a source (`data.corpus`: the Hub, local text files/tarballs, or the embedded stdlib
     corpus), split into "train" and "validation";
  2. tokenized with `Dataset.map(batched=True, num_proc=...)` (`data.tokenizer`), EOS after each document,
     and written once per split as a flat uint16 token file `<split>.bin` plus a JSON sidecar
     `<split>.json` in `<cache_dir>/tokens/<slug>-<key>/`;
  3. read through `np.memmap` as windows of seq_len + 1 tokens: window i is tokens[i*seq_len :
     (i+1)*seq_len + 1], input_ids = window[:-1], labels = window[1:]. Batches are dicts
     {"input_ids", "labels"}, both int64 of shape (batch_size, seq_len), batch_size being the micro-batch
     per device. Every token is a target once.

Token cache (`data.cache`). The key is a JSON dict of: the source identity (Hub name/config; or a sha256 over the
local/stdlib files' names and bytes), the tokenizer identity (kind + sha256 of its files), sample_by and
the split rule. Files are written to a temporary name in the same folder, fsync'ed and renamed; the
sidecar (key, split, n_tokens, dtype, byte size, sha256 of the .bin) is written last. On load the sidecar,
the key, the file size and (unless verify_checksum=False) the sha256 are checked; anything wrong is
logged and the split is rebuilt, never used.

Training order, resume and validation: `data.sampling` (windows are its examples); validation uses
windows 0..n_val-1, n_val = all windows or ``val_tokens // seq_len``.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data import corpus
from data.cache import CACHE_FORMAT, check_array, key_digest, write_array
from data.sampling import ExampleDataModule
from data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
DEFAULT_CACHE_DIR = "~/.cache/flashattn-repro"


# ----------------------------------------------------------------------------- token files


def write_token_file(ds, path: Path, key: dict, split: str) -> dict:
    """Write the "ids" column of `ds` (lists of uint16 ids) as one flat uint16 cache array at `path`."""

    def chunks():
        for table in ds.with_format("arrow").iter(batch_size=65536):
            for chunk in table.column("ids").chunks:
                yield chunk.flatten().to_numpy(zero_copy_only=False)

    return write_array(path, chunks(), key, split, "uint16")


def check_token_file(path: Path, key: dict, split: str, verify_checksum: bool) -> tuple[dict | None, str]:
    """(sidecar, "") if `path` is a complete token file for `key`, else (None, reason)."""
    return check_array(path, key, split, "uint16", verify_checksum)


def _encode(batch: dict[str, list], tokenizer) -> dict[str, list]:
    docs = [t for t in batch["text"] if t and t.strip()]
    return {"ids": tokenizer.encode_documents(docs)}


# ----------------------------------------------------------------------------- windows and samplers


class TokenWindows(Dataset):
    """Windows of a token file: item i is {"input_ids": x, "labels": y}, int64 tensors of shape (seq_len,),
    with x = tokens[i*seq_len : (i+1)*seq_len] and y = tokens[i*seq_len + 1 : (i+1)*seq_len + 1]."""

    def __init__(self, path: Path, n_tokens: int, seq_len: int):
        self.path, self.n_tokens, self.seq_len = Path(path), n_tokens, seq_len
        self._tokens = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def window(self, i: int, length: int) -> torch.Tensor:
        """tokens[i*seq_len : i*seq_len + length] as int64, (length,)."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype="<u2", mode="r", shape=(self.n_tokens,))
        return torch.from_numpy(self._tokens[i * self.seq_len : i * self.seq_len + length].astype(np.int64))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.window(i, self.seq_len + 1)
        return {"input_ids": w[:-1], "labels": w[1:]}

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


# ----------------------------------------------------------------------------- the DataModule


class LMDataModule(ExampleDataModule):
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

    extra_tokens = 0  # ids after the tokenizer's that the module adds (a mask token, in data.mlm)

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
        super().__init__(batch_size, num_workers, seed, rank, world_size)
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
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len!r}: must be a positive integer.")
        self.source, self.sample_by, self.tokenizer_spec = source, sample_by, tokenizer
        self.hub_name, self.hub_config = hub_name, hub_config
        self.test_size, self.split_seed = test_size, split_seed
        self.seq_len = seq_len
        self.val_tokens, self.num_proc, self.verify_checksum = val_tokens, num_proc, verify_checksum
        self.stdlib_max_bytes = stdlib_max_bytes
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

    # --- tokenizer and source identity ---------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tok = load_tokenizer(self.tokenizer_spec, self.data_root, self.cache_dir)
            want = tok.vocab_size + self.extra_tokens
            if self._vocab_size is not None and self._vocab_size != want:
                raise ValueError(
                    f"data.vocab_size={self._vocab_size} but tokenizer={self.tokenizer_spec!r} has "
                    f"{tok.vocab_size} tokens{' + 1 mask token' if self.extra_tokens else ''}. Fix: set "
                    f"data.vocab_size={want} (or null)."
                )
            if tok.vocab_size > 65536:
                raise ValueError(f"vocab_size {tok.vocab_size} does not fit the uint16 token files.")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size plus `extra_tokens` (the configured value if given; it is
        checked on load)."""
        return (
            self._vocab_size
            if self._vocab_size is not None
            else self.tokenizer.vocab_size + self.extra_tokens
        )

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
        digest = key_digest(key)
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
        self.train_set = self.windows(out / "train.bin", metas["train"]["n_tokens"], train=True)
        self.val_set = self.windows(out / "validation.bin", metas["validation"]["n_tokens"], train=False)
        self.check_sizes(f"windows of seq_len={self.seq_len}")
        log.info(
            "data: %s | tokenizer %s (vocab %d) | train %d tokens, validation %d tokens | %d train windows of "
            "%d+1 | cache %s",
            self._source_info()["desc"], self.tokenizer_spec, self.tokenizer.vocab_size, metas["train"]["n_tokens"],
            metas["validation"]["n_tokens"], len(self.train_set), self.seq_len, out,
        )  # fmt: skip

    def windows(self, path: Path, n_tokens: int, train: bool) -> Dataset:
        """The examples of one split's token file: next-token windows."""
        return TokenWindows(path, n_tokens, self.seq_len)

    def n_val(self) -> int:
        n_val = len(self.val_set)
        return n_val if self.val_tokens is None else min(n_val, max(1, self.val_tokens // self.seq_len))

    def order_settings(self) -> dict:
        return super().order_settings() | {
            "seq_len": self.seq_len,
            "cache_key_sha256": key_digest(self.cache_key()),
        }
