"""FlashAttention backward pass in Triton: recompute the attention probabilities from the saved LSE.

With P = exp(S - lse) recomputed block by block (S = scale * q k^T), Z the dropout keep-mask and
r = 1 / (1 - dropout_p):
    dV = (P * Z * r)^T dO
    dP = (dO V^T) * Z * r
    dS = P * (dP - D),   D = rowsum(dO * O) - dlse     (dlse: gradient flowing into the returned lse)
    dQ = scale * dS K,   dK = scale * dS^T Q
Two launches, none with atomics, so gradients are bitwise deterministic:
  1. `_bwd_dq_kernel`: one program per query block; it computes D of its rows (and stores it), then
     walks the key blocks like the forward pass.
  2. `_bwd_dkdv_kernel`: one program per key block of one kv head; it walks the query blocks of every
     query head in its GQA group, so dK and dV are sums formed in registers in a fixed order.
Short key sequences (max_seqlen_k <= SHORT_SEQLEN_K at head dim <= 64, half that at head dim 96/128,
never at 256; not block-sparse) take one launch instead, which matters when launches dominate:
  3. `_bwd_short_kernel`: one program per (batch, kv head) holds the single key block; it computes D
     inline, and dQ of each query block is complete after that block, so it also needs no atomics.
Layouts are those of `kernels.flash_fwd` (dq/dk/dv share q/k/v's layout; D shares lse's).
"""

import torch
import triton
import triton.language as tl

from kernels.flash_fwd import (
    NO_SPECIALIZE,
    autotuning,
    bench_config,
    block_start,
    dropout_keep,
    dropout_numbers,
    dropout_select,
    dropout_select2,
    dropout_words,
    interpreting,
    loop_block,
    sequence_start,
)


@triton.jit
def _lse_base2(lse):
    """Saved lse (natural log) in base 2, for exp2; rows that saw no key (lse = -inf, P = 0) get +inf."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _row_delta(o, do, DLse, l_ptrs, m_ok, HAS_DLSE: tl.constexpr):
    """D = rowsum(dO * O) - dlse (float32) of a block of query rows; o, do: (rows, BLOCK_D)."""
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + l_ptrs, mask=m_ok, other=0.0)
    return delta


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, stride_lt,
    start_n, offs_n, offs_d, lo, hi, seqlen_q, causal_shift, qk_scale, seed, bh, drop_bound, keep_prob,
    sparse_idx, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPARSE: tl.constexpr, DROPOUT_WORDS: tl.constexpr = dropout_words,
):  # fmt: skip
    """Add the contributions of query rows lo .. hi to one key block's dK, dV.

    Dropout is folded in without scaling each element: this adds (P * Z)^T dO to dv and
    (P * (Z * dP - keep_prob * D))^T Q to dk, and the caller multiplies both by 1 / keep_prob.
    Without dropout the score tiles are (keys x queries), so dV += P^T dO takes P from registers as it
    is (6% faster). With dropout they are (queries x keys) like the forward pass, where the dropout mask
    is made in the threads that use it (`dropout_numbers`), and P^T, dS^T go to the MMA through shared memory.
    SPARSE: lo .. hi count positions in the concatenation of the query blocks listed at `sparse_idx`.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    next_m = block_start(sparse_idx, lo, SPARSE)
    if DROPOUT_MODE:
        # Philox words of the first query block; each iteration makes the next block's (`dropout_words`).
        w0, w1, w2, w3 = DROPOUT_WORDS(seed, bh, next_m + offs_m0, start_n, BLOCK_N)
    for it in tl.range(lo, hi, BLOCK_M):
        start_m, next_m = loop_block(sparse_idx, it, hi, next_m, BLOCK_M, SPARSE)
        offs_m = start_m + offs_m0
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]
        if MASKED:
            m_ok = offs_m < seqlen_q
            q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            # Rows past the end load q = dO = 0, so they add nothing to dK = dS^T Q and dV = P^T dO; lse = 0
            # keeps their P finite (1 for a zero score), so 0 * P stays 0.
            lse = tl.load(lse_base + offs_m * stride_lt, mask=m_ok, other=0.0)
            delta = tl.load(delta_base + offs_m * stride_lt, mask=m_ok, other=0.0)
        else:
            if BLOCK_D != HEAD_DIM:
                q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m * stride_lt)
            delta = tl.load(delta_base + offs_m * stride_lt)
        lse2 = _lse_base2(lse)
        if DROPOUT_MODE:
            # (queries x keys) tiles, as in the forward: the mask is made in the threads that use it.
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
            if MASKED:
                if IS_CAUSAL:
                    p = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_shift, p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            # dS = P * (Z * dP - D): P * dP - P * D where kept and -P * D where dropped, both rounded to
            # 16 bits and chosen by the same comparison that zeroes the dropped P for dV.
            p_d = p * (-delta * keep_prob)[:, None]
            p16 = p.to(q.dtype)
            x = dropout_numbers(w0, w1, w2, w3, BLOCK_N)
            pz, ds = dropout_select2(
                x,
                drop_bound,
                p16,
                tl.zeros_like(p16),
                (p * dp + p_d).to(q.dtype),
                p_d.to(q.dtype),
                DROPOUT_MODE,
            )
            dv = tl.dot(tl.trans(pz), do, dv)
            dk = tl.dot(tl.trans(ds), q, dk)
            if it + BLOCK_M < hi:  # while the tensor cores compute dV and dK
                w0, w1, w2, w3 = DROPOUT_WORDS(seed, bh, next_m + offs_m0, start_n, BLOCK_N)
        else:
            # (keys x queries) tiles: dV += P^T dO takes P from registers as it is.
            pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
            if MASKED:
                if IS_CAUSAL:
                    pT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_shift, pT, 0.0)
            dpT = tl.dot(v, tl.trans(do))
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt,
    offs_m, offs_d, lo, hi, seqlen_k, causal_shift, qk_scale, seed, bh, drop_bound,
    sparse_idx, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPARSE: tl.constexpr,
    DROPOUT_WORDS: tl.constexpr = dropout_words,
):  # fmt: skip
    """Add the contributions of keys lo .. hi to one query block's dQ (SPARSE: as in `_fwd_inner`).

    With dropout, `delta` arrives multiplied by keep_prob and this adds (P * (Z * dP - delta)) K; the
    caller multiplies by 1 / keep_prob, so no element is scaled one by one.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    next_n = block_start(sparse_idx, lo, SPARSE)
    if DROPOUT_MODE:
        # Philox words of the first key block; each iteration makes the next block's (`dropout_words`).
        w0, w1, w2, w3 = DROPOUT_WORDS(seed, bh, offs_m, next_n, BLOCK_N)
    for it in tl.range(lo, hi, BLOCK_N):
        start_n, next_n = loop_block(sparse_idx, it, hi, next_n, BLOCK_N, SPARSE)
        cols = start_n + offs_n0
        k_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]
        v_ptrs = v_base + cols[None, :] * stride_vt + offs_d[:, None]
        if MASKED:
            ok = (cols[None, :] < seqlen_k) & d_ok[:, None]
            kT = tl.load(k_ptrs, mask=ok, other=0.0)
            vT = tl.load(v_ptrs, mask=ok, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kT = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            vT = tl.load(v_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            kT = tl.load(k_ptrs)
            vT = tl.load(v_ptrs)
        qk = tl.dot(q, kT)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            allowed = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + causal_shift)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, vT)
        if DROPOUT_MODE:
            # dS = P * (Z * dP - D): P * dP - P * D where kept, -P * D where dropped (16-bit select).
            p_d = p * -delta[:, None]
            x = dropout_numbers(w0, w1, w2, w3, BLOCK_N)
            ds = dropout_select(x, drop_bound, (p * dp + p_d).to(kT.dtype), p_d.to(kT.dtype), DROPOUT_MODE)
        else:
            ds = (p * (dp - delta[:, None])).to(kT.dtype)
        dq = tl.dot(ds, tl.trans(kT), dq)
        if DROPOUT_MODE:
            if it + BLOCK_N < hi:  # while the tensor cores compute dS K
                w0, w1, w2, w3 = DROPOUT_WORDS(seed, bh, offs_m, next_n, BLOCK_N)
    return dq


@triton.jit
def _store_dkdv(dk_base, dv_base, dk, dv, stride_dkt, stride_dvt, offs_n, offs_d, kv_mask):
    """Store one key block's dK and dV (BLOCK_N, BLOCK_D) at rows offs_n of one kv head, in their dtype."""
    dk_ptrs = dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(dk_base.dtype.element_ty), mask=kv_mask)
    dv_ptrs = dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dv_ptrs, dv.to(dv_base.dtype.element_ty), mask=kv_mask)


def _bwd_configs() -> list:
    if interpreting() or not torch.cuda.is_available():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (32, 128, 8, 2),
            (64, 64, 4, 2),
            (64, 128, 8, 2),
            (64, 128, 8, 3),
            (32, 64, 4, 2),
            (64, 64, 8, 3),
            (64, 64, 4, 3),
            (128, 128, 8, 2),
            (128, 64, 8, 2),
            (16, 64, 4, 2),
        ]
    ]


def _prune_bwd(configs, named_args, min_block_m=0, **kwargs):
    """Drop tiles whose shared memory cannot fit at large head dims, and tiles below min_block_m rows."""
    d = named_args["HEAD_DIM"] if "HEAD_DIM" in named_args else kwargs["HEAD_DIM"]
    out = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm < min_block_m:
            continue
        if d > 128 and (bm * bn > 32 * 64 or c.num_stages > 2):
            continue
        if d > 64 and bm * bn > 64 * 128:
            continue
        out.append(c)
    out = out or configs[-1:]
    return out if autotuning() else out[:1]


def _prune_dkdv(configs, named_args, **kwargs):
    """`_prune_bwd`; with dropout ((queries x keys) tiles) also BLOCK_M >= 64, where all four products
    are Hopper wgmma: at 32 x 128 with 8 warps Triton 3.6 computed a wrong dK in that orientation
    (`test_gpu_dropout_backward_every_tile`)."""
    dropout = kwargs.get("DROPOUT_MODE", named_args.get("DROPOUT_MODE"))
    return _prune_bwd(configs, named_args, 64 if dropout and not interpreting() else 0, **kwargs)


_BWD_KEY = ["HEAD_DIM", "IS_CAUSAL", "DROPOUT_MODE", "IS_VARLEN", "IS_SPARSE", "Q_BUCKET", "K_BUCKET"]


@triton.autotune(
    configs=_bwd_configs(),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _prune_dkdv},
    do_bench=bench_config,
)
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, CuQ, CuK, SparseIdx, SparseCnt,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh, stride_lt, sparse_heads, sparse_nk, sparse_nq,
    seqlen_q, seqlen_k, nheads_k, gqa_group, qk_scale, sm_scale, seed, drop_bound, drop_scale,
    Q_BUCKET, K_BUCKET,
    IS_CAUSAL: tl.constexpr, DROPOUT_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, IS_SPARSE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE_BLOCK_SIZE: tl.constexpr, SPARSE_MASKED: tl.constexpr,
    DROPOUT_WORDS: tl.constexpr = dropout_words,
):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // nheads_k
    hk = bhk % nheads_k
    q_row, k_row, seqlen_q, seqlen_k = sequence_start(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    b64 = b.to(tl.int64)
    q_off = b64 * stride_qb + q_row * stride_qt
    do_off = b64 * stride_dob + q_row * stride_dot
    l_off = b64 * stride_lb + q_row * stride_lt
    k_off = b64 * stride_kb + k_row * stride_kt
    v_off = b64 * stride_vb + k_row * stride_vt
    dk_off = b64 * stride_dkb + k_row * stride_dkt
    dv_off = b64 * stride_dvb + k_row * stride_dvt
    if start_n >= seqlen_k:
        return
    causal_shift = seqlen_k - seqlen_q
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(
        K + k_off + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    v = tl.load(
        V + v_off + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    keep_prob = 1.0 / drop_scale

    # Query rows [lo, mid) cross the causal diagonal; [mid, full_end) need no mask; the rest is ragged.
    if IS_CAUSAL:
        lo = tl.maximum(start_n - causal_shift, 0) // BLOCK_M * BLOCK_M
        mid = tl.maximum((start_n + BLOCK_N - 1 - causal_shift + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo)
    else:
        lo = 0
        mid = 0
    full_end = seqlen_q // BLOCK_M * BLOCK_M
    q_ceil = (seqlen_q + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    for g in range(0, gqa_group):
        h = hk * gqa_group + g
        q_base = Q + q_off + h * stride_qh
        do_base = DO + do_off + h * stride_doh
        lse_base = Lse + l_off + h * stride_lh
        delta_base = Delta + l_off + h * stride_lh
        bh = b * nheads_k * gqa_group + h
        if IS_SPARSE:
            col = (h % sparse_heads) * sparse_nk + start_n // SPARSE_BLOCK_SIZE
            count = tl.load(SparseCnt + col)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, stride_lt,
                start_n, offs_n, offs_d, 0, count * SPARSE_BLOCK_SIZE, seqlen_q, causal_shift, qk_scale, seed, bh,
                drop_bound, keep_prob, SparseIdx + col * sparse_nq,
                SPARSE_MASKED, IS_CAUSAL, DROPOUT_MODE, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, True,
                DROPOUT_WORDS,
            )  # fmt: skip
        else:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, stride_lt,
                start_n, offs_n, offs_d, lo, tl.minimum(mid, q_ceil), seqlen_q, causal_shift, qk_scale, seed, bh,
                drop_bound, keep_prob, Q, True, IS_CAUSAL, DROPOUT_MODE, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, False,
                DROPOUT_WORDS,
            )  # fmt: skip
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, stride_lt,
                start_n, offs_n, offs_d, mid, full_end, seqlen_q, causal_shift, qk_scale, seed, bh,
                drop_bound, keep_prob, Q, False, IS_CAUSAL, DROPOUT_MODE, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, False,
                DROPOUT_WORDS,
            )  # fmt: skip
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, stride_lt,
                start_n, offs_n, offs_d, tl.maximum(mid, full_end), seqlen_q, seqlen_q, causal_shift, qk_scale, seed,
                bh, drop_bound, keep_prob, Q, True, IS_CAUSAL, DROPOUT_MODE, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, False,
                DROPOUT_WORDS,
            )  # fmt: skip
    _store_dkdv(
        DK + dk_off + hk * stride_dkh, DV + dv_off + hk * stride_dvh, dk * (sm_scale * drop_scale),
        dv * drop_scale, stride_dkt, stride_dvt, offs_n, offs_d, kv_mask,
    )  # fmt: skip


def _dq_configs() -> list:
    if interpreting() or not torch.cuda.is_available():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 32, 8, 2),
            (128, 32, 8, 3),
            (128, 32, 4, 3),
            (128, 64, 8, 2),
            (128, 64, 8, 3),
            (128, 64, 4, 3),
            (64, 64, 4, 2),
            (64, 32, 4, 2),
            (128, 128, 8, 2),
            (64, 128, 8, 2),
            (32, 64, 4, 2),
        ]
    ]


@triton.autotune(
    configs=_dq_configs(),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _prune_bwd},
    do_bench=bench_config,
)
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_dq_kernel(
    Q, K, V, Out, DO, Lse, DLse, Delta, DQ, CuQ, CuK, SparseIdx, SparseCnt,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_lt, sparse_heads, sparse_nq, sparse_nk,
    seqlen_q, seqlen_k, nheads, gqa_group, qk_scale, sm_scale, seed, drop_bound, drop_scale,
    Q_BUCKET, K_BUCKET,
    IS_CAUSAL: tl.constexpr, DROPOUT_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, IS_SPARSE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE_BLOCK_SIZE: tl.constexpr, SPARSE_MASKED: tl.constexpr, HAS_DLSE: tl.constexpr,
    DROPOUT_WORDS: tl.constexpr = dropout_words,
):  # fmt: skip
    """dQ of one query block; first D = rowsum(dO * O) - dlse of its rows, stored to Delta for dK/dV."""
    num_m = tl.num_programs(0)
    start_m = (num_m - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // gqa_group
    q_row, k_row, seqlen_q, seqlen_k = sequence_start(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    b64 = b.to(tl.int64)
    q_off = b64 * stride_qb + q_row * stride_qt
    o_off = b64 * stride_ob + q_row * stride_ot
    do_off = b64 * stride_dob + q_row * stride_dot
    dq_off = b64 * stride_dqb + q_row * stride_dqt
    l_off = b64 * stride_lb + q_row * stride_lt
    k_off = b64 * stride_kb + k_row * stride_kt
    v_off = b64 * stride_vb + k_row * stride_vt
    if start_m >= seqlen_q:
        return
    causal_shift = seqlen_k - seqlen_q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    qd_mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        Q + q_off + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0
    )
    do = tl.load(
        DO + do_off + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0
    )
    l_ptrs = l_off + h * stride_lh + offs_m * stride_lt
    lse = tl.load(Lse + l_ptrs, mask=m_ok, other=float("inf"))
    lse2 = _lse_base2(lse)
    o = tl.load(
        Out + o_off + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=qd_mask, other=0.0
    )
    delta = _row_delta(o, do, DLse, l_ptrs, m_ok, HAS_DLSE)
    tl.store(Delta + l_ptrs, delta, mask=m_ok)  # the dK/dV kernel, launched next, reads it
    delta = delta / drop_scale  # times keep_prob: see `_bwd_dq_inner`
    k_base = K + k_off + hk * stride_kh
    v_base = V + v_off + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if IS_SPARSE:
        row = (h % sparse_heads) * sparse_nq + start_m // SPARSE_BLOCK_SIZE
        count = tl.load(SparseCnt + row)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, count * SPARSE_BLOCK_SIZE,
            seqlen_k, causal_shift, qk_scale, seed, bh, drop_bound, SparseIdx + row * sparse_nk,
            SPARSE_MASKED, IS_CAUSAL, DROPOUT_MODE, BLOCK_N, HEAD_DIM, BLOCK_D, True, DROPOUT_WORDS,
        )  # fmt: skip
    else:
        if IS_CAUSAL:
            hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + causal_shift), 0)
            full_hi = tl.minimum(
                (start_m + causal_shift + 1) // BLOCK_N * BLOCK_N, seqlen_k // BLOCK_N * BLOCK_N
            )
            full_hi = tl.maximum(full_hi, 0)
        else:
            hi = seqlen_k
            full_hi = seqlen_k // BLOCK_N * BLOCK_N
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, full_hi,
            seqlen_k, causal_shift, qk_scale, seed, bh, drop_bound, K,
            False, IS_CAUSAL, DROPOUT_MODE, BLOCK_N, HEAD_DIM, BLOCK_D, False, DROPOUT_WORDS,
        )  # fmt: skip
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, full_hi, hi,
            seqlen_k, causal_shift, qk_scale, seed, bh, drop_bound, K,
            True, IS_CAUSAL, DROPOUT_MODE, BLOCK_N, HEAD_DIM, BLOCK_D, False, DROPOUT_WORDS,
        )  # fmt: skip
    dq = dq * (sm_scale * drop_scale)
    tl.store(
        DQ + dq_off + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=qd_mask,
    )


# Longest key sequence whose backward is one launch of `_bwd_short_kernel` (at head dim <= 64). Its
# program keeps K, V, dK and dV of the whole key sequence in registers, [BLOCK_N, BLOCK_D] each, next to
# (keys x BLOCK_M) score tiles, so the limit is set by registers. Compiled for sm_90 (bf16):
#   head dim <= 64, up to 128 keys, BLOCK_M = 32: no spills (8 warps once BLOCK_N * BLOCK_D > 32 * 64;
#     4 warps or BLOCK_M = 64 at 128 x 64 spill).
#   head dim 96/128 (BLOCK_D = 128), up to 64 keys, BLOCK_M = 16, 8 warps: no spills up to 32 keys;
#     at 64 keys 24-88 bytes per thread (most with dropout), kept for the two launches it saves.
#   head dim 256: never (the 3-kernel path).
SHORT_SEQLEN_K = 128


def short_bwd_tiles(head_dim: int, max_seqlen_k: int) -> tuple[int, int, int] | None:
    """(BLOCK_M, BLOCK_N, num_warps) of the one-launch backward, or None when the 3-kernel path serves.

    BLOCK_N is the next power of two >= max_seqlen_k (at least 32, as dropout needs): one block holds every key.
    """
    if head_dim <= 64:
        limit = SHORT_SEQLEN_K
    elif head_dim <= 128:
        limit = SHORT_SEQLEN_K // 2
    else:
        limit = 0
    if max_seqlen_k > limit:
        return None
    block_n = max(triton.next_power_of_2(max_seqlen_k), 32)
    if interpreting():
        return 16, block_n, 4  # small tiles keep the CPU interpreter fast, as in `_bwd_configs`
    block_m = 32 if head_dim <= 64 else 16
    num_warps = 4 if block_n * triton.next_power_of_2(head_dim) <= 32 * 64 else 8  # no spills (above)
    return block_m, block_n, num_warps


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_short_kernel(
    Q, K, V, Out, DO, Lse, DLse, DQ, DK, DV, CuQ, CuK,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh, stride_lt,
    seqlen_q, seqlen_k, nheads_k, gqa_group, qk_scale, sm_scale, seed, drop_bound, drop_scale,
    IS_CAUSAL: tl.constexpr, DROPOUT_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT_WORDS: tl.constexpr = dropout_words,
):  # fmt: skip
    """dQ, dK and dV of one (batch, kv head) whose keys all fit in one block (seqlen_k <= BLOCK_N).

    The whole backward in one launch: K and V of the sequence stay in registers while the program walks
    every query head of the GQA group and every BLOCK_M query rows. Each query block computes its
    D = rowsum(dO * O) - dlse, recomputes P (transposed, keys x queries, as in `_bwd_dkdv_inner`),
    adds its share to dK and dV, and stores its dQ = scale * dS K, which is complete because there is
    no other key block. No atomics: the sums run in a fixed order, so gradients are deterministic.
    Masks as in the other kernels: bottom-right causal, lse = -inf rows get P = 0, and the dropout
    keep-mask of head bh = b * nheads + h at columns 0 .. BLOCK_N, which is the forward's mask bit for bit.
    Grid: (batch * nheads_k,). Layouts as in the module docstring.
    """
    bhk = tl.program_id(0)
    b = bhk // nheads_k
    hk = bhk % nheads_k
    q_row, k_row, seqlen_q, seqlen_k = sequence_start(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    b64 = b.to(tl.int64)
    q_off = b64 * stride_qb + q_row * stride_qt
    o_off = b64 * stride_ob + q_row * stride_ot
    do_off = b64 * stride_dob + q_row * stride_dot
    dq_off = b64 * stride_dqb + q_row * stride_dqt
    l_off = b64 * stride_lb + q_row * stride_lt
    k_off = b64 * stride_kb + k_row * stride_kt
    v_off = b64 * stride_vb + k_row * stride_vt
    dk_off = b64 * stride_dkb + k_row * stride_dkt
    dv_off = b64 * stride_dvb + k_row * stride_dvt
    causal_shift = seqlen_k - seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < seqlen_k
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + k_off + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    v = tl.load(
        V + v_off + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    keep_prob = 1.0 / drop_scale
    for g in range(0, gqa_group):
        h = hk * gqa_group + g
        bh = b * nheads_k * gqa_group + h
        for start_m in range(0, seqlen_q, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < seqlen_q
            md_mask = m_ok[:, None] & d_ok[None, :]
            qT = tl.load(
                Q + q_off + h * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None],
                mask=m_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            do = tl.load(
                DO + do_off + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                mask=md_mask,
                other=0.0,
            )
            o = tl.load(
                Out + o_off + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=md_mask,
                other=0.0,
            )
            l_ptrs = l_off + h * stride_lh + offs_m * stride_lt
            delta = _row_delta(o, do, DLse, l_ptrs, m_ok, HAS_DLSE)
            # Rows past the end get lse = +inf and rows that saw no key have lse = -inf: both get P = 0.
            lse2 = _lse_base2(tl.load(Lse + l_ptrs, mask=m_ok, other=float("inf")))
            pT = tl.math.exp2(tl.dot(k, qT) * qk_scale - lse2[None, :])
            allowed = n_ok[:, None]
            if IS_CAUSAL:
                allowed = allowed & (offs_n[:, None] <= offs_m[None, :] + causal_shift)
            pT = tl.where(allowed, pT, 0.0)
            dpT = tl.dot(v, tl.trans(do))
            # Dropout folded in as in `_bwd_dkdv_inner`: unscaled masks here, 1 / keep_prob at the end.
            if DROPOUT_MODE:
                keepT = tl.trans(
                    dropout_keep(seed, bh, offs_m, 0, drop_bound, BLOCK_N, DROPOUT_MODE, DROPOUT_WORDS)
                )
                dv = tl.dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, dv)
                dpT = tl.where(keepT, dpT, 0.0)
                delta = delta * keep_prob
            else:
                dv = tl.dot(pT.to(do.dtype), do, dv)
            dsT = pT * (dpT - delta[None, :])
            dsT = dsT.to(qT.dtype)
            dk = tl.dot(dsT, tl.trans(qT), dk)
            dq = tl.dot(tl.trans(dsT), k) * (sm_scale * drop_scale)
            tl.store(
                DQ + dq_off + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
                dq.to(DQ.dtype.element_ty),
                mask=md_mask,
            )
    _store_dkdv(
        DK + dk_off + hk * stride_dkh, DV + dv_off + hk * stride_dvh, dk * (sm_scale * drop_scale),
        dv * drop_scale, stride_dkt, stride_dvt, offs_n, offs_d, kv_mask,
    )  # fmt: skip
