"""Multi-GPU scaling of training, launched the way users launch it: `python train.py ... trainer=ddp`.

For each device count N in --gpus it runs

    python train.py experiment=gpt2 trainer=ddp trainer.devices=N data.batch_size=B global_batch_size=B*N ...

as a subprocess (a fixed micro-batch B per GPU, no gradient accumulation, validation and checkpoints off,
logger=csv) and reads the run's CSV log. `throughput/tokens_per_sec` (models/callbacks.py) is the global
rate: rank 0's rate times the world size; so

    tokens/s per GPU = tokens_per_sec / N,  scaling efficiency = (tokens/s per GPU at N) / (tokens/s at N=1)

and `throughput/mfu` is per device. Each value is the median of the rates logged in the second half of the
run (the first steps include Triton autotuning, torch.compile and CUDA warmup). Runs share Triton's on-disk
autotuning cache (TRITON_CACHE_AUTOTUNING=1), so only the first run of each kernel key times the tiles. Then:

- memory: GPT-2 medium and large through `trainer=fsdp` and `trainer=ddp` at the largest N, eager
  (compile=false, both strategies), reporting
  `memory/peak_gb` (torch.cuda.max_memory_allocated of rank 0; ranks are symmetric under DDP and FULL_SHARD)
  when the training log has it.
- correctness: with dropout off, eager, the same seed and the same global batch, DDP on 2 devices (micro-batch b)
  against 1 device with 2-step gradient accumulation (micro-batch b). Both see the same windows each step
  (data/lm.py: micro-batch i of rank r is perm.reshape(N, W, B)[i, r]). Validation runs after every step on
  a fixed 8-window set (token-weighted mean over all ranks), so `val/loss` after step k is the loss of the
  weights after k steps; the per-step losses, their max abs difference and the max abs difference of the
  final weights (last.ckpt) are recorded and checked against a stated tolerance.

- all-reduce: first, one all_reduce of GPT-2 small's fp32 gradient size over 2..N processes (NCCL, one per
  GPU), timed alone: what a DDP step would add if none of it overlapped the backward.

Results go to <out>/<gpu-slug>x<n>.json and .md (GPU name, clocks from nvidia-smi, versions, date, and every
command line). Subprocess environments set NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 (no NVLink multicast).

    python scripts/bench_scaling.py                          # 1 2 4 8 GPUs (those present), memory, check
    python scripts/bench_scaling.py --gpus 1 2 --skip-memory
    python scripts/bench_scaling.py --smoke --out /tmp/s     # CPU: gloo DDP, tiny model, 1 and 2 processes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels.benchmark import gpu_slug, nvidia_smi, read_metrics

REPO = Path(__file__).resolve().parents[1]

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Triton keeps the attention kernels' autotuning results on disk, so the runs after the first (the same
# head dim, sequence length and dropout) reuse its choice instead of re-timing every tile on every rank.
CACHE_AUTOTUNING = {"TRITON_CACHE_AUTOTUNING": "1"}
# Dense bf16 tensor-core peak FLOP/s per GPU (SXM parts), the same figure scripts/bench_train.py uses; Lightning's
# table misses the H200 (MFU is left empty otherwise).
PEAK_FLOPS = {"H200": 989.4e12, "H100 80GB HBM3": 989.4e12}

# Overrides for the two modes. `gpu`: GPT-2 small + FlashAttention at seq 1K (experiment=gpt2) on the
# standard-library corpus (local, no download; the model keeps GPT-2's 50257-token vocabulary, so the
# compute is GPT-2 small's). `smoke`: the tiny experiment, shrunk, on CPU processes over gloo.
MODES = {
    "gpu": dict(
        experiment="gpt2",
        trainer="ddp",
        single="gpu",
        overrides=["data=stdlib", "data.seq_len=1024", "data.num_workers=4"],
        # Eager, untuned kernels: the check is about gradients, and compiling twice more costs minutes.
        check_overrides=["model.dropout=0.0", "compile=false"],
        check_env={"FLASHREPRO_AUTOTUNE": "0"},
        # FSDP runs eager (compile=false): what is compared is the memory peak of the two strategies.
        memory_overrides=["compile=false"],
        check_tolerance=2e-2,  # bf16 autocast: the reduction order differs between the two runs
    ),
    "smoke": dict(
        experiment="tiny",
        trainer="ddp_cpu",
        single="cpu",
        overrides=[
            "data.seq_len=64",
            "data.num_workers=0",
            "model.n_layer=2",
            "model.n_head=2",
            "model.n_embd=64",
            "model.n_positions=64",
            "trainer.precision=32-true",
            "callbacks.progress_bar.refresh_rate=0",
        ],
        check_overrides=["model.dropout=0.0"],
        check_env={},
        memory_overrides=[],
        check_tolerance=1e-5,  # fp32: only the summation order differs
    ),
}
GPU_DEFAULTS = dict(
    micro_batch=16, steps=60, window=10, log_every=5, memory_steps=20, check_micro_batch=4, check_steps=20
)
SMOKE_DEFAULTS = dict(
    micro_batch=4, steps=8, window=2, log_every=1, memory_steps=8, check_micro_batch=2, check_steps=4
)


def run_train(
    name: str, overrides: list[str], out: Path, log_file: Path, env: dict[str, str] | None = None
) -> tuple[Path, str]:
    """Run `python train.py name=<name> <overrides>` from the repo root; returns (run dir, command line).

    The run directory <out>/runs/<name> is removed first, so the run starts fresh and logs to csv/version_0.
    """
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "train.py", f"name={name}", f"paths.log_dir={out / 'runs'}", "ckpt_path=null"]
    cmd += overrides
    env = {**os.environ, **CACHE_AUTOTUNING, **(env or {}), **NO_MULTICAST, "WANDB_MODE": "disabled"}
    env.pop("SLURM_NTASKS_PER_NODE", None)  # devices come from the command line, not an enclosing job
    env.pop("SLURM_NNODES", None)
    line = shlex.join(["python", *cmd[1:]])
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v and k not in NO_MULTICAST}
    line = " ".join([*(f"{k}={v}" for k, v in sorted(changed.items())), line])
    print(f"$ {line}", flush=True)
    with open(log_file, "a") as f:
        f.write(f"\n$ {line}\n")
        f.flush()
        result = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"training run failed ({result.returncode}): {line}\n--- log tail ---\n{tail}")
    return run_dir, line


def series(rows: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in rows if key in r]


def late_median(values: list[float]) -> float | None:
    """Median of the second half of a series (warmup excluded); None when empty."""
    return statistics.median(values[len(values) // 2 :]) if values else None


def common_overrides(mode: dict, args: argparse.Namespace) -> list[str]:
    return [
        f"experiment={mode['experiment']}",
        "logger=csv",
        "test=false",
        *mode["overrides"],
        *args.override,
    ]


def throughput_run(
    mode: dict,
    args: argparse.Namespace,
    n: int,
    trainer: str,
    model: str | None,
    micro_batch: int,
    tag: str,
    steps: int,
    extra: list[str] = (),
) -> dict:
    """One short run without validation or checkpoints; its throughput (and peak memory if logged)."""
    # --global-batch G: the recipe's fixed global batch, reached by accumulation (one gradient all-reduce
    # per G / (micro_batch x n) micro-batches); otherwise one all-reduce per micro-batch.
    global_batch = args.global_batch or micro_batch * n
    accumulation, rest = divmod(global_batch, micro_batch * n)
    if rest:
        raise SystemExit(f"--global-batch {global_batch} is not a multiple of micro-batch x devices")
    window = min(args.window, steps * accumulation // 2)  # in micro-batches
    overrides = common_overrides(mode, args) + [
        f"trainer={trainer}",
        f"trainer.devices={n}",
        f"data.batch_size={micro_batch}",
        f"global_batch_size={global_batch}",
        f"trainer.max_steps={steps}",
        f"val_every_n_steps={steps}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_checkpointing=false",
        "~callbacks.best_checkpoint",
        "~callbacks.last_checkpoint",
        f"trainer.log_every_n_steps={min(args.log_every, window)}",
        f"callbacks.throughput.window_size={window}",
        *extra,
    ]
    if model:
        overrides.append(f"model={model}")
    if args.peak_flops:
        overrides.append(f"callbacks.throughput.peak_flops={args.peak_flops}")
    run_dir, line = run_train(f"scaling-{tag}", overrides, args.out, args.log_file)
    rows = read_metrics(run_dir)
    total = late_median(series(rows, "throughput/tokens_per_sec"))
    if total is None or total <= 0:
        raise RuntimeError(f"{run_dir}: no throughput/tokens_per_sec logged; raise --steps or lower --window")
    mfu = late_median(series(rows, "throughput/mfu"))
    mem = series(rows, "memory/peak_gb")
    return {
        "devices": n,
        "strategy": trainer,
        "model": model or mode["experiment"],
        "micro_batch": micro_batch,
        "global_batch": global_batch,
        "accumulation": accumulation,
        "steps": steps,
        "tokens_per_sec": total,
        "tokens_per_sec_per_device": total / n,
        "mfu": mfu,
        "peak_memory_gb_rank0": max(mem) if mem else None,
        "command": line,
    }


def loss_check(mode: dict, args: argparse.Namespace) -> dict:
    """DDP on 2 devices (micro-batch b) against 1 device with accumulation 2 (micro-batch b)."""
    b, k = args.check_micro_batch, args.check_steps
    seq_len = next((int(o.split("=")[1]) for o in mode["overrides"] if o.startswith("data.seq_len=")), 1024)
    base = (
        common_overrides(mode, args)
        + mode["check_overrides"]
        + [
            f"data.batch_size={b}",
            f"global_batch_size={2 * b}",
            f"trainer.max_steps={k}",
            "val_every_n_steps=1",
            f"data.val_tokens={8 * seq_len}",  # 8 windows: the same validation set split 1 or 2 ways
            "trainer.num_sanity_val_steps=0",
            "trainer.log_every_n_steps=1",
            f"callbacks.last_checkpoint.every_n_steps={k}",
        ]
    )
    runs = {
        "1x_accum2": base + [f"trainer={mode['single']}", "trainer.devices=1"],
        "2x_ddp": base + [f"trainer={mode['trainer']}", "trainer.devices=2"],
    }
    losses, weights, commands = {}, {}, {}
    for key, overrides in runs.items():
        run_dir, commands[key] = run_train(
            f"scaling-check-{key}", overrides, args.out, args.log_file, env=mode["check_env"]
        )
        rows = read_metrics(run_dir)
        losses[key] = {"val_loss": series(rows, "val/loss"), "train_loss_rank0": series(rows, "train/loss")}
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        weights[key] = ckpt["state_dict"]
    a, d = losses["1x_accum2"]["val_loss"], losses["2x_ddp"]["val_loss"]
    if len(a) != k or len(d) != k:
        raise RuntimeError(f"expected {k} validation losses per run, got {len(a)} and {len(d)}")
    loss_diff = max(abs(x - y) for x, y in zip(a, d, strict=True))
    weight_diff = max((weights["1x_accum2"][n] - w).abs().max().item() for n, w in weights["2x_ddp"].items())
    return {
        "micro_batch": b,
        "global_batch": 2 * b,
        "steps": k,
        "losses": losses,
        "max_abs_loss_diff": loss_diff,
        "max_abs_weight_diff": weight_diff,
        "tolerance": mode["check_tolerance"],
        "passed": loss_diff <= mode["check_tolerance"],
        "commands": commands,
        "note": "val/loss after each optimizer step on a fixed 8-window set (mean over all ranks); "
        "train/loss is rank 0's micro-batches only under DDP, so it is recorded but not compared.",
    }


def _allreduce_worker(rank: int, world: int, port: int, backend: str, numel: int, iters: int, out) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        x = torch.empty(numel, dtype=torch.float32, device=device)
        times = []
        for i in range(iters + 3):  # 3 warm-up calls (NCCL builds its rings on the first)
            x.fill_(1.0)
            sync()
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            sync()
            if i >= 3:
                times.append(time.perf_counter() - start)
        if x[0].item() != world or x[-1].item() != world:
            raise RuntimeError(f"all_reduce of ones gave {x[0].item()}, expected {world}")
        if rank == 0:
            out["seconds"] = statistics.median(times)
    finally:
        dist.destroy_process_group()


def allreduce_probe(n: int, backend: str, numel: int, iters: int = 10) -> dict:
    """Median time of one all_reduce of `numel` fp32 values over `n` processes (one per GPU under NCCL):
    the gradient all-reduce of one DDP step without its overlap. Bus bandwidth = bytes x 2(n-1)/n / time,
    NCCL's own convention (nccl-tests), comparable across n."""
    os.environ.update(NO_MULTICAST)  # inherited by the spawned processes
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_allreduce_worker, args=(n, port, backend, numel, iters, out), nprocs=n, join=True)
        seconds = out["seconds"]
    size = 4 * numel
    return {
        "devices": n,
        "backend": backend,
        "bytes": size,
        "seconds": seconds,
        "bus_gb_per_s": size * 2 * (n - 1) / n / seconds / 1e9,
    }


def gradient_numel(model: str) -> int:
    """Parameters of configs/model/<model>.yaml (built on the meta device: no memory, no init)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with torch.device("meta"):
        net = instantiate(OmegaConf.load(REPO / "configs" / "model" / f"{model}.yaml"))
    return sum(p.numel() for p in net.parameters())


def gpu_info() -> dict:
    if not torch.cuda.is_available():
        return {"name": "cpu", "count": 0}
    info = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    query = "--query-gpu=index,name,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit"
    # Clocks and limits, then how the GPUs are linked (NVLink / PCIe), which bounds the all-reduce.
    info["nvidia_smi"] = nvidia_smi(query, "--format=csv")
    info["topology"] = nvidia_smi("topo", "-m")
    return info


def versions() -> dict:
    import lightning

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "lightning": lightning.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["cuda"] = torch.version.cuda
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(report: dict) -> str:
    lines = [
        f"# Training scaling: {report['gpu']['name']}, up to {report['scaling'][-1]['devices']} devices"
        if report["scaling"]
        else f"# Training scaling: {report['gpu']['name']}",
        "",
        f"Date: {report['date']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v is not None)
        + ".",
        "",
    ]
    if report["gpu"].get("nvidia_smi"):
        lines += ["```", report["gpu"]["nvidia_smi"], "```", ""]
    if report["gpu"].get("topology"):
        lines += ["```", report["gpu"]["topology"], "```", ""]
    lines += [
        "## Throughput (DDP, fixed micro-batch per device; one gradient all-reduce per optimizer step)",
        "",
        "| devices | micro-batch | accumulation | global batch | tokens/s total | tokens/s per device | MFU | scaling eff. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["scaling"]:
        lines.append(
            f"| {r['devices']} | {r['micro_batch']} | {r['accumulation']} | {r['global_batch']} | {r['tokens_per_sec']:,.0f} | "
            f"{r['tokens_per_sec_per_device']:,.0f} | {fmt(r['mfu'], '.1%')} | {fmt(r['efficiency'], '.3f')} |"
        )
    if report.get("memory"):
        lines += [
            "",
            "## Peak memory per rank (rank 0)",
            "",
            "| model | strategy | devices | micro-batch | peak GB | tokens/s per device |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["memory"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['strategy']} | {r['devices']} | - | {r['error']} | - |")
                continue
            lines.append(
                f"| {r['model']} | {r['strategy']} | {r['devices']} | {r['micro_batch']} | "
                f"{fmt(r['peak_memory_gb_rank0'], '.2f')} | {r['tokens_per_sec_per_device']:,.0f} |"
            )
    if report.get("allreduce"):
        lines += [
            "",
            "## Gradient all-reduce alone (fp32, the model's parameter count; no overlap with compute)",
            "",
            "| devices | backend | MB | ms | bus GB/s |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['devices']} | {r['backend']} | {r['bytes'] / 1e6:,.0f} | {r['seconds'] * 1e3:.2f} | "
            f"{r['bus_gb_per_s']:.1f} |"
            for r in report["allreduce"]
        ]
    c = report.get("loss_check")
    if c:
        lines += [
            "",
            f"## Correctness: 2-device DDP vs 1 device with accumulation 2 (micro-batch {c['micro_batch']})",
            "",
            f"max |val loss diff| over {c['steps']} steps = {c['max_abs_loss_diff']:.3g} "
            f"(tolerance {c['tolerance']:g}: {'pass' if c['passed'] else 'FAIL'}); "
            f"max |weight diff| after the last step = {c['max_abs_weight_diff']:.3g}.",
            "",
            "| step | 1 device, accum 2 | 2 devices DDP |",
            "|---|---|---|",
        ]
        a, d = c["losses"]["1x_accum2"]["val_loss"], c["losses"]["2x_ddp"]["val_loss"]
        lines += [f"| {i + 1} | {x:.6f} | {y:.6f} |" for i, (x, y) in enumerate(zip(a, d, strict=True))]
    lines += ["", "## Commands", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="device counts (filtered to those present)"
    )
    p.add_argument("--micro-batch", type=int, help="sequences per device per step (16; smoke 4)")
    p.add_argument("--steps", type=int, help="optimizer steps per throughput run (60; smoke 8)")
    p.add_argument("--window", type=int, help="micro-batches in the throughput rolling average (10; smoke 2)")
    p.add_argument("--log-every", type=int, help="trainer.log_every_n_steps of throughput runs (5; smoke 1)")
    p.add_argument("--global-batch", type=int, help="fixed global batch (accumulation); default micro x N")
    p.add_argument("--skip-scaling", action="store_true", help="no throughput rows")
    p.add_argument("--skip-allreduce", action="store_true", help="no all-reduce bandwidth probe")
    p.add_argument("--memory-models", nargs="*", default=["gpt2-medium", "gpt2-large"], help="model configs")
    p.add_argument("--memory-micro-batch", type=int, default=8)
    p.add_argument("--memory-steps", type=int, help="optimizer steps per memory run (20; smoke 8)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--check-micro-batch", type=int, help="micro-batch b of the loss check (4; smoke 2)")
    p.add_argument("--check-steps", type=int, help="optimizer steps K of the loss check (20; smoke 4)")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s for MFU")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--out", type=Path, default=REPO / "results" / "scaling")
    p.add_argument("--smoke", "--cpu", action="store_true", help="CPU gloo, tiny model, 1 and 2 processes")
    args = p.parse_args(argv)
    for key, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.smoke:
        mode = MODES["smoke"]
        gpus = [1, 2]
        args.skip_memory = True  # FSDP needs GPUs; peak memory is a CUDA measurement
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "No CUDA GPU visible. Fix: run on a GPU machine, or pass --smoke for the CPU path."
            )
        mode = MODES["gpu"]
        gpus = sorted(n for n in set(args.gpus) if n <= torch.cuda.device_count())
        if not gpus:
            raise SystemExit(f"--gpus {args.gpus}: none <= {torch.cuda.device_count()} visible GPUs.")
        if args.peak_flops is None:
            name = torch.cuda.get_device_name(0)
            args.peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if 1 not in gpus:
        raise SystemExit("--gpus must include 1: scaling efficiency is relative to one device.")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_info()
    stem = args.out / (
        f"{gpu_slug(gpu['name'])}x{max(gpus)}" + (f"-gb{args.global_batch}" if args.global_batch else "")
    )
    args.log_file = stem.with_suffix(".log")
    args.log_file.write_text("")
    report = {
        "gpu": gpu,
        "versions": versions(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "smoke" if args.smoke else "gpu",
        "env": NO_MULTICAST,
        "tokens_per_sec_note": "throughput/tokens_per_sec is global (rank 0's rate x world size); "
        "per device = total / devices; MFU is per device",
        "allreduce": [],
        "scaling": [],
        "memory": [],
        "loss_check": None,
        "commands": [],
    }

    def save() -> None:
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))

    if not args.skip_allreduce:
        numel = 1 << 20 if args.smoke else gradient_numel("gpt2-small")
        for n in (g for g in gpus if g > 1):
            report["allreduce"].append(allreduce_probe(n, "gloo" if args.smoke else "nccl", numel))
            save()

    for n in [] if args.skip_scaling else gpus:
        row = throughput_run(mode, args, n, mode["trainer"], None, args.micro_batch, f"ddp-n{n}", args.steps)
        base = (
            report["scaling"][0]["tokens_per_sec_per_device"] if report["scaling"] else row["tokens_per_sec"]
        )
        row["efficiency"] = row["tokens_per_sec_per_device"] / base
        report["scaling"].append(row)
        report["commands"].append(row["command"])
        save()

    if not args.skip_memory:
        n = max(gpus)
        for model in args.memory_models:
            for strategy in ("fsdp", "ddp"):
                try:
                    row = throughput_run(
                        mode,
                        args,
                        n,
                        strategy,
                        model,
                        args.memory_micro_batch,
                        f"{strategy}-{model}-n{n}",
                        args.memory_steps,
                        mode["memory_overrides"],
                    )
                    report["commands"].append(row["command"])
                except RuntimeError as err:  # e.g. DDP out of memory for a large model: record and go on
                    oom = "out of memory" in str(err).lower() or "MemoryError" in str(err)
                    row = {
                        "model": model,
                        "strategy": strategy,
                        "devices": n,
                        "error": "OOM" if oom else "failed",
                    }
                    print(err, file=sys.stderr)
                report["memory"].append(row)
                save()

    if not args.skip_check:
        report["loss_check"] = check = loss_check(mode, args)
        report["commands"] += list(check["commands"].values())
        save()
        if not check["passed"]:
            print(
                f"LOSS CHECK FAILED: {check['max_abs_loss_diff']:.3g} > {check['tolerance']:g}",
                file=sys.stderr,
            )
    save()
    print(markdown(report))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    report = main()
    if report["loss_check"] is not None and not report["loss_check"]["passed"]:
        sys.exit(1)
