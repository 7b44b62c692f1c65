"""Lightning callbacks of the training stack (configured in configs/callbacks/).

- `TokenThroughput`: Lightning's `ThroughputMonitor`, logging `throughput/tokens_per_sec` (all devices) and
  `throughput/mfu` (model FLOPs utilisation per device; absent where Lightning does not know the peak FLOPs,
  e.g. on CPU) for training.
- `LastCheckpoint`: keeps `last.ckpt` current at optimizer-step boundaries; on SIGTERM / SIGINT (and SLURM's
  pre-timeout signal) it finishes the step in flight, saves and stops, so `ckpt_path=last` resumes without
  losing or repeating a step. (The best checkpoint by val/loss is Lightning's `ModelCheckpoint`.)
"""

import logging
import os
import signal
import subprocess
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    """Sequences in a batch: the B of its `input_ids` (B, T)."""
    return batch["input_ids"].size(0)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real tokens in a batch: the True entries of `attention_mask` (B, T) where the data pads (one host
    sync), else all B * T of `input_ids`."""
    mask = batch.get("attention_mask")
    return int(mask.sum().item()) if mask is not None else batch["input_ids"].numel()


class TokenThroughput(ThroughputMonitor):
    """`ThroughputMonitor` over dict batches, logging `throughput/tokens_per_sec` and `throughput/mfu`.

    Rates are rolling averages over the last `window_size` micro-batches. The module's `flops_per_batch`
    (see `models.tasks.base.TaskModule`) gives the model FLOPs; the device's peak comes from Lightning's `get_available_flops`
    (known GPUs, for the training precision) unless `peak_flops` (FLOP/s per device) is given.
    """

    def __init__(self, window_size: int = 20, peak_flops: float | None = None) -> None:
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:  # a device missing from Lightning's table
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING or not trainer._logger_connector.should_update_logs:
            return  # evaluation is still timed (the parent excludes it from training time), not logged
        metrics = self._throughputs[stage].compute()
        out = {}
        if "device/items_per_sec" in metrics:
            out["throughput/tokens_per_sec"] = metrics["device/items_per_sec"] * trainer.world_size
        if "device/mfu" in metrics:
            out["throughput/mfu"] = metrics["device/mfu"]
        if trainer.strategy.root_device.type == "cuda":  # rank 0's peak; ranks are symmetric under DDP / FSDP
            out["memory/peak_gb"] = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
        if out:
            trainer._logger_connector.log_metrics(out, step=iter_num)


class LastCheckpoint(L.Callback):
    """Keep `<dirpath>/last.ckpt` current and stop cleanly on a signal.

    Saves at optimizer-step boundaries only (never inside a gradient accumulation): every `every_n_steps`
    steps, after the final step, and, after SIGTERM, SIGINT (Ctrl-C; a second one aborts at once) or SIGUSR1
    (what `#SBATCH --signal=USR1@90` sends before the time limit), right after the step in flight, before
    stopping. A signal seen by any rank stops all ranks at the same step. Stopping raises Lightning's
    `SIGTERMException` (a `SystemExit`), so no validation or test runs on the way out. Under SLURM, SIGUSR1
    also requeues the job (`scontrol requeue`) and the requeued job resumes from last.ckpt (see train.py).
    These handlers replace Lightning's own for the training loop, which stop or save in the middle of a step.
    The file is written next to its final name and renamed, so a kill never leaves a truncated last.ckpt.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, dirpath: str, every_n_steps: int = 100, requeue_on_slurm: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 (got {every_n_steps}).")
        self.path = os.path.join(dirpath, "last.ckpt")
        self.every_n_steps = every_n_steps
        self.requeue_on_slurm = requeue_on_slurm
        self.received: int | None = None  # signal number, once caught
        self.stopped_at_step: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = -1

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        if self.received is None:
            log.warning(
                f"Caught {signal.Signals(signum).name}: saving last.ckpt and stopping after this step."
            )
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its handlers just before this hook; ours replace them while training runs.
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: signals stay with Lightning
                return

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._step_at_batch_start:
            return  # inside a gradient accumulation: the optimizer has not stepped yet
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop or step % self.every_n_steps == 0 or step == trainer.max_steps:
            self.save(trainer)
        if not stop:
            return
        self.stopped_at_step = step
        # Log this step's metrics now: Lightning does it right after this hook, which the exception skips.
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        log.warning(f"Stopped by {name} after step {step}; saved {self.path}.")
        if self.requeue_on_slurm and self.received == signal.SIGUSR1 and trainer.is_global_zero:
            self._slurm_requeue()
        raise SIGTERMException()

    def save(self, trainer: L.Trainer) -> None:
        tmp = self.path + ".tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # all ranks take part; global rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)

    @staticmethod
    def _slurm_requeue() -> None:
        if not SLURMEnvironment.detect():
            return
        job = os.environ["SLURM_JOB_ID"]
        if "SLURM_ARRAY_JOB_ID" in os.environ:
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            log.warning(f"Requeued SLURM job {job}; it resumes from last.ckpt.")
        else:
            log.error(f"`scontrol requeue {job}` failed ({result.returncode}): {result.stderr.strip()}")
