"""What limits our kernels: Nsight Compute counters and every tile's time, paper setting on one GPU.

Paper setting (batch 16, 8 heads, head dim 64, bf16, non-causal) at one N, three cases: `dense`,
`dropout` (dropout_p = 0.1) and `sparse` (the butterfly block mask of scripts/bench_attention.py).

1. Counters. Run one case under `ncu`; the script autotunes first and then opens the profiler for one
   fwd+bwd only, so the report holds exactly that call's kernels. Then summarize the reports:

       for c in dense dropout sparse; do
         ncu --clock-control none --profile-from-start off --set full -f -o $c \\
             python kernel_dev/profile_kernels.py --case $c
         ncu -i $c.ncu-rep --page raw --csv > $c.csv
       done
       python kernel_dev/profile_kernels.py --summarize dense.csv dropout.csv sparse.csv

   Per kernel: time, registers per thread, the blocks per SM that registers and shared memory allow,
   active warps, issue slots busy, tensor-pipe busy, DRAM bytes, L2 hit rate, and the largest stall
   reasons (cycles per issued instruction). Writes kernel_dev/results/<gpu>-ncu.{json,md}.

2. Tiles (`--tiles`): every autotuning config of the three kernels, plus register-capped ones
   (`maxnreg`, which would fit a third or fourth program on an SM), timed for each case by autotuners
   of this script's own (`tuning.autotuners`). Writes kernel_dev/results/<gpu>-tiles.json.
"""

import argparse
import csv
import json
from pathlib import Path

import torch
from tuning import autotuners, fwd_bwd, tile_times

from kernels import block_sparse_flash_attn_func, butterfly_block_mask, flash_attn_func
from kernels.benchmark import environment, gpu_slug, tuned_configs

RESULTS = Path(__file__).resolve().parent / "results"

# Register-capped tiles (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg): 168 registers fit three
# 128-thread programs on an SM where the uncapped 64x64 dK/dV tile (about 227) fits two.
CAPPED = {
    "fwd": [(64, 64, 4, 3, 128), (128, 64, 4, 3, 168)],
    "dkdv": [(64, 64, 4, 2, 168), (64, 64, 4, 3, 168), (64, 64, 4, 3, 160), (64, 64, 4, 2, 128)],
    "dq": [(64, 64, 4, 3, 168), (128, 64, 4, 3, 168), (64, 64, 4, 2, 128)],
}
# ncu raw-page metrics kept per kernel: (column, name in the output).
METRICS = [
    ("gpu__time_duration.sum", "ms"),
    ("launch__grid_size", "grid"),
    ("launch__block_size", "threads"),
    ("launch__registers_per_thread", "registers"),
    ("launch__occupancy_limit_registers", "blocks_per_sm_by_registers"),
    ("launch__occupancy_limit_shared_mem", "blocks_per_sm_by_smem"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "warps_active_pct"),
    ("smsp__issue_active.avg.pct_of_peak_sustained_active", "issue_busy_pct"),
    ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", "tensor_busy_pct"),
    ("dram__bytes_read.sum", "dram_read_mb"),
    ("dram__bytes_write.sum", "dram_write_mb"),
    ("lts__t_sector_hit_rate.pct", "l2_hit_pct"),
]
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"


def cases(n: int) -> dict:
    """name -> (attention function of (q, k, v), q, k, v, dout, dropout_p, block mask), paper setting."""
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(16, n, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    dout = torch.randn_like(q)
    mask = butterfly_block_mask(n, device="cuda")
    fns = {
        "dense": lambda q, k, v: flash_attn_func(q, k, v),
        "dropout": lambda q, k, v: flash_attn_func(q, k, v, dropout_p=0.1),
        "sparse": lambda q, k, v: block_sparse_flash_attn_func(q, k, v, mask),
    }
    args = {"dense": (0.0, None), "dropout": (0.1, None), "sparse": (0.0, mask)}
    return {name: (fn, q, k, v, dout, *args[name]) for name, fn in fns.items()}


def profile_one(case: str, n: int) -> None:
    """Autotune, then one fwd+bwd between cudaProfilerStart and cudaProfilerStop (for ncu)."""
    fn, q, k, v, dout, _, _ = cases(n)[case]
    for _ in range(3):
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    for line in tuned_configs(n):
        print(line)


def number(text: str) -> float:
    return float(text.replace(",", ""))


def summarize(paths: list[str], out_dir: Path) -> None:
    """One row per profiled kernel of each case's ncu raw CSV (case = the file's stem)."""
    rows = []
    for path in paths:
        table = list(csv.reader(open(path)))
        header, units, data = table[0], table[1], table[2:]
        col = {name: i for i, name in enumerate(header)}
        for rec in data:
            row = {"case": Path(path).stem, "kernel": rec[col["Kernel Name"]].split("<")[0].split("(")[0]}
            for metric, name in METRICS:
                value = number(rec[col[metric]])
                unit = units[col[metric]]
                if metric.startswith("dram__bytes"):
                    value *= {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1, "Gbyte": 1e3}[unit]  # -> MB
                if metric == "gpu__time_duration.sum":
                    value *= {"us": 1e-3, "usecond": 1e-3, "ns": 1e-6, "nsecond": 1e-6}.get(unit, 1)  # -> ms
                row[name] = round(value, 4)
            stalls = {
                h[len(STALL_PREFIX) : -len(STALL_SUFFIX)]: number(rec[i])
                for h, i in col.items()
                if h.startswith(STALL_PREFIX) and h.endswith(STALL_SUFFIX) and "not_issued" not in h
            }
            stalls.pop("selected", None)
            row["top_stalls"] = {s: round(x, 2) for s, x in sorted(stalls.items(), key=lambda kv: -kv[1])[:5]}
            rows.append(row)
    env = environment()  # run where the reports were made: the GPU's name and clocks go with them
    stem = out_dir / f"{gpu_slug(env['gpu'])}-ncu"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    cols = ["case", "kernel", "ms", "registers", "blocks_per_sm_by_registers", "warps_active_pct",
            "issue_busy_pct", "tensor_busy_pct", "dram_read_mb", "l2_hit_pct"]  # fmt: skip
    lines = [
        f"# Nsight Compute counters, {env['gpu']}",
        "",
        f"torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date')}. "
        "`kernel_dev/profile_kernels.py` (paper setting, one fwd+bwd per case). Stalls: cycles per issued "
        "instruction.",
        "",
        "| " + " | ".join(cols) + " | top stalls |",
        "|" + "---|" * (len(cols) + 1),
    ]
    for r in rows:
        stalls = ", ".join(f"{s} {x}" for s, x in r["top_stalls"].items())
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + f" | {stalls} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def tiles(n: int, out_dir: Path) -> None:
    """Every config's kernel time (µs) per case, the register-capped ones included."""
    rows = []
    for case, (_, q, k, v, dout, dropout_p, mask) in cases(n).items():
        tuners = autotuners(CAPPED)  # new ones per case: each case tunes from scratch
        fwd_bwd(tuners, *(x.detach() for x in (q, k, v)), dout, dropout_p, mask)
        row = {"case": case, "seqlen": n}
        for name, tuner in tuners.items():
            times = {c: round(t * 1000, 1) for c, t in tile_times(tuner).items()}
            row[name] = dict(sorted(times.items(), key=lambda kv: kv[1]))
            best = next(iter(row[name].items()))
            print(
                case,
                name,
                "fastest",
                best,
                "capped",
                {c: t for c, t in times.items() if " r" in c},
                flush=True,
            )
        rows.append(row)
    env = environment()
    path = out_dir / f"{gpu_slug(env['gpu'])}-tiles.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=["dense", "dropout", "sparse"], help="profile one fwd+bwd (under ncu)")
    ap.add_argument("--summarize", nargs="+", metavar="CSV", help="ncu raw CSVs, one per case")
    ap.add_argument("--tiles", action="store_true", help="time every tile, register caps included")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize, Path(args.out))
    elif args.tiles:
        tiles(args.seqlen, Path(args.out))
    elif args.case:
        profile_one(args.case, args.seqlen)
    else:
        ap.error("give --case, --summarize or --tiles")


if __name__ == "__main__":
    main()
