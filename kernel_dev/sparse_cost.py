"""Block-sparse cost against the number of nonzero blocks per row, next to the dense kernel, one run.

Paper setting (batch 16, 8 heads, head dim 64, bf16, non-causal) at one N. The masks are cyclic bands of
k blocks (block (i, j) is nonzero when (j - i) mod n < k), so every query row and every key column has
exactly k nonzero blocks and the forward and backward loops are equally long. Each k autotunes its own
tiles (the autotuner's key does not see the mask, so its cache is cleared), fwd and fwd+bwd are timed as
CUDA-graph replays (`kernels.benchmark.phases`), and `ratio_fwd_bwd` is the time over (k / n) x the dense
time. A straight line through the times splits them into a part that does not depend on k (reading and
writing every tensor once, launches) and a cost per nonzero block, to compare with the dense kernel's
per block.

    python kernel_dev/sparse_cost.py [--seqlen 4096] [--blocks 2 4 6 8 16 32]   # -> kernel_dev/results/
"""

import argparse
import json
from pathlib import Path

import torch

from kernels import block_sparse_flash_attn_func, flash_attn_func
from kernels.benchmark import environment, gpu_slug, make_inputs, phases, tuned_configs, warm_up_graphs
from kernels.flash_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel
from kernels.flash_fwd import SPARSE_BLOCK, _fwd_kernel

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 6, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    b, h, d, n = 16, 8, 64, args.seqlen
    nb = n // SPARSE_BLOCK
    warm_up_graphs()
    sets, douts = make_inputs(b, n, h, d, copies=1)
    rows = {"dense": phases(lambda q, k, v: flash_attn_func(q, k, v), sets, douts, args.reps)}
    print("dense", rows["dense"], flush=True)
    i = torch.arange(nb, device="cuda")
    for kb in args.blocks:
        for tuner in (_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel):
            tuner.cache.clear()  # each k tunes its own tiles
        mask = (((i[None, :] - i[:, None]) % nb) < kb)[None]
        r = phases(lambda q, k, v, m=mask: block_sparse_flash_attn_func(q, k, v, m), sets, douts, args.reps)
        r["ratio_fwd_bwd"] = r["fwd_bwd_ms"] / (kb / nb * rows["dense"]["fwd_bwd_ms"])
        r["tuned"] = [t for t in tuned_configs(n) if ", True, " in t.split(":")[0]]  # IS_SPARSE keys
        rows[str(kb)] = r
        print(kb, {key: round(x, 4) for key, x in r.items() if isinstance(x, float)}, flush=True)
    ks = [kb for kb in args.blocks if kb < nb]
    fit = None
    if len(ks) >= 2:  # least squares t = fixed + per_block * k over the sparse masks
        t = [rows[str(kb)]["fwd_bwd_ms"] for kb in ks]
        mk, mt = sum(ks) / len(ks), sum(t) / len(t)
        slope = sum((kb - mk) * (y - mt) for kb, y in zip(ks, t, strict=True)) / sum(
            (kb - mk) ** 2 for kb in ks
        )
        fit = {
            "fixed_ms": mt - slope * mk,
            "per_block_ms": slope,
            "dense_per_block_ms": rows["dense"]["fwd_bwd_ms"] / nb,
        }
        print("fit", fit, flush=True)
    env = environment()
    out = Path(args.out) / f"{gpu_slug(env['gpu'])}-sparse-cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "seqlen": n, "rows": rows, "fit_k_below_n": fit}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
