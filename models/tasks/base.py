"""What every task shares: the optimizer and schedule, the gradient norm and the non-finite stop,
torch.compile, throughput FLOPs, evaluation metrics, and the checks of the network and data it is given.

A task subclasses `TaskModule` and sets:
    name       -- its config name (configs/task/<name>.yaml); a network serves the tasks in its `tasks`
    loss_fn    -- a static function (net, batch) -> mean training loss, 0-dim, at least fp32; it is what
                  `compile: true` runs through torch.compile
    eval_stats -- batch -> {metric: (batch mean, weight)}; logged as `<stage>/<metric>` (weighted means
                  over the whole evaluation set and all ranks), plus `derived_metrics`
Batches are dicts of tensors: `input_ids` (B, T) always, `labels`, and `attention_mask` (B, T) bool where
the data pads.

Logged keys: `train/loss` (mean over the micro-batches of one optimizer step on this rank),
`train/grad_norm` (before clipping), `lr`, and the evaluation metrics of each task.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric

from models.optim import param_groups

Batch = dict[str, torch.Tensor]


def grad_norm(grads: list[torch.Tensor], device: torch.device, sharded: bool = False) -> torch.Tensor:
    """L2 norm over all of `grads` as a 0-dim fp32 tensor on `device` (0 for an empty list).

    `sharded`: each rank of the default process group holds a disjoint shard of the gradients (FSDP's
    FULL_SHARD), so the ranks' squared norms are summed: every rank returns the same, global norm.
    """
    norm = (
        torch.nn.utils.get_total_norm(grads).float().to(device) if grads else torch.zeros((), device=device)
    )
    if sharded and dist.is_available() and dist.is_initialized():
        squared = norm.square()
        dist.all_reduce(squared)
        norm = squared.sqrt()
    return norm


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits in fp32 for the loss; fp32 and fp64 unchanged."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """{"loss": (mean cross-entropy, N), "accuracy": (fraction of argmax hits, N)}: logits (N, K), labels (N,)."""
    n = labels.numel()
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return {"loss": (F.cross_entropy(logits, labels), n), "accuracy": (accuracy, n)}


class TaskModule(L.LightningModule):
    """Trains `net` on one kind of problem; subclasses define the loss and the evaluation metrics.

    Args:
        net: the network; it must list this task's `name` in its class attribute `tasks`.
        optimizer: partial optimizer, called as `optimizer(param_groups)`; its `weight_decay` (default 0)
            applies to the decayed group only (see `models.optim.param_groups`).
        scheduler: partial scheduler, called as `scheduler(optimizer, total_steps=...)` and stepped after
            every optimizer step; None for a constant learning rate.
        compile: run the network and the loss through `torch.compile` (the first steps compile). Our
            attention kernels enter the graph as custom ops.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[str] = ""  # what the network must provide, for error messages
    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "labels")
    eval_metrics: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.check_network(type(net))
        self.net = net
        self._loss_fn = torch.compile(self.loss_fn) if compile else self.loss_fn
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.metrics = nn.ModuleDict(
            {f"{stage}_{m}": MeanMetric() for stage in ("val", "test") for m in self.eval_metrics}
        )
        # Sum of the per-micro-batch losses since the last optimizer step (a 0-dim tensor, no host sync).
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._batch_shape = (0, 0)  # (batch, seq_len) of the last batch, for `flops_per_batch`

    # -- what the task accepts -----------------------------------------------------------------------------

    @classmethod
    def check_network(cls, net_cls: type, model_choice: str | None = None, serving: str = "") -> None:
        """Raise a ValueError unless networks of `net_cls` serve this task (`cls.name in net_cls.tasks`).

        `model_choice` (the `model=` option) and `serving` (the model options that do serve it) make the
        message name the config choices."""
        tasks = getattr(net_cls, "tasks", ())
        if cls.name in tasks:
            return
        what = (
            f"model={model_choice} ({net_cls.__module__}.{net_cls.__qualname__})"
            if model_choice
            else (f"{net_cls.__module__}.{net_cls.__qualname__}")
        )
        has = ", ".join(f"task={t}" for t in tasks) or "no task"
        raise ValueError(
            f"task={cls.name} needs {cls.needs}; {what} serves {has}."
            + (f" Models for task={cls.name}: {serving}." if serving else "")
        )

    def check_batch(self, batch: Batch) -> None:
        """Raise a ValueError unless `batch` is a dict with this task's keys."""
        if not isinstance(batch, dict) or any(k not in batch for k in self.batch_keys):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                f"task={self.name} expects batches as dicts with keys {list(self.batch_keys)}, got {got}; "
                "use a data module of this project (configs/data/) that serves this task"
            )

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Raise before any work when the data does not fit the network (vocabulary size)."""
        data_vocab, model_vocab = (
            getattr(datamodule, "vocab_size", None),
            getattr(self.net, "vocab_size", None),
        )
        if data_vocab is not None and model_vocab is not None and data_vocab > model_vocab:
            raise ValueError(
                f"The data's tokenizer has {data_vocab} tokens but model.vocab_size={model_vocab}. "
                "Fix: model.vocab_size=${data.vocab_size} (or a data config with the model's tokenizer)."
            )

    def check_fits_on_gpu(self, trainer: L.Trainer, micro_batch: int, seq_len: int) -> None:
        """Raise before training when the run clearly cannot fit in the GPU's memory (CUDA only)."""
        device = trainer.strategy.root_device
        if device.type != "cuda" or not hasattr(self.net, "training_memory"):
            return
        full = str(trainer.precision).startswith(("32", "64"))
        need = self.net.training_memory(micro_batch, seq_len, 4 if full else 2)
        have = torch.cuda.get_device_properties(device).total_memory
        if need > 0.95 * have:
            raise MemoryError(
                f"This run needs about {need / 2**30:.1f} GiB per GPU (weights, gradients, AdamW states and "
                f"activations for data.batch_size={micro_batch} x data.seq_len={seq_len}), but "
                f"{torch.cuda.get_device_name(device)} has {have / 2**30:.1f} GiB. Fix: lower data.batch_size "
                "(global_batch_size is kept through gradient accumulation), use attn_impl=flash, or spread the "
                "model over more GPUs (FSDP)."
            )

    # -- loss and throughput -------------------------------------------------------------------------------

    @staticmethod
    def loss_fn(net: nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: Batch) -> torch.Tensor:
        """The training loss of `batch` (0-dim, at least fp32), through torch.compile if configured."""
        self.check_batch(batch)
        self._batch_shape = tuple(batch["input_ids"].shape)
        return self._loss_fn(self.net, batch)

    @property
    def flops_per_batch(self) -> float:
        """Model FLOPs of the last batch (read by `ThroughputMonitor` for MFU), padding included.

        `net.flops_per_token(T)` counts forward + backward (3x forward), so evaluation counts a third.
        """
        b, t = self._batch_shape
        flops = self.net.flops_per_token(t) * b * t
        return flops if self.training else flops / 3

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.net(*args, **kwargs)

    # -- training ------------------------------------------------------------------------------------------

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_count += 1
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Log the step's loss, lr and gradient norm; stop on a non-finite loss or gradient.

        Runs once per optimizer step, after the last backward of the accumulation and before clipping and
        `optimizer.step()`, so a diverged step never reaches the weights or a checkpoint.
        """
        loss = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # Under FSDP each rank holds a shard of the gradients: the norm (and the stop below) must be the
        # global one on every rank, or one rank would stop alone and the others wait for it forever.
        norm = grad_norm(grads, loss.device, sharded=isinstance(self.trainer.strategy, FSDPStrategy))
        # fp16's GradScaler handles inf gradients itself (it skips that step); bf16 and fp32 have no scaler.
        check = loss if self.trainer.precision == "16-mixed" else loss + norm
        if not torch.isfinite(check).item():
            raise FloatingPointError(
                f"Non-finite training loss ({loss.item()}) or gradient norm ({norm.item()}) at optimizer step "
                f"{self.trainer.global_step}; stopped before the update, so the last checkpoint holds the last good "
                "weights. Fix: lower optim.lr or raise the warmup, keep trainer.gradient_clip_val=1.0, use "
                "bf16-mixed rather than 16-mixed, then resume with ckpt_path=last."
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/grad_norm", norm)
        self.log("lr", optimizer.param_groups[0]["lr"], prog_bar=True)

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Norm clipping; under FSDP through the wrapped model, since Lightning's FSDP plugin refuses it."""
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict:
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        optimizer = self.optimizer_factory(param_groups(self.net, weight_decay))
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError("The learning-rate schedule needs a finite length: set trainer.max_steps.")
        scheduler = self.scheduler_factory(optimizer, total_steps=int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ----------------------------------------------------------------------------------------

    def eval_stats(self, batch: Batch) -> dict[str, tuple[torch.Tensor, int | torch.Tensor]]:
        """{metric: (mean over the batch, weight)} for `eval_metrics`; the default is the weighted loss."""
        return {"loss": (self.loss(batch), batch["labels"].numel())}

    def derived_metrics(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metrics computed from the evaluation means (e.g. perplexity from the loss)."""
        return {}

    def _eval_step(self, stage: str, batch: Batch) -> None:
        for name, (value, weight) in self.eval_stats(batch).items():
            self.metrics[f"{stage}_{name}"].update(value, weight=weight)

    def _log_eval(self, stage: str) -> None:
        values = {}
        for name in self.eval_metrics:
            metric = self.metrics[f"{stage}_{name}"]
            values[name] = (
                metric.compute()
            )  # weighted mean over all batches and ranks (the same on every rank)
            metric.reset()
        for name, value in (values | self.derived_metrics(values)).items():
            self.log(f"{stage}/{name}", value, prog_bar=True, sync_dist=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
