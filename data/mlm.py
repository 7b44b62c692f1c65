"""Masked-language-modelling data: the token streams of `data.lm` as windows with dynamic BERT masking.

`MaskedLMDataModule` is `data.lm.LMDataModule` (same sources, tokenizers, token cache, order and resume)
whose examples are windows of seq_len tokens (window i is tokens[i*seq_len : (i+1)*seq_len]), masked as
BERT: each position is chosen with probability `mlm_probability` (0.15); a chosen position becomes the
mask token with probability 0.8, a random token with 0.1 (uniform over the real vocabulary: not EOS,
not the mask), and stays with 0.1. Every position may be chosen, EOS included. Batches are
{"input_ids": (B, T) int64 after masking, "labels": (B, T) int64: the original token where chosen,
IGNORE (-100) elsewhere}.

Mask token: the tokenizer's if it has one (`mask_token_id`), else a new id after its vocabulary (bytes:
257, vocab_size 258; GPT-2 BPE: 50257, vocab_size 50258); see data.text.

Determinism. The masking of window i is a pure function of (seed, split, epoch, i): its random numbers
come from ``np.random.default_rng([seed, split, epoch, i])`` (split 0 train, 1 validation). The train
sampler tells each index its epoch (`data.sampling.TrainSampler` with `with_epoch`: it yields
epoch * n_windows + i), so epochs mask differently, and a resumed run, with any number of DataLoader
workers, masks exactly as an uninterrupted one. Validation indices are plain window numbers (epoch 0):
its masking is the same at every validation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from data.cache import CachedArray
from data.lm import LMDataModule, TokenWindows

IGNORE = -100  # label of the positions that are not predicted (cross_entropy's ignore_index)
SPLIT_STREAM = {"train": 0, "validation": 1}  # keeps the two splits' random streams apart


def mask_tokens(
    tokens: torch.Tensor,
    rng: np.random.Generator,
    p: float,
    mask_id: int,
    replacements: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of one window: tokens (T,) int64 -> (input_ids (T,) int64, labels (T,) int64).

    Each position is chosen with probability `p`; a chosen one becomes `mask_id` (probability 0.8), a
    token drawn uniformly from `replacements` (1-D array of ids; 0.1) or stays (0.1). labels hold the
    original token at chosen positions and IGNORE elsewhere. All randomness comes from `rng`.
    """
    n = tokens.numel()
    chosen = torch.from_numpy(rng.random(n) < p)
    action = torch.from_numpy(rng.random(n))  # < 0.8: mask, < 0.9: random token, else keep
    random_ids = torch.from_numpy(replacements[rng.integers(0, len(replacements), n)].astype(np.int64))
    input_ids = torch.where(chosen & (action < 0.8), mask_id, tokens)
    input_ids = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, input_ids)
    labels = torch.where(chosen, tokens, IGNORE)
    return input_ids, labels


class MaskedWindows(Dataset):
    """Windows of seq_len tokens of a token array, masked by `mask_tokens`; index e * len + i is window i
    masked for epoch e (see the module doc). Items: {"input_ids": (T,) int64, "labels": (T,) int64}."""

    def __init__(
        self,
        tokens: CachedArray,
        seq_len: int,
        seed: int,
        stream: int,
        p: float,
        mask_id: int,
        replacements: np.ndarray,
    ):
        self.windows = TokenWindows(tokens, seq_len)
        self.n = len(tokens) // seq_len  # no next-token shift: every whole window
        self.seed, self.stream, self.p = seed, stream, p
        self.mask_id, self.replacements = mask_id, replacements

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(index, self.n)
        rng = np.random.default_rng([self.seed, self.stream, epoch, i])
        tokens = self.windows.window(i, self.windows.seq_len)
        input_ids, labels = mask_tokens(tokens, rng, self.p, self.mask_id, self.replacements)
        return {"input_ids": input_ids, "labels": labels}


class MaskedLMDataModule(LMDataModule):
    """`data.lm.LMDataModule` serving masked-LM batches; see the module doc.

    Args:
        mlm_probability: the fraction of positions chosen for prediction (BERT: 0.15).
        Everything else as `data.lm.LMDataModule`; `seed` also seeds the masking. vocab_size, if given,
        must include the mask token (bytes: 258).

    Attributes: mask_token_id, vocab_size (the model's embedding rows).
    """

    special_tokens = ("mask",)
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
        return self.special_id("mask")

    def replacement_ids(self) -> np.ndarray:
        """The ids a random replacement is drawn from: the tokenizer's, without EOS and the mask."""
        return np.setdiff1d(np.arange(self.tokenizer.vocab_size), [self.tokenizer.eos_id, self.mask_token_id])

    def examples(self, tokens: CachedArray, split: str) -> Dataset:
        return MaskedWindows(
            tokens, self.seq_len, self.seed, SPLIT_STREAM[split], self.mlm_probability, self.mask_token_id,
            self.replacement_ids(),
        )  # fmt: skip

    def order_settings(self) -> dict:
        return super().order_settings() | {"mlm_probability": self.mlm_probability}
