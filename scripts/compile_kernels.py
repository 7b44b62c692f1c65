"""Compile every attention kernel for an NVIDIA architecture without a GPU (Triton's bundled ptxas).

Catches errors that only GPU compilation shows (the CPU interpreter runs the same Python but never
lowers it) before a job reaches a cluster. Each kernel is built (`kernels/aot.py`) for the flag
combinations below at head dim 64 with the first autotuning config's tiles, and its cubin size is printed.

    python scripts/compile_kernels.py              # sm_90 (H100 / H200), all 16 flag combinations
    python scripts/compile_kernels.py --arch 80    # A100
    python scripts/compile_kernels.py --quick      # 2 combinations (what the tests run)

Run it without TRITON_INTERPRET=1 (the interpreter replaces the kernels it would compile).
"""

import argparse
import itertools
import os
import sys

from kernels.aot import compile_kernel, first_configs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = Hopper)")
    ap.add_argument("--quick", action="store_true", help="two flag combinations instead of sixteen")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")

    # DROPOUT_MODE 0 is no dropout; 1, 2, 3 are the comparison modes of flash_fwd.dropout_params.
    combos = list(itertools.product([False, True], [0, 1, 2, 3], [False, True]))
    if args.quick:
        combos = [(False, 0, False), (True, 1, True)]
    for causal, dropout, varlen in combos:
        flags = dict(IS_CAUSAL=causal, DROPOUT_MODE=dropout, IS_VARLEN=varlen)
        for name, (fn, tiles, warps, stages) in first_configs(dropout > 0).items():
            size = len(compile_kernel(fn, {**flags, **tiles}, args.arch, warps, stages).asm["cubin"])
            print(f"sm_{args.arch} {name:22s} causal={causal!s:5} dropout_mode={dropout} varlen={varlen!s:5} "
                  f"cubin {size:,} bytes", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
