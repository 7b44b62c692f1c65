"""Deterministic, resumable order over any map-style dataset of examples, and the data-module base.

Training order. A "data epoch" e is the permutation ``np.random.default_rng([seed, e]).permutation(n)``
of the n examples; its first N * B * W entries (N = n // (B*W) micro-batches per rank, B = batch_size,
W = world size) are viewed as (N, W, B): micro-batch i of rank r is ``perm.reshape(N, W, B)[i, r]``. Ranks
read disjoint examples; the union of the W micro-batches i is the global micro-batch i a single process
with batch B*W would read. Lightning's epochs are these epochs (the sampler's ``set_epoch``).

Resume rule. When `train_dataloader()` is built, the start position is derived from the trainer:
``steps_per_epoch = ceil(num_training_batches / accumulate_grad_batches)`` (Lightning's own count, which
steps the optimizer on a partial accumulation at the end of an epoch), then ``epoch, step =
divmod(trainer.global_step, steps_per_epoch)`` and the first micro-batch is ``step *
accumulate_grad_batches`` of that epoch. (When an epoch's batch count is a multiple of
accumulate_grad_batches, this is simply ``global_step * accumulate_grad_batches * batch_size`` examples
per rank into the sequence of epochs.) Lightning restores `global_step` from the checkpoint before it
builds the train loader (``fit(ckpt_path=...)``), so a resumed run reads exactly the batches an
uninterrupted one would have read, provided the checkpoint was taken at an optimizer-step boundary
(ModelCheckpoint's ``every_n_train_steps``, end of epoch, validation at a step boundary). The train
loader's ``state_dict()`` (saved by Lightning in the checkpoint) records what the order depends on
(`order_settings()`: seed, batch size, world size, and what the data module adds); a resume with
different values logs a warning, since the batches then differ from the uninterrupted run's.

Validation: examples 0..n_val-1 in order (n_val rounded down to a multiple of W); rank r reads examples
r, r + W, r + 2W, ...

Batches are dicts of tensors, stacked by the default collate from the dataset's items (dicts of tensors
of equal shapes per key): e.g. {"input_ids": (B, T) int64, "labels": (B, T) int64}.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


class TrainSampler(DistributedSampler):
    """Example indices for one rank, in the order of the module docstring (a pure function of seed and
    epoch). Epoch `start_epoch` begins at micro-batch `start_batch` (resume); other epochs at 0.
    Length: the full epoch, N * batch_size, so Lightning's batch counters stay aligned on resume.
    With `with_epoch`, example i of epoch e is yielded as e * len(dataset) + i, so that a dataset whose
    items depend on the epoch (dynamic masking, data.mlm) can tell it, in any worker process; such a
    dataset reads example ``index % len(dataset)``.
    A DistributedSampler subclass, so Lightning does not wrap it in another one under DDP."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                 start_epoch: int = 0, start_batch: int = 0, with_epoch: bool = False):  # fmt: skip
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.n_examples = len(dataset)
        self.batches_per_epoch = self.n_examples // (batch_size * world_size)
        self.start_epoch, self.start_batch, self.with_epoch = start_epoch, start_batch, with_epoch
        self.epoch = start_epoch  # the loader may be iterated before Lightning calls set_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N, batch_size) example indices of this rank for `epoch`, from micro-batch 0."""
        n, w, b = self.batches_per_epoch, self.num_replicas, self.batch_size
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)
        return perm[: n * w * b].reshape(n, w, b)[:, self.rank]

    def __iter__(self):
        first = self.start_batch if self.epoch == self.start_epoch else 0
        order = self.epoch_order(self.epoch)[first:].reshape(-1)
        if self.with_epoch:
            order = order + self.epoch * self.n_examples
        return iter(order.tolist())


class ValSampler(DistributedSampler):
    """Examples rank, rank + W, rank + 2W, ... below n_val (a multiple of W)."""

    def __init__(self, dataset: Dataset, n_val: int, rank: int, world_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True)
        self.n_val = n_val

    def __len__(self) -> int:
        return self.n_val // self.num_replicas

    def __iter__(self):
        return iter(range(self.rank, self.n_val, self.num_replicas))


class TrainLoader(DataLoader):
    """DataLoader whose state (what the order depends on) Lightning saves in checkpoints; on resume
    `load_state_dict` warns if it changed. The position itself comes from the trainer (see module doc)."""

    order: dict = {}  # set by ExampleDataModule.train_dataloader()
    log: logging.Logger = log  # the data module's logger, set there too

    def state_dict(self) -> dict:
        return dict(self.order)

    def load_state_dict(self, state: dict) -> None:
        changed = {k: (state.get(k), v) for k, v in self.order.items() if state.get(k) != v}
        if changed:
            self.log.warning(
                "resuming with different data-order settings %s (checkpoint -> now): the resumed run does "
                "not see the batches the interrupted run would have seen.",
                changed,
            )


def lightning_epoch_batches(loader_batches: int, limit_train_batches: int | float) -> int:
    """Batches Lightning runs per epoch given `limit_train_batches` (as its `_parse_num_batches`)."""
    if isinstance(limit_train_batches, int):
        return min(loader_batches, limit_train_batches)
    return int(loader_batches * limit_train_batches)


def resume_position(global_step: int, accumulate: int, epoch_batches: int) -> tuple[int, int]:
    """(epoch, first micro-batch in it) after `global_step` optimizer steps (see module doc)."""
    steps_per_epoch = math.ceil(epoch_batches / accumulate)
    epoch, step = divmod(global_step, steps_per_epoch)
    return epoch, step * accumulate


class ExampleDataModule(L.LightningDataModule):
    """A data module over map-style datasets whose items are dicts of tensors: it owns the micro-batch,
    workers, order seed and sharding, and builds the train and validation loaders with the order and
    resume rule of this module. A subclass sets `train_set` and `val_set` in `setup` (and calls
    `check_sizes` there), and may override `n_val` (how many validation examples to use),
    `order_settings` and `epoch_dependent_items`. Messages go to the logger of the subclass's module
    (e.g. "data.lm"), so one pipeline's messages share one logger name.

    Args:
        batch_size: examples per micro-batch per device; num_workers: DataLoader workers;
        seed: training order seed; rank, world_size: this process's shard (None: from the trainer,
            global_rank and world_size, else 0 and 1).
    """

    epoch_dependent_items = False  # True: the train set takes e * len + i indices (TrainSampler.with_epoch)

    def __init__(
        self,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 1234,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size!r}: must be a positive integer.")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"rank={rank}, world_size={world_size}: give both, with 0 <= rank < world_size.")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._rank, self._world_size = rank, world_size
        self._log = logging.getLogger(type(self).__module__)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def check_sizes(self, what: str, fix: str = "lower data.batch_size, or use more data") -> None:
        """Raise when a split has fewer examples than one micro-batch on every rank needs (train:
        batch_size x world_size, validation: world_size). `what` names the examples in the message
        (e.g. "windows of seq_len=1024"), `fix` says what to change."""
        _, world = self._rank_world()
        for name, ds, need in (
            ("train", self.train_set, self.batch_size * world),
            ("validation", self.val_set, world),
        ):
            if len(ds) < need:
                raise ValueError(
                    f"the {name} split has {len(ds)} {what}, fewer than the {need} needed (batch_size x "
                    f"world_size). Fix: {fix}."
                )

    def n_val(self) -> int:
        """Validation examples to use (before rounding down to a multiple of the world size): all."""
        return len(self.val_set)

    def order_settings(self) -> dict:
        """What the training order depends on, saved in checkpoints and compared on resume."""
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self._rank_world()[1]}

    def _rank_world(self) -> tuple[int, int]:
        if self._world_size is not None:
            return self._rank, self._world_size
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _start(self, sampler_batches: int) -> tuple[int, int]:
        """(epoch, micro-batch) where the train loader starts: the resume rule of the module doc."""
        t = self.trainer
        if t is None or t.global_step == 0:
            return 0, 0
        epoch_batches = lightning_epoch_batches(sampler_batches, t.limit_train_batches)
        epoch, batch = resume_position(t.global_step, t.accumulate_grad_batches, epoch_batches)
        self._log.info(
            "train loader starts at epoch %d, micro-batch %d (global_step %d x accumulate_grad_batches %d)",
            epoch, batch, t.global_step, t.accumulate_grad_batches,
        )  # fmt: skip
        return epoch, batch

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> TrainLoader:
        if self.train_set is None:
            self.setup("fit")
        rank, world = self._rank_world()
        start_epoch, start_batch = self._start(len(self.train_set) // (self.batch_size * world))
        sampler = TrainSampler(
            self.train_set, self.batch_size, rank, world, self.seed, start_epoch, start_batch,
            with_epoch=self.epoch_dependent_items,
        )  # fmt: skip
        loader = TrainLoader(self.train_set, sampler=sampler, drop_last=True, **self._loader_kwargs())
        loader.order, loader.log = self.order_settings(), self._log
        return loader

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        rank, world = self._rank_world()
        n_val = self.n_val()
        n_val -= n_val % world
        if n_val == 0:
            raise ValueError(
                f"the validation settings leave no validation example for {world} rank(s) "
                f"({self.n_val()} example(s) to use)."
            )
        return DataLoader(
            self.val_set, sampler=ValSampler(self.val_set, n_val, rank, world), **self._loader_kwargs()
        )
