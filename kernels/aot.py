"""Compile the attention kernels for an NVIDIA architecture without a GPU (Triton's bundled ptxas).

The CPU interpreter runs the kernels' Python but never lowers it, so only this catches errors that GPU
compilation shows (scripts/compile_kernels.py), and it gives the IR, PTX and cubin to inspect.

    from kernels.aot import compile_kernel, first_configs
    fn, tiles, warps, stages = first_configs()["forward"]
    flags = {"IS_CAUSAL": False, "DROPOUT_MODE": 0, "IS_VARLEN": False}
    k = compile_kernel(fn, {**flags, **tiles}, 90, warps, stages)
    k.asm["ttgir"], k.asm["ptx"], k.asm["cubin"]
"""

import inspect

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import flash_bwd, flash_fwd

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
    the "ttgir", "ptx" and "cubin" stages). Constexprs not given take their defaults (as at a launch).

    Pointers and strides are declared divisible by 16, as Triton specializes them at a real launch with
    the usual shapes (head dims and head counts that make every stride a multiple of 16); without that the
    loads would not be vectorized and the code would not be what a GPU runs.
    """
    defaults = {
        name: p.default
        for name, p in inspect.signature(fn.fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    constexprs = {**defaults, **constexprs}
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
