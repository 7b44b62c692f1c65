"""Causal language modelling: next-token cross-entropy (GPT-2).

Batches: `input_ids` (B, T) int64 and `labels` (B, T) int64, the next token of each position. The network
maps input_ids (B, T) to logits (B, T, V). Evaluation logs `<stage>/loss` (token-weighted) and
`<stage>/ppl = exp(loss)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.tasks.base import Batch, TaskModule, at_least_fp32


def next_token_loss(net: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of `net(input_ids)` (logits (B, T, V)) against `labels`, in at least fp32."""
    logits = at_least_fp32(net(batch["input_ids"]))
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


class CausalLMTask(TaskModule):
    """Trains a language model on next-token prediction; see `TaskModule` for the arguments."""

    name = "causal_lm"
    needs = "a language model mapping token ids (B, T) to next-token logits (B, T, vocab)"
    loss_fn = staticmethod(next_token_loss)

    def check_batch(self, batch: Batch) -> None:
        super().check_batch(batch)
        x, y = batch["input_ids"], batch["labels"]
        if x.ndim != 2 or x.shape != y.shape:
            raise ValueError(
                f"expected input_ids and labels of equal (B, T) shapes, got {tuple(x.shape)}, {tuple(y.shape)}"
            )

    def derived_metrics(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"ppl": torch.exp(values["loss"])}
