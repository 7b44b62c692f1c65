"""Every config composes, and what it describes can be built: experiments (model on the meta device, no
training), each option of each config group, and the GPT-2 recipe of the paper in every GPT-2 experiment."""

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from train_utils import CONFIGS, compose_train

import train
from models.optim import param_groups
from models.tasks.base import TaskModule

EXPERIMENTS = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
)
# Options that serve tasks other than causal_lm: tests/test_tasks.py composes them with their task.
OTHER_TASKS = {("data", "stdlib-mlm"), ("data", "imdb-classify"), ("model", "encoder")}
GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("trainer", "callbacks", "logger", "optim", "scheduler", "paths", "hydra", "model", "data")
    for p in sorted((CONFIGS / group).glob("[!_]*.yaml"))
    if (group, p.stem) not in OTHER_TASKS
]
GPT2_TOKENS_PER_STEP = 512 * 1024  # the paper's batch: 512 sequences of 1024 tokens


def build_on_meta(cfg) -> tuple[torch.nn.Module, TaskModule]:
    """The run's network (meta device: no memory, no init cost) and its task module with the optimizer."""
    with torch.device("meta"):
        net = hydra.utils.instantiate(cfg.model)
    module = hydra.utils.instantiate(
        cfg.task,
        net=net,
        optimizer=hydra.utils.instantiate(cfg.optim),
        scheduler=hydra.utils.instantiate(cfg.scheduler),
    )
    return net, module


def test_experiment_list():
    names = {
        "gpt2",
        "gpt2/small-flash",
        "gpt2/small-standard",
        "gpt2/small-hf",
        "gpt2/medium-flash",
        "gpt2/medium-standard",
        "gpt2/medium-hf",
        "gpt2/small-flash-1k",
        "gpt2/small-flash-2k",
        "gpt2/small-flash-4k",
    }
    assert names <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(experiment, tmp_path):
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    net, module = build_on_meta(cfg)
    assert net.n_positions >= cfg.data.seq_len, "the position table must cover the sequence length"
    assert net.flops_per_token(cfg.data.seq_len) > 0
    # The micro-batch divides the global batch on 1 and on 8 GPUs.
    for gpus in (1, 8):
        assert train.accumulation_steps(cfg.global_batch_size, cfg.data.batch_size, gpus) >= 1
    # The configured micro-batch fits an 80 GB GPU by the same estimate train.py checks on CUDA.
    full = str(cfg.trainer.precision).startswith(("32", "64"))
    assert net.training_memory(cfg.data.batch_size, cfg.data.seq_len, 4 if full else 2) < 0.95 * 80e9
    decay, no_decay = param_groups(net, cfg.optim.weight_decay)
    assert decay["params"] and no_decay["params"]
    scheduler = hydra.utils.instantiate(cfg.scheduler)(
        module.optimizer_factory(param_groups(net, 0.1)), total_steps=cfg.trainer.max_steps
    )
    assert scheduler.get_last_lr()[0] > 0


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("gpt2")])
def test_gpt2_experiments_follow_the_paper_recipe(experiment, tmp_path):
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    assert cfg.data._target_ == "data.lm.LMDataModule"
    assert cfg.trainer.max_steps == 400_000
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.global_batch_size * cfg.data.seq_len == GPT2_TOKENS_PER_STEP
    assert cfg.optim._target_ == "torch.optim.AdamW" and list(cfg.optim.betas) == [0.9, 0.95]
    assert cfg.optim.weight_decay == 0.1 and cfg.scheduler.warmup_fraction == 0.01
    medium = "medium" in experiment
    assert cfg.optim.lr == (1.5e-4 if medium else 6e-4)
    assert cfg.model.n_layer == (24 if medium else 12) and cfg.model.n_embd == (1024 if medium else 768)
    if experiment.endswith("-hf"):
        assert cfg.model._target_ == "models.hf_gpt2.HFGPT2" and cfg.model.attn_implementation == "eager"
    else:
        assert cfg.model._target_ == "models.gpt2.GPT2"
        assert cfg.model.attn_impl == ("standard" if "standard" in experiment else "flash")
    context = {"1k": 1024, "2k": 2048, "4k": 4096}.get(experiment.rsplit("-", 1)[-1], 1024)
    assert cfg.data.seq_len == cfg.model.n_positions == context
    assert cfg.name == (experiment.replace("/", "-") if experiment != "gpt2" else "gpt2-small-flash")


def test_default_run_is_the_tiny_cpu_run(tmp_path):
    cfg = compose_train(tmp_path)
    assert cfg.name == "tiny" and cfg.ckpt_path == "last"
    assert cfg.model.n_layer <= 4 and cfg.trainer.max_steps <= 500
    OmegaConf.resolve(cfg)
    if not torch.cuda.is_available():
        assert cfg.trainer.precision == "32-true"
    build_on_meta(cfg)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_group_option(group, option, tmp_path):
    """Each option composes with the defaults; what can be built on this machine is built."""
    cfg = compose_train(tmp_path, [f"{group}={option}"])
    OmegaConf.resolve(cfg)
    if group == "trainer":
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            assert cfg.trainer.precision == "bf16-mixed"
            return
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer, L.Trainer) and trainer.gradient_clip_val == 1.0
        if option == "ddp_cpu":
            assert trainer.world_size == 2 and trainer.strategy.process_group_backend == "gloo"
    elif group == "callbacks":
        callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
        assert all(isinstance(c, L.Callback) for c in callbacks)
    elif group == "logger":
        loggers = [
            hydra.utils.instantiate(c, id="test") if "Wandb" in c._target_ else hydra.utils.instantiate(c)
            for c in cfg.logger.values()
        ]
        assert loggers and all(isinstance(lg, L.pytorch.loggers.Logger) for lg in loggers)
    elif group in ("optim", "scheduler", "model"):
        build_on_meta(cfg)
    elif group == "data":
        assert cfg.data._target_ == "data.lm.LMDataModule"
        assert cfg.data.seq_len >= 1 and cfg.data.batch_size >= 1


def test_ddp_follows_the_slurm_allocation(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    cfg = compose_train(tmp_path, ["trainer=ddp"])
    assert cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2


def test_unknown_key_is_rejected(tmp_path):
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_train(tmp_path, ["trainer.max_stepz=3"])


def test_wandb_is_offline_unless_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert train.wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not train.wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert train.wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not train.wandb_offline()  # left to wandb, which then logs nothing
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not train.wandb_offline()
    monkeypatch.delenv("WANDB_MODE")
    Path(tmp_path, ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    Path(tmp_path, ".netrc").chmod(0o600)
    assert not train.wandb_offline()
