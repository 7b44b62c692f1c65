"""Public FlashAttention API: dense, variable-length and block-sparse exact attention.

Each function checks its inputs (raising ValueError that names the argument before any launch),
then runs the Triton kernels of `kernels.flash_fwd` / `kernels.flash_bwd` through `_attention`:
inside `torch.compile` as two `torch.library` custom ops, `flashrepro::fwd` and `flashrepro::bwd`,
which the compiler treats as opaque; in eager mode through a plain `torch.autograd.Function` with the
same forward and backward, which skips the custom-op dispatch (kernel_dev/NOTES.md, session 10).

Dropout masks come from Philox counters keyed by a seed drawn from torch's default (CPU) generator,
so `torch.manual_seed(s)` makes the output and the gradients reproducible; the backward pass
regenerates exactly the forward's mask from the saved seed.
"""

from __future__ import annotations

import math

import torch
import triton

from kernels.flash_bwd import (
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _bwd_short_kernel,
    short_bwd_tiles,
)
from kernels.flash_fwd import LOG2E, SPARSE_BLOCK, _fwd_kernel, dropout_params, interpreting, seqlen_bucket
from kernels.masks import block_sparse_lists

HEAD_DIMS = (16, 32, 64, 96, 128, 256)
GPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(
            f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.device.type == "cuda":
        if q.dtype not in GPU_DTYPES:
            raise ValueError(
                f"q/k/v dtype {q.dtype} is not supported on CUDA: use torch.float16 or torch.bfloat16"
            )
    elif q.device.type == "cpu":
        if not interpreting():
            raise ValueError(
                "q/k/v are on the CPU: move them to a CUDA device, or set TRITON_INTERPRET=1 "
                "(before importing triton) to run the kernels in Triton's interpreter"
            )
        if q.dtype not in CPU_DTYPES:
            raise ValueError(
                f"q/k/v dtype {q.dtype} is not supported by the CPU interpreter: use torch.float32 or "
                "torch.float16 (bf16 is covered on the GPU)"
            )
    else:
        raise ValueError(f"q/k/v are on an unsupported device {q.device}: use a CUDA device")
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"headdim {d} is not supported: use one of {HEAD_DIMS} (pad the head dimension)")
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same headdim, got {d} and {k.shape[-1]}")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads of k/v ({nheads_k}) (MQA/GQA)")


def _softmax_scale(softmax_scale: float | None, headdim: int) -> float:
    """The scale to use: 1 / sqrt(headdim) by default; a given one must be a finite number > 0 (the
    kernels take each block's row maximum before scaling, which a negative scale would turn into a minimum)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(headdim)
    if not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(
            f"softmax_scale must be a finite number > 0, got {softmax_scale!r}: negate q instead of the scale"
        )
    return float(softmax_scale)


def _check_dropout(dropout_p: float) -> None:
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must satisfy 0 <= dropout_p < 1, got {dropout_p}")


_checked_cu_seqlens: dict[str, tuple[int, int, int]] = {}


def _check_cu_seqlens(
    name: str, cu: torch.Tensor, total: int, max_seqlen: int, batch: int | None, device
) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32:
        raise ValueError(f"{name} must be a 1-D torch.int32 tensor of length batch + 1")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q/k/v are on {device}: move it to {device}")
    if cu.numel() < 2:
        raise ValueError(f"{name} must have length batch + 1 >= 2, got {cu.numel()}")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {batch + 1} and {cu.numel()}"
        )
    if torch.compiler.is_compiling():
        return  # value checks need a device sync; inside torch.compile they are left out
    # The same cu_seqlens tensor is usually passed to every layer: check its values once per version.
    key = (cu.data_ptr(), cu._version, total)
    if _checked_cu_seqlens.get(name) == key:
        return
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    lengths = [b - a for a, b in zip(vals[:-1], vals[1:], strict=True)]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] = {vals[-1]} must equal the number of packed tokens ({total})")
    if max(lengths) > max_seqlen:
        raise ValueError(
            f"max_seqlen for {name} is {max_seqlen} but the longest sequence has {max(lengths)} tokens"
        )
    _checked_cu_seqlens[name] = key


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------
# Launchers (also usable directly with preallocated outputs, which the tests poison)
# ----------------------------------------------------------------------------------------------


def _strides3(t: torch.Tensor | None, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (B, T, H, D) or packed (T, H, D) tensor."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    if varlen:  # (nheads, total_q)
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)  # (batch, nheads, seqlen_q)


def _sparse_args(idx: torch.Tensor | None, cnt: torch.Tensor | None, q: torch.Tensor):
    if idx is None:
        return q, q, 1, 1, 1  # placeholders: the kernels read them only when IS_SPARSE
    return idx, cnt, idx.shape[0], idx.shape[1], idx.shape[2]


def _sparse_needs_mask(causal: bool, seqlen_q: int, seqlen_k: int) -> bool:
    """Block-sparse tiles skip masking when no tile can cross the causal diagonal or a sequence end."""
    return causal or seqlen_q % SPARSE_BLOCK != 0 or seqlen_k % SPARSE_BLOCK != 0


def flash_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    sparse_idx: torch.Tensor | None,
    sparse_cnt: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    dropout_p: float,
    seed: int,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    *,
    kernel=_fwd_kernel,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Shapes as in `kernels.flash_fwd`; returns (out, lse).

    kernel: the autotuned kernel to launch, `_fwd_kernel` unless a benchmark passes its own autotuner over
    the same JIT function (other tiles, or configs that set the DROPOUT_WORDS constexpr).
    """
    varlen = cu_seqlens_q is not None
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse_shape = (nheads, q.shape[0]) if varlen else (batch, nheads, q.shape[1])
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    cu_q = cu_seqlens_q if varlen else q  # a placeholder: the kernels read it only when IS_VARLEN
    cu_k = cu_seqlens_k if varlen else cu_q
    s_idx, s_cnt, s_heads, s_nq, s_nk = _sparse_args(sparse_idx, sparse_cnt, q)
    mode, bound, drop_scale = dropout_params(dropout_p)

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * nheads)

    kernel[grid](
        q, k, v, out, lse, cu_q, cu_k, s_idx, s_cnt,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *_lse_strides(lse, varlen), s_heads, s_nq, s_nk,
        max_seqlen_q, max_seqlen_k, nheads, nheads // nheads_k, softmax_scale * LOG2E, seed, bound, drop_scale,
        seqlen_bucket(max_seqlen_q), seqlen_bucket(max_seqlen_k),
        IS_CAUSAL=causal, DROPOUT_MODE=mode, IS_VARLEN=varlen, IS_SPARSE=sparse_idx is not None,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), SPARSE_BLOCK_SIZE=SPARSE_BLOCK,
        SPARSE_MASKED=_sparse_needs_mask(causal, max_seqlen_q, max_seqlen_k),
    )  # fmt: skip
    return out, lse


def flash_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    q2k_idx: torch.Tensor | None,
    q2k_cnt: torch.Tensor | None,
    k2q_idx: torch.Tensor | None,
    k2q_cnt: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    dropout_p: float,
    seed: int,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    *,
    dq_kernel=_bwd_dq_kernel,
    dkdv_kernel=_bwd_dkdv_kernel,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels; returns (dq, dk, dv) in q/k/v's shapes and dtype.

    Short key sequences (`kernels.flash_bwd.short_bwd_tiles`) take the one-launch `_bwd_short_kernel`
    unless block-sparse; the rest take `_bwd_dq_kernel` (which also stores D) and then `_bwd_dkdv_kernel`,
    or the autotuners passed as dq_kernel and dkdv_kernel (as `flash_fwd`'s kernel).
    """
    varlen = cu_seqlens_q is not None
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    dout = _last_dim_contiguous(dout)
    if dlse is not None and dlse.stride() != lse.stride():
        # The kernels read dlse with lse's strides; e.g. the gradient of lse.sum() arrives expanded.
        dlse = torch.empty_like(lse).copy_(dlse)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    block_d = triton.next_power_of_2(d)
    cu_q = cu_seqlens_q if varlen else q  # a placeholder: the kernels read it only when IS_VARLEN
    cu_k = cu_seqlens_k if varlen else cu_q
    mode, bound, drop_scale = dropout_params(dropout_p)

    tiles = None if q2k_idx is not None else short_bwd_tiles(d, max_seqlen_k)
    if tiles is not None:
        block_m, block_n, num_warps = tiles
        _bwd_short_kernel[(batch * nheads_k,)](
            q, k, v, out, dout, lse, dlse if dlse is not None else lse, dq, dk, dv, cu_q, cu_k,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
            *_strides3(dout, varlen), *_strides3(dq, varlen), *_strides3(dk, varlen), *_strides3(dv, varlen),
            *_lse_strides(lse, varlen), max_seqlen_q, max_seqlen_k, nheads_k, nheads // nheads_k,
            softmax_scale * LOG2E, softmax_scale, seed, bound, drop_scale,
            IS_CAUSAL=causal, DROPOUT_MODE=mode, IS_VARLEN=varlen, HAS_DLSE=dlse is not None,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
        return dq, dk, dv

    delta = torch.empty_like(lse)  # D = rowsum(dO * O) - dlse: written by the dQ kernel, read by dK/dV
    common = dict(
        IS_CAUSAL=causal, DROPOUT_MODE=mode, IS_VARLEN=varlen, IS_SPARSE=q2k_idx is not None,
        HEAD_DIM=d, BLOCK_D=block_d, SPARSE_BLOCK_SIZE=SPARSE_BLOCK,
        SPARSE_MASKED=_sparse_needs_mask(causal, max_seqlen_q, max_seqlen_k),
    )  # fmt: skip
    buckets = (seqlen_bucket(max_seqlen_q), seqlen_bucket(max_seqlen_k))

    s_idx, s_cnt, s_heads, s_nq, s_nk = _sparse_args(q2k_idx, q2k_cnt, q)
    dq_kernel[lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * nheads)](
        q, k, v, out, dout, lse, dlse if dlse is not None else lse, delta, dq, cu_q, cu_k, s_idx, s_cnt,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *_strides3(dout, varlen), *_strides3(dq, varlen), *_lse_strides(lse, varlen), s_heads, s_nq, s_nk,
        max_seqlen_q, max_seqlen_k, nheads, nheads // nheads_k, softmax_scale * LOG2E, softmax_scale,
        seed, bound, drop_scale, *buckets, HAS_DLSE=dlse is not None, **common,
    )  # fmt: skip
    s_idx, s_cnt, s_heads, s_nk, s_nq = _sparse_args(k2q_idx, k2q_cnt, q)
    dkdv_kernel[lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), batch * nheads_k)](
        q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, s_idx, s_cnt,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(dout, varlen),
        *_strides3(dk, varlen), *_strides3(dv, varlen), *_lse_strides(lse, varlen), s_heads, s_nk, s_nq,
        max_seqlen_q, max_seqlen_k, nheads_k, nheads // nheads_k, softmax_scale * LOG2E, softmax_scale,
        seed, bound, drop_scale, *buckets, **common,
    )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd
# ----------------------------------------------------------------------------------------------


def draw_seed() -> int:
    """The Philox seed of a dropout call, drawn from torch's default CPU generator."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    q2k_idx: torch.Tensor | None,
    q2k_cnt: torch.Tensor | None,
    k2q_idx: torch.Tensor | None,
    k2q_cnt: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, rng): rng is the (1,) int64 CPU tensor holding the dropout seed the backward reuses."""
    seed = draw_seed() if dropout_p > 0 else 0
    out, lse = flash_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q2k_idx, q2k_cnt,
        softmax_scale, causal, dropout_p, seed,
    )  # fmt: skip
    return out, lse, torch.tensor([seed], dtype=torch.int64)


def _bwd_impl(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    rng: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    q2k_idx: torch.Tensor | None,
    q2k_cnt: torch.Tensor | None,
    k2q_idx: torch.Tensor | None,
    k2q_cnt: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the forward `_fwd_impl` ran with the same arguments (and the seed in rng)."""
    return flash_bwd(
        dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        q2k_idx, q2k_cnt, k2q_idx, k2q_cnt, softmax_scale, causal, dropout_p, int(rng.item()),
    )  # fmt: skip


_fwd_op = torch.library.custom_op("flashrepro::fwd", _fwd_impl, mutates_args=())
_bwd_op = torch.library.custom_op("flashrepro::bwd", _bwd_impl, mutates_args=())


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q2k_idx, q2k_cnt, k2q_idx, k2q_cnt,
      softmax_scale, causal, dropout_p):  # fmt: skip
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse, torch.empty(1, dtype=torch.int64)


@_bwd_op.register_fake
def _(dout, dlse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_FWD_ARGS = (
    "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
    "q2k_idx", "q2k_cnt", "k2q_idx", "k2q_cnt", "softmax_scale", "causal", "dropout_p",
)  # fmt: skip


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs, strict=True))
    out, lse, rng = output
    ctx.save_for_backward(
        args["q"], args["k"], args["v"], out, lse, rng, args["cu_seqlens_q"], args["cu_seqlens_k"],
        args["q2k_idx"], args["q2k_cnt"], args["k2q_idx"], args["k2q_cnt"],
    )  # fmt: skip
    ctx.scalars = (
        args["max_seqlen_q"],
        args["max_seqlen_k"],
        args["softmax_scale"],
        args["causal"],
        args["dropout_p"],
    )
    ctx.mark_non_differentiable(rng)
    # An unused lse (the usual case) arrives as None instead of a tensor of zeros: no fill kernel, and
    # the dQ kernel skips reading dlse (HAS_DLSE).
    ctx.set_materialize_grads(False)


def _grads(bwd, ctx, dout, dlse) -> tuple:
    """The gradients of the 14 forward arguments (None for all but q, k, v), computed by bwd."""
    q, k, v, out, lse, rng, cu_q, cu_k, q2k_idx, q2k_cnt, k2q_idx, k2q_cnt = ctx.saved_tensors
    max_q, max_k, scale, causal, dropout_p = ctx.scalars
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = bwd(
        dout, dlse, q, k, v, out, lse, rng, cu_q, cu_k, max_q, max_k,
        q2k_idx, q2k_cnt, k2q_idx, k2q_cnt, scale, causal, dropout_p,
    )  # fmt: skip
    return (dq, dk, dv) + (None,) * (len(_FWD_ARGS) - 3)


torch.library.register_autograd(
    "flashrepro::fwd",
    lambda ctx, dout, dlse, _drng: _grads(_bwd_op, ctx, dout, dlse),
    setup_context=_setup_context,
)


class _EagerAttention(torch.autograd.Function):
    """`flashrepro::fwd` and its backward without the custom-op dispatch, for eager mode."""

    @staticmethod
    def forward(ctx, *args):  # ctx in forward: a separate setup_context would cost a signature bind per call
        output = _fwd_impl(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse, _drng):
        return _grads(_bwd_impl, ctx, dout, dlse)


def _attention(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, rng) of `_fwd_impl(*args)`, differentiable in q, k, v (and through lse).

    Under `torch.compile` this is the opaque custom op; in eager mode the same computation as an
    `autograd.Function`, which costs 0.3-0.5 ms less CPU per fwd+bwd (kernel_dev/NOTES.md, session 10).
    """
    if torch.compiler.is_compiling():
        return _fwd_op(*args)
    return _EagerAttention.apply(*args)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
    deterministic: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention softmax(q k^T * softmax_scale) v without materializing the score matrix.

    Args:
        q: (batch, seqlen_q, nheads, headdim), float16 or bfloat16 on CUDA (float32/float16 on the CPU
            under TRITON_INTERPRET=1). headdim in {16, 32, 64, 96, 128, 256}.
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads must be a multiple of nheads_k (MQA/GQA).
            Any strides with a contiguous last dimension are used in place (e.g. views of one packed
            qkv tensor); other inputs are copied.
        dropout_p: dropout probability on the attention probabilities (0 <= p < 1). Pass 0 at eval.
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: causal mask aligned to the bottom-right corner: query i sees key j iff
            j <= i + seqlen_k - seqlen_q (as flash-attn 2). Rows that see no key output 0.
        return_lse: also return the log-sum-exp of each row's scaled scores.
        deterministic: the backward pass is always deterministic (no atomics); kept for flash-attn
            compatibility.

    Returns:
        out: (batch, seqlen_q, nheads, headdim), q's dtype, contiguous.
        lse (if return_lse): (batch, nheads, seqlen_q) float32, natural log; -inf for empty rows.
            It is differentiable.
    """
    _check_qkv(q, k, v, 4, "(batch, seqlen, nheads, headdim)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k/v must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    _check_dropout(dropout_p)
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse, _ = _attention(
        q, k, v, None, None, q.shape[1], k.shape[1], None, None, None, None, scale, causal, dropout_p
    )
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
    deterministic: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a batch of sequences of different lengths, packed without padding.

    Args:
        q: (total_q, nheads, headdim): sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]].
        k, v: (total_k, nheads_k, headdim), likewise with cu_seqlens_k.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 cumulative lengths starting at 0, on q's device.
        max_seqlen_q, max_seqlen_k: the longest sequence length in each (an upper bound is fine).
        Other arguments as in `flash_attn_func`; causal alignment is per sequence.

    Returns:
        out: (total_q, nheads, headdim); lse (if return_lse): (nheads, total_q) float32.

    Use `kernels.unpad_input` / `kernels.pad_input` to go from a (batch, seqlen) padding mask to this
    packed form and back.
    """
    _check_qkv(q, k, v, 3, "(total_tokens, nheads, headdim)")
    _check_dropout(dropout_p)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, None, q.device)
    _check_cu_seqlens(
        "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, cu_seqlens_q.numel() - 1, q.device
    )
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse, _ = _attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
        None, None, None, None, scale, causal, dropout_p,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def block_sparse_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse FlashAttention (the paper's Algorithm 5): attention restricted to nonzero blocks.

    Args:
        q, k, v: as in `flash_attn_func`.
        block_mask: bool tensor (nheads or 1, ceil(seqlen_q / 128), ceil(seqlen_k / 128)); entry
            [h, i, j] lets queries 128*i .. 128*i+127 attend keys 128*j .. 128*j+127 (block size
            `kernels.SPARSE_BLOCK` = 128). Zero blocks are skipped in the forward and backward passes, so
            the cost scales with the number of nonzero blocks. Query rows with no nonzero block output 0.
            See `butterfly_block_mask` and `local_global_block_mask`.
        causal: additionally apply the bottom-right causal mask inside the nonzero blocks.

    Returns:
        out (batch, seqlen_q, nheads, headdim); lse (batch, nheads, seqlen_q) if return_lse.
    """
    _check_qkv(q, k, v, 4, "(batch, seqlen, nheads, headdim)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k/v must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    _check_dropout(dropout_p)
    nheads = q.shape[2]
    expected = (triton.cdiv(q.shape[1], SPARSE_BLOCK), triton.cdiv(k.shape[1], SPARSE_BLOCK))
    if (
        not isinstance(block_mask, torch.Tensor)
        or block_mask.dim() != 3
        or block_mask.shape[0] not in (1, nheads)
        or tuple(block_mask.shape[1:]) != expected
    ):
        got = tuple(block_mask.shape) if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
        raise ValueError(
            f"block_mask must have shape (nheads={nheads} or 1, {expected[0]}, {expected[1]}) "
            f"= (heads, ceil(seqlen_q/{SPARSE_BLOCK}), ceil(seqlen_k/{SPARSE_BLOCK})), got {got}"
        )
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
    if block_mask.device != q.device:
        raise ValueError(
            f"block_mask is on {block_mask.device} but q is on {q.device}: move it to {q.device}"
        )
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    q2k_idx, q2k_cnt, k2q_idx, k2q_cnt = block_sparse_lists(block_mask)
    out, lse, _ = _attention(
        q,
        k,
        v,
        None,
        None,
        q.shape[1],
        k.shape[1],
        q2k_idx,
        q2k_cnt,
        k2q_idx,
        k2q_cnt,
        scale,
        causal,
        dropout_p,
    )
    return (out, lse) if return_lse else out
