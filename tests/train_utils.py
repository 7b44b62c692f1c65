"""Helpers shared by the tests (test_train, test_configs, test_scaling, test_slurm)."""

import socket
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import train  # noqa: F401  (registers the config resolvers)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def compose_train(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """configs/train.yaml composed as `python train.py <overrides>` would, writing to `output_dir`."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
