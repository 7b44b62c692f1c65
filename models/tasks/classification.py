"""Sequence classification (Long Range Arena, long documents): cross-entropy over one label per sequence.

Batches: `input_ids` (B, T) int64, `labels` (B,) int64 class ids, and `attention_mask` (B, T) bool where
the data pads. The network's `classify(input_ids, attention_mask)` pools its hidden states into class
logits (B, num_classes). Evaluation logs `<stage>/loss` and `<stage>/accuracy`, weighted by sequences.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from models.tasks.base import Batch, TaskModule, at_least_fp32, loss_and_accuracy


def class_logits(net: nn.Module, batch: Batch) -> torch.Tensor:
    return at_least_fp32(net.classify(batch["input_ids"], batch.get("attention_mask")))


def classification_loss(net: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(class_logits(net, batch), batch["labels"])


class ClassificationTask(TaskModule):
    """Trains a sequence classifier; see `TaskModule` for the arguments."""

    name = "classification"
    needs = "a network with a classification head (`classify`, e.g. model=encoder with num_classes set)"
    loss_fn = staticmethod(classification_loss)
    eval_metrics = ("loss", "accuracy")

    def __init__(self, net: nn.Module, *args, **kwargs) -> None:
        super().__init__(net, *args, **kwargs)
        if not getattr(net, "num_classes", None):
            raise ValueError(
                f"task=classification needs model.num_classes (got {getattr(net, 'num_classes', None)}). "
                "Fix: model.num_classes=${data.num_classes}"
            )

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        super().check_data(datamodule)
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and classes != self.net.num_classes:
            raise ValueError(
                f"The data has {classes} classes but model.num_classes={self.net.num_classes}. "
                "Fix: model.num_classes=${data.num_classes}"
            )

    def eval_stats(self, batch: Batch) -> dict[str, tuple[torch.Tensor, int]]:
        self.check_batch(batch)
        return loss_and_accuracy(class_logits(self.net, batch), batch["labels"])
