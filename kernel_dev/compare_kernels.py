"""Time two (or more) versions of the kernels in one run, paper setting, with the same tiles.

    git archive 04b5c0f | tar -x -C /tmp/old        # any revision, extracted to a folder
    python kernel_dev/compare_kernels.py /tmp/old . --seqlens 1024 2048 4096     # -> kernel_dev/results/

Each tree runs in its own process (its own `kernels` package and benchmark helpers), one after the other
on the same GPU. Batch 16, 8 heads, head dim 64, bf16, as in bench_attention's paper setting:
  flash               dense, N keys
  flash_n-1           dense, N - 1 keys and queries (a ragged last block)
  flash_dropout       dense, dropout 0.1
  flash_mask          varlen, lengths uniform in N-20 .. N (a padding mask)
  flash_dropout_mask  both
Autotuning is replaced by one pinned tile per kernel (forward 128x64, 8 warps, 3 stages; dK/dV 64x64, 4
warps, 3 stages; dQ 128x64, 8 warps, 3 stages), so the trees differ in their code only and no autotuning
time is spent. Writes <out>/<gpu>-compare.json and .md and prints each tree's times and ratios to its
`flash`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["flash", "flash_n-1", "flash_dropout", "flash_mask", "flash_dropout_mask"]


def child(tree: str, seqlens: list[int]) -> dict:
    """Times of every method at every N for the kernels of `tree`, in a process started by `tree_env`."""
    import torch
    import torch.nn.functional as F
    import triton

    from kernels import flash_attn_func, flash_attn_varlen_func, flash_bwd, flash_fwd

    if (Path(tree) / "kernels" / "benchmark.py").is_file():  # the tree's own benchmark helpers
        from kernels import benchmark as ba
    else:  # older trees keep them in scripts/bench_attention.py
        import bench_attention as ba

    # Every tree's flash_attn_func launches its own modules' autotuners, so the pinned tiles replace their
    # configs, in this child process only.
    pin = {
        flash_fwd._fwd_kernel: (128, 64, 8, 3),
        flash_bwd._bwd_dkdv_kernel: (64, 64, 4, 3),
        flash_bwd._bwd_dq_kernel: (128, 64, 8, 3),
    }
    for kernel, (bm, bn, w, s) in pin.items():
        kernel.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
    ba.warm_up_graphs()
    b, h, d = 16, 8, 64
    out = {"env": ba.environment(), "tree": tree}
    for n in seqlens:
        # The padding mask is built here as bench_attention.bench_paper builds it, not through a shared
        # helper: this child imports the *tree's* helpers, and older trees have no such helper.
        sets, douts = ba.make_inputs(b, n, h, d)
        gen = torch.Generator().manual_seed(n)
        lengths = torch.randint(max(1, n - 20), n + 1, (b,), generator=gen)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
        total = int(lengths.sum())

        def packed(a, total=total, n=n):
            return [x.detach().reshape(b * n, h, d)[:total].clone().requires_grad_() for x in a]

        varlen_sets = [packed(a) for a in sets]
        varlen_douts = [dd.reshape(b * n, h, d)[:total].clone() for dd in douts]
        short_sets = [[x.detach()[:, : n - 1].clone().requires_grad_() for x in a] for a in sets]
        short_douts = [dd[:, : n - 1].clone() for dd in douts]
        methods = {
            "flash": (lambda q, k, v: flash_attn_func(q, k, v), sets, douts),
            "flash_n-1": (lambda q, k, v: flash_attn_func(q, k, v), short_sets, short_douts),
            "flash_dropout": (lambda q, k, v: flash_attn_func(q, k, v, dropout_p=0.1), sets, douts),
            "flash_mask": (
                lambda q, k, v, cu=cu, n=n: flash_attn_varlen_func(q, k, v, cu, cu, n, n),
                varlen_sets,
                varlen_douts,
            ),
            "flash_dropout_mask": (
                lambda q, k, v, cu=cu, n=n: flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=0.1),
                varlen_sets,
                varlen_douts,
            ),
        }
        out[str(n)] = {
            name: ba.phases(fn, ins, ds, 15, use_graph=n <= 4096) for name, (fn, ins, ds) in methods.items()
        }
        print(f"N={n} done", file=sys.stderr, flush=True)
    return out


def tree_env(tree: str) -> dict:
    """The environment of a child process that imports `tree`'s `kernels` and benchmark helpers.

    The trees are other checkouts, which the editable install of this one cannot provide: the tree and
    its scripts/ (where older trees keep bench_attention.py) go first on PYTHONPATH, ahead of the install.
    """
    root = Path(tree).resolve()
    path = [str(root), str(root / "scripts"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def write_markdown(path: Path, data: dict) -> None:
    """A table of every run's fwd / bwd / fwd+bwd ms, each with its ratio to the same tree's `flash`."""
    runs = data["runs"]
    lines = [
        f"# Kernel trees compared on one {runs[0]['env']['gpu']}",
        "",
        f"`{data['command']}`, torch {runs[0]['env']['torch']}, triton {runs[0]['env']['triton']}.",
        "Tiles pinned (see the script); batch 16, 8 heads, head dim 64, bf16; ms, and fwd+bwd over the same",
        "tree's `flash`.",
        "",
        "| N | method | " + " | ".join(f"{r['tree']} fwd | bwd | fwd+bwd" for r in runs) + " |",
        "|---|---|" + "---|---|---|" * len(runs),
    ]
    for n in [k for k in runs[0] if k.isdigit()]:
        for m in METHODS:
            cells = []
            for r in runs:
                t, base = r[n][m], r[n]["flash"]["fwd_bwd_ms"]
                cells.append(
                    f"{t['fwd_ms']:.4f} | {t['bwd_ms']:.4f} | {t['fwd_bwd_ms']:.4f} ({t['fwd_bwd_ms'] / base - 1:+.1%})"
                )
            lines.append(f"| {n} | {m} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="*", help="folders that each hold a copy of the project")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.seqlens)), flush=True)
        return
    if not args.trees:
        ap.error("name at least one folder holding a copy of the project")
    runs = []
    for tree in args.trees:
        t0 = time.time()
        cmd = [sys.executable, __file__, "--child", tree, "--seqlens", *map(str, args.seqlens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=tree_env(tree))
        print(f"{tree}: {time.time() - t0:.0f} s", flush=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            sys.exit(f"{tree} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(lines[-1][len("RESULT ") :]))
    for run in runs:
        for n in map(str, args.seqlens):
            base = run[n]["flash"]["fwd_bwd_ms"]
            cells = " ".join(
                f"{m}={run[n][m]['fwd_bwd_ms']:.4f} ({run[n][m]['fwd_bwd_ms'] / base - 1:+.1%})"
                for m in METHODS
            )
            print(f"{run['tree']} N={n} fwd+bwd ms: {cells}")
            print(
                f"{run['tree']} N={n} fwd ms: " + " ".join(f"{m}={run[n][m]['fwd_ms']:.4f}" for m in METHODS)
            )
    from kernels.benchmark import gpu_slug

    path = Path(args.out) / f"{gpu_slug(runs[0]['env']['gpu'])}-compare.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": " ".join(["python", *sys.argv]), "runs": runs}
    path.write_text(json.dumps(data, indent=1))
    write_markdown(path.with_suffix(".md"), data)
    print(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
