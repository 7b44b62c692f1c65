"""Masked language modelling (BERT): cross-entropy over the masked positions only.

Batches: `input_ids` (B, T) int64 with the masking applied, `labels` (B, T) int64 holding the original
token at the chosen positions and -100 elsewhere, and `attention_mask` (B, T) bool where the data pads.
The network maps (input_ids, attention_mask) to hidden states (B, T, C), and `mlm_logits` maps the hidden
states of the chosen positions (N, C) to logits (N, V): the head runs only where the loss needs it.
Evaluation logs `<stage>/loss`, `<stage>/accuracy` (masked-token accuracy, MLPerf's target metric) and
`<stage>/ppl`, all weighted by masked tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data.mlm import IGNORE  # the label of positions that are not predicted
from models.tasks.base import Batch, TaskModule, at_least_fp32, loss_and_accuracy


def masked_logits(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) in at least fp32, labels (N,)) at the N chosen positions of the batch."""
    hidden = net(batch["input_ids"], batch.get("attention_mask"))
    chosen = batch["labels"] != IGNORE
    return at_least_fp32(net.mlm_logits(hidden[chosen])), batch["labels"][chosen]


def masked_token_loss(net: nn.Module, batch: Batch) -> torch.Tensor:
    logits, labels = masked_logits(net, batch)
    return F.cross_entropy(logits, labels)


class MaskedLMTask(TaskModule):
    """Trains an encoder on masked-token prediction; see `TaskModule` for the arguments."""

    name = "masked_lm"
    needs = "an encoder with a masked-LM head (`mlm_logits`)"
    loss_fn = staticmethod(masked_token_loss)
    eval_metrics = ("loss", "accuracy")

    def eval_stats(self, batch: Batch) -> dict[str, tuple[torch.Tensor, int]]:
        self.check_batch(batch)
        return loss_and_accuracy(*masked_logits(self.net, batch))

    def derived_metrics(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"ppl": torch.exp(values["loss"])}
