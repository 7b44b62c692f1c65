"""The base of the data modules over tokenized text (data.lm, data.mlm, data.classification).

`TextDataModule` adds to `data.sampling.ExampleDataModule` what every text pipeline shares: the tokenizer
(loaded lazily, see data.tokenizer), the vocabulary the model must cover, the special ids a task needs on
top of the tokenizer's (a mask token, a pad token), the example length `seq_len`, the folder of relative
local paths (`data_root`) and the cache folder.

Special ids. A subclass lists the special tokens it needs in `special_tokens` (e.g. ("mask",)). A
tokenizer that has one (an attribute `<name>_token_id` that is not None) provides it; otherwise it is a
new id after the tokenizer's vocabulary, in the order listed. `vocab_size` is the tokenizer's plus the
new ids: bytes (257 = 256 byte values + EOS) with a new mask token: mask id 257, vocab_size 258.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from data import corpus
from data.cache import cache_root
from data.sampling import ExampleDataModule
from data.tokenizer import ByteTokenizer, GPT2BPETokenizer, load_tokenizer

MAX_TOKEN_FILE_VOCAB = 65536  # cached token ids are uint16


class TextDataModule(ExampleDataModule):
    """Tokenizer, vocabulary, special ids, seq_len and folders; see the module doc.

    Args:
        tokenizer: "bytes", "gpt2" (the Hub) or a folder with the GPT-2 BPE files (see data.tokenizer).
        vocab_size: optional; if given it must equal the tokenizer's plus the new special ids (checked
            when the tokenizer loads; it lets configs interpolate ${data.vocab_size} without loading it).
        seq_len: tokens per example.
        data_root: folder of relative local paths. cache_dir: the cache (default $FLASHREPRO_CACHE or
            ~/.cache/flashattn-repro).
        verify_checksum: sha256-check cache files on load.
        batch_size, num_workers, seed, rank, world_size: see data.sampling.ExampleDataModule.
    """

    special_tokens: ClassVar[tuple[str, ...]] = ()  # e.g. ("mask",): see the module doc

    def __init__(
        self,
        tokenizer: str = "bytes",
        vocab_size: int | None = None,
        seq_len: int = 1024,
        data_root: str = ".",
        cache_dir: str | None = None,
        verify_checksum: bool = True,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 1234,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__(batch_size, num_workers, seed, rank, world_size)
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len!r}: must be a positive integer.")
        self.tokenizer_spec, self.seq_len, self.verify_checksum = tokenizer, seq_len, verify_checksum
        self.data_root = Path(os.path.expanduser(data_root))
        self.cache_dir = cache_root(cache_dir)
        self._vocab_size = vocab_size
        self._tokenizer: ByteTokenizer | GPT2BPETokenizer | None = None
        self._special_ids: dict[str, int] = {}

    def _load(self) -> None:
        """Load the tokenizer, assign the special ids and check data.vocab_size (once)."""
        if self._tokenizer is not None:
            return
        tok = load_tokenizer(self.tokenizer_spec, self.data_root, self.cache_dir)
        if tok.vocab_size > MAX_TOKEN_FILE_VOCAB:
            raise ValueError(f"vocab_size {tok.vocab_size} does not fit the uint16 token files.")
        ids, new = {}, []
        for name in self.special_tokens:
            own = getattr(tok, f"{name}_token_id", None)
            ids[name] = own if own is not None else tok.vocab_size + len(new)
            if own is None:
                new.append(name)
        want = tok.vocab_size + len(new)
        if self._vocab_size is not None and self._vocab_size != want:
            added = f" + {len(new)} added ({', '.join(new)})" if new else ""
            raise ValueError(
                f"data.vocab_size={self._vocab_size} but tokenizer={self.tokenizer_spec!r} has "
                f"{tok.vocab_size} tokens{added}. Fix: set data.vocab_size={want} (or null)."
            )
        self._tokenizer, self._special_ids, self._vocab_size = tok, ids, want

    @property
    def tokenizer(self) -> ByteTokenizer | GPT2BPETokenizer:
        """The tokenizer, loaded on first use."""
        self._load()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed: the tokenizer's plus the new special ids. The configured value is
        returned without loading the tokenizer (it is checked when the tokenizer loads)."""
        if self._vocab_size is None:
            self._load()
        return self._vocab_size

    def special_id(self, name: str) -> int:
        """The id of special token `name` (one of `special_tokens`), see the module doc."""
        self._load()
        return self._special_ids[name]

    def resolve(self, path: str | os.PathLike) -> Path:
        """A local path: relative to data_root, through tarballs (extracted into the cache)."""
        return corpus.resolve_path(path, self.data_root, self.cache_dir, what="data")
