"""Optimizer parameter groups and learning-rate schedules (configured in configs/optim/, configs/scheduler/)."""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

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
