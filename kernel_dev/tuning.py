"""Our kernels under an experiment's own autotuners: extra tiles, another timer, other constexprs.

Each autotuner is new and wraps the kernel's JIT function, so the kernels' own autotuners (what
`flash_attn_func` launches) are neither changed nor read. `fwd_bwd` runs one forward and backward
through `kernels.attention`'s launchers with them.
"""

import triton

from kernels import attention, flash_bwd, flash_fwd
from kernels.masks import block_sparse_lists

KERNELS = {"fwd": flash_fwd._fwd_kernel, "dkdv": flash_bwd._bwd_dkdv_kernel, "dq": flash_bwd._bwd_dq_kernel}


def config_name(c) -> str:
    """A config's tile as '64x64 w4 s3' (with ' r168' when it caps registers)."""
    k = c.kwargs
    cap = f" r{c.maxnreg}" if c.maxnreg else ""
    return f"{k['BLOCK_M']}x{k['BLOCK_N']} w{c.num_warps} s{c.num_stages}{cap}"


def autotuners(extra: dict | None = None, constexprs: dict | None = None, do_bench=None) -> dict:
    """name ("fwd", "dkdv", "dq") -> a new autotuner over that kernel's JIT function.

    Its configs are the kernel's own plus extra[name], tiles (BLOCK_M, BLOCK_N, num_warps, num_stages,
    maxnreg); every config also sets `constexprs` (e.g. DROPOUT_WORDS). Key and pruning are the kernel's;
    do_bench: the timer of each config (default the kernels' CUDA-graph timer).
    """
    extra, constexprs = extra or {}, constexprs or {}
    tuners = {}
    for name, base in KERNELS.items():
        configs = [
            triton.Config(
                {**c.kwargs, **constexprs}, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg
            )
            for c in base.configs
        ]
        configs += [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **constexprs}, num_warps=w, num_stages=s, maxnreg=r)
            for bm, bn, w, s, r in extra.get(name, [])
        ]
        tuners[name] = triton.autotune(
            configs=configs,
            key=base.keys,
            prune_configs_by={"early_config_prune": base.early_config_prune},
            do_bench=do_bench or flash_fwd.bench_config,
        )(base.fn)
    return tuners


def tile_times(tuner) -> dict:
    """`config_name` -> median time (ms) of every config the autotuner timed at its last tuning."""
    return {config_name(c): t[0] for c, t in tuner.configs_timings.items()}


def fwd_bwd(tuners: dict, q, k, v, dout, dropout_p: float = 0.0, block_mask=None, seed: int = 1234):
    """(out, dq, dk, dv) of one non-causal forward and backward of (batch, seqlen, heads, dim) q, k, v with
    `tuners`' kernels (block-sparse under block_mask), through the launchers `flash_attn_func` uses."""
    n_q, n_k, scale = q.shape[1], k.shape[1], q.shape[-1] ** -0.5
    q2k_idx = q2k_cnt = k2q_idx = k2q_cnt = None
    if block_mask is not None:
        q2k_idx, q2k_cnt, k2q_idx, k2q_cnt = block_sparse_lists(block_mask)
    out, lse = attention.flash_fwd(
        q, k, v, None, None, n_q, n_k, q2k_idx, q2k_cnt, scale, False, dropout_p, seed, kernel=tuners["fwd"]
    )
    grads = attention.flash_bwd(
        dout, q, k, v, out, lse, None, None, None, n_q, n_k, q2k_idx, q2k_cnt, k2q_idx, k2q_cnt,
        scale, False, dropout_p, seed, dq_kernel=tuners["dq"], dkdv_kernel=tuners["dkdv"],
    )  # fmt: skip
    return (out, *grads)
