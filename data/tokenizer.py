"""Tokenizers for language modelling: GPT-2 byte-level BPE, and raw UTF-8 bytes.

Both turn a list of documents into token ids with an end-of-text id (EOS) after each document, the
token stream that `data.lm` writes to disk (or without EOS, for one document per example, as
`data.classification`). Ids are returned as uint16 arrays (every vocabulary here has fewer than 65,536
entries). Neither has a mask or pad token (no `mask_token_id` / `pad_token_id`): the data modules that
need one add it after the vocabulary (data.text).

- ``"bytes"``: id = UTF-8 byte value (0..255), EOS = 256, vocab_size 257. Needs no files.
- ``"gpt2"``: the GPT-2 BPE (vocab 50,257, EOS 50256 = ``<|endoftext|>``) from the Hugging Face Hub
  (``openai-community/gpt2``: vocab.json + merges.txt).
- a folder holding ``encoder.json`` + ``vocab.bpe`` (OpenAI's file names) or ``vocab.json`` +
  ``merges.txt`` (the Hub's names for the same two files): the same GPT-2 BPE, offline.

Text is encoded as ordinary text (like tiktoken's ``encode_ordinary`` in nanoGPT): a literal
``<|endoftext|>`` inside a document is not turned into EOS. A tokenizer's ``identity`` (kind + sha256
of its files) is part of the token-cache key, so the Hub files and a byte-identical local copy share
one cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from data.corpus import data_options, hub_file, resolve_path

GPT2_HUB_REPO = "openai-community/gpt2"
GPT2_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are byte values, 256 is EOS (vocab_size 257)."""

    vocab_size = 257
    eos_id = 256
    identity = {"kind": "bytes", "version": 1}

    def encode_documents(self, texts: list[str], eos: bool = True) -> list[np.ndarray]:
        """Each text's UTF-8 bytes followed by EOS (unless eos=False), as uint16 arrays of shape
        (n_bytes + 1,) (or (n_bytes,))."""
        out = []
        for t in texts:
            b = t.encode("utf-8")
            ids = np.empty(len(b) + eos, dtype=np.uint16)
            ids[: len(b)] = np.frombuffer(b, dtype=np.uint8)
            if eos:
                ids[-1] = self.eos_id
            out.append(ids)
        return out

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class GPT2BPETokenizer:
    """The GPT-2 byte-level BPE built from its two files with the `tokenizers` library.

    vocab_file: encoder.json / vocab.json (token -> id); merges_file: vocab.bpe / merges.txt.
    """

    def __init__(self, vocab_file: str | Path, merges_file: str | Path):
        self._tok = Tokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self.vocab_size = self._tok.get_vocab_size()
        eos = self._tok.token_to_id("<|endoftext|>")
        if eos is None:
            raise ValueError(f"{vocab_file} has no '<|endoftext|>' token: it is not a GPT-2 vocabulary file.")
        self.eos_id = eos
        h = hashlib.sha256(Path(vocab_file).read_bytes())
        h.update(b"\0")
        h.update(Path(merges_file).read_bytes())
        self.identity = {"kind": "gpt2-bpe", "sha256": h.hexdigest()}

    def encode_documents(self, texts: list[str], eos: bool = True) -> list[np.ndarray]:
        """Each text's BPE ids followed by EOS (unless eos=False), as uint16 arrays of shape (n_ids + 1,)
        (or (n_ids,))."""
        encs = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        tail = [self.eos_id] if eos else []
        return [np.asarray([*e.ids, *tail], dtype=np.uint16) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str, data_root: Path, cache_dir: Path) -> ByteTokenizer | GPT2BPETokenizer:
    """`spec` is "bytes", "gpt2" (the Hub) or a folder path (relative to `data_root`; it may go
    through a tarball, e.g. ``text-core.tar.xz/gpt2``)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "gpt2":
        what = f"the GPT-2 tokenizer ({GPT2_HUB_REPO})"
        hint = (
            "Use local GPT-2 BPE files instead: data.tokenizer=<folder with encoder.json + vocab.bpe or "
            "vocab.json + merges.txt> (e.g. text-core.tar.xz/gpt2 under data.data_root, as data=tinyshakespeare, "
            f"data=wikitext2 and data=imdb do), or data.tokenizer=bytes. Local data configs: {data_options(True)}. "
            "If the files are already in your Hugging Face cache, set HF_HUB_OFFLINE=1."
        )
        return GPT2BPETokenizer(
            hub_file(GPT2_HUB_REPO, "vocab.json", what, hint),
            hub_file(GPT2_HUB_REPO, "merges.txt", what, hint),
        )
    folder = resolve_path(spec, data_root, cache_dir, what="tokenizer")
    for vocab, merges in GPT2_FILE_PAIRS:
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return GPT2BPETokenizer(folder / vocab, folder / merges)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [folder.name]
    raise FileNotFoundError(
        f"tokenizer={spec!r} ({folder}) has no GPT-2 BPE files: expected encoder.json + vocab.bpe or "
        f"vocab.json + merges.txt, found {found[:10]}. Fix: point data.tokenizer at such a folder, or use "
        "data.tokenizer=gpt2 (Hub) or data.tokenizer=bytes."
    )
