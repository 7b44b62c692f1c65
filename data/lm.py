"""Language-modelling data: documents -> one token stream per split -> next-token windows.

Pipeline (`LMDataModule`):
  1. documents from a source (`data.corpus`: the Hub, local text files/tarballs, or the embedded stdlib
     corpus), split into "train" and "validation";
  2. tokenized with `Dataset.map(batched=True, num_proc=...)` (`data.tokenizer`), EOS after each document,
     and written once per split as a flat uint16 token array `<split>.bin` with its JSON sidecar
     `<split>.json` (`data.cache`) in `<cache_dir>/tokens/<slug>-<key>/`;
  3. read through `np.memmap` as windows of seq_len + 1 tokens: window i is tokens[i*seq_len :
     (i+1)*seq_len + 1], input_ids = window[:-1], labels = window[1:]. Batches are dicts
     {"input_ids": (B, T) int64, "labels": (B, T) int64}, B = batch_size (the micro-batch per device),
     T = seq_len. Every token is a target once.

Token cache. The key is a JSON dict of: the source identity (Hub name/config; or a sha256 over the
local/stdlib files' names and bytes), the tokenizer identity (kind + sha256 of its files), sample_by and
the split rule. The two splits are one entry of `data.cache` (atomic writes, sidecar last; on load the
sidecar, key, size and, unless verify_checksum=False, the sha256 are checked); anything wrong is logged
and the cache is rebuilt, never used. The sidecars also hold `n_tokens` and `n_documents`.

Training order, resume and validation: `data.sampling` (windows are its examples); validation uses
windows 0..n_val-1, n_val = all windows or ``val_tokens // seq_len``. `data.mlm` serves the same token
streams as masked-LM windows (it overrides `examples`).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from data import corpus
from data.cache import CACHE_FORMAT, MISSING, CachedArray, key_digest, load_arrays, write_array
from data.text import TextDataModule

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")


# ----------------------------------------------------------------------------- token files


def _encode(batch: dict[str, list], tokenizer) -> dict[str, list]:
    docs = [t for t in batch["text"] if t and t.strip()]
    ids = tokenizer.encode_documents(docs)
    return {"ids": ids, "n": [len(x) for x in ids]}


def write_token_file(ds, path: Path, split: str, key: dict) -> CachedArray:
    """Write the "ids" column of `ds` (lists of uint16 ids; "n": their lengths) as one flat uint16 cache
    array named `split` at `path`; its sidecar also records n_tokens and n_documents."""

    def tables():
        return ds.with_format("arrow").iter(batch_size=65536)

    def chunks():
        for table in tables():
            for chunk in table.column("ids").chunks:
                yield chunk.flatten().to_numpy(zero_copy_only=False)

    n_tokens = sum(pc.sum(table.column("n")).as_py() or 0 for table in tables())
    tokens = write_array(path, split, "uint16", chunks(), key, {"n_tokens": n_tokens, "n_documents": len(ds)})
    assert len(tokens) == n_tokens, (len(tokens), n_tokens)
    return tokens


# ----------------------------------------------------------------------------- windows


class TokenWindows(Dataset):
    """Next-token windows of a token array: item i is {"input_ids": x, "labels": y}, int64 tensors of
    shape (seq_len,), with x = tokens[i*seq_len : (i+1)*seq_len] and y = tokens[i*seq_len + 1 :
    (i+1)*seq_len + 1]."""

    def __init__(self, tokens: CachedArray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def window(self, i: int, length: int) -> torch.Tensor:
        """tokens[i*seq_len : i*seq_len + length] as int64, shape (length,)."""
        start = i * self.seq_len
        return torch.from_numpy(self.tokens[start : start + length].astype(np.int64))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.window(i, self.seq_len + 1)
        return {"input_ids": w[:-1], "labels": w[1:]}


# ----------------------------------------------------------------------------- the DataModule


class LMDataModule(TextDataModule):
    """Token windows for causal LM training; see the module docstring for the pipeline and cache, and
    data.sampling for the order and resume rules.

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
        super().__init__(
            tokenizer, vocab_size, seq_len, data_root, cache_dir, verify_checksum,
            batch_size, num_workers, seed, rank, world_size,
        )  # fmt: skip
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
        self.source, self.sample_by = source, sample_by
        self.hub_name, self.hub_config = hub_name, hub_config
        self.test_size, self.split_seed = test_size, split_seed
        self.val_tokens, self.num_proc = val_tokens, num_proc
        self.stdlib_max_bytes = stdlib_max_bytes
        self.paths = [path] if isinstance(path, str) else list(path or [])
        self.val_paths = [val_path] if isinstance(val_path, str) else list(val_path or [])
        if source == "local":
            for p in self.paths + self.val_paths:
                corpus.check_path(p, self.data_root)
        self._source: dict | None = None  # identity, description, files
        self._tokens: dict[str, CachedArray] = {}

    # --- source identity ------------------------------------------------------------------------------

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
            train = corpus.named_files([self.resolve(p) for p in self.paths])
            val = corpus.named_files([self.resolve(p) for p in self.val_paths]) if self.val_paths else []
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
        digest = key_digest(self.cache_key())
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
                tokens = write_token_file(tokenized, out / f"{split}.bin", split, key)
                log.info("wrote %s: %d tokens (%d documents)", tokens.path, len(tokens), len(tokenized))
                del tokenized
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _token_arrays(self) -> dict[str, CachedArray]:
        """The checked train/validation token arrays, building them if absent or invalid."""
        if self._tokens:
            return self._tokens
        key, out = self.cache_key(), self.token_dir()
        spec = {split: (out / f"{split}.bin", "uint16") for split in SPLITS}
        tokens, why = load_arrays(spec, key, self.verify_checksum)
        if tokens is None:
            if why != MISSING:
                log.warning("token cache %s is invalid (%s): rebuilding it", out, why)
            self._build(out, key)
            tokens, why = load_arrays(spec, key, self.verify_checksum)
            if tokens is None:
                raise RuntimeError(f"token cache {out} is invalid right after building it: {why}")
        self._tokens = tokens
        return tokens

    # --- Lightning hooks ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the token cache if needed (Lightning calls this on one process per node)."""
        self._token_arrays()

    def setup(self, stage: str | None = None) -> None:
        tokens = self._token_arrays()
        self.train_set = self.examples(tokens["train"], "train")
        self.val_set = self.examples(tokens["validation"], "validation")
        self.check_sizes(
            f"windows of seq_len={self.seq_len} ({len(tokens['train'])} train, "
            f"{len(tokens['validation'])} validation tokens)",
            fix="lower data.seq_len or data.batch_size, or use more data",
        )
        log.info(
            "data: %s | tokenizer %s (vocab %d) | train %d tokens, validation %d tokens | %d train windows of "
            "%d+1 | cache %s",
            self._source_info()["desc"], self.tokenizer_spec, self.tokenizer.vocab_size, len(tokens["train"]),
            len(tokens["validation"]), len(self.train_set), self.seq_len, self.token_dir(),
        )  # fmt: skip

    def examples(self, tokens: CachedArray, split: str) -> Dataset:
        """The examples of one split's token array: next-token windows (data.mlm: masked windows)."""
        return TokenWindows(tokens, self.seq_len)

    def n_val(self) -> int:
        n_val = len(self.val_set)
        return n_val if self.val_tokens is None else min(n_val, max(1, self.val_tokens // self.seq_len))

    def order_settings(self) -> dict:
        return super().order_settings() | {
            "seq_len": self.seq_len,
            "cache_key_sha256": key_digest(self.cache_key(), full=True),
        }
