"""The training stack. CausalLMTask (on the shared TaskModule): loss, weight-decay groups, lr schedule, gradient accumulation (fp64 against
the full-batch gradient), the non-finite-loss stop. train.py as users run it (subprocesses): loss goes down,
the logged keys, wandb offline files; SIGTERM + resume equals an uninterrupted run; 2-process CPU DDP."""

import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from train_utils import compose_train, free_port

import train
from kernels.benchmark import read_metrics
from models.callbacks import LastCheckpoint
from models.gpt2 import GPT2
from models.hf_gpt2 import HFGPT2
from models.layers import estimate_training_memory
from models.optim import linear_warmup_decay, param_groups
from models.tasks.base import grad_norm
from models.tasks.causal_lm import CausalLMTask

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=97, n_positions=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


class TokenBatches(TensorDataset):
    """n random sequences as {"input_ids": x, "labels": y} with y = x shifted by one; `[:]` gives (x, y)."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (x, y) if isinstance(i, slice) else {"input_ids": x, "labels": y}


def token_batches(n: int, seq: int = 16, vocab: int = 97, seed: int = 0) -> TokenBatches:
    data = torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(seed))
    return TokenBatches(data[:, :-1], data[:, 1:])


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**(defaults | kwargs))


# -- CausalLMTask---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GPT2, HFGPT2])
def test_weight_decay_only_on_linear_matrices(cls):
    """Decay exactly the attention / MLP matrices; never biases, LayerNorms or (tied) embeddings."""
    net = cls(**TINY)
    decay, no_decay = param_groups(net, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}  # tied weights appear once
    matrices = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        n for n in names.values() if n.endswith(matrices)
    )
    assert len(decay["params"]) == 4 * TINY["n_layer"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    wte = net.transformer.wte.weight if cls is GPT2 else net.model.transformer.wte.weight
    assert any(p is wte for p in no_decay["params"])


def test_linear_warmup_decay_schedule():
    """lr of step s: lr*(s+1)/W during warmup, then linear to 0 at total_steps (W = 1% of 1000 = 10)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = linear_warmup_decay(opt, total_steps=1000, warmup_fraction=0.01)
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * (s + 1) / 10 for s in range(10)] + [2.0 * (1000 - s) / 990 for s in range(10, 1000)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert max(lrs) == pytest.approx(2.0) and lrs[-1] == pytest.approx(2.0 / 990)


def test_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    module = CausalLMTask(GPT2(**TINY), optimizer=partial(torch.optim.SGD, lr=0.1))
    x, y = token_batches(3)[:]
    logits = module.net(x)
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, y[..., None]).mean()
    assert module.loss({"input_ids": x, "labels": y}).item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="equal"):
        module.loss({"input_ids": x, "labels": y[:, :-1]})


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler"
)
def test_compiled_module_trains_like_eager():
    """compile=True (torch.compile of net + loss, inductor): the same losses and weights as eager, 3 steps."""
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        module = CausalLMTask(
            GPT2(**TINY, attn_impl="sdpa"), optimizer=partial(torch.optim.SGD, lr=0.1), compile=compile
        )
        losses = []
        trainer = quiet_trainer(max_steps=3, callbacks=[LossRecorder(losses)])
        trainer.fit(module, DataLoader(token_batches(6), batch_size=2, shuffle=False))
        runs.append((losses, [p.detach().clone() for p in module.net.parameters()]))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = runs
    assert len(compiled_losses) == 3
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(eager_params, compiled_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


class LossRecorder(L.Callback):
    def __init__(self, losses: list[float]):
        self.losses = losses

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def one_sgd_step(micro_batch: int, accumulate: int) -> dict[str, torch.Tensor]:
    """Parameter change of one optimizer step (SGD, lr 1) over the same 4 sequences, in float64."""
    torch.manual_seed(0)
    net = GPT2(**TINY, attn_impl="standard")
    before = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    module = CausalLMTask(net, optimizer=partial(torch.optim.SGD, lr=1.0))
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=accumulate, precision="64-true")
    trainer.fit(module, DataLoader(token_batches(4), batch_size=micro_batch, shuffle=False))
    return {n: p.detach() - before[n] for n, p in module.net.named_parameters()}


def test_gradient_accumulation_matches_large_batch():
    """2 micro-batches of 2 with accumulation == one batch of 4 == -grad of the mean loss over all 4."""
    accumulated, full = one_sgd_step(2, 2), one_sgd_step(4, 1)
    torch.manual_seed(0)
    ref_net = GPT2(**TINY, attn_impl="standard").double()
    x, y = token_batches(4)[:]
    F.cross_entropy(ref_net(x).flatten(0, 1), y.flatten()).backward()
    for n, p in ref_net.named_parameters():
        assert torch.allclose(full[n], -p.grad, rtol=0, atol=1e-12), n
        assert torch.allclose(accumulated[n], full[n], rtol=0, atol=1e-12), n
    assert any(d.abs().max() > 1e-6 for d in full.values())


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class BreakWeightsAt(L.Callback):
    """Fault injection: a weight becomes inf at the start of optimizer step `step` (as after an overflow)."""

    def __init__(self, step: int, ckpt: Path):
        self.step, self.ckpt, self.hash_before = step, ckpt, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.hash_before = file_hash(self.ckpt)
            with torch.no_grad():
                pl_module.net.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")


def test_nonfinite_loss_stops_before_the_update_and_keeps_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = CausalLMTask(GPT2(**TINY), optimizer=partial(torch.optim.AdamW, lr=1e-3))
    ckpt = tmp_path / "last.ckpt"
    breaker = BreakWeightsAt(3, ckpt)
    trainer = quiet_trainer(max_steps=10, callbacks=[LastCheckpoint(str(tmp_path), every_n_steps=1), breaker])
    with pytest.raises(
        FloatingPointError, match=r"Non-finite training loss .* at optimizer step 3.*ckpt_path=last"
    ):
        trainer.fit(module, DataLoader(token_batches(40), batch_size=2))
    assert trainer.global_step == 3
    assert breaker.hash_before is not None and file_hash(ckpt) == breaker.hash_before
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


# -- train.py helpers ----------------------------------------------------------------------------------------


def test_accumulation_steps():
    assert train.accumulation_steps(512, 16, 8) == 4
    assert train.accumulation_steps(None, 16, 8) == 1
    with pytest.raises(
        ValueError, match="global_batch_size=512 is not a multiple of data.batch_size .* = 48"
    ):
        train.accumulation_steps(512, 16, 3)


def test_memory_estimate():
    """GPT-2 small, 16 x 1024 tokens: weights/grads/Adam 18 B/param, activations per Korthikanti et al."""
    n = 124_439_808
    flash = estimate_training_memory(n, 16, 1024, 12, 768, 12, 50257, attention_stores_scores=False)
    standard = estimate_training_memory(n, 16, 1024, 12, 768, 12, 50257, attention_stores_scores=True)
    tokens = 16 * 1024
    assert flash == 18 * n + 12 * tokens * 768 * 34 + tokens * 50257 * 10
    assert standard - flash == 12 * tokens * 768 * 5 * 12 * 1024 / 768  # the stored (T, T) scores
    assert 20 * 2**30 < standard < 40 * 2**30  # fits an 80 GB GPU, as observed for this size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the memory check applies to CUDA devices only")
def test_too_large_for_the_gpu_fails_before_training(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=gpt2", "data.batch_size=4096", "model.attn_impl=standard"])
    with pytest.raises(MemoryError, match="lower data.batch_size"):
        train.train(cfg)


# -- train.py end to end (subprocesses, as users run it) ---------------------------------------------------

# A 1-layer GPT-2 on a 200 KB slice of the stdlib corpus as bytes: a few ms per step on a CPU.
TINY_RUN = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.n_positions=32",
    "model.dropout=0.0",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.stdlib_max_bytes=200000",
    "data.val_tokens=1024",
    "trainer=cpu",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.throughput.window_size=2",
    "callbacks.progress_bar.refresh_rate=0",
]


@pytest.fixture(scope="module")
def run_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the train.py subprocesses: one token cache for the module, wandb offline."""
    env = dict(os.environ)
    env.update(
        FLASHREPRO_CACHE=str(tmp_path_factory.mktemp("cache")),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    env.pop("WANDB_API_KEY", None)
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", *TINY_RUN, f"hydra.run.dir={run_dir}", *overrides]


def run_train(run_dir: Path, env: dict[str, str], *overrides: str, expect_rc: int = 0) -> str:
    r = subprocess.run(train_cmd(run_dir, *overrides), cwd=REPO, env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == expect_rc, f"train.py exited with {r.returncode}:\n{out[-5000:]}"
    return out


def sigterm_after_first_checkpoint(run_dir: Path, env: dict[str, str], *overrides: str) -> str:
    """Start train.py, send SIGTERM once its first last.ckpt exists; returns the output (exit code 143 asserted)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        train_cmd(run_dir, *overrides), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-5000:]
    return out


def series(rows: list[dict[str, float]], key: str) -> dict[int, float]:
    """{step: value} of `key`; a step logged twice (a repeated step) fails."""
    out: dict[int, float] = {}
    for row in rows:
        if key in row:
            step = int(row["step"])
            assert step not in out, f"{key} logged twice at step {step}"
            out[step] = row[key]
    return out


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_train_py_trains_and_logs(tmp_path, run_env):
    """Loss goes down; the logged keys; val/ppl = exp(val/loss); wandb offline files of the run's id."""
    run_dir = tmp_path / "run"
    wandb_dir = tmp_path / "wandb"
    env = run_env | {"WANDB_DIR": str(wandb_dir)}
    out = run_train(run_dir, env, "trainer.max_steps=60", "val_every_n_steps=20", "logger=default")
    assert "No checkpoint at" in out and "starting a fresh run" in out

    rows = read_metrics(run_dir)
    keys = set().union(*rows)
    assert {"train/loss", "val/loss", "val/ppl", "lr", "throughput/tokens_per_sec", "train/grad_norm"} <= keys
    loss = series(rows, "train/loss")
    assert sorted(loss) == list(range(60))  # every optimizer step logged once
    first, last = [loss[s] for s in range(5)], [loss[s] for s in range(55, 60)]
    assert sum(last) / 5 < sum(first) / 5 - 0.5, (first, last)
    val, ppl = series(rows, "val/loss"), series(rows, "val/ppl")
    assert len(val) >= 3 and list(val.values()) == sorted(val.values(), reverse=True)
    for step, v in val.items():
        assert ppl[step] == pytest.approx(math.exp(v), rel=1e-5)
    assert all(v > 0 for v in series(rows, "throughput/tokens_per_sec").values())
    # Warmup is 1% of 60 steps -> 1 step (lr 6e-4 at step 0), then linear decay: 6e-4 * (60 - s) / 59.
    lrs = series(rows, "lr")
    assert sorted(lrs) == list(range(60))
    for step, lr in lrs.items():
        assert lr == pytest.approx(6e-4 * min(1, (60 - step) / 59), rel=1e-6)

    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 60
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert "max_steps: 60" in (run_dir / "csv" / "version_0" / "hparams.yaml").read_text()  # resolved config

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = list((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((wandb_dir / "wandb").iterdir())
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()  # protobuf records: keys appear verbatim
    for key in (b"train/loss", b"val/ppl", b"throughput/tokens_per_sec", b'"max_steps":60'):
        assert key in records, key


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, run_env):
    """SIGTERM mid-run: the step in flight finishes, last.ckpt is saved, the process exits 143; rerunning
    the same command resumes there (and continues the same wandb run) and ends at the same step with the
    same losses as a run never stopped."""
    steps = ["trainer.max_steps=200", "val_every_n_steps=50", "callbacks.last_checkpoint.every_n_steps=10"]
    straight = tmp_path / "straight"
    run_train(straight, run_env, *steps)

    stopped = tmp_path / "stopped"
    last = stopped / "checkpoints" / "last.ckpt"
    steps += ["logger=default"]  # csv + wandb (offline)
    env = run_env | {"WANDB_DIR": str(tmp_path)}
    out = sigterm_after_first_checkpoint(stopped, env, *steps)
    k = ckpt_step(last)
    assert 10 <= k < 200 and f"Stopped by SIGTERM after step {k}" in out, out[-3000:]

    out = run_train(stopped, env, *steps)  # the same command: ckpt_path=last by default
    assert f"Resuming from {last}" in out
    assert ckpt_step(last) == 200
    # Both starts wrote to the same wandb run.
    run_id = (stopped / "wandb_id.txt").read_text().strip()
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2

    a, b = read_metrics(straight), read_metrics(stopped)
    loss_a, loss_b = series(a, "train/loss"), series(b, "train/loss")  # fails on a repeated step
    assert sorted(loss_b) == sorted(loss_a) == list(range(200))  # no step lost or repeated
    for s in range(200):
        assert loss_b[s] == pytest.approx(loss_a[s], rel=1e-5, abs=1e-6), s
    val_a, val_b = series(a, "val/loss"), series(b, "val/loss")
    assert val_a.keys() == val_b.keys() == {49, 99, 149, 199, 200}  # every 50 steps, then the best ckpt
    for s in val_a:
        assert val_b[s] == pytest.approx(val_a[s], rel=1e-5), s


def test_ddp_two_processes_accumulate_and_stop_together(tmp_path, run_env):
    """trainer=ddp_cpu (2 gloo processes): accumulation fills global_batch_size over both ranks; SIGTERM to
    the launching process stops both ranks after the same step with one last.ckpt; the rerun resumes."""
    run_dir = tmp_path / "run"
    args = ["trainer=ddp_cpu", "global_batch_size=16", "trainer.max_steps=200", "val_every_n_steps=100",
            "callbacks.last_checkpoint.every_n_steps=10"]  # fmt: skip
    last = run_dir / "checkpoints" / "last.ckpt"
    out = sigterm_after_first_checkpoint(run_dir, run_env, *args)
    assert "2 device(s) x data.batch_size 4 x 2 accumulation = 16 sequences of 32 tokens per step" in out
    k = ckpt_step(last)
    assert f"Stopped by SIGTERM after step {k}" in out  # rank 0
    assert f"Stopped by a signal on another rank after step {k}" in out  # rank 1, at the same step

    out = run_train(run_dir, run_env, *args)
    assert f"Resuming from {last}" in out and ckpt_step(last) == 200
    assert sorted(series(read_metrics(run_dir), "train/loss")) == list(range(200))


def _sharded_norm_worker(rank: int, world: int, port: int, grads: list[torch.Tensor], out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # FSDP's layout: every gradient flattened and cut into `world` contiguous shards, one per rank
        # (the last rank's shard of the small gradient is empty).
        shards = [g.flatten().tensor_split(world)[rank] for g in grads]
        out[rank] = grad_norm(shards, torch.device("cpu"), sharded=True).item()
    finally:
        dist.destroy_process_group()


def test_grad_norm_sums_shards_over_ranks():
    """Under FSDP every rank must log (and stop on) the global gradient norm, not its own shard's."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 5, generator=g), torch.randn(1, generator=g), 3 * torch.randn(11, generator=g)]
    expected = torch.cat([x.double().flatten() for x in grads]).norm().item()
    assert grad_norm(grads, torch.device("cpu")).item() == pytest.approx(expected, rel=1e-6)
    assert grad_norm([], torch.device("cpu")).item() == 0.0

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sharded_norm_worker, args=(2, free_port(), grads, out), nprocs=2, join=True)
        norms = dict(out)
    local = grad_norm([x.flatten().tensor_split(2)[0] for x in grads], torch.device("cpu")).item()
    assert local < expected * 0.95, "a shard's own norm must differ, or the test proves nothing"
    assert norms[0] == pytest.approx(expected, rel=1e-6) and norms[1] == pytest.approx(expected, rel=1e-6)
