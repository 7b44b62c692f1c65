"""LightningModule for causal language modelling: next-token cross-entropy, AdamW, warmup + linear decay.

`LMModule` wraps any network with `forward(idx: LongTensor (B, T)) -> logits (B, T, V)` (`models.gpt2.GPT2`,
`models.hf_gpt2.HFGPT2`). Batches are `(x, y)` LongTensors of shape (B, T) with `y` = `x` shifted by one token.

Logged keys: `train/loss` (mean over the micro-batches of one optimizer step on this rank), `train/grad_norm`
(before clipping), `lr`, `val/loss` (token-weighted mean over the validation set, all ranks) and
`val/ppl = exp(val/loss)`; `test/loss`, `test/ppl` likewise.
"""

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torchmetrics import MeanMetric

# Modules whose parameters never get weight decay (on top of every parameter with fewer than 2 dims).
NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d)


def param_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into an AdamW group with `weight_decay` and one without.

    Decayed: matrices of linear layers (nn.Linear, HF's Conv1D). Not decayed: biases and other vectors,
    norm weights, and embeddings (also when tied to the output layer). Tied parameters appear once.
    """
    no_decay_ids = {id(p) for m in net.modules() if isinstance(m, NO_DECAY_MODULES) for p in m.parameters()}
    decay, no_decay = [], []
    for p in dict.fromkeys(net.parameters()):  # unique, in registration order
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def next_token_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `net(x)` (logits (B, T, V)) against `y`, both (B, T) int64, in at least fp32."""
    logits = net(x)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


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


def linear_warmup_decay(
    optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.01, final_lr_fraction: float = 0.0
) -> LambdaLR:
    """Linear warmup over `warmup_fraction * total_steps` optimizer steps, then linear decay.

    The learning rate of optimizer step s (0-based) is `lr * (s + 1) / W` for s < W, then
    `lr * (f + (1 - f) * (total_steps - s) / (total_steps - W))`, with W the warmup steps (at least 1) and
    f = `final_lr_fraction`; it reaches `lr` at s = W - 1 and `f * lr` at s = total_steps.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 (got {total_steps}); set trainer.max_steps.")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1) (got {warmup_fraction}).")
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        decay = max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        return final_lr_fraction + (1.0 - final_lr_fraction) * decay

    return LambdaLR(optimizer, factor)


class LMModule(L.LightningModule):
    """Trains `net` on next-token prediction.

    Args:
        net: maps idx (B, T) int64 to logits (B, T, V).
        optimizer: partial optimizer, called as `optimizer(param_groups)`; its `weight_decay` (default 0)
            applies to the decayed group only (see `param_groups`).
        scheduler: partial scheduler, called as `scheduler(optimizer, total_steps=...)` and stepped after
            every optimizer step; None for a constant learning rate.
        compile: run the network and the cross-entropy through `torch.compile` (fuses the layer norms,
            GELU, dropout and the softmax of the loss into few kernels; the first steps compile). Our
            attention kernels enter the graph as custom ops.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self._next_token_loss = torch.compile(next_token_loss) if compile else next_token_loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # Sum of the per-micro-batch losses since the last optimizer step (a 0-dim tensor, no host sync).
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._tokens_per_batch = (0, 0)  # (batch, seq_len) of the last batch, for `flops_per_batch`

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy (at least fp32) of a batch `(x, y)`, both (B, T) int64."""
        x, y = batch
        if x.ndim != 2 or x.shape != y.shape:
            raise ValueError(
                f"expected a batch (x, y) of equal (B, T) shapes, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        self._tokens_per_batch = tuple(x.shape)
        return self._next_token_loss(self.net, x, y)

    @property
    def flops_per_batch(self) -> float:
        """Model FLOPs of the last batch (read by `ThroughputMonitor` for MFU).

        `net.flops_per_token(T)` counts forward + backward (3x forward), so evaluation counts a third.
        """
        b, t = self._tokens_per_batch
        flops = self.net.flops_per_token(t) * b * t
        return flops if self.training else flops / 3

    # -- training ------------------------------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
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

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_loss.update(self.loss(batch), weight=batch[1].numel())

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_loss)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.test_loss.update(self.loss(batch), weight=batch[1].numel())

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_loss)

    def _log_eval(self, stage: str, metric: MeanMetric) -> None:
        loss = metric.compute()  # token-weighted mean over all batches and ranks (the same on every rank)
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/ppl", torch.exp(loss), prog_bar=True, sync_dist=True)
