"""Compile every attention kernel for an NVIDIA architecture without a GPU (Triton's bundled ptxas).

Catches errors that only GPU compilation shows (the CPU interpreter runs the same Python but never
lowers it) before a job reaches a cluster. Each kernel is built for the flag combinations below at head
dim 64 with the first autotuning config's tiles, and its cubin size is printed.

    python scripts/compile_kernels.py              # sm_90 (H100 / H200), all 16 flag combinations
    python scripts/compile_kernels.py --arch 80    # A100
    python scripts/compile_kernels.py --quick      # 2 combinations (what the tests run)

Run it without TRITON_INTERPRET=1 (the interpreter replaces the kernels it would compile).
"""

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import flash_bwd, flash_fwd  # noqa: E402

POINTER_TYPES = {
    **dict.fromkeys(["Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"], "*bf16"),
    **dict.fromkeys(["Lse", "Delta", "DLse"], "*fp32"),
    **dict.fromkeys(["CuQ", "CuK", "SparseIdx", "SparseCnt"], "*i32"),
}
SCALAR_TYPES = {"qk_scale": "fp32", "sm_scale": "fp32", "drop_scale": "fp32", "seed": "i64"}


def signature(fn, constexprs: dict) -> dict:
    """Triton signature of `fn`: bf16 q/k/v-like pointers, fp32 lse-like, int32 offsets, scalars."""
    return {
        name: "constexpr" if name in constexprs else POINTER_TYPES.get(name, SCALAR_TYPES.get(name, "i32"))
        for name in fn.arg_names
    }


def compile_kernel(fn, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """Compile `fn` (a @triton.jit function) for sm_<arch>; returns Triton's compiled kernel (`.asm` has
    the "ttgir", "ptx" and "cubin" stages).

    Pointers and strides are declared divisible by 16, as Triton specializes them at a real launch with
    the usual shapes (head dims and head counts that make every stride a multiple of 16); without that the
    loads would not be vectorized and the code would not be what a GPU runs.
    """
    sig = signature(fn, constexprs)
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if sig[name].startswith("*") or name.startswith("stride_")
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def first_configs(dropout: bool = False) -> dict:
    """name -> (jit function, tile constexprs, num_warps, num_stages): each kernel's first autotuning
    config at head dim 64 (what FLASHREPRO_AUTOTUNE=0 runs use), without the flag constexprs. With
    dropout the dK/dV kernel's (queries x keys) tiles need BLOCK_M >= 64 (`flash_bwd._prune_dkdv`)."""
    shape = dict(HEAD_DIM=64, BLOCK_D=64, SPARSE_BLOCK_SIZE=128, SPARSE_MASKED=False, IS_SPARSE=False)
    return {
        "forward": (flash_fwd._fwd_kernel.fn, dict(BLOCK_M=128, BLOCK_N=128, **shape), 8, 2),
        "backward dK/dV": (flash_bwd._bwd_dkdv_kernel.fn, dict(BLOCK_M=32, BLOCK_N=128, **shape), 8, 2)
        if not dropout
        else (flash_bwd._bwd_dkdv_kernel.fn, dict(BLOCK_M=64, BLOCK_N=64, **shape), 4, 2),
        "backward dQ": (
            flash_bwd._bwd_dq_kernel.fn,
            dict(BLOCK_M=128, BLOCK_N=32, HAS_DLSE=True, **shape),
            8,
            2,
        ),
        "backward, one launch": (
            flash_bwd._bwd_short_kernel,
            dict(BLOCK_M=32, BLOCK_N=128, HEAD_DIM=64, BLOCK_D=64, HAS_DLSE=True),
            8,
            1,
        ),
    }


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
