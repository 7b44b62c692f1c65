"""Sequence-classification data: labelled documents -> token ids truncated to seq_len -> padded batches.

Source: folders with one subfolder per class (`path/<class>/*.txt`, e.g. aclImdb/train/{neg,pos}), for
training (`path`) and validation (`val_path`), possibly through tarballs as `data.corpus` resolves them;
`classes` lists the subfolders, in label order. Each document is tokenized once (bytes or the GPT-2 BPE,
without the EOS) and cached with `data.cache` per split as three checked arrays: the tokens of all
documents (uint16), the offset of each document (int64) and its label (int64), keyed by the files'
content hash, the tokenizer and the classes.

Batches: {"input_ids": (B, seq_len) int64, the first seq_len tokens padded with `pad_token_id`,
"attention_mask": (B, seq_len) bool, True on real tokens, "labels": (B,) int64}. The pad token is a new
id after the tokenizer's, so `vocab_size` is the tokenizer's + 1. Order and resume: `data.sampling`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data import corpus
from data.cache import check_array, key_digest, open_array, write_array
from data.lm import DEFAULT_CACHE_DIR
from data.sampling import ExampleDataModule
from data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

ARRAYS = {"tokens": "uint16", "offsets": "int64", "labels": "int64"}


class LabelledDocuments(Dataset):
    """Item i: document i's first seq_len tokens, padded, with its mask and label (see the module doc)."""

    def __init__(self, files: dict[str, tuple[Path, dict]], seq_len: int, pad_id: int):
        self.files, self.seq_len, self.pad_id = files, seq_len, pad_id
        self._arrays: dict[str, np.ndarray] | None = None  # opened lazily, once per worker process

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {name: open_array(path, meta) for name, (path, meta) in self.files.items()}
        return self._arrays

    def __len__(self) -> int:
        return self.files["labels"][1]["n_tokens"]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a = self.arrays()
        start, end = int(a["offsets"][i]), int(a["offsets"][i + 1]) if i + 1 < len(self) else len(a["tokens"])
        ids = np.asarray(a["tokens"][start : min(end, start + self.seq_len)], dtype=np.int64)
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.int64)
        input_ids[: len(ids)] = torch.from_numpy(ids)
        mask = torch.arange(self.seq_len) < len(ids)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(int(a["labels"][i]))}

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}


class TextClassificationDataModule(ExampleDataModule):
    """Labelled documents from class folders, for task=classification.

    Args:
        path, val_path: folders (or paths through tarballs) holding one subfolder per class; relative
            paths are under `data_root`.
        classes: the class subfolders, in label order; num_classes: optional, checked against it (model
            configs interpolate ${data.num_classes}).
        tokenizer: "bytes", "gpt2" (the Hub) or a folder with the GPT-2 BPE files (see data.tokenizer).
        vocab_size: optional, checked: the tokenizer's + 1 (the pad token).
        seq_len: tokens per example (longer documents are truncated); batch_size, num_workers, seed,
            rank, world_size: see `data.sampling.ExampleDataModule`.
        data_root, cache_dir, verify_checksum: as `data.lm.LMDataModule`.
    """

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
        super().__init__(batch_size, num_workers, seed, rank, world_size)
        classes = list(classes)
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"data.classes={classes}: give at least two distinct class folder names.")
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(
                f"data.num_classes={num_classes} but data.classes has {len(classes)}: {classes}."
            )
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len!r}: must be a positive integer.")
        self.classes, self.num_classes, self.seq_len = classes, len(classes), seq_len
        self.tokenizer_spec, self.verify_checksum = tokenizer, verify_checksum
        self.data_root = Path(os.path.expanduser(data_root))
        self.cache_dir = Path(
            os.path.expanduser(cache_dir or os.environ.get("FLASHREPRO_CACHE", DEFAULT_CACHE_DIR))
        )
        self.split_paths = {"train": path, "validation": val_path}
        for p in self.split_paths.values():
            corpus.check_path(p, self.data_root)
        self.tokenizer = load_tokenizer(tokenizer, self.data_root, self.cache_dir)
        self.pad_token_id = self.tokenizer.vocab_size
        self.vocab_size = self.tokenizer.vocab_size + 1
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(
                f"data.vocab_size={vocab_size} but tokenizer={tokenizer!r} has {self.tokenizer.vocab_size} "
                f"tokens + 1 pad token. Fix: set data.vocab_size={self.vocab_size} (or null)."
            )
        self._files: dict[str, dict[str, tuple[Path, dict]]] = {}

    def _class_files(self, split: str) -> list[tuple[int, str, Path]]:
        """(label, name, path) of every document of a split, by class then path."""
        root = corpus.resolve_path(self.split_paths[split], self.data_root, self.cache_dir, what="data")
        out = []
        for label, name in enumerate(self.classes):
            if not (root / name).is_dir():
                raise FileNotFoundError(
                    f"{root} has no class folder {name!r} (data.classes={self.classes}). Fix: data.classes "
                    f"should list subfolders of {root}: {sorted(p.name for p in root.iterdir() if p.is_dir())}."
                )
            out += [(label, f"{name}/{n}", p) for n, p in corpus.named_files([root / name])]
        return out

    def _split(self, split: str) -> dict[str, tuple[Path, dict]]:
        """The checked arrays of one split, building them if absent or invalid."""
        docs = self._class_files(split)
        content = corpus.content_sha256([(name, p) for _, name, p in docs])
        key = {"source": content, "tokenizer": self.tokenizer.identity, "classes": self.classes}
        out = self.cache_dir / "classification" / f"{self.tokenizer.identity['kind']}-{key_digest(key)}"
        files = {name: out / f"{split}.{name}.bin" for name in ARRAYS}
        metas = {
            name: check_array(files[name], key, split, ARRAYS[name], self.verify_checksum) for name in ARRAYS
        }
        if all(meta for meta, _ in metas.values()):
            return {name: (files[name], meta) for name, (meta, _) in metas.items()}
        why = next(why for meta, why in metas.values() if meta is None)
        log.info("building classification cache %s (%s: %s)", out, split, why)
        out.mkdir(parents=True, exist_ok=True)
        ids = [self.tokenizer.encode_documents([p.read_text(encoding="utf-8")])[0][:-1] for _, _, p in docs]
        offsets = np.cumsum([0] + [len(x) for x in ids[:-1]])
        labels = np.array([label for label, _, _ in docs])
        counts = np.bincount(labels, minlength=self.num_classes).tolist()
        log.info(
            "%s: %d documents, per class %s", split, len(docs), dict(zip(self.classes, counts, strict=True))
        )
        metas = {
            "tokens": write_array(files["tokens"], ids, key, split, ARRAYS["tokens"]),
            "offsets": write_array(files["offsets"], [offsets], key, split, ARRAYS["offsets"]),
            "labels": write_array(files["labels"], [labels], key, split, ARRAYS["labels"]),
        }
        return {name: (files[name], meta) for name, meta in metas.items()}

    def prepare_data(self) -> None:
        """Build the caches if needed (Lightning calls this on one process per node)."""
        for split in self.split_paths:
            self._split(split)

    def setup(self, stage: str | None = None) -> None:
        for split in self.split_paths:
            if split not in self._files:
                self._files[split] = self._split(split)
        self.train_set = LabelledDocuments(self._files["train"], self.seq_len, self.pad_token_id)
        self.val_set = LabelledDocuments(self._files["validation"], self.seq_len, self.pad_token_id)
        self.check_sizes("documents")
        log.info(
            "data: %d classes %s | tokenizer %s (+1 pad) | train %d, validation %d documents, seq_len %d",
            self.num_classes, self.classes, self.tokenizer_spec, len(self.train_set), len(self.val_set),
            self.seq_len,
        )  # fmt: skip

    def order_settings(self) -> dict:
        return super().order_settings() | {"seq_len": self.seq_len, "classes": self.classes}
