"""Training throughput of GPT-2: our model with each attention implementation against HuggingFace's.

One training step = forward + cross-entropy + backward + AdamW step, bf16 autocast on CUDA (float32
master weights), random tokens, dropout 0.1, the same micro-batch / sequence length / precision for every
implementation in a group; the loss is train.py's (`models.tasks.causal_lm.next_token_loss`). Rows named
`...+compile` run the forward and the loss through `torch.compile` (what `python train.py compile=true`
does); the HF baselines run as HuggingFace ships them, in eager mode. Each config runs `--warmup` untimed
steps, then `--steps` steps timed one by one with CUDA events; the median step time gives tokens/s, and

    MFU = flops_per_token(seq_len) * tokens/s / peak dense bf16 FLOP/s of the GPU

with `flops_per_token` = 6 N + 12 n_layer n_embd seq_len (see models/layers.py). Peak memory is
torch.cuda.max_memory_allocated over the config. Out-of-memory is recorded as "OOM", any other failure
as an error, and the run goes on. Results are rewritten after every config to
<out>/<gpu-slug>.json and <out>/<gpu-slug>.md.

    python scripts/bench_train.py                        # the full default set (a few minutes on an H100)
    python scripts/bench_train.py --only 'small-1k:*'    # one group; patterns are fnmatch, comma-separated
    python scripts/bench_train.py --device cpu --size tiny --seq-len 128 --batch-size 2 --steps 2 \\
        --only '*:ours-sdpa,*:hf-eager'                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import json
import math
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from kernels.benchmark import gpu_slug, nvidia_smi
from models.gpt2 import GPT2
from models.hf_gpt2 import HFGPT2
from models.tasks.causal_lm import next_token_loss

# The model sizes of the configs (configs/model/size/*.yaml; tiny is for CPU smoke runs).
SIZE_DIR = Path(__file__).resolve().parents[1] / "configs" / "model" / "size"
SIZES = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(SIZE_DIR.glob("*.yaml"))}
# Dense bf16 tensor-core peak, TFLOP/s, matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
]
IMPLS = {  # name -> (model class, attention kwarg)
    "ours-flash": (GPT2, dict(attn_impl="flash")),
    "ours-standard": (GPT2, dict(attn_impl="standard")),
    "ours-sdpa": (GPT2, dict(attn_impl="sdpa")),
    "hf-eager": (HFGPT2, dict(attn_implementation="eager")),
    "hf-sdpa": (HFGPT2, dict(attn_implementation="sdpa")),
}


@dataclass
class Config:
    group: str  # configs in a group share size, seq_len and batch size, so their speeds compare directly
    impl: str
    size: str
    seq_len: int
    batch_size: int
    compile: bool = False  # torch.compile forward + loss

    @property
    def name(self) -> str:
        return f"{self.group}:{self.impl}{'+compile' if self.compile else ''}"


DEFAULT_CONFIGS = (
    [Config("small-1k", impl, "small", 1024, 16) for impl in IMPLS]
    + [Config("small-1k", impl, "small", 1024, 16, compile=True) for impl in ("ours-flash", "ours-sdpa")]
    # Micro-batch 8: HF-eager GPT-2 medium runs out of memory at 16 on an 80 GB card.
    + [Config("medium-1k", impl, "medium", 1024, 8) for impl in ("ours-flash", "hf-eager", "hf-sdpa")]
    + [Config("medium-1k", "ours-flash", "medium", 1024, 8, compile=True)]
    + [Config("small-4k", "ours-flash", "small", 4096, 4, compile=c) for c in (False, True)]
    + [Config("small-16k", impl, "small", 16384, 1) for impl in ("ours-flash", "hf-eager")]
)


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": "cpu"}
    info = {"name": torch.cuda.get_device_name(device)}
    info["capability"] = list(torch.cuda.get_device_capability(device))
    info["nvidia_smi_clocks"] = nvidia_smi("--query-gpu=clocks.sm,clocks.mem,clocks.max.sm", "--format=csv")
    return info


def peak_tflops(gpu_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            return tflops
    return None


def versions() -> dict:
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    out["transformers"] = transformers.__version__
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["cuda"] = torch.version.cuda
    return out


def run_config(cfg: Config, args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    """Time `args.steps` training steps of one config; returns its result row."""
    cls, attn_kwargs = IMPLS[cfg.impl]
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(
            **SIZES[cfg.size], n_positions=max(1024, cfg.seq_len), dropout=args.dropout, **attn_kwargs
        )
    model.train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    x = torch.randint(0, model.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)
    batch = {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}

    loss_fn = torch.compile(next_token_loss) if cfg.compile else next_token_loss

    def train_step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        train_step()
    times_ms, losses = [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(train_step())
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            losses.append(train_step())
            times_ms.append((time.perf_counter() - t0) * 1e3)
    step_ms = statistics.median(times_ms)
    profile = kernel_profile(train_step, args.profile) if args.profile and device.type == "cuda" else None
    tokens_per_s = cfg.batch_size * cfg.seq_len / (step_ms / 1e3)
    flops_per_token = model.flops_per_token(cfg.seq_len)
    final_loss = losses[-1].item()
    return {
        "status": "ok" if math.isfinite(final_loss) else f"non-finite loss {final_loss}",
        "num_params": model.num_params(),
        "step_ms_median": step_ms,
        "step_ms_mean": statistics.fmean(times_ms),
        "step_ms_min": min(times_ms),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "tflops_per_s": flops_per_token * tokens_per_s / 1e12,
        "mfu": flops_per_token * tokens_per_s / (peak * 1e12) if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": final_loss,
        **({"profile": profile} if profile else {}),
    }


# Our attention kernels' names in a profile (kernels/flash_fwd.py, kernels/flash_bwd.py).
ATTENTION_KERNELS = (
    "_fwd_kernel",
    "_bwd_dkdv_kernel",
    "_bwd_dq_kernel",
    "_bwd_short_kernel",
)


def kernel_profile(train_step, steps: int) -> dict:
    """GPU time per step of each kernel over `steps` profiled steps (torch.profiler): the top 12 kernels,
    our attention kernels' sum and the total, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + evt.device_time / 1e3 / steps
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    return {
        "total_ms": sum(per_kernel.values()),
        "attention_ms": sum(t for name, t in per_kernel.items() if name.startswith(ATTENTION_KERNELS)),
        "attention_kernels_ms": {n: t for n, t in top if n.startswith(ATTENTION_KERNELS)},
        "top_kernels_ms": dict((n[:100], t) for n, t in top[:12]),
    }


def markdown(report: dict) -> str:
    gpu, rows = report["gpu"], report["results"]
    lines = [
        f"# GPT-2 training throughput on {gpu['name']}",
        "",
        f"{report['date']}; torch {report['versions']['torch']}, triton {report['versions']['triton']}, "
        f"transformers {report['versions']['transformers']}; {report['precision']}, AdamW, dropout "
        f"{report['args']['dropout']}; `+compile`: forward and loss through torch.compile; median of "
        f"{report['args']['steps']} steps after {report['args']['warmup']} warm-up steps; "
        f"MFU against {report['peak_tflops'] or 'n/a'} TFLOP/s peak.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| config | model | seq | batch | tokens/s | MFU | TFLOP/s | step ms | peak mem GiB "
        "| vs HF-eager | vs HF-sdpa |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(row: dict, baseline: str) -> str:
        base = next(
            (r for r in rows if r["group"] == row["group"] and r["name"].endswith(f":{baseline}")), None
        )
        if base is None or row["status"] != "ok":
            return ""
        if base["status"] != "ok":
            return f"n/a ({baseline} {base['status']})"
        return f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x"

    for r in rows:
        head = f"| {r['group']} | {r['name'].split(':')[1]} | {r['seq_len']} | {r['batch_size']} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['status'][:80]} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        speed = f"| {r['tokens_per_s']:,.0f} | {mfu} | {r['tflops_per_s']:.1f} | {r['step_ms_median']:.1f} "
        lines.append(head + speed + f"| {mem} | {ratio(r, 'hf-eager')} | {ratio(r, 'hf-sdpa')} |")
    lines += ["", f"GPU clocks (nvidia-smi): `{gpu.get('nvidia_smi_clocks', 'n/a')}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--only", default="*", help="comma-separated fnmatch patterns on 'group:impl' names")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's peak for MFU")
    parser.add_argument("--size", choices=SIZES, default=None, help="force every config to this model size")
    parser.add_argument("--seq-len", type=int, default=None, help="force every config to this length")
    parser.add_argument("--batch-size", type=int, default=None, help="force every config to this micro-batch")
    parser.add_argument("--out", type=Path, default=Path("results/train"))
    parser.add_argument("--list", action="store_true", help="print the config names and exit")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="STEPS",
        help="after timing, profile STEPS more steps and record GPU ms per step by kernel (CUDA only)",
    )  # fmt: skip
    args = parser.parse_args()

    configs = []
    for cfg in DEFAULT_CONFIGS:
        cfg = replace(
            cfg,
            size=args.size or cfg.size,
            seq_len=args.seq_len or cfg.seq_len,
            batch_size=args.batch_size or cfg.batch_size,
        )
        if any(fnmatch.fnmatchcase(cfg.name, pat.strip()) for pat in args.only.split(",")):
            configs.append(cfg)
    if args.list:
        print("\n".join(c.name for c in DEFAULT_CONFIGS))
        return
    if not configs:
        parser.error(f"--only {args.only!r} matches none of: {', '.join(c.name for c in DEFAULT_CONFIGS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible; pass --device cpu for a smoke run")

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = gpu_info(device)
    peak = args.peak_tflops or peak_tflops(gpu["name"])
    slug = gpu_slug(gpu["name"])
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "gpu": gpu,
        "peak_tflops": peak,
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": [],
    }
    if peak is None:
        print(f"no peak FLOP/s known for {gpu['name']!r}: MFU left empty (pass --peak-tflops)", flush=True)

    t_start = time.time()
    for cfg in configs:
        row = {
            "name": cfg.name,
            "group": cfg.group,
            "impl": cfg.impl,
            "compile": cfg.compile,
            "size": cfg.size,
        }
        row |= {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size}
        t0 = time.time()
        try:
            row |= run_config(cfg, args, device, peak)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as err:  # keep the other configs' results
            traceback.print_exc()
            row["status"] = f"error: {type(err).__name__}: {err}".splitlines()[0]
        row["wall_s"] = time.time() - t0
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["results"].append(row)
        (args.out / f"{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{slug}.md").write_text(markdown(report))
        if row["status"] == "ok":
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
            print(
                f"{cfg.name:28s} {row['tokens_per_s']:>12,.0f} tok/s  MFU {mfu:>6s}  "
                f"{row['step_ms_median']:8.1f} ms/step  ({row['wall_s']:.0f}s)",
                flush=True,
            )
            if "profile" in row:
                prof = row["profile"]
                print(
                    f"  GPU {prof['total_ms']:.1f} ms/step, our attention kernels {prof['attention_ms']:.1f}"
                )
                for name, ms in prof["top_kernels_ms"].items():
                    print(f"    {ms:7.2f}  {name}")
        else:
            print(f"{cfg.name:28s} {row['status']}", flush=True)
    print(f"done in {time.time() - t_start:.0f}s -> {args.out / slug}.json, .md", flush=True)


if __name__ == "__main__":
    main()
