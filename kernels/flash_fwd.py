"""FlashAttention forward pass in Triton: tiled exact attention with an online softmax.

One program computes BLOCK_M query rows of one (batch, head): it streams the keys and values in
blocks of BLOCK_N, keeping a running max `m_i`, a running sum `l_i` and an unnormalized output `acc`
in registers, so the (seqlen_q, seqlen_k) score matrix never reaches memory. Scores are kept in base 2
(scaled by softmax_scale * log2(e)) so the exponentials are `exp2`.

Tensor layouts (strides are passed, so views such as q/k/v slices of one packed qkv tensor work):
  dense:  q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim),
          lse (batch, nheads, seqlen_q) float32.
  varlen: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim); sequence b occupies rows
          cu_seqlens[b]:cu_seqlens[b+1]; lse (nheads, total_q) float32.
The head dimension must be contiguous (stride 1).

Key loops are split into blocks that need no mask (fully inside the sequence and below the causal
diagonal) and the few boundary blocks that do. Causal masking is aligned to the bottom-right corner:
query i sees key j when j <= i + seqlen_k - seqlen_q.
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2_C: tl.constexpr = tl.constexpr(0.6931471805599453)
# Block size of block-sparse masks: a mask entry covers SPARSE_BLOCK queries x SPARSE_BLOCK keys.
SPARSE_BLOCK = 128
SPARSE_BLOCK_C: tl.constexpr = tl.constexpr(SPARSE_BLOCK)
# Kernel arguments that stay runtime values: Triton would otherwise compile other variants of a kernel for
# integers equal to 1 or divisible by 16 (a new compile for 1 in 16 dropout seeds).
NO_SPECIALIZE = ["seed", "drop_bound"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """FLASHREPRO_AUTOTUNE=0 skips autotuning: each kernel uses the first config that fits the head dim."""
    return os.environ.get("FLASHREPRO_AUTOTUNE", "1") != "0"


def bench_config(kernel_call, quantiles):
    """Autotuning timer: CUDA-graph replays, so a config's time at small sizes is the kernel's own and not
    the CPU's launch overhead (which made eager timings pick configs at random below ~512 tokens)."""
    return triton.testing.do_bench_cudagraph(kernel_call, quantiles=quantiles)


# Dropout decisions compare 16-bit random numbers, read as float16 bit patterns, with a bound
# (`kernels.attention.dropout_params`). The patterns 0 .. 0x7C00 encode +0 .. +inf in increasing order, so
# one packed float16 comparison (`set.f16x2`) decides two elements at once. DROPOUT_MODE 1 drops a
# number x when bound <= x <= 0x7C00 (dropout_p up to 0.484); mode 2 also drops the 2046 NaN patterns
# (dropout_p up to 0.516); mode 3 keeps exactly the numbers mode 1 would drop (larger dropout_p).
F16_INF: tl.constexpr = tl.constexpr(0x7C00)


def dropout_params(dropout_p: float) -> tuple[int, int, float]:
    """(DROPOUT_MODE, bound, output scale) for the kernels' dropout (see F16_INF).

    The drop count T = round(dropout_p * 65536) of the 65536 16-bit numbers is exact to 2^-17: mode 1
    drops the T numbers bound .. 0x7C00, mode 2 adds the 2046 NaN patterns, mode 3 keeps 65536 - T.
    T = 33791 alone is out of reach and becomes 33790 (dropout_p off by 2^-16 at 0.5156).
    """
    if dropout_p == 0:
        return 0, 0, 1.0
    t = int(round(dropout_p * 65536))
    if t <= 0x7C00:
        mode, bound = 1, 0x7C01 - t
    elif t <= 33791:
        mode, bound = 2, max(33791 - t, 1)
    else:
        mode, bound = 3, t - 33791
    return mode, bound, 1.0 / (1.0 - dropout_p)


def _select_asm(compare: str, n: int) -> str:
    """PTX for n selects under one packed comparison: $i = (x >= bound) ? second_i : first_i, per half.

    Operands: n outputs, then x (2 packed numbers), bound (packed twice), then (first_i, second_i) pairs.
    `lop3` with table 0xD8 is (a & ~m) | (b & m): the mask m is 0xFFFF in the halves that compare true.
    """
    x, bound = f"${n}", f"${n + 1}"
    body = "".join(f"lop3.b32 ${i}, ${n + 2 + 2 * i}, ${n + 3 + 2 * i}, m, 0xD8; " for i in range(n))
    return f"{{ .reg .b32 m; set.{compare}.u32.f16x2 m, {x}, {bound}; {body}}}"


_SELECT_GE_1: tl.constexpr = tl.constexpr(_select_asm("ge", 1))
_SELECT_GEU_1: tl.constexpr = tl.constexpr(_select_asm("geu", 1))
_SELECT_GE_2: tl.constexpr = tl.constexpr(_select_asm("ge", 2))
_SELECT_GEU_2: tl.constexpr = tl.constexpr(_select_asm("geu", 2))
_INTERPRET: tl.constexpr = tl.constexpr(interpreting())


_PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
_PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
# One widening multiply gives both halves of a 32 x 32-bit product (umulhi and mul would take two).
_MUL_WIDE_M0: tl.constexpr = tl.constexpr(
    "{ .reg .b64 t; mul.wide.u32 t, $2, 0xD2511F53; mov.b64 {$1, $0}, t; }"
)
_MUL_WIDE_M1: tl.constexpr = tl.constexpr(
    "{ .reg .b64 t; mul.wide.u32 t, $2, 0xCD9E8D57; mov.b64 {$1, $0}, t; }"
)


@triton.jit
def philox4x32(seed, c0, c1, c2, c3, ROUNDS: tl.constexpr):
    """Philox4x32 with key (low, high words of seed) on uint32 counters: the same numbers as `tl.philox`."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(ROUNDS):
        if _INTERPRET:
            hi0, lo0 = tl.math.umulhi(c0, _PHILOX_M0), c0 * _PHILOX_M0
            hi2, lo2 = tl.math.umulhi(c2, _PHILOX_M1), c2 * _PHILOX_M1
        else:
            hi0, lo0 = tl.inline_asm_elementwise(
                _MUL_WIDE_M0, "=r,=r,r", [c0], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1
            )
            hi2, lo2 = tl.inline_asm_elementwise(
                _MUL_WIDE_M1, "=r,=r,r", [c2], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1
            )
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _rotr8(r):
    """Word (b3, b2, b1, b0) -> (b0, b3, b2, b1)."""
    return (r >> 8) | (r << 24)


@triton.jit
def _split16(r0, r1, r2, r3):
    """The low (e = 0) and high (e = 1) 16 bits of words j = 0..3, shape (..., e, j % 2, j // 2)."""
    h0 = tl.join(r0.to(tl.uint16), (r0 >> 16).to(tl.uint16))
    h1 = tl.join(r1.to(tl.uint16), (r1 >> 16).to(tl.uint16))
    h2 = tl.join(r2.to(tl.uint16), (r2 >> 16).to(tl.uint16))
    h3 = tl.join(r3.to(tl.uint16), (r3 >> 16).to(tl.uint16))
    return tl.join(tl.join(h0, h1), tl.join(h2, h3))


@triton.jit
def dropout_words(seed, bh, rows, start_n, BLOCK_N: tl.constexpr, ROUNDS: tl.constexpr = 7):
    """The Philox words behind `dropout_bits`: four uint32 tensors of shape (len(rows) // 16, 8, BLOCK_N // 32, 4).

    Call (R, r, g, t) is Philox4x32-7 of counter (bh, 4g + t, 0, 16R + r) with key = seed, where rows
    16R + r are the upper rows of `rows` and 4g + t counts groups of 8 columns from column 0. The head and
    a zero fill the two words Philox's first round multiplies, and the row and the column group enter by
    XOR: whichever of the two stays fixed over a loop (rows in the forward and dQ kernels, columns in dK/dV),
    the compiler hoists the products that depend on it alone, four of the fourteen, out of the loop.
    The kernels compute the next block's words right after issuing the block's last product, so Philox
    runs while the tensor cores work, and turn them into numbers (`dropout_numbers`) one iteration later.
    ROUNDS: Philox rounds, 7 in the kernels. The kernels call this function through their DROPOUT_WORDS
    constexpr (default: this function), so that a variant with the same signature (fewer rounds, constant
    words) can be compiled and timed without editing them.
    """
    tl.static_assert(BLOCK_N % 32 == 0, "dropout needs key tiles that are a multiple of 32")
    M: tl.constexpr = rows.shape[0]
    tl.static_assert(M % 16 == 0, "dropout needs query tiles that are a multiple of 16")
    grp = (start_n // 32 + tl.arange(0, BLOCK_N // 32))[:, None] * 4 + tl.arange(0, 4)[None, :]  # 4g + t
    upper, _ = tl.split(tl.permute(tl.reshape(rows, (M // 16, 2, 8)), (0, 2, 1)))  # rows 16R + r: (R, r)
    row = upper[:, :, None, None] + grp[None, None, :, :] * 0
    col = grp[None, None, :, :] + upper[:, :, None, None] * 0
    head = row * 0 + bh
    return philox4x32(
        seed, head.to(tl.uint32), col.to(tl.uint32), head.to(tl.uint32) * 0, row.to(tl.uint32), ROUNDS
    )


@triton.jit
def dropout_numbers(r0, r1, r2, r3, BLOCK_N: tl.constexpr):
    """16-bit random numbers (16 * r0.shape[0], BLOCK_N) uint16 from the words of `dropout_words`.

    Word j of call (R, r, g, t), with bytes (b3, b2, b1, b0), gives (b1, b0) and (b3, b2) to row 16R + r,
    columns 32g + 8j + 2t + e for e = 0, 1, and (b2, b1), (b0, b3) to row 16R + r + 8. These 16 elements
    are the ones one thread holds of a tensor-core accumulator tile (Hopper wgmma and Ampere mma.sync), so
    every number is made in the thread that uses it: no data moves between threads, whatever the tile
    shape. The numbers depend only on the element's position and the seed, never on the tiling.

    Every byte leads one number and trails another, so 8 random bits per element. Two elements interact only
    when a leading byte ties the bound's (probability ~1/256): their drop decisions correlate by 0.1% at
    dropout_p = 0.1 (the tests bound it by 1%).
    """
    M: tl.constexpr = r0.shape[0] * 16
    r0r, r1r, r2r, r3r = _rotr8(r0), _rotr8(r1), _rotr8(r2), _rotr8(r3)
    x_up = _split16(r0, r1, r2, r3)  # (R, r, g, t, e, j % 2, j // 2)
    x_lo = _split16(r0r, r1r, r2r, r3r)
    x = tl.join(x_up, x_lo)  # (R, r, g, t, e, j % 2, j // 2, h)
    x = tl.permute(x, (0, 7, 1, 2, 6, 5, 3, 4))  # (R, h, r, g, j // 2, j % 2, t, e)
    return tl.reshape(x, (M, BLOCK_N))


@triton.jit
def dropout_bits(seed, bh, rows, start_n, BLOCK_N: tl.constexpr, DROPOUT_WORDS: tl.constexpr = dropout_words):
    """Random numbers (len(rows), BLOCK_N) uint16 for columns start_n .. start_n + BLOCK_N of head `bh`.

    len(rows) and BLOCK_N must be multiples of 16 and 32, starting at multiples of 16 and 32
    (`dropout_words`, `dropout_numbers`).
    """
    r0, r1, r2, r3 = DROPOUT_WORDS(seed, bh, rows, start_n, BLOCK_N)
    return dropout_numbers(r0, r1, r2, r3, BLOCK_N)


@triton.jit
def dropout_drops(x, bound, DROPOUT_MODE: tl.constexpr):
    """True where the number x (from `dropout_bits`) drops its element (see F16_INF for the modes)."""
    x = x.to(tl.int32)
    inside = (x >= bound) & (x <= F16_INF)
    if DROPOUT_MODE == 1:
        return inside
    elif DROPOUT_MODE == 2:
        return inside | ((x & 0x7FFF) > F16_INF)
    else:
        return ~inside


@triton.jit
def dropout_keep(
    seed, bh, rows, start_n, bound, BLOCK_N: tl.constexpr, DROPOUT_MODE: tl.constexpr,
    DROPOUT_WORDS: tl.constexpr = dropout_words,
):  # fmt: skip
    """Keep-mask (len(rows), BLOCK_N) bool of columns start_n .. start_n + BLOCK_N of head `bh`."""
    x = dropout_bits(seed, bh, rows, start_n, BLOCK_N, DROPOUT_WORDS)
    return ~dropout_drops(x, bound, DROPOUT_MODE)


@triton.jit
def dropout_select(x, bound, kept, dropped, DROPOUT_MODE: tl.constexpr):
    """`kept` where the number x keeps its element, else `dropped` (16-bit float tensors of x's shape).

    On the GPU one packed comparison and one bitwise select serve two elements (`_select_asm`).
    """
    if _INTERPRET:
        return tl.where(dropout_drops(x, bound, DROPOUT_MODE), dropped, kept)
    else:
        bound = tl.full(x.shape, 0, tl.uint16) + bound.to(tl.uint16)
        if DROPOUT_MODE == 3:
            kept, dropped = dropped, kept
        if DROPOUT_MODE == 2:
            asm: tl.constexpr = _SELECT_GEU_1
        else:
            asm: tl.constexpr = _SELECT_GE_1
        return tl.inline_asm_elementwise(
            asm, "=r,r,r,r,r", [x, bound, kept, dropped], dtype=kept.dtype, is_pure=True, pack=2
        )


@triton.jit
def dropout_select2(x, bound, kept0, dropped0, kept1, dropped1, DROPOUT_MODE: tl.constexpr):
    """`dropout_select` of two pairs of tensors under the same numbers: one comparison for both."""
    if _INTERPRET:
        drops = dropout_drops(x, bound, DROPOUT_MODE)
        return tl.where(drops, dropped0, kept0), tl.where(drops, dropped1, kept1)
    else:
        bound = tl.full(x.shape, 0, tl.uint16) + bound.to(tl.uint16)
        if DROPOUT_MODE == 3:
            kept0, dropped0 = dropped0, kept0
            kept1, dropped1 = dropped1, kept1
        if DROPOUT_MODE == 2:
            asm: tl.constexpr = _SELECT_GEU_2
        else:
            asm: tl.constexpr = _SELECT_GE_2
        return tl.inline_asm_elementwise(
            asm, "=r,=r,r,r,r,r,r,r", [x, bound, kept0, dropped0, kept1, dropped1],
            dtype=(kept0.dtype, kept1.dtype), is_pure=True, pack=2,
        )  # fmt: skip


@triton.jit
def sequence_start(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first query row, first key row, seqlen_q, seqlen_k) of batch entry b.

    Varlen: rows of the packed tensors, read from cu_seqlens (the launchers pass batch strides of 0).
    Dense: rows start at 0 and the lengths are the arguments. Either way a tensor X's entry b starts at
    b * stride_xb + first_row * stride_xt.
    """
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        k_start = tl.load(CuK + b)
        seqlen_q = tl.load(CuQ + b + 1) - q_start
        seqlen_k = tl.load(CuK + b + 1) - k_start
        q_row = q_start.to(tl.int64)
        k_row = k_start.to(tl.int64)
    else:
        q_row = 0
        k_row = 0
    return q_row, k_row, seqlen_q, seqlen_k


@triton.jit
def sparse_position(sparse_idx, it):
    """Position `it` of the concatenated nonzero blocks listed at `sparse_idx` -> its real position."""
    block = it // SPARSE_BLOCK_C
    return tl.load(sparse_idx + block) * SPARSE_BLOCK_C + (it - block * SPARSE_BLOCK_C)


@triton.jit
def block_start(sparse_idx, it, SPARSE: tl.constexpr):
    """First row or column of a loop's block at position `it`: `it` itself, or its real position when the
    loop walks the nonzero blocks of a block-sparse mask (`sparse_position`)."""
    if SPARSE:
        return sparse_position(sparse_idx, it)
    else:
        return it


@triton.jit
def loop_block(sparse_idx, it, hi, next_start, BLOCK: tl.constexpr, SPARSE: tl.constexpr):
    """(start of the block at loop position `it`, start of the next block) for loops over lo .. hi.

    Dense: `it` and it + BLOCK. SPARSE: the start read one iteration earlier (`next_start`, first from
    `block_start(sparse_idx, lo, True)`), and the next one's read now (the last iteration re-reads the last
    entry, so nothing past the list is read). A block's K/V (or Q/dO) addresses
    that waited on an index load of their own iteration made Triton drain every prefetch at the top of
    each iteration (`cp.async.wait_group 0`), so the block-sparse loops ran with no loads in flight.
    """
    if SPARSE:
        return next_start, sparse_position(sparse_idx, tl.minimum(it + BLOCK, hi - 1))
    else:
        return it, it + BLOCK


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
    offs_m, offs_d, lo, hi, seqlen_k, causal_shift, qk_scale, seed, bh, drop_bound, sparse_idx,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPARSE: tl.constexpr,
    RAGGED: tl.constexpr = False, DROPOUT_WORDS: tl.constexpr = dropout_words,
):  # fmt: skip
    """Fold keys lo .. hi (multiples of BLOCK_N, except hi when MASKED or RAGGED) into (acc, l_i, m_i).

    MASKED: every block gets the key-end and causal masks (the causal diagonal's blocks).
    RAGGED: an unmasked loop whose last block may end past seqlen_k: its loads are bounded, and only that
    block, found by a runtime test, sets the scores of missing keys to -inf. Varlen inputs, where almost
    every sequence has such a block, use it: with dropout a separate masked loop for that block made the
    forward up to 28% slower. Dense inputs keep that loop: with N a multiple of the tile it never runs,
    while the bounds in the main loop cost the dense dropout forward 2-6% (kernel_dev/NOTES.md).
    SPARSE: lo .. hi count positions in the concatenation of the nonzero key blocks listed at
    `sparse_idx`, so one pipelined loop walks all of them.
    """
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    next_n = block_start(sparse_idx, lo, SPARSE)
    if DROPOUT_MODE:
        # Philox words of the first block; each iteration makes the next block's (`dropout_words`).
        w0, w1, w2, w3 = DROPOUT_WORDS(seed, bh, offs_m, next_n, BLOCK_N)
    for it in tl.range(lo, hi, BLOCK_N):
        start_n, next_n = loop_block(sparse_idx, it, hi, next_n, BLOCK_N, SPARSE)
        cols = start_n + offs_n
        k_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        if MASKED or RAGGED:
            kT = tl.load(k_ptrs, mask=(cols[None, :] < seqlen_k) & d_ok[:, None], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kT = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            kT = tl.load(k_ptrs)
        qk = tl.dot(q, kT)
        if MASKED:
            allowed = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + causal_shift)
            qk = tl.where(allowed, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with no allowed key so far keeps m = -inf; subtract 0 instead to avoid inf - inf.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
        else:
            if RAGGED:
                if start_n + BLOCK_N > seqlen_k:
                    qk = tl.where(cols[None, :] < seqlen_k, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = p.to(q.dtype)
        if DROPOUT_MODE:
            x = dropout_numbers(w0, w1, w2, w3, BLOCK_N)
            p = dropout_select(x, drop_bound, p, tl.zeros_like(p), DROPOUT_MODE)
        if MASKED or RAGGED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p, v, acc)
        if DROPOUT_MODE:
            if it + BLOCK_N < hi:  # while the tensor cores compute P V
                w0, w1, w2, w3 = DROPOUT_WORDS(seed, bh, offs_m, next_n, BLOCK_N)
        m_i = m_new
    return acc, l_i, m_i


def _fwd_configs() -> list:
    if interpreting() or not torch.cuda.is_available():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 128, 8, 2),
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 64, 8, 4),
            (128, 32, 4, 3),
            (64, 64, 4, 3),
            (64, 64, 4, 2),
            (64, 32, 4, 2),
        ]
    ]


def _prune_fwd(configs, named_args, **kwargs):
    """Drop tiles whose shared memory cannot fit at large head dims."""
    d = named_args["HEAD_DIM"] if "HEAD_DIM" in named_args else kwargs["HEAD_DIM"]
    out = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if d > 128 and (bm * bn > 64 * 64 or c.num_stages > 2):
            continue
        if d > 64 and bn > 64 and c.num_stages > 2:
            continue
        out.append(c)
    out = out or configs[-1:]
    return out if autotuning() else out[:1]


@triton.autotune(
    configs=_fwd_configs(),
    key=["HEAD_DIM", "IS_CAUSAL", "DROPOUT_MODE", "IS_VARLEN", "IS_SPARSE", "Q_BUCKET", "K_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_fwd},
    do_bench=bench_config,
)
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, SparseIdx, SparseCnt,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_lt, sparse_heads, sparse_nq, sparse_nk,
    seqlen_q, seqlen_k, nheads, gqa_group, qk_scale, seed, drop_bound, drop_scale,
    Q_BUCKET, K_BUCKET,
    IS_CAUSAL: tl.constexpr, DROPOUT_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, IS_SPARSE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE_BLOCK_SIZE: tl.constexpr, SPARSE_MASKED: tl.constexpr,
    DROPOUT_WORDS: tl.constexpr = dropout_words,
):  # fmt: skip
    # Longest causal rows first: reversed block order balances the tail of the grid.
    num_m = tl.num_programs(0)
    start_m = (num_m - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // gqa_group
    q_row, k_row, seqlen_q, seqlen_k = sequence_start(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    b64 = b.to(tl.int64)
    q_off = b64 * stride_qb + q_row * stride_qt
    k_off = b64 * stride_kb + k_row * stride_kt
    v_off = b64 * stride_vb + k_row * stride_vt
    o_off = b64 * stride_ob + q_row * stride_ot
    l_off = b64 * stride_lb + q_row * stride_lt
    if start_m >= seqlen_q:
        return
    causal_shift = seqlen_k - seqlen_q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + q_off + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + k_off + hk * stride_kh
    v_base = V + v_off + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if IS_SPARSE:
        # Visit only the nonzero key blocks of this query block's row of the block mask.
        row = (h % sparse_heads) * sparse_nq + start_m // SPARSE_BLOCK_SIZE
        count = tl.load(SparseCnt + row)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, count * SPARSE_BLOCK_SIZE,
            seqlen_k, causal_shift, qk_scale, seed, bh, drop_bound, SparseIdx + row * sparse_nk,
            SPARSE_MASKED, IS_CAUSAL, DROPOUT_MODE, BLOCK_N, HEAD_DIM, BLOCK_D, True,
            DROPOUT_WORDS=DROPOUT_WORDS,
        )  # fmt: skip
    elif IS_CAUSAL or not IS_VARLEN:
        # Keys [0, full_hi) need no mask; [full_hi, hi) hold the causal diagonal and the ragged end (for
        # dense inputs usually none: their N is mostly a multiple of the tile).
        if IS_CAUSAL:
            hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + causal_shift), 0)
            full_hi = tl.minimum(
                (start_m + causal_shift + 1) // BLOCK_N * BLOCK_N, seqlen_k // BLOCK_N * BLOCK_N
            )
            full_hi = tl.maximum(full_hi, 0)
        else:
            hi = seqlen_k
            full_hi = seqlen_k // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, full_hi,
            seqlen_k, causal_shift, qk_scale, seed, bh, drop_bound, K,
            False, IS_CAUSAL, DROPOUT_MODE, BLOCK_N, HEAD_DIM, BLOCK_D, False,
            DROPOUT_WORDS=DROPOUT_WORDS,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, full_hi, hi,
            seqlen_k, causal_shift, qk_scale, seed, bh, drop_bound, K,
            True, IS_CAUSAL, DROPOUT_MODE, BLOCK_N, HEAD_DIM, BLOCK_D, False,
            DROPOUT_WORDS=DROPOUT_WORDS,
        )  # fmt: skip
    else:
        # Varlen, every key allowed: nearly every sequence ends in a ragged block, walked by the main loop.
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, seqlen_k,
            seqlen_k, causal_shift, qk_scale, seed, bh, drop_bound, K,
            False, IS_CAUSAL, DROPOUT_MODE, BLOCK_N, HEAD_DIM, BLOCK_D, False, RAGGED=True,
            DROPOUT_WORDS=DROPOUT_WORDS,
        )  # fmt: skip

    # Rows that saw no key (causal with seqlen_q > seqlen_k, empty sparse rows) output 0, lse = -inf.
    empty = l_i == 0.0
    acc = acc * (drop_scale / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2_C)
    o_ptrs = Out + o_off + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(
        o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    )
    tl.store(Lse + l_off + h * stride_lh + offs_m * stride_lt, lse, mask=offs_m < seqlen_q)


def seqlen_bucket(n: int) -> int:
    """Autotuning key for a sequence length: the next power of two, clamped to [64, 16384]."""
    return min(max(triton.next_power_of_2(max(n, 1)), 64), 16384)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _dropout_mask_kernel(
    Mask, seed, drop_bound, seqlen_q, seqlen_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT_MODE: tl.constexpr,
):  # fmt: skip
    """Write the keep-mask of head `bh` = program_id(2) into Mask (batch * nheads, seqlen_q, seqlen_k)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = dropout_keep(seed, bh, offs_m, start_n, drop_bound, BLOCK_N, DROPOUT_MODE)
    ptrs = Mask + bh.to(tl.int64) * seqlen_q * seqlen_k + offs_m[:, None] * seqlen_k + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


def dropout_mask(
    batch: int, nheads: int, seqlen_q: int, seqlen_k: int, seed: int, dropout_p: float, device
) -> torch.Tensor:
    """The keep-mask the kernels apply for `seed`: (batch, nheads, seqlen_q, seqlen_k) bool (for tests).

    For varlen inputs, sequence b of the batch uses head index b * nheads + h and local positions.
    It is computed by `dropout_keep`'s plain comparisons, not the kernels' packed ones, so tests that use
    it also check the two against each other.
    """
    mode, bound, _ = dropout_params(dropout_p)
    if mode == 0:
        return torch.ones((batch, nheads, seqlen_q, seqlen_k), dtype=torch.bool, device=device)
    mask = torch.empty((batch * nheads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    grid = (triton.cdiv(seqlen_q, 32), triton.cdiv(seqlen_k, 32), batch * nheads)
    _dropout_mask_kernel[grid](
        mask, seed, bound, seqlen_q, seqlen_k, BLOCK_M=32, BLOCK_N=32, DROPOUT_MODE=mode
    )
    return mask.view(batch, nheads, seqlen_q, seqlen_k).bool()
