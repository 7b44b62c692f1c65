"""Attention benchmark: the paper's Figure 3 / Appendix E setting and the FA2/FA3 TFLOP/s grid.

    python scripts/bench_attention.py [--quick] [--out results/attention]

Writes results/attention/<gpu>.json, <gpu>.md and PNG plots. Everything is measured in one run:
  * paper:  batch 16, 8 heads, headdim 64, seqlen 128 .. 64K, bf16. Forward, backward and fwd+bwd
            runtime of our kernel (plain; with dropout 0.1 and a padding mask, lengths uniform in
            N-20 .. N, served through the varlen path), PyTorch standard attention (kernels/reference.py,
            plain and with the same dropout + padding mask) and block-sparse FlashAttention with the
            butterfly mask; peak extra memory of fwd+bwd.
  * grid:   16K tokens (batch x seqlen), hidden 2048, headdim 64 and 128, causal and not, seqlen
            512 .. 16K, TFLOP/s by flash-attn's convention (fwd 4*B*H*N^2*d, halved when causal;
            bwd 2.5x, fwd+bwd 3.5x) for ours and torch SDPA pinned to FLASH_ATTENTION (FA2),
            CUDNN_ATTENTION and EFFICIENT_ATTENTION; peak extra memory of fwd+bwd.
Timing (kernels/benchmark.py): CUDA-graph replays (fallback: triton.testing.do_bench), median over
repeats, after warm-up; inputs are rotated among several copies when one set would fit in L2. The methods of one row are timed
in interleaved rounds (A B C, A B C, ...) and each reports the median over rounds, so clock and
temperature drift during a row does not favour the method that happens to run first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import (
    block_sparse_flash_attn_func,
    butterfly_block_mask,
    flash_attn_func,
    flash_attn_varlen_func,
)
from kernels.benchmark import (
    environment,
    gpu_slug,
    interleaved,
    make_inputs,
    peak_extra_mb,
    tuned_configs,
    warm_up_graphs,
)
from kernels.reference import standard_attention


def sdpa(q, k, v, backend, causal=False, dropout_p=0.0):
    """torch's scaled_dot_product_attention pinned to one backend, on our (batch, seqlen, heads, dim) layout."""
    with sdpa_kernel(backend):
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, dropout_p=dropout_p
        )
    return o.transpose(1, 2)


def oom_safe(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


# ---------------------------------------------------------------------------------------------
# The paper's setting
# ---------------------------------------------------------------------------------------------


def bench_paper(seqlens, reps, rounds, save):
    b, h, d = 16, 8, 64
    rows = []
    for n in seqlens:
        print(f"[paper] N={n}", flush=True)
        row = {"seqlen": n, "autotune": os.environ.get("FLASHREPRO_AUTOTUNE", "1") != "0"}
        sets, douts = make_inputs(b, n, h, d)
        gen = torch.Generator().manual_seed(n)
        lengths = torch.randint(max(1, n - 20), n + 1, (b,), generator=gen)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
        total = int(lengths.sum())
        key_mask = (torch.arange(n)[None, :] < lengths[:, None]).cuda()[:, None, None, :]
        block_mask = butterfly_block_mask(n, device="cuda")
        row["butterfly_density"] = block_mask.float().mean().item()

        def packed(a):
            return [x.detach().reshape(b * n, h, d)[:total].clone().requires_grad_() for x in a]

        varlen_sets = [packed(a) for a in sets]
        varlen_douts = [dd.reshape(b * n, h, d)[:total].clone() for dd in douts]
        methods = {
            "flash": (lambda q, k, v: flash_attn_func(q, k, v), sets, douts),
            "flash_dropout": (lambda q, k, v: flash_attn_func(q, k, v, dropout_p=0.1), sets, douts),
            "flash_mask": (
                lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, n, n),
                varlen_sets,
                varlen_douts,
            ),
            "flash_dropout_mask": (
                lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=0.1),
                varlen_sets,
                varlen_douts,
            ),
            "block_sparse_butterfly": (
                lambda q, k, v: block_sparse_flash_attn_func(q, k, v, block_mask),
                sets,
                douts,
            ),
            # Context for the dropout cost: PyTorch's FlashAttention-2 with and without its own dropout.
            "sdpa_flash": (lambda q, k, v: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION), sets, douts),
            "sdpa_flash_dropout": (
                lambda q, k, v: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, dropout_p=0.1),
                sets,
                douts,
            ),
            "standard": (lambda q, k, v: standard_attention(q, k, v), sets, douts),
            "standard_dropout_mask": (
                lambda q, k, v: standard_attention(q, k, v, dropout_p=0.1, attn_mask=key_mask),
                sets,
                douts,
            ),
        }
        jobs = {}
        for name, (fn, ins, ds) in methods.items():
            if name.startswith("standard") and n >= 16384:
                # Show it does not fit: one plain fwd+bwd attempt, no timing.
                res = oom_safe(lambda fn=fn, a=ins[0], dd=ds[0]: torch.autograd.grad(fn(*a), a, dd) and "ran")
                row[name] = res
                print(f"   {name:24s} {res}", flush=True)
                continue
            # CUDA graphs, so the GPU's time is measured and not the Python launch path: a block-sparse
            # fwd+bwd at 8K is ~2.5 ms of GPU work and ~2.5 ms of CPU work per call (kernel_dev/NOTES.md).
            # Standard attention beyond 4K (tens of GB per call) keeps plain launches, where the CPU is
            # far ahead anyway, so that no graph memory pool is needed next to it.
            jobs[name] = (fn, ins, ds, n <= 4096 or not name.startswith("standard"))
        for name, res in interleaved(jobs, reps, rounds).items():
            if isinstance(res, dict):
                fn, ins, ds, _ = jobs[name]
                a, dd = ins[0], ds[0]
                res["mem_mb"] = oom_safe(
                    lambda fn=fn, a=a, dd=dd: peak_extra_mb(lambda: torch.autograd.grad(fn(*a), a, dd))
                )
            row[name] = res
            torch.cuda.empty_cache()
            print(f"   {name:24s} {res}", flush=True)
        row["tuned_configs"] = tuned_configs(n)
        rows.append(row)
        save(rows)
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# The FA2/FA3 TFLOP/s grid
# ---------------------------------------------------------------------------------------------

PAPER_METHODS = (
    "flash", "flash_dropout", "flash_mask", "flash_dropout_mask", "sdpa_flash", "sdpa_flash_dropout",
    "block_sparse_butterfly", "standard", "standard_dropout_mask",
)  # fmt: skip
SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def bench_grid(seqlens, head_dims, reps, rounds, save):
    rows = []
    for d in head_dims:
        for causal in (False, True):
            for n in seqlens:
                b, h = 16384 // n, 2048 // d
                print(f"[grid] d={d} causal={causal} N={n} (batch {b}, heads {h})", flush=True)
                sets, douts = make_inputs(b, n, h, d, copies=1)
                fwd_flops = 4 * b * h * n * n * d / (2 if causal else 1)
                row = {"headdim": d, "causal": causal, "seqlen": n, "batch": b, "nheads": h}
                methods = {"flash": lambda q, k, v: flash_attn_func(q, k, v, causal=causal)}
                for name, backend in SDPA_BACKENDS.items():
                    methods[name] = lambda q, k, v, backend=backend: sdpa(q, k, v, backend, causal=causal)
                timed = interleaved({m: (fn, sets, douts, True) for m, fn in methods.items()}, reps, rounds)
                for name, fn in methods.items():
                    res = timed[name]
                    if isinstance(res, dict):
                        res["mem_mb"] = peak_extra_mb(
                            lambda fn=fn: torch.autograd.grad(fn(*sets[0]), sets[0], douts[0])
                        )
                        res["fwd_tflops"] = fwd_flops / res["fwd_ms"] / 1e9
                        res["bwd_tflops"] = 2.5 * fwd_flops / res["bwd_ms"] / 1e9
                        res["fwd_bwd_tflops"] = 3.5 * fwd_flops / res["fwd_bwd_ms"] / 1e9
                    if isinstance(res, dict) and name != "flash":
                        with torch.no_grad():  # the autotuned kernel against this backend, same inputs
                            a = [x.detach() for x in sets[0]]
                            res["max_abs_diff_flash"] = (
                                (methods["flash"](*a).float() - fn(*a).float()).abs().max().item()
                            )
                    row[name] = res
                    short = (
                        {k: round(v, 1) for k, v in res.items() if k != "fwd_bwd_ms_rounds"}
                        if isinstance(res, dict)
                        else res
                    )
                    print(f"   {name:16s} {short}", flush=True)
                rows.append(row)
                save(rows)
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Targets and report
# ---------------------------------------------------------------------------------------------


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def evaluate(paper, grid):
    """The issue's performance targets, computed from this run's numbers."""
    t = {}
    cells = [
        r
        for r in grid
        if r["seqlen"] >= 1024 and isinstance(r.get("flash"), dict) and isinstance(r.get("sdpa_flash"), dict)
    ]
    fb = [r["flash"]["fwd_bwd_tflops"] / r["sdpa_flash"]["fwd_bwd_tflops"] for r in cells]
    fw = [r["flash"]["fwd_tflops"] / r["sdpa_flash"]["fwd_tflops"] for r in cells]
    t["fwd_bwd_geomean_vs_sdpa_flash"] = {
        "value": geomean(fb),
        "min_cell": min(fb, default=float("nan")),
        "target": ">= 1.0, every cell >= 0.85",
    }
    t["fwd_geomean_vs_sdpa_flash"] = {"value": geomean(fw), "target": ">= 1.15"}
    mem = [
        r["flash"]["mem_mb"] / r["sdpa_flash"]["mem_mb"]
        for r in grid
        if isinstance(r.get("flash"), dict) and isinstance(r.get("sdpa_flash"), dict)
    ]
    t["memory_vs_sdpa_flash_max_ratio"] = {"value": max(mem, default=float("nan")), "target": "<= 1.10"}
    over = []
    for r in paper:
        if (
            r["seqlen"] >= 1024
            and isinstance(r.get("flash"), dict)
            and isinstance(r.get("flash_dropout_mask"), dict)
        ):
            over.append(r["flash_dropout_mask"]["fwd_bwd_ms"] / r["flash"]["fwd_bwd_ms"] - 1)
    t["dropout_mask_overhead_max"] = {
        "value": max(over, default=float("nan")),
        "target": "<= 0.25 at N >= 1K",
    }
    fa2 = [
        r["sdpa_flash_dropout"]["fwd_bwd_ms"] / r["sdpa_flash"]["fwd_bwd_ms"] - 1
        for r in paper
        if r["seqlen"] >= 1024 and isinstance(r.get("sdpa_flash_dropout"), dict)
        and isinstance(r.get("sdpa_flash"), dict)
    ]  # fmt: skip
    if fa2:
        t["sdpa_flash_dropout_overhead_max"] = {"value": max(fa2), "target": "context: FA2's own dropout 0.1"}
    sparse = []
    for r in paper:
        if (
            r["seqlen"] >= 4096
            and isinstance(r.get("block_sparse_butterfly"), dict)
            and isinstance(r.get("flash"), dict)
        ):
            s = r["butterfly_density"]
            sparse.append(r["block_sparse_butterfly"]["fwd_bwd_ms"] / (s * r["flash"]["fwd_bwd_ms"]))
    t["block_sparse_time_over_density_times_dense_max"] = {
        "value": max(sparse, default=float("nan")),
        "target": "<= 1.3 at N >= 4K",
    }
    sp_plain, sp_drop = [], []
    for r in paper:
        if r["seqlen"] <= 2048 and isinstance(r.get("standard"), dict):
            sp_plain.append(r["standard"]["fwd_bwd_ms"] / r["flash"]["fwd_bwd_ms"])
            sp_drop.append(r["standard_dropout_mask"]["fwd_bwd_ms"] / r["flash_dropout_mask"]["fwd_bwd_ms"])
    t["speedup_vs_standard_min_n_le_2k"] = {"value": min(sp_plain, default=float("nan")), "target": ">= 3"}
    t["speedup_vs_standard_dropout_mask_min_n_le_2k"] = {
        "value": min(sp_drop, default=float("nan")),
        "target": ">= 3",
    }
    at4k = [r for r in paper if r["seqlen"] == 4096 and isinstance(r.get("standard"), dict)]
    if at4k:
        t["memory_reduction_vs_standard_at_4k"] = {
            "value": at4k[0]["standard"]["mem_mb"] / at4k[0]["flash"]["mem_mb"],
            "target": ">= 20",
        }
    at64k = [r for r in paper if r["seqlen"] == 65536]
    if at64k:
        t["runs_at_64k"] = {
            "flash": isinstance(at64k[0].get("flash"), dict),
            "standard": at64k[0].get("standard"),
        }
    return t


def fmt(x, key):
    """Two decimals, or three significant digits below 1 (microsecond-scale times at small N)."""
    if not isinstance(x, dict):
        return str(x)
    return f"{x[key]:.3g}" if abs(x[key]) < 1 else f"{x[key]:.2f}"


def write_report(out_dir: Path, data: dict):
    slug = gpu_slug(data["env"]["gpu"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{slug}.json").write_text(json.dumps(data, indent=1))
    e = data["env"]
    lines = [
        f"# Attention benchmark on {e['gpu']}",
        "",
        f"torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, {e['date']}. `{e['command']}`",
        "",
        f"```\n{e['nvidia_smi']}\n```",
        "",
        *(
            f"- last {section} run: {se['date']}, `{se['command']}`"
            for section, se in data.get("env_by_section", {}).items()
        ),
        "",
        "## Targets",
        "",
        "| target | measured | goal |",
        "|---|---|---|",
    ]
    for k, v in data["targets"].items():
        val = v.get("value", {kk: vv for kk, vv in v.items() if kk != "target"})
        val = f"{val:.3f}" if isinstance(val, float) else str(val)
        extra = f" (min cell {v['min_cell']:.3f})" if "min_cell" in v else ""
        lines.append(f"| {k} | {val}{extra} | {v.get('target', '')} |")
    lines += [
        "",
        "## Paper setting: batch 16, 8 heads, headdim 64, bf16 (ms; memory in MiB)",
        "",
        "`flash_dropout`: dropout 0.1; `flash_mask`: a padding mask (lengths uniform in N-20..N, served by the "
        "varlen path); `flash_dropout_mask`: both. Backward = (fwd+bwd) - fwd. Rows of different N may come "
        "from different runs (`--paper-seqlens`): `run` is the row's date (rows written before dates were "
        "recorded say `earlier`); `autotuned` says whether our kernels were autotuned for that "
        "N (FLASHREPRO_AUTOTUNE=0 runs use each kernel's first fitting config, to save time). Rows whose "
        "methods carry `fwd_bwd_ms_rounds` in the JSON were timed in interleaved rounds, each method's "
        "median round shown.",
        "",
        "| N | run | autotuned | method | fwd | bwd | fwd+bwd | peak extra MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["paper"]:
        for m in (
            "flash",
            "flash_dropout",
            "flash_mask",
            "flash_dropout_mask",
            "sdpa_flash",
            "sdpa_flash_dropout",
            "block_sparse_butterfly",
            "standard",
            "standard_dropout_mask",
        ):
            x = r.get(m)
            name = m + (f" (density {r['butterfly_density']:.3f})" if m == "block_sparse_butterfly" else "")
            lines.append(
                f"| {r['seqlen']} | {r.get('date', 'earlier')[:10]} | {r.get('autotune', 'n/a')} | {name} | {fmt(x, 'fwd_ms')} | {fmt(x, 'bwd_ms')} | {fmt(x, 'fwd_bwd_ms')} | {fmt(x, 'mem_mb')} |"
            )
    lines += [
        "",
        "## FA2/FA3 grid: 16K tokens, hidden 2048, bf16 (TFLOP/s; memory in MiB)",
        "",
        "| d | causal | N | method | fwd | bwd | fwd+bwd | peak extra MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["grid"]:
        for m in ("flash", *SDPA_BACKENDS):
            x = r.get(m)
            lines.append(
                f"| {r['headdim']} | {r['causal']} | {r['seqlen']} | {m} | {fmt(x, 'fwd_tflops')} | "
                f"{fmt(x, 'bwd_tflops')} | {fmt(x, 'fwd_bwd_tflops')} | {fmt(x, 'mem_mb')} |"
            )
    (out_dir / f"{slug}.md").write_text("\n".join(lines) + "\n")
    plot(out_dir, slug, data)
    return slug


def plot(out_dir: Path, slug: str, data: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in PAPER_METHODS:
        pts = [(r["seqlen"], r[m]) for r in data["paper"] if isinstance(r.get(m), dict)]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1]["fwd_bwd_ms"] for p in pts], marker="o", label=m)
            axes[1].plot([p[0] for p in pts], [p[1]["mem_mb"] for p in pts], marker="o", label=m)
    for ax, title in zip(axes, ("fwd+bwd runtime (ms)", "peak extra memory fwd+bwd (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Paper setting (batch 16, 8 heads, d 64, bf16) on {data['env']['gpu']}")
    fig.tight_layout()
    fig.savefig(out_dir / f"{slug}-paper.png", dpi=110)
    plt.close(fig)

    grid = data["grid"]
    dims = sorted({r["headdim"] for r in grid})
    fig, axes = plt.subplots(len(dims), 2, figsize=(12, 4 * len(dims)), squeeze=False)
    for i, d in enumerate(dims):
        for j, causal in enumerate((False, True)):
            ax = axes[i][j]
            rows = [r for r in grid if r["headdim"] == d and r["causal"] == causal]
            for m in ("flash", *SDPA_BACKENDS):
                pts = [(r["seqlen"], r[m]["fwd_bwd_tflops"]) for r in rows if isinstance(r.get(m), dict)]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_title(f"fwd+bwd TFLOP/s, headdim {d}, causal={causal}")
            ax.set_xlabel("sequence length")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / f"{slug}-grid.png", dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/attention")
    ap.add_argument("--quick", action="store_true", help="a few sizes only (smoke run)")
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved passes over the methods of a row")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--paper-seqlens", type=int, nargs="+", help="paper-setting sequence lengths to (re)run")
    ap.add_argument(
        "--report-only", metavar="JSON", help="rewrite the .md table and plots from a results JSON"
    )
    args = ap.parse_args()
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        data["targets"] = evaluate(data["paper"], data["grid"])
        slug = write_report(Path(args.report_only).parent, data)
        print(json.dumps(data["targets"], indent=1))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    torch.manual_seed(0)
    paper_n = (
        [128, 1024, 4096] if args.quick else [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    )
    paper_n = args.paper_seqlens or paper_n
    grid_n = [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    warm_up_graphs()
    env = environment()
    slug = gpu_slug(env["gpu"])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slug}.json"
    # Sections not run now are kept from an earlier run of the same script (when both ran here).
    data = json.loads(path.read_text()) if path.exists() else {"paper": [], "grid": []}
    data.setdefault("env_by_section", {})

    def saver(section, key):
        # Rows of this run replace earlier rows with the same key; the others are kept.
        kept = [r for r in data.get(section, [])]

        def save(rows):
            for r in rows:  # rows kept from earlier runs keep their own date
                r.setdefault("date", env["date"])
            new = {key(r) for r in rows}
            data[section] = sorted([r for r in kept if key(r) not in new] + rows, key=key)
            data["env_by_section"][section] = env
            path.write_text(json.dumps(data, indent=1))

        return save

    if not args.skip_paper:
        bench_paper(paper_n, args.reps, args.rounds, saver("paper", lambda r: r["seqlen"]))
    if not args.skip_grid:
        bench_grid(
            grid_n,
            args.head_dims,
            args.reps,
            args.rounds,
            saver("grid", lambda r: (r["headdim"], r["causal"], r["seqlen"])),
        )
    data["env"] = env
    data["targets"] = evaluate(data["paper"], data["grid"])
    slug = write_report(Path(args.out), data)
    print(json.dumps(data["targets"], indent=1))
    print(f"wrote {args.out}/{slug}.json/.md/-paper.png/-grid.png")


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
