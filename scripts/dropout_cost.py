"""Where does in-kernel dropout time go? Times our kernels with variants of `dropout_bits` swapped in.

Paper setting (batch 16, 8 heads, head dim 64, bf16, non-causal) at one sequence length; each variant runs
in a fresh process (Triton resolves `dropout_bits` when it first compiles a kernel), with autotuning off
so every variant uses the same tiles. Variants:

    nodrop      dropout_p = 0 (the baseline)
    ours        the kernels' dropout_bits: one Philox4x32-7 call per 16 thread-owned elements
    ours0       the same with 0 Philox rounds: everything but the rounds
    allkeep     numbers computed directly in the score tile's layout, all kept: the cost of the selects
    hash_full   a cheap per-element hash in the tile's layout: the selects + a few integer ops
    contiguous  the first version: one call per 8 consecutive columns of a row, joined and reshaped into
                the tile, which Triton moves between threads through shared memory

Not a correctness test: the variants other than ours do not draw the kernels' dropout mask.

    python scripts/dropout_cost.py [--seqlen 4096] [--variants nodrop,ours,...]   # GPU timings
    python scripts/dropout_cost.py --inspect     # no GPU: layout conversions and spills of each variant

`--inspect` compiles each kernel with dropout for sm_90 (as scripts/compile_kernels.py does) and counts the
layout conversions (`ttg.convert_layout`) in its Triton GPU IR, then runs ptxas -v for registers and spills.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ["nodrop", "ours", "ours0", "allkeep", "hash_full", "contiguous"]


def variant_functions() -> dict:
    from kernels.flash_fwd import dropout_bits

    @triton.jit
    def ours0(seed, bh, rows, start_n, BLOCK_N: tl.constexpr):
        return dropout_bits(seed, bh, rows, start_n, BLOCK_N, 0)

    @triton.jit
    def allkeep(seed, bh, rows, start_n, BLOCK_N: tl.constexpr):
        cols = start_n + tl.arange(0, BLOCK_N)
        return ((rows[:, None] + cols[None, :]) * 0).to(tl.uint16)  # 0 is below every bound: kept

    @triton.jit
    def hash_full(seed, bh, rows, start_n, BLOCK_N: tl.constexpr):
        cols = start_n + tl.arange(0, BLOCK_N)
        x = (
            rows[:, None].to(tl.uint32) * 0x9E3779B1
            + cols[None, :].to(tl.uint32) * 0x85EBCA77
            + bh.to(tl.uint32)
        )
        x = (x ^ (x >> 15)) * 0x2C1B3C6D
        return (x >> 16).to(tl.uint16)

    @triton.jit
    def contiguous(seed, bh, rows, start_n, BLOCK_N: tl.constexpr):
        groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)
        c0 = groups[None, :] + rows[:, None] * 0
        c1 = rows[:, None] + groups[None, :] * 0
        c2 = c0 * 0 + bh
        r0, r1, r2, r3 = tl.philox(
            seed, c0.to(tl.uint32), c1.to(tl.uint32), c2.to(tl.uint32), c2.to(tl.uint32) * 0, 7
        )
        lo = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
        hi = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
        return tl.reshape(tl.join(lo, hi), (rows.shape[0], BLOCK_N)).to(tl.uint16)

    return dict(ours0=ours0, allkeep=allkeep, hash_full=hash_full, contiguous=contiguous)


def measure(variant: str, n: int) -> dict:
    import torch

    import kernels.flash_bwd
    import kernels.flash_fwd
    from kernels import flash_attn_func

    fn = variant_functions().get(variant)
    if fn is not None:
        kernels.flash_fwd.dropout_bits = fn
        kernels.flash_bwd.dropout_bits = fn
    p = 0.0 if variant == "nodrop" else 0.1
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(16, n, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    do = torch.randn_like(q)

    def fwd_bwd():
        flash_attn_func(q, k, v, dropout_p=p).backward(do)

    fwd = triton.testing.do_bench(lambda: flash_attn_func(q, k, v, dropout_p=p), warmup=50, rep=300)
    total = triton.testing.do_bench(fwd_bwd, warmup=50, rep=300, grad_to_none=[q, k, v])
    return dict(variant=variant, seqlen=n, fwd_ms=fwd, fwd_bwd_ms=total)


def inspect(variants: list[str]) -> None:
    """Per variant and kernel: layout conversions in the TTGIR, registers and spill bytes from ptxas."""
    import re
    import tempfile

    from compile_kernels import compile_kernel, first_configs

    import kernels.flash_bwd
    import kernels.flash_fwd

    original = kernels.flash_fwd.dropout_bits
    flags = dict(IS_CAUSAL=False, DROPOUT_MODE=1, IS_VARLEN=False)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    for variant in variants:
        fn_bits = variant_functions().get(variant, original)
        kernels.flash_fwd.dropout_bits = kernels.flash_bwd.dropout_bits = fn_bits
        for name, (fn, tiles, warps, stages) in first_configs(dropout=True).items():
            k = compile_kernel(fn, {**flags, **tiles}, 90, warps, stages)
            converts = k.asm["ttgir"].count("ttg.convert_layout")
            usage = "ptxas-blackwell not found"
            if ptxas.exists():
                with tempfile.TemporaryDirectory() as d:
                    Path(d, "k.ptx").write_text(k.asm["ptx"])
                    cmd = [str(ptxas), "-arch=sm_90a", "-v", "k.ptx", "-o", "k.cubin"]
                    log = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
                usage = ", ".join(
                    re.findall(r"Used \d+ registers|\d+ bytes spill stores", log.stdout + log.stderr)
                )
            print(f"{variant:10s} {name:20s} convert_layout x{converts:<3d} {usage}", flush=True)
        kernels.flash_fwd.dropout_bits = kernels.flash_bwd.dropout_bits = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--inspect", action="store_true", help="compile for sm_90 and count, no GPU needed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--inspect-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inspect_child:
        inspect([args.inspect_child])
        return
    if args.inspect:  # one process per variant: Triton resolves dropout_bits once per process
        for variant in args.variants.split(","):
            if variant != "nodrop":
                r = subprocess.run(
                    [sys.executable, __file__, "--inspect-child", variant], capture_output=True, text=True
                )
                print(r.stdout.strip() or r.stderr[-2000:], flush=True)
        return
    if args.child:
        print(json.dumps(measure(args.child, args.seqlen)), flush=True)
        return
    env = dict(os.environ, FLASHREPRO_AUTOTUNE="0")
    for variant in args.variants.split(","):
        t0 = time.time()
        cmd = [sys.executable, __file__, "--child", variant, "--seqlen", str(args.seqlen)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        print(r.stdout.strip() or r.stderr[-2000:], f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
