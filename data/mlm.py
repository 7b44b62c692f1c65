"""Masked-language-modelling data: the token streams of `data.lm` as windows with dynamic BERT masking.

Each example is a window of seq_len tokens (window i is tokens[i*seq_len : (i+1)*seq_len]). Of its
positions, each is chosen with probability `mlm_probability` (15%); a chosen position becomes the mask
token with probability 0.8, a uniformly random real token with 0.1, and stays with 0.1. Batches are
{"input_ids": (B, T) int64 after masking, "labels": (B, T) int64 = the original token where chosen, -100
elsewhere}. The mask token is a new id after the tokenizer's (`mask_token_id` = the tokenizer's vocab
size), so `vocab_size` is the tokenizer's + 1.

The masking of a window is a pure function of (seed, epoch, window index): the train sampler tells each
index its epoch (`TrainSampler.with_epoch`), so epochs mask differently, and a resumed run, with any
number of workers, masks exactly as an uninterrupted one. Validation masks with epoch 0, the same every
time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.lm import LMDataModule, TokenWindows

IGNORE = -100  # label of the positions that are not predicted


def mask_tokens(
    tokens: torch.Tensor, rng: np.random.Generator, p: float, mask_id: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of one window: tokens (T,) int64 -> (input_ids (T,), labels (T,)), see the module doc."""
    n = tokens.numel()
    chosen = torch.from_numpy(rng.random(n) < p)
    action = torch.from_numpy(rng.random(n))
    random_ids = torch.from_numpy(rng.integers(0, vocab, n))
    input_ids = torch.where(chosen & (action < 0.8), mask_id, tokens)
    input_ids = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, input_ids)
    labels = torch.where(chosen, tokens, IGNORE)
    return input_ids, labels


class MaskedWindows(Dataset):
    """Windows of a token file with BERT masking; index e * len + i is window i masked for epoch e."""

    def __init__(self, windows: TokenWindows, seed: int, p: float, mask_id: int, vocab: int):
        self.windows, self.seed, self.p, self.mask_id, self.vocab = windows, seed, p, mask_id, vocab

    def __len__(self) -> int:
        return max(0, self.windows.n_tokens // self.windows.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(index, len(self))
        rng = np.random.default_rng([self.seed, epoch, i])
        input_ids, labels = mask_tokens(
            self.windows.window(i, self.windows.seq_len), rng, self.p, self.mask_id, self.vocab
        )
        return {"input_ids": input_ids, "labels": labels}


class MaskedLMDataModule(LMDataModule):
    """`LMDataModule` (same sources, tokenizers, cache and order) serving masked-LM batches.

    Args:
        mlm_probability: the fraction of positions chosen for prediction (BERT: 0.15).
        Everything else as `data.lm.LMDataModule`.
    """

    extra_tokens = 1
    epoch_dependent_items = True

    def __init__(self, *args, mlm_probability: float = 0.15, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(
                f"data.mlm_probability={mlm_probability!r}: use a fraction in (0, 1), BERT's is 0.15."
            )
        self.mlm_probability = mlm_probability

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.vocab_size

    def windows(self, path: Path, n_tokens: int, train: bool) -> Dataset:
        base = TokenWindows(path, n_tokens, self.seq_len)
        return MaskedWindows(
            base, self.seed, self.mlm_probability, self.mask_token_id, self.tokenizer.vocab_size
        )

    def order_settings(self) -> dict:
        return super().order_settings() | {"mlm_probability": self.mlm_probability}
