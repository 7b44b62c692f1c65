"""Each task trains a few steps on the CPU from `python train.py task=... model=... data=...` with a tiny
model, and a task paired with a model it cannot drive, or an unknown task, fails at config time."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from train_utils import compose_train

import train
from kernels.benchmark import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer=cpu",
    "trainer.max_steps=30",
    "val_every_n_steps=15",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.throughput.window_size=2",
    "callbacks.progress_bar.refresh_rate=0",
    "optim.lr=3e-3",
]
STDLIB = ["data.stdlib_max_bytes=200000", "data.val_tokens=1024"]


def two_class_corpus(root: Path) -> None:
    """root/{train,test}/{a,b}/*.txt: class a's documents are mostly the letter a, class b's mostly b."""
    for split, n in (("train", 40), ("test", 8)):
        for label, letter in (("a", "a"), ("b", "b")):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                words = [letter * (1 + (i + j) % 5) for j in range(6 + i % 7)]
                (folder / f"{i}.txt").write_text(" ".join(words) + f" {i}\n")


def run(tmp_path: Path, *overrides: str) -> list[dict[str, float]]:
    env = dict(os.environ, FLASHREPRO_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled")
    cmd = [sys.executable, "train.py", *SMALL, f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return read_metrics(tmp_path / "run")


def logged(rows: list[dict[str, float]], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


@pytest.mark.parametrize(
    "task,overrides,metrics",
    [
        ("causal_lm", ["model=gpt2-tiny", "data=stdlib", *STDLIB], ["val/loss", "val/ppl"]),
        ("masked_lm", ["model=encoder", "data=stdlib-mlm", *STDLIB], ["val/loss", "val/accuracy", "val/ppl"]),
        ("classification", ["model=encoder", "data=imdb-classify", "data.classes=[a,b]"], ["val/accuracy"]),
    ],
)
def test_task_trains_from_train_py(task, overrides, metrics, tmp_path):
    if task == "classification":
        two_class_corpus(tmp_path / "docs")
        overrides = [
            *overrides,
            f"data.path={tmp_path / 'docs/train'}",
            f"data.val_path={tmp_path / 'docs/test'}",
        ]
    rows = run(tmp_path, f"task={task}", *overrides)
    loss = logged(rows, "train/loss")
    assert len(loss) == 30
    assert sum(loss[-5:]) < sum(loss[:5]), loss
    for key in metrics:
        assert len(logged(rows, key)) >= 2, key
    if task == "classification":
        assert logged(rows, "val/accuracy")[-1] >= 0.75
    assert all(v > 0 for v in logged(rows, "throughput/tokens_per_sec"))


def test_task_that_cannot_drive_the_model_fails_at_config_time(tmp_path):
    cfg = compose_train(tmp_path, ["task=classification", "model=gpt2-tiny"])
    with pytest.raises(ValueError) as e:
        train.check_task_and_model(cfg)
    message = str(e.value)
    assert "task=classification needs a network with a classification head" in message
    assert "models.gpt2.GPT2" in message and "serves task=causal_lm" in message
    assert "Models for task=classification: model=encoder" in message
    with pytest.raises(ValueError, match="task=masked_lm needs .* Models for task=masked_lm: model=encoder"):
        train.check_task_and_model(compose_train(tmp_path, ["task=masked_lm", "model=hf-gpt2-small"]))
    train.check_task_and_model(compose_train(tmp_path, ["task=masked_lm", "model=encoder"]))  # fits


def test_unknown_task_names_the_choices(tmp_path):
    with pytest.raises((ConfigCompositionException, MissingConfigException)) as e:
        compose_train(tmp_path, ["task=translation"])
    for name in ("causal_lm", "masked_lm", "classification"):
        assert name in str(e.value)


def test_train_py_rejects_the_pairing_before_building_data(tmp_path):
    env = dict(
        os.environ, FLASHREPRO_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled", HYDRA_FULL_ERROR="1"
    )
    cmd = [sys.executable, "train.py", "task=classification", f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "task=classification needs" in out and "model=gpt2-tiny" in out
    assert "building token cache" not in out and not (tmp_path / "cache").exists()
