"""Train any task of the project with Hydra + Lightning: `cfg.task` drives `cfg.model` on `cfg.data`.

    python train.py                                   # tiny GPT-2 on a small local corpus, CPU-friendly
    python train.py experiment=gpt2                   # GPT-2 small + FlashAttention on OpenWebText
    python train.py task=masked_lm model=encoder data=stdlib-mlm
    python train.py experiment=gpt2 trainer=ddp trainer.devices=8
    python train.py experiment=gpt2 ckpt_path=null    # start over instead of resuming

Everything is in configs/ (train.yaml is the root). The run directory is `outputs/<name>` without a
timestamp, so re-running the same command resumes from its `checkpoints/last.ckpt` (`ckpt_path=last`, the
default); a killed or requeued run therefore continues where it stopped.
"""

import logging
import math
import netrc
import os
import secrets
import signal
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from models.callbacks import LastCheckpoint
from models.tasks.base import TaskModule

log = logging.getLogger("train")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def wandb_offline() -> bool:
    """True unless wandb can reach a server: `WANDB_MODE=online`, or an API key (env var or ~/.netrc).

    `WANDB_MODE=disabled` gives False too: the logger then leaves the mode to wandb, which disables itself.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return False
    if mode in ("offline", "dryrun"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (OSError, netrc.NetrcParseError):
        return True


def auto_precision() -> str:
    """bf16 mixed precision on a GPU that has bf16, fp16 mixed on older GPUs, fp32 on CPU."""
    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)
OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)


def accumulation_steps(global_batch_size: int | None, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that one step sees `global_batch_size` sequences."""
    if global_batch_size is None:
        return 1
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of data.batch_size ({micro_batch_size}) x "
            f"{world_size} devices = {per_step}. Fix: choose data.batch_size and the device count so that "
            f"global_batch_size / (data.batch_size x devices x num_nodes) is a whole number."
        )
    return global_batch_size // per_step


def model_options() -> dict[str, str]:
    """{`model=` option: the `_target_` it builds}, read from configs/model (following a file's first default
    when it has no `_target_` of its own)."""

    def target(name: str) -> str | None:
        cfg = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")
        if "_target_" in cfg:
            return cfg._target_
        first = next((d for d in cfg.get("defaults", []) if isinstance(d, str) and d != "_self_"), None)
        return target(first) if first else None

    options = {p.stem: target(p.stem) for p in sorted((CONFIG_DIR / "model").glob("*.yaml"))}
    return {name: t for name, t in options.items() if t}


def check_task_and_model(cfg: DictConfig) -> None:
    """Fail at config time, before any work, when `cfg.task` cannot drive `cfg.model`; the message names
    the model options that serve the task."""
    task_cls = hydra.utils.get_class(cfg.task._target_)
    net_cls = hydra.utils.get_class(cfg.model._target_)
    choice = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
    serving = ", ".join(
        f"model={name}"
        for name, target in model_options().items()
        if task_cls.name in getattr(hydra.utils.get_class(target), "tasks", ())
    )
    task_cls.check_network(net_cls, choice, serving)


def resolve_ckpt_path(ckpt_path: str | None, ckpt_dir: Path) -> str | None:
    """`last` -> `<ckpt_dir>/last.ckpt` if it exists (else None: start fresh); other values unchanged."""
    if ckpt_path is None and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        log.info("Requeued SLURM job: resuming from last.ckpt.")
        ckpt_path = "last"
    if ckpt_path != "last":
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path} does not exist. Fix: give a checkpoint file or `last`."
            )
        return ckpt_path
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        log.info(f"Resuming from {last}")
        return str(last)
    log.info(f"No checkpoint at {last}: starting a fresh run.")
    return None


def wandb_run_id(output_dir: Path) -> str:
    """The run's wandb id, kept in `<output_dir>/wandb_id.txt` so a resumed run continues the same wandb run."""
    path = output_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit `cfg.task` with `cfg.model` on `cfg.data`, then evaluate the best checkpoint; returns the final metrics."""
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    check_task_and_model(cfg)
    net = hydra.utils.instantiate(cfg.model)
    module: TaskModule = hydra.utils.instantiate(
        cfg.task,
        net=net,
        optimizer=hydra.utils.instantiate(cfg.optim),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        compile=cfg.get("compile", False),
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    module.check_data(datamodule)

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = []
    for lg in (cfg.get("logger") or {}).values():
        if lg is None:
            continue
        extra = {"id": wandb_run_id(output_dir)} if "Wandb" in lg._target_ and lg.get("id") is None else {}
        loggers.append(hydra.utils.instantiate(lg, **extra))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    # Lightning counts accumulation and validation intervals in micro-batches; the config speaks of
    # sequences per optimizer step and optimizer steps.
    accumulate = accumulation_steps(cfg.get("global_batch_size"), cfg.data.batch_size, trainer.world_size)
    trainer.accumulate_grad_batches = accumulate
    trainer.val_check_interval = cfg.val_every_n_steps * accumulate
    log.info(
        f"{trainer.world_size} device(s) x data.batch_size {cfg.data.batch_size} x {accumulate} accumulation "
        f"= {trainer.world_size * cfg.data.batch_size * accumulate} sequences of {cfg.data.seq_len} tokens per step"
    )
    module.check_fits_on_gpu(trainer, cfg.data.batch_size, cfg.data.seq_len)

    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir / "checkpoints")
    uses_wandb = any(isinstance(lg, WandbLogger) for lg in trainer.loggers) and rank_zero_only.rank == 0
    try:
        metrics = fit_and_evaluate(cfg, trainer, module, datamodule, ckpt_path)
    except BaseException as e:
        if uses_wandb:
            finish_wandb(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
        raise
    if uses_wandb:
        finish_wandb(0)
    return metrics


def finish_wandb(exit_code: int) -> None:
    """Close the wandb run now (writes its summary and config files; Lightning leaves the run open)."""
    import wandb

    wandb.finish(exit_code=exit_code)


def fit_and_evaluate(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: TaskModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None,
) -> dict[str, float]:
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        stop = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        step = stop.stopped_at_step if stop else trainer.global_step
        log.warning(f"Stopped at step {step}. Resume with the same command (ckpt_path=last).")
        raise SystemExit(128 + (stop.received if stop and stop.received else signal.SIGTERM)) from None
    except RuntimeError as e:
        if ckpt_path and "Error(s) in loading state_dict" in str(e):
            raise RuntimeError(
                f"{ckpt_path} was saved by a different model configuration. Fix: pass the same model config, "
                "use another name=..., or ckpt_path=null to start over."
            ) from e
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test") and trainer.checkpoint_callback is not None:
        best = trainer.checkpoint_callback.best_model_path or None
        if best is None:
            log.info("No best checkpoint (no validation ran): evaluating the final weights.")
        evaluate = trainer.test if is_overridden("test_dataloader", datamodule) else trainer.validate
        for result in evaluate(module, datamodule=datamodule, ckpt_path=best):
            metrics.update({k: float(v) for k, v in result.items()})
    log.info("Final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))  # each rank
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    val = metrics.get("val/loss")
    return None if val is None or math.isnan(val) else val


if __name__ == "__main__":
    main()
