"""What the benchmark scripts share: the GPU and software they ran on, timing, and a training run's metrics.

Used by scripts/ (what users run) and kernel_dev/ (kernel experiments), so that every results file records
its environment the same way:

    from kernels.benchmark import environment, gpu_slug, phases
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import triton

DTYPE = torch.bfloat16
L2_BYTES = 50 * 2**20  # inputs smaller than a few times this are rotated among copies (`make_inputs`)
CLOCKS_QUERY = "clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version"


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def nvidia_smi(*args: str) -> str:
    """nvidia-smi's output for args (e.g. "--query-gpu=clocks.sm", "--format=csv"), or why there is none."""
    try:
        return subprocess.run(
            ["nvidia-smi", *args], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable: {err}"


def gpu_clocks() -> str:
    """nvidia-smi's CSV of the current and maximum SM clock, memory clock, power limit and driver."""
    return nvidia_smi(f"--query-gpu={CLOCKS_QUERY}", "--format=csv")


def versions() -> dict[str, str | None]:
    """torch, triton, CUDA (as torch was built) and Python versions."""
    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second: "2026-11-27T10:30:28+00:00"."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    """GPU name, versions, date, command line, whether our kernels autotune, and nvidia-smi's clocks."""
    return {
        "gpu": torch.cuda.get_device_name(),
        **versions(),
        "date": utc_now(),
        "command": " ".join(sys.argv),
        "autotune": os.environ.get("FLASHREPRO_AUTOTUNE", "1") != "0",
        "nvidia_smi": gpu_clocks(),
    }


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def time_ms(fns: list, reps: int = 20, retry: bool = True, use_graph: bool = True) -> float:
    """Median milliseconds of one call, cycling through `fns` (one closure per input copy).

    Small problems are timed as CUDA-graph replays so launch gaps stay out; large ones (use_graph=False)
    with triton.testing.do_bench, where launch overhead is negligible and graph pools would cost memory.
    """
    for fn in fns:  # warm-up: compilation, autotuning, allocator
        fn()
    torch.cuda.synchronize()
    if not use_graph:
        return triton.testing.do_bench(fns[0], warmup=25, rep=200, return_mode="median")
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
        graph.replay()
        torch.cuda.synchronize()
        # Replays per measurement so one lasts >= ~2 ms.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        inner = max(1, math.ceil(2.0 / max(start.elapsed_time(end), 1e-3)))
        times = []
        for _ in range(reps):
            start.record()
            for _ in range(inner):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / inner / len(fns))
        del graph
        return sorted(times)[len(times) // 2]
    except Exception as exc:  # noqa: BLE001 - retry once, then fall back to plain launches
        if retry:
            torch.cuda.synchronize()
            return time_ms(fns, reps, retry=False, use_graph=use_graph)
        print(f"  (graph capture failed: {type(exc).__name__}: {str(exc)[:80]}; using do_bench)")
        torch.cuda.synchronize()
        i = [0]

        def cycle():
            fns[i[0] % len(fns)]()
            i[0] += 1

        return triton.testing.do_bench(cycle, warmup=25, rep=200, return_mode="median")


def warm_up_graphs():
    """One throwaway capture of fwd+bwd, so one-time initialization stays out of measured captures."""
    from kernels import flash_attn_func

    q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
    try:
        time_ms([lambda: torch.autograd.grad(flash_attn_func(q, k, v).sum(), (q, k, v))], reps=2)
    except Exception as exc:  # noqa: BLE001
        print(f"(warm-up capture: {exc})")


def peak_extra_mb(fn) -> float:
    """Peak memory allocated by fn beyond what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def phases(attn, inputs_list, dout_list, reps=20, use_graph=True):
    """Forward and fwd+bwd ms of attn(*inputs), rotating over the input copies; backward = the difference."""
    fwd = [lambda a=a: attn(*a) for a in inputs_list]
    t_fwd = time_ms(fwd, reps, use_graph=use_graph)
    both = [
        lambda a=a, d=d: torch.autograd.grad(attn(*a), a, d)
        for a, d in zip(inputs_list, dout_list, strict=True)
    ]
    t_both = time_ms(both, reps, use_graph=use_graph)
    return {"fwd_ms": t_fwd, "bwd_ms": t_both - t_fwd, "fwd_bwd_ms": t_both}


def interleaved(jobs: dict, reps: int, rounds: int) -> dict:
    """`phases` of every job, name -> (attn, inputs_list, dout_list, use_graph), in `rounds` passes over
    all jobs; per job the median forward and fwd+bwd over the passes (backward = the difference) and the
    fwd+bwd of each pass. A job that runs out of memory or fails gives "OOM" or "error: ..." instead."""
    passes: dict = {name: [] for name in jobs}
    failed: dict = {}
    for _ in range(rounds):
        for name, (attn, inputs_list, dout_list, use_graph) in jobs.items():
            if name in failed:
                continue
            try:
                passes[name].append(phases(attn, inputs_list, dout_list, reps, use_graph=use_graph))
            except torch.cuda.OutOfMemoryError:
                failed[name] = "OOM"
            except Exception as exc:  # noqa: BLE001 - a backend may not support a shape
                failed[name] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
            if name in failed:
                torch.cuda.empty_cache()
    out = {}
    for name, runs in passes.items():
        if name in failed:
            out[name] = failed[name]
            continue
        fwd = statistics.median(r["fwd_ms"] for r in runs)
        both = statistics.median(r["fwd_bwd_ms"] for r in runs)
        out[name] = {"fwd_ms": fwd, "bwd_ms": both - fwd, "fwd_bwd_ms": both}
        out[name]["fwd_bwd_ms_rounds"] = [r["fwd_bwd_ms"] for r in runs]
    return out


def make_inputs(b, n, h, d, copies=None):
    """`copies` independent (q, k, v) sets (+ dout); rotate when one set fits in L2."""
    per_set = 4 * b * n * h * d * 2
    if copies is None:
        copies = max(1, min(8, math.ceil(4 * L2_BYTES / per_set)))
    sets, douts = [], []
    for _ in range(copies):
        t = [torch.randn(b, n, h, d, device="cuda", dtype=DTYPE).requires_grad_() for _ in range(3)]
        sets.append(t)
        douts.append(torch.randn(b, n, h, d, device="cuda", dtype=DTYPE))
    return sets, douts


def tuned_configs(n: int, tuners: dict | None = None) -> list[str]:
    """The autotuner's choice for each of our kernels' keys at sequence length n (key: head dim, causal,
    dropout mode, varlen, sparse, query/key length buckets). tuners: name -> autotuner, by default the
    kernels' own ("fwd", "dkdv", "dq")."""
    from kernels.flash_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel
    from kernels.flash_fwd import _fwd_kernel, seqlen_bucket

    tuners = tuners or {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
    chosen = []
    for name, kernel in tuners.items():
        for key, cfg in kernel.cache.items():
            if seqlen_bucket(n) in key[5:7]:
                chosen.append(f"{name} {key[:7]}: {cfg}")
    return chosen


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """Rows of `<run_dir>/csv/version_<i>/metrics.csv` (one file per start of the run), in order; empty
    cells dropped. The layout is that of a `train.py` run's CSV logger (configs/logger/csv.yaml).
    """
    starts = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    files = [v / "metrics.csv" for v in starts if (v / "metrics.csv").is_file()]
    if not files:
        raise FileNotFoundError(f"{run_dir}/csv/version_*/metrics.csv is missing: the run wrote no CSV log")
    rows = []
    for path in files:
        with open(path) as f:
            rows += [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return rows
