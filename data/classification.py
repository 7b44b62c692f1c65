"""Sequence-classification data: labelled documents -> token ids truncated to seq_len -> padded batches.

Source (`TextClassificationDataModule`): folders with one subfolder per class (``path/<class>/**/*.txt``,
e.g. aclImdb/train/{neg,pos}), one for training (`path`) and one for validation (`val_path`), possibly
through tarballs as `data.corpus` resolves them (``aclImdb_labeled.tar.xz/aclImdb/train``); `classes`
lists the subfolders in label order (label i = classes[i]). Documents are ordered by class, then path.

Cache. Each split is one entry of `data.cache` in ``<cache_dir>/classification/<split>-<tokenizer>-<key>/``
holding three arrays: `tokens` (uint16, every document's ids, without EOS, concatenated), `offsets`
(int64, n_documents + 1: document d is tokens[offsets[d] : offsets[d+1]]) and `labels` (int64,
n_documents). The key is the sha256 of the split's files (names and bytes), the tokenizer identity and
the classes, so editing a file or changing the class list rebuilds that split.

Batches: {"input_ids": (B, seq_len) int64, a document's first seq_len tokens then `pad_token_id`,
"attention_mask": (B, seq_len) bool, True on real tokens (position < length), "labels": (B,) int64}.
The pad token is the tokenizer's if it has one, else a new id after its vocabulary (bytes: pad id 257,
vocab_size 258), see data.text. Order and resume: `data.sampling`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data import corpus
from data.cache import MISSING, CachedArray, key_digest, load_arrays, write_array
from data.text import TextDataModule

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
ARRAYS = {"tokens": "uint16", "offsets": "int64", "labels": "int64"}
ENCODE_BATCH = 512  # documents tokenized per call


class LabelledDocuments(Dataset):
    """The documents of one cache entry: item d is {"input_ids": (seq_len,) int64, "attention_mask":
    (seq_len,) bool, "labels": () int64}, document d truncated to seq_len and padded with `pad_id`."""

    def __init__(self, arrays: dict[str, CachedArray], seq_len: int, pad_id: int):
        self.tokens, self.offsets, self.labels = arrays["tokens"], arrays["offsets"], arrays["labels"]
        self.seq_len, self.pad_id = seq_len, pad_id

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, d: int) -> dict[str, torch.Tensor]:
        start, end = int(self.offsets[d]), int(self.offsets[d + 1])
        ids = torch.from_numpy(self.tokens[start : min(end, start + self.seq_len)].astype(np.int64))
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.int64)
        input_ids[: len(ids)] = ids
        return {
            "input_ids": input_ids,
            "attention_mask": torch.arange(self.seq_len) < len(ids),
            "labels": torch.tensor(int(self.labels[d])),
        }

    def class_counts(self, n_classes: int) -> list[int]:
        return np.bincount(np.asarray(self.labels), minlength=n_classes).tolist()


class TextClassificationDataModule(TextDataModule):
    """Labelled documents from class folders, for task=classification; see the module doc.

    Args:
        path, val_path: folders (or paths through tarballs) holding one subfolder per class, for training
            and validation; relative paths are under `data_root`.
        classes: the class subfolders, in label order. num_classes: optional, checked against `classes`
            (model configs interpolate ${data.num_classes}).
        tokenizer: "bytes", "gpt2" (the Hub) or a folder with the GPT-2 BPE files (see data.tokenizer).
        vocab_size: optional, checked: the tokenizer's plus the pad token if it is new (bytes: 258).
        seq_len: tokens per example (longer documents are truncated, shorter ones padded).
        batch_size, num_workers, seed, rank, world_size: see data.sampling.ExampleDataModule.
        data_root, cache_dir, verify_checksum: see data.text.TextDataModule.

    Attributes: num_classes, classes, pad_token_id, vocab_size, seq_len.
    """

    special_tokens = ("pad",)

    def __init__(
        self,
        path: str,
        val_path: str,
        classes: list[str],
        num_classes: int | None = None,
        tokenizer: str = "bytes",
        vocab_size: int | None = None,
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 1234,
        data_root: str = ".",
        cache_dir: str | None = None,
        verify_checksum: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__(
            tokenizer, vocab_size, seq_len, data_root, cache_dir, verify_checksum,
            batch_size, num_workers, seed, rank, world_size,
        )  # fmt: skip
        classes = [str(c) for c in classes]  # a plain list (Hydra passes a ListConfig)
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"data.classes={classes}: give at least two distinct class folder names.")
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(
                f"data.num_classes={num_classes} but data.classes has {len(classes)}: {classes}."
            )
        self.classes, self.num_classes = classes, len(classes)
        self.split_paths = {"train": path, "validation": val_path}
        for p in self.split_paths.values():
            corpus.check_path(p, self.data_root)
        self._arrays: dict[str, dict[str, CachedArray]] = {}

    @property
    def pad_token_id(self) -> int:
        return self.special_id("pad")

    # --- the cache ------------------------------------------------------------------------------------

    def documents(self, split: str) -> list[tuple[int, str, Path]]:
        """(label, name, file) of every document of a split, by class then path; names are
        "<class>/<path below the class folder>"."""
        root = self.resolve(self.split_paths[split])
        out = []
        for label, name in enumerate(self.classes):
            if not (root / name).is_dir():
                found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
                raise FileNotFoundError(
                    f"{root} has no class folder {name!r} (data.classes={self.classes}). Fix: data.classes "
                    f"lists subfolders of {root}: {found}."
                )
            out += [(label, f"{name}/{n.split('/', 1)[1]}", p) for n, p in corpus.named_files([root / name])]
        return out

    def _split_arrays(self, split: str) -> dict[str, CachedArray]:
        """The checked arrays of one split, building them if absent or invalid."""
        docs = self.documents(split)
        key = {
            "source": corpus.content_sha256([(name, p) for _, name, p in docs]),
            "tokenizer": self.tokenizer.identity,
            "classes": self.classes,
        }
        kind = self.tokenizer.identity["kind"]
        out = self.cache_dir / "classification" / f"{split}-{kind}-{key_digest(key)}"
        spec = {name: (out / f"{name}.bin", dtype) for name, dtype in ARRAYS.items()}
        arrays, why = load_arrays(spec, key, self.verify_checksum)
        if arrays is not None:
            return arrays
        if why != MISSING:
            log.warning("classification cache %s is invalid (%s): rebuilding it", out, why)
        log.info("building classification cache %s (%s: %d documents)", out, split, len(docs))
        lengths: list[int] = []

        def token_chunks() -> Iterator[np.ndarray]:
            for i in range(0, len(docs), ENCODE_BATCH):
                texts = [p.read_text(encoding="utf-8") for _, _, p in docs[i : i + ENCODE_BATCH]]
                for ids in self.tokenizer.encode_documents(texts, eos=False):
                    lengths.append(len(ids))
                    yield ids

        write_array(spec["tokens"][0], "tokens", ARRAYS["tokens"], token_chunks(), key)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        write_array(spec["offsets"][0], "offsets", ARRAYS["offsets"], offsets, key)
        write_array(spec["labels"][0], "labels", ARRAYS["labels"], np.array([d[0] for d in docs]), key)
        arrays, why = load_arrays(spec, key, self.verify_checksum)
        if arrays is None:
            raise RuntimeError(f"classification cache {out} is invalid right after building it: {why}")
        return arrays

    # --- Lightning hooks ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the caches if needed (Lightning calls this on one process per node)."""
        for split in SPLITS:
            self._split_arrays(split)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self._arrays:
                self._arrays[split] = self._split_arrays(split)
        self.train_set, self.val_set = (
            LabelledDocuments(self._arrays[split], self.seq_len, self.pad_token_id) for split in SPLITS
        )
        self.check_sizes("documents")
        counts = {
            split: dict(zip(self.classes, ds.class_counts(self.num_classes), strict=True))
            for split, ds in zip(SPLITS, (self.train_set, self.val_set), strict=True)
        }
        log.info(
            "data: %d classes | train %d documents %s | validation %d documents %s | tokenizer %s, "
            "seq_len %d, pad id %d",
            self.num_classes, len(self.train_set), counts["train"], len(self.val_set), counts["validation"],
            self.tokenizer_spec, self.seq_len, self.pad_token_id,
        )  # fmt: skip

    def order_settings(self) -> dict:
        key = self._arrays["train"]["labels"].meta["key"] if "train" in self._arrays else None
        return super().order_settings() | {
            "seq_len": self.seq_len,
            "classes": self.classes,
            "cache_key_sha256": key_digest(key, full=True) if key else None,
        }
