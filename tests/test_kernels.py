"""FlashAttention kernels against float64 attention.

Tolerance follows flash-attn's rule: the kernel's max error against the float64 reference is at most
twice the error of the same-precision PyTorch reference (kernels.reference in q's dtype), plus a small
absolute slack. On the CPU the kernels run in Triton's interpreter (fp32 / fp16, small sizes); the
GPU tests (bf16, long sequences, determinism) skip without CUDA.

Short key sequences take a one-launch backward (`_bwd_short_kernel`), longer ones three kernels. Tests
taking the `bwd_path` fixture run on both: "three_kernels" sets `SHORT_SEQLEN_K` to 0 for the test.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import kernels.flash_bwd as bwd_module
from kernels import (
    SPARSE_BLOCK,
    attention_ref,
    block_sparse_flash_attn_func,
    butterfly_block_mask,
    flash_attn_func,
    flash_attn_varlen_func,
    local_global_block_mask,
    pad_input,
    standard_attention,
    unpad_input,
)
from kernels.attention import draw_seed, flash_bwd, flash_fwd
from kernels.flash_bwd import short_bwd_tiles
from kernels.flash_fwd import dropout_drops, dropout_mask, dropout_params, dropout_select, philox4x32
from kernels.masks import block_sparse_lists
from kernels.reference import block_mask_to_dense

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def run(fn, inputs, dout, extra_grad=None):
    """Forward and backward of fn on fresh leaves; returns (outputs, grads)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = (outs[0].float() * dout.float()).sum()
    if extra_grad is not None:
        loss = loss + (outs[1].float() * extra_grad.float()).sum()
    loss.backward()
    return [o.detach() for o in outs], [x.grad for x in leaves]


def check(name, got, same, ref64, dtype):
    """flash-attn's rule: |got - ref64| <= 2 |same - ref64| + slack, elementwise max over the tensor."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref64).abs().max().item()
    base = (same.double() - ref64).abs().max().item()
    assert err <= 2 * base + SLACK[dtype], f"{name}: error {err:.3g} vs reference error {base:.3g}"


def compare(flash_fn, ref_fn, inputs, dtype, dout=None, dlse=None):
    """Check outputs and all gradients of flash_fn against ref_fn in float64 and in `dtype`."""
    flash_out, flash_grads = run(flash_fn, inputs, dout, dlse)
    ref_out, ref_grads = run(ref_fn, [x.double() for x in inputs], dout, dlse)
    same_out, same_grads = run(ref_fn, inputs, dout, dlse)
    for i, (a, b, c) in enumerate(zip(flash_out, same_out, ref_out, strict=True)):
        if i == 1:  # lse: compare where finite, and -inf exactly where the reference has it
            assert torch.equal(torch.isinf(a), torch.isinf(c)), "lse: -inf rows differ"
            a, b, c = (torch.where(torch.isinf(c), 0, x.double()) for x in (a, b, c))
        check(f"output {i}", a, b, c, dtype)
    for i, (a, b, c) in enumerate(zip(flash_grads, same_grads, ref_grads, strict=True)):
        check(f"gradient of input {i}", a, b, c, dtype)


@pytest.fixture(params=["one_launch", "three_kernels"])
def bwd_path(request, monkeypatch):
    """Which backward serves the test: "three_kernels" turns the one-launch path off."""
    if request.param == "three_kernels":
        monkeypatch.setattr(bwd_module, "SHORT_SEQLEN_K", 0)
    return request.param


def assert_bwd_path(bwd_path, headdim, max_seqlen_k):
    """The dispatch rule sends these sizes down `bwd_path` (so the test checks the path it names)."""
    one_launch = short_bwd_tiles(headdim, max_seqlen_k) is not None
    assert one_launch == (bwd_path == "one_launch"), (bwd_path, headdim, max_seqlen_k)


def both_paths(cases, headdim_at=-2, seqlen_k_at=2):
    """Each case on the 3-kernel path, and on the one-launch path where its sizes allow it."""
    out = []
    for c in cases:
        out.append((*c, "three_kernels"))
        if short_bwd_tiles(c[headdim_at], c[seqlen_k_at]) is not None:
            out.append((*c, "one_launch"))
    return out


# The shared tests run in float32 in the CPU interpreter and in float16 on a GPU.
DT = torch.float16 if CUDA else torch.float32


def rand(*shape, dtype=DT):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


DENSE_CASES = [
    # batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal
    (2, 37, 37, 2, 2, 32, False),
    (2, 37, 37, 2, 2, 32, True),
    (1, 100, 47, 2, 2, 64, True),  # seqlen_q > seqlen_k: the first rows see no key
    (1, 47, 100, 2, 2, 64, True),
    (2, 65, 33, 4, 1, 16, False),  # MQA
    (1, 70, 81, 4, 2, 96, True),  # GQA, padded head dim
    (1, 50, 60, 4, 2, 32, True),  # GQA, causal, seqlen_q != seqlen_k, one key block
    (1, 40, 64, 4, 2, 128, True),  # GQA at head dim 128: the longest one-launch key sequence there
    (1, 1, 1, 1, 1, 128, False),
    (1, 17, 130, 2, 2, 256, False),
]


@pytest.mark.parametrize("b,sq,sk,h,hk,d,causal,bwd_path", both_paths(DENSE_CASES), indirect=["bwd_path"])
def test_dense_matches_float64(b, sq, sk, h, hk, d, causal, bwd_path):
    """Outputs, lse and gradients (incl. through lse) on both backward paths; the query loop of the
    one-launch kernel runs several times whenever seqlen_q exceeds its BLOCK_M (16 in the interpreter)."""
    assert_bwd_path(bwd_path, d, sk)
    torch.manual_seed(sq * 1000 + sk + d)
    q, k, v = rand(b, sq, h, d), rand(b, sk, hk, d), rand(b, sk, hk, d)
    dout, dlse = rand(b, sq, h, d), rand(b, h, sq)
    compare(
        lambda q, k, v: flash_attn_func(q, k, v, causal=causal, return_lse=True),
        lambda q, k, v: attention_ref(q, k, v, causal=causal, return_lse=True),
        [q, k, v], DT, dout, dlse,
    )  # fmt: skip


def test_fp16_in_interpreter():
    torch.manual_seed(1)
    q, k, v = (rand(1, 50, 2, 32, dtype=torch.float16) for _ in range(3))
    dout = rand(1, 50, 2, 32, dtype=torch.float16)
    compare(
        lambda q, k, v: flash_attn_func(q, k, v, causal=True),
        lambda q, k, v: attention_ref(q, k, v, causal=True),
        [q, k, v], torch.float16, dout,
    )  # fmt: skip


def test_softmax_scale_and_views_of_packed_qkv():
    torch.manual_seed(2)
    qkv = rand(2, 45, 3, 2, 32)  # (batch, seqlen, 3, nheads, headdim): q/k/v are strided views
    dout = rand(2, 45, 2, 32)
    compare(
        lambda qkv: flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softmax_scale=0.3, causal=True),
        lambda qkv: attention_ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softmax_scale=0.3, causal=True),
        [qkv], DT, dout,
    )  # fmt: skip
    # A last dimension that is not contiguous is copied, not misread.
    q = rand(1, 20, 2, 32).transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(flash_attn_func(q, q, q), attention_ref(q, q, q), atol=SLACK[DT], rtol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence_float64(causal, bwd_path):
    torch.manual_seed(3)
    lens_q, lens_k = [5, 150, 1, 40], [9, 120, 33, 40]
    assert_bwd_path(bwd_path, 32, max(lens_k))
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    h, d = 2, 32
    q, k, v = rand(sum(lens_q), h, d), rand(sum(lens_k), h, d), rand(sum(lens_k), h, d)
    dout, dlse = rand(sum(lens_q), h, d), rand(h, sum(lens_q))

    def ref(q, k, v):
        outs, lses = [], []
        for i in range(len(lens_q)):
            sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            o, lse = attention_ref(q[None, sq], k[None, sk], v[None, sk], causal=causal, return_lse=True)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    compare(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                               return_lse=True),
        ref, [q, k, v], DT, dout, dlse,
    )  # fmt: skip


def test_unpad_pad_roundtrip_and_padding_mask():
    """Padded batch + key padding mask == unpadded varlen attention."""
    torch.manual_seed(4)
    b, s, h, d = 3, 70, 2, 32
    lengths = torch.tensor([70, 12, 51], device=DEVICE)
    mask = torch.arange(s, device=DEVICE)[None, :] < lengths[:, None]
    x = rand(b, s, h, d)
    x_unpad, indices, cu, max_len = unpad_input(x, mask)
    assert x_unpad.shape == (int(lengths.sum()), h, d) and max_len == 70
    assert cu.tolist() == [0, 70, 82, 133]
    back = pad_input(x_unpad, indices, b, s)
    assert torch.equal(back[mask], x[mask]) and torch.all(back[~mask] == 0)
    out = pad_input(
        flash_attn_varlen_func(x_unpad, x_unpad, x_unpad, cu, cu, max_len, max_len), indices, b, s
    )
    ref = attention_ref(x.double(), x.double(), x.double(), attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out[mask].double(), ref[mask], atol=SLACK[DT], rtol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_matches_masked_float64(causal):
    torch.manual_seed(5)
    b, n, h, d = 1, 300, 2, 32
    q, k, v = rand(b, n, h, d), rand(b, n, h, d), rand(b, n, h, d)
    dout, dlse = rand(b, n, h, d), rand(b, h, n)
    # Per-head masks; head 0 has an empty block row (query block 1 sees nothing).
    block_mask = torch.tensor(
        [[[1, 0, 1], [0, 0, 0], [1, 1, 0]], [[1, 0, 0], [1, 1, 0], [0, 1, 1]]],
        dtype=torch.bool,
        device=DEVICE,
    )
    dense = block_mask_to_dense(block_mask, n, n, SPARSE_BLOCK)[None]
    compare(
        lambda q, k, v: block_sparse_flash_attn_func(q, k, v, block_mask, causal=causal, return_lse=True),
        lambda q, k, v: attention_ref(q, k, v, attn_mask=dense, causal=causal, return_lse=True),
        [q, k, v], DT, dout, dlse,
    )  # fmt: skip


def test_block_sparse_lists_match_a_stable_sort():
    """Each row lists its nonzero blocks in increasing order, then the zero ones, as a stable sort would."""
    gen = torch.Generator().manual_seed(3)
    masks = [
        torch.rand(3, 5, 9, generator=gen) < 0.3,
        butterfly_block_mask(1000, 700),
        torch.zeros(2, 3, 4) > 0,
    ]
    for mask in masks:
        mask = mask.to(DEVICE)
        got = block_sparse_lists(mask)
        m = mask.to(torch.int8)
        for idx, cnt, mm in zip(got[::2], got[1::2], (m, m.transpose(1, 2)), strict=True):
            ref = torch.sort(mm, dim=-1, descending=True, stable=True).indices
            assert torch.equal(idx.long(), ref) and torch.equal(cnt, mm.sum(-1, dtype=torch.int32))


def test_block_mask_generators():
    m = butterfly_block_mask(4096)
    assert m.shape == (1, 32, 32) and m.dtype == torch.bool
    assert torch.equal(m, m.transpose(1, 2)) and m[0].diagonal().all()
    assert m[0].sum(1).tolist() == [6] * 32  # the diagonal + one partner per bit of 32 = 2^5
    assert butterfly_block_mask(4096, max_stride=4)[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 4]
    lg = local_global_block_mask(1000, 700, window_blocks=1, global_blocks=1)
    assert lg.shape == (1, 8, 6)
    assert lg[0, 5].nonzero().flatten().tolist() == [0, 4, 5]
    assert lg[0, 0].all() and lg[0, :, 0].all()


def dropout_case(seed, p=0.2, b=1, n=96, h=2, d=32, causal=False):
    torch.manual_seed(7)
    q, k, v = rand(b, n, h, d), rand(b, n, h, d), rand(b, n, h, d)
    torch.manual_seed(seed)
    out, grads = run(lambda q, k, v: flash_attn_func(q, k, v, dropout_p=p, causal=causal), [q, k, v], q)
    return (q, k, v), out[0], grads


def test_dropout_is_reproducible_per_seed():
    _, out1, g1 = dropout_case(seed=11)
    _, out2, g2 = dropout_case(seed=11)
    _, out3, g3 = dropout_case(seed=12)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert not torch.equal(out1, out3) and not torch.equal(g1[0], g3[0])


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_gradients_match_reference_with_recovered_mask(causal, bwd_path):
    """The backward regenerates the forward's keep-mask bit for bit, on both backward paths."""
    assert_bwd_path(bwd_path, 32, 80)
    (q, k, v), out, grads = dropout_case(seed=13, p=0.3, n=80, causal=causal)
    torch.manual_seed(13)  # the seed the kernel drew
    keep = dropout_mask(1, 2, 80, 80, draw_seed(), 0.3, DEVICE)
    ref_out, ref_grads = run(
        lambda q, k, v: attention_ref(q, k, v, causal=causal, dropout_p=0.3, dropout_mask=keep),
        [x.double() for x in (q, k, v)],
        q.double(),
    )
    atol = 5e-5 if DT == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out[0], atol=atol, rtol=1e-3)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=1e-3)


def test_dropout_kept_fraction_within_binomial_bounds():
    p = 0.1
    keep = dropout_mask(2, 4, 256, 256, seed=12345, dropout_p=p, device=DEVICE)
    n = keep.numel()
    sigma = math.sqrt(n * p * (1 - p))
    kept = keep.sum().item()
    assert abs(kept - n * (1 - p)) < 5 * sigma, (kept, n)
    # Every row and column block is drawn independently: per-head fractions within bounds too.
    per_head = keep.flatten(2).float().mean(-1)
    assert ((per_head - (1 - p)).abs() < 5 * math.sqrt(p * (1 - p) / (256 * 256))).all()
    # Elements that share a Philox word (rows r and r + 8 of a 16-row group, same column), and plain
    # neighbours, are close to independent: correlation of their drop decisions below 1%.
    drop = (~keep).float()
    groups = drop.view(2, 4, 16, 2, 8, 256)
    pairs = {
        "rows r, r + 8": (groups[:, :, :, 0], groups[:, :, :, 1]),
        "next column": (drop[..., :-1], drop[..., 1:]),
        "next row": (drop[:, :, :-1], drop[:, :, 1:]),
    }
    for name, (a, b) in pairs.items():
        corr = ((a * b).mean() - a.mean() * b.mean()) / (p * (1 - p))
        assert abs(corr) < 0.01, (name, corr.item())


@triton.jit(do_not_specialize=["bound"])
def _dropout_numbers_kernel(Out, Plain, bound, DROPOUT_MODE: tl.constexpr):
    """For the 16-bit numbers pid * 1024 .. + 1023: 1 where the kernels' select keeps, and the plain rule."""
    x = (tl.program_id(0) * 1024 + tl.arange(0, 1024)).to(tl.uint16)
    ones = tl.full([1024], 1.0, tl.float16)
    kept = dropout_select(x, bound, ones, ones * 0, DROPOUT_MODE)
    tl.store(Out + tl.program_id(0) * 1024 + tl.arange(0, 1024), kept)
    plain = ~dropout_drops(x, bound, DROPOUT_MODE)
    tl.store(Plain + tl.program_id(0) * 1024 + tl.arange(0, 1024), plain.to(tl.int8))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.4844, 0.49, 0.5156, 0.52, 0.9, 0.999, 1 - 2**-17])
def test_dropout_drops_exactly_round_p_times_65536_numbers(p):
    """Each mode of dropout_params drops exactly round(p * 65536) of the 65536 numbers (33791 -> 33790),
    and the packed comparison the kernels use (on the GPU) agrees with the plain rule on every number."""
    mode, bound, _ = dropout_params(p)
    kept = torch.empty(65536, dtype=torch.float16, device=DEVICE)
    plain = torch.empty(65536, dtype=torch.int8, device=DEVICE)
    _dropout_numbers_kernel[(64,)](kept, plain, bound, DROPOUT_MODE=mode)
    t = round(p * 65536)
    assert 65536 - int(kept.float().sum().item()) == (33790 if t == 33791 else t), (p, mode, bound)
    assert torch.equal(kept.to(torch.int8), plain)


@triton.jit(do_not_specialize=["seed"])
def _philox_kernel(C, Out, Ref, seed):
    offs = tl.arange(0, 256)
    c0 = tl.load(C + offs).to(tl.uint32)
    c1 = tl.load(C + 256 + offs).to(tl.uint32)
    c2 = tl.load(C + 512 + offs).to(tl.uint32)
    c3 = tl.load(C + 768 + offs).to(tl.uint32)
    a0, a1, a2, a3 = philox4x32(seed, c0, c1, c2, c3, 7)
    b0, b1, b2, b3 = tl.philox(seed, c0, c1, c2, c3, 7)
    tl.store(Out + offs, a0.to(tl.int64))
    tl.store(Out + 256 + offs, a1.to(tl.int64))
    tl.store(Out + 512 + offs, a2.to(tl.int64))
    tl.store(Out + 768 + offs, a3.to(tl.int64))
    tl.store(Ref + offs, b0.to(tl.int64))
    tl.store(Ref + 256 + offs, b1.to(tl.int64))
    tl.store(Ref + 512 + offs, b2.to(tl.int64))
    tl.store(Ref + 768 + offs, b3.to(tl.int64))


def test_philox_matches_triton():
    """The kernels' Philox4x32-7 (widening multiplies on the GPU) gives tl.philox's numbers."""
    gen = torch.Generator().manual_seed(5)
    c = torch.randint(0, 2**32, (4, 256), generator=gen, dtype=torch.int64).to(torch.int32).to(DEVICE)
    out, ref = (torch.empty(4, 256, dtype=torch.int64, device=DEVICE) for _ in range(2))
    _philox_kernel[(1,)](c, out, ref, 0x123456789ABCDEF)
    assert torch.equal(out, ref)


def test_every_output_element_is_written(bwd_path):
    """Preallocated outputs (NaN-poisoned) are filled entirely, on both backward paths."""
    torch.manual_seed(8)
    b, sq, sk, h, d = 2, 75, 90, 2, 32
    assert_bwd_path(bwd_path, d, sk)
    q, k, v = rand(b, sq, h, d), rand(b, sk, h, d), rand(b, sk, h, d)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, h, sq), float("nan"), device=DEVICE)
    scale = 1 / math.sqrt(d)
    flash_fwd(q, k, v, None, None, sq, sk, None, None, scale, True, 0.0, 0, out=out, lse=lse)
    assert not out.isnan().any() and not lse.isnan().any()
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    flash_bwd(q, q, k, v, out, lse, None, None, None, sq, sk, None, None, None, None, scale, True, 0.0, 0,
              dq=dq, dk=dk, dv=dv)  # fmt: skip
    assert not dq.isnan().any() and not dk.isnan().any() and not dv.isnan().any()


def test_backward_is_deterministic(bwd_path):
    torch.manual_seed(9)
    q, k, v = rand(1, 64, 4, 32), rand(1, 64, 2, 32), rand(1, 64, 2, 32)
    assert_bwd_path(bwd_path, 32, 64)
    _, g1 = run(lambda q, k, v: flash_attn_func(q, k, v, causal=True), [q, k, v], q)
    _, g2 = run(lambda q, k, v: flash_attn_func(q, k, v, causal=True), [q, k, v], q)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_short_bwd_dispatch_rule(monkeypatch):
    """One launch while one key block of at most SHORT_SEQLEN_K keys fits (half at head dims 96/128)."""
    assert short_bwd_tiles(64, 128)[1] == 128 and short_bwd_tiles(64, 129) is None
    assert short_bwd_tiles(32, 100)[1] == 128 and short_bwd_tiles(16, 1)[1] == 32
    assert short_bwd_tiles(96, 64)[1] == 64 and short_bwd_tiles(128, 65) is None
    assert short_bwd_tiles(256, 16) is None
    monkeypatch.setattr(bwd_module, "SHORT_SEQLEN_K", 0)
    assert short_bwd_tiles(64, 1) is None


@pytest.mark.parametrize("varlen", [False, True])
def test_bwd_paths_agree_with_dropout(varlen, monkeypatch):
    """Both backward paths give the same gradients for one forward pass (GQA, causal, dropout, dlse)."""
    torch.manual_seed(16)
    h, hk, d, scale, p, seed = 4, 2, 32, 0.2, 0.3, 1234
    if varlen:
        lens_q, lens_k = [33, 9], [20, 45]
        cu_q = torch.tensor([0, 33, 42], dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor([0, 20, 65], dtype=torch.int32, device=DEVICE)
        q, k, v = rand(42, h, d), rand(65, hk, d), rand(65, hk, d)
        dout, dlse = rand(42, h, d), rand(h, 42)
    else:
        lens_q, lens_k, cu_q, cu_k = [45], [37], None, None
        q, k, v = rand(2, 45, h, d), rand(2, 37, hk, d), rand(2, 37, hk, d)
        dout, dlse = rand(2, 45, h, d), rand(2, h, 45)
    sizes = (max(lens_q), max(lens_k))
    out, lse = flash_fwd(q, k, v, cu_q, cu_k, *sizes, None, None, scale, True, p, seed)

    def grads():
        return flash_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *sizes, None, None, None, None,
                         scale, True, p, seed)  # fmt: skip

    assert short_bwd_tiles(d, sizes[1]) is not None
    one_launch = grads()
    monkeypatch.setattr(bwd_module, "SHORT_SEQLEN_K", 0)
    three_kernels = grads()
    tol = dict(atol=1e-5, rtol=1e-5) if DT == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    for name, a, b in zip(("dq", "dk", "dv"), one_launch, three_kernels, strict=True):
        assert b.abs().max() > 0.1, name  # dropout and masks left real gradients to compare
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_of_lse_sum(bwd_path):
    """lse.sum() sends back an expanded (stride 0) dlse; the kernels must read it as lse-shaped."""
    torch.manual_seed(17)
    q, k, v = rand(2, 40, 2, 32), rand(2, 40, 2, 32), rand(2, 40, 2, 32)
    assert_bwd_path(bwd_path, 32, 40)

    def grads(fn, inputs):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out, lse = fn(*leaves)
        (out.float().sum() + 3 * lse.sum()).backward()
        return [x.grad for x in leaves]

    got = grads(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True), [q, k, v])
    ref = grads(
        lambda q, k, v: attention_ref(q, k, v, causal=True, return_lse=True), [x.double() for x in (q, k, v)]
    )
    same = grads(lambda q, k, v: attention_ref(q, k, v, causal=True, return_lse=True), [q, k, v])
    for i, (a, b, c) in enumerate(zip(got, same, ref, strict=True)):
        check(f"gradient of input {i}", a, b, c, DT)


def test_unused_outputs_get_no_zero_gradients():
    """An unused lse reaches the backward as None, not as a tensor of zeros to fill and read; with only lse
    used, out's missing gradient counts as zero and the gradients still match the reference."""
    torch.manual_seed(19)
    q, k, v = rand(1, 40, 2, 32), rand(1, 40, 2, 32), rand(1, 40, 2, 32)
    out = flash_attn_func(*(x.detach().clone().requires_grad_() for x in (q, k, v)))
    with torch.profiler.profile() as prof:
        out.backward(rand(1, 40, 2, 32))
    filled = {e.name for e in prof.events()} & {"aten::zeros", "aten::zero_", "aten::fill_"}
    assert not filled, f"the backward materialized a zero gradient: {filled}"

    def grads(fn, inputs):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        fn(*leaves)[1].sum().backward()
        return [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]  # lse does not depend on v

    got = grads(lambda q, k, v: flash_attn_func(q, k, v, return_lse=True), [q, k, v])
    ref = grads(lambda q, k, v: attention_ref(q, k, v, return_lse=True), [x.double() for x in (q, k, v)])
    same = grads(lambda q, k, v: attention_ref(q, k, v, return_lse=True), [q, k, v])
    for i, (a, b, c) in enumerate(zip(got, same, ref, strict=True)):
        check(f"gradient of input {i}", a, b, c, DT)


def test_block_sparse_short_keys_keep_the_sparse_backward():
    """Key sequences short enough for the one-launch backward still honour a block mask when sparse."""
    torch.manual_seed(18)
    b, n, h, d = 1, 100, 2, 32
    assert short_bwd_tiles(d, n) is not None
    q, k, v = rand(b, n, h, d), rand(b, n, h, d), rand(b, n, h, d)
    block_mask = torch.tensor([[[True]], [[False]]], device=DEVICE)  # head 1 attends to nothing
    dense = block_mask_to_dense(block_mask, n, n, SPARSE_BLOCK)[None]
    compare(
        lambda q, k, v: block_sparse_flash_attn_func(q, k, v, block_mask, causal=True, return_lse=True),
        lambda q, k, v: attention_ref(q, k, v, attn_mask=dense, causal=True, return_lse=True),
        [q, k, v], DT, rand(b, n, h, d), rand(b, h, n),
    )  # fmt: skip


def test_works_under_torch_compile():
    """Compiled, the custom ops run; eager, the autograd.Function: the same values and gradients, and
    with dropout the same mask for the same seed."""
    torch.manual_seed(10)
    q, k, v = rand(1, 40, 2, 32), rand(1, 40, 2, 32), rand(1, 40, 2, 32)

    def f(q, k, v):
        return (flash_attn_func(q * 2, k, v, causal=True) * k.sum()).sum()

    def g(q, k, v):
        return flash_attn_func(q, k, v, dropout_p=0.3).square().sum()

    for fn in (f, g):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(1)
        compiled(*leaves).backward()
        ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(1)
        fn(*ref_leaves).backward()
        for a, b in zip(leaves, ref_leaves, strict=True):
            torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _qkv(b=1, n=16, h=2, d=32, dtype=DT):
    return rand(b, n, h, d, dtype=dtype), rand(b, n, h, d, dtype=dtype), rand(b, n, h, d, dtype=dtype)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: (rand(1, 16, 2, 32), rand(1, 16, 2, 32), rand(1, 17, 2, 32)),
            "k and v must have the same shape",
        ),
        (lambda: (rand(2, 16, 2, 32), rand(1, 16, 2, 32), rand(1, 16, 2, 32)), "same batch size"),
        (
            lambda: (rand(1, 16, 3, 32), rand(1, 16, 2, 32), rand(1, 16, 2, 32)),
            "must be a multiple of nheads",
        ),
        (lambda: (rand(1, 16, 2, 48), rand(1, 16, 2, 48), rand(1, 16, 2, 48)), "headdim 48 is not supported"),
        (lambda: (rand(1, 16, 2, 32), rand(1, 16, 2, 64), rand(1, 16, 2, 64)), "same headdim"),
        (lambda: (rand(16, 2, 32), rand(16, 2, 32), rand(16, 2, 32)), "q must have shape"),
        (lambda: tuple(x.double() for x in _qkv()), "dtype torch.float64 is not supported"),
        (
            lambda: (rand(1, 16, 2, 32), rand(1, 16, 2, 32, dtype=torch.bfloat16), rand(1, 16, 2, 32)),
            "must share a dtype",
        ),
    ],
)
def test_bad_inputs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        flash_attn_func(*make())


def test_bad_dropout_scale_and_device():
    q, k, v = _qkv()
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p must satisfy"):
            flash_attn_func(q, k, v, dropout_p=p)
    for scale in (-0.5, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softmax_scale must be a finite number > 0"):
            flash_attn_func(q, k, v, softmax_scale=scale)
    if CUDA:
        with pytest.raises(ValueError, match="one device"):
            flash_attn_func(q, k.cpu(), v)
        with pytest.raises(ValueError, match="not supported on CUDA"):
            flash_attn_func(q.float(), k.float(), v.float())  # float32 is CPU-interpreter only


def test_bad_cu_seqlens_raise():
    q = rand(10, 2, 32)

    def call(cu, max_seqlen=10):
        cu = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
        return flash_attn_varlen_func(q, q, q, cu, cu, max_seqlen, max_seqlen)

    with pytest.raises(ValueError, match=r"cu_seqlens_q must be non-decreasing"):
        call([0, 6, 4, 10])
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] = 12 must equal the number of packed tokens"):
        call([0, 6, 12])
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[0\] must be 0"):
        call([1, 6, 10])
    with pytest.raises(ValueError, match="longest sequence has 6"):
        call([0, 6, 10], max_seqlen=5)
    with pytest.raises(ValueError, match="1-D torch.int32"):
        flash_attn_varlen_func(
            q, q, q, torch.tensor([0, 10], device=DEVICE), torch.tensor([0, 10], device=DEVICE), 10, 10
        )


def test_bad_block_mask_raises():
    q, k, v = _qkv(n=200)
    with pytest.raises(ValueError, match=r"block_mask must have shape \(nheads=2 or 1, 2, 2\)"):
        block_sparse_flash_attn_func(q, k, v, torch.ones(1, 3, 2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="block_mask must be a bool tensor"):
        block_sparse_flash_attn_func(q, k, v, torch.ones(1, 2, 2, device=DEVICE))


# --------------------------------------------------------------------------------------------------
# GPU: bf16 / fp16, long sequences, bitwise determinism
# --------------------------------------------------------------------------------------------------


GPU_DENSE = [(torch.bfloat16, d, c) for d in (16, 32, 64, 96, 128, 256) for c in (False, True)] + [
    (torch.float16, d, c) for d in (64, 128) for c in (False, True)
]


@needs_cuda
@pytest.mark.parametrize("dtype,d,causal", GPU_DENSE)
def test_gpu_dense(dtype, d, causal):
    torch.manual_seed(d)
    for b, sq, sk, h, hk in [(2, 1000, 1000, 4, 2), (1, 513, 2049, 2, 2), (3, 129, 77, 2, 1)]:
        q, k, v = (
            rand(b, sq, h, d, dtype=dtype),
            rand(b, sk, hk, d, dtype=dtype),
            rand(b, sk, hk, d, dtype=dtype),
        )
        compare(
            lambda q, k, v: flash_attn_func(q, k, v, causal=causal, return_lse=True),
            lambda q, k, v: attention_ref(q, k, v, causal=causal, return_lse=True),
            [q, k, v], dtype, rand(b, sq, h, d, dtype=dtype), rand(b, h, sq),
        )  # fmt: skip


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_varlen_sparse_dropout(dtype):
    torch.manual_seed(0)
    lens = [1, 700, 2000, 33]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (rand(sum(lens), 4, 64, dtype=dtype) for _ in range(3))

    def ref(q, k, v):
        return torch.cat([attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], causal=True)[0]
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)])  # fmt: skip

    compare(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 2000, 2000, causal=True), ref, [q, k, v],
            dtype, rand(sum(lens), 4, 64, dtype=dtype))  # fmt: skip
    n = 1500
    q, k, v = (rand(2, n, 4, 64, dtype=dtype) for _ in range(3))
    mask = butterfly_block_mask(n, device=DEVICE)
    dense = block_mask_to_dense(mask, n, n, SPARSE_BLOCK)[None]
    compare(lambda q, k, v: block_sparse_flash_attn_func(q, k, v, mask),
            lambda q, k, v: attention_ref(q, k, v, attn_mask=dense), [q, k, v], dtype, rand(2, n, 4, 64, dtype=dtype))  # fmt: skip
    torch.manual_seed(3)
    seed = draw_seed()
    keep = dropout_mask(2, 4, n, n, seed, 0.1, DEVICE)
    torch.manual_seed(3)
    compare(lambda q, k, v: flash_attn_func(q, k, v, dropout_p=0.1, causal=True),
            lambda q, k, v: attention_ref(q, k, v, causal=True, dropout_p=0.1, dropout_mask=keep),
            [q, k, v], dtype, rand(2, n, 4, 64, dtype=dtype))  # fmt: skip


@needs_cuda
@pytest.mark.parametrize("which", ["dkdv", "dq"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_dropout_backward_every_tile(which, d, monkeypatch):
    """Every dK/dV tile ((queries x keys) score tiles with dropout) and every dQ tile the autotuner may
    run with dropout gives right gradients: bf16, causal, GQA, a ragged length, mask recovered from the
    kernel."""
    kernel = {"dkdv": bwd_module._bwd_dkdv_kernel, "dq": bwd_module._bwd_dq_kernel}[which]
    prune = {"dkdv": bwd_module._prune_dkdv, "dq": bwd_module._prune_bwd}[which]
    with monkeypatch.context() as m:
        m.setenv("FLASHREPRO_AUTOTUNE", "1")  # every tile autotuning may pick, not only the first
        tiles = prune(kernel.configs, {}, HEAD_DIM=d, DROPOUT_MODE=1)
    assert tiles and (which == "dq" or all(c.kwargs["BLOCK_M"] >= 64 for c in tiles))
    b, n, h, hk, p = 2, 333, 4, 2, 0.1
    q, k, v, dout = rand(b, n, h, d, dtype=torch.bfloat16), rand(b, n, hk, d, dtype=torch.bfloat16), \
        rand(b, n, hk, d, dtype=torch.bfloat16), rand(b, n, h, d, dtype=torch.bfloat16)  # fmt: skip
    torch.manual_seed(21)
    keep = dropout_mask(b, h, n, n, draw_seed(), p, DEVICE)
    for tile in tiles:
        monkeypatch.setattr(kernel, "configs", [tile])
        kernel.cache.clear()
        torch.manual_seed(21)
        compare(lambda q, k, v: flash_attn_func(q, k, v, dropout_p=p, causal=True),
                lambda q, k, v: attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep),
                [q, k, v], torch.bfloat16, dout)  # fmt: skip
    kernel.cache.clear()


@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_one_launch_backward_bf16(causal):
    """The benchmark's short setting (bf16, head dim 64, N = 128) through the one-launch backward, with GQA."""
    torch.manual_seed(19)
    dtype = torch.bfloat16
    for b, sq, sk, h, hk in [(4, 128, 128, 8, 2), (2, 200, 77, 8, 4)]:
        assert short_bwd_tiles(64, sk) is not None
        q, k, v = (
            rand(b, sq, h, 64, dtype=dtype),
            rand(b, sk, hk, 64, dtype=dtype),
            rand(b, sk, hk, 64, dtype=dtype),
        )
        compare(
            lambda q, k, v: flash_attn_func(q, k, v, causal=causal, return_lse=True),
            lambda q, k, v: attention_ref(q, k, v, causal=causal, return_lse=True),
            [q, k, v], dtype, rand(b, sq, h, 64, dtype=dtype), rand(b, h, sq),
        )  # fmt: skip


@needs_cuda
def test_gpu_bitwise_deterministic_backward():
    torch.manual_seed(0)
    q, k, v = (rand(2, 4096, 8, 64, dtype=torch.bfloat16) for _ in range(3))
    dout = rand(2, 4096, 8, 64, dtype=torch.bfloat16)
    grads = [run(lambda q, k, v: flash_attn_func(q, k, v, causal=True), [q, k, v], dout)[1] for _ in range(3)]
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0], strict=True))


@needs_cuda
def test_gpu_64k_sequence():
    """Batch 1, 8 heads of 64 at 64K tokens: forward + backward run; spot-check rows against float64."""
    torch.manual_seed(0)
    n = 65536
    q, k, v = (rand(1, n, 8, 64, dtype=torch.bfloat16) for _ in range(3))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash_attn_func(*leaves, causal=True)
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    rows = torch.tensor([0, 1, 4095, 40000, n - 1], device=DEVICE)
    for r in rows.tolist():
        ref = attention_ref(q[:, r : r + 1].double(), k[:, : r + 1].double(), v[:, : r + 1].double())
        torch.testing.assert_close(out[:, r : r + 1].double(), ref, atol=2e-2, rtol=0)


def test_standard_attention_baseline_matches_reference():
    torch.manual_seed(11)
    q, k, v = (torch.randn(2, 33, 4, 16, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 1, 33) > 0.3
    mask[..., 0] = True
    for causal in (False, True):
        got = standard_attention(q, k[:, :, :2], v[:, :, :2], causal=causal, attn_mask=mask)
        want = attention_ref(q, k[:, :, :2], v[:, :, :2], causal=causal, attn_mask=mask)
        torch.testing.assert_close(got, want)


def test_block_sparse_unmasked_tiles_with_butterfly():
    """Sequence lengths that are multiples of the block size take the unmasked sparse path."""
    torch.manual_seed(12)
    n = 512
    q, k, v = rand(1, n, 2, 32), rand(1, n, 2, 32), rand(1, n, 2, 32)
    block_mask = butterfly_block_mask(n, max_stride=1, device=DEVICE)  # 4 blocks: diagonal + one partner
    dense = block_mask_to_dense(block_mask, n, n, SPARSE_BLOCK)[None]
    compare(
        lambda q, k, v: block_sparse_flash_attn_func(q, k, v, block_mask),
        lambda q, k, v: attention_ref(q, k, v, attn_mask=dense),
        [q, k, v],
        DT,
        rand(1, n, 2, 32),
    )


def test_dropout_with_gqa_and_varlen_matches_reference_with_recovered_mask(bwd_path):
    """The dK/dV kernel walks a GQA group; its Philox head index must match the forward's (b * nheads + h)."""
    assert_bwd_path(bwd_path, 32, 50)
    torch.manual_seed(14)
    lens_q, lens_k = [40, 7], [33, 50]
    cu_q = torch.tensor([0, 40, 47], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 33, 83], dtype=torch.int32, device=DEVICE)
    h, hk, d, p = 4, 2, 32, 0.25
    q, k, v = rand(47, h, d), rand(83, hk, d), rand(83, hk, d)
    dout = rand(47, h, d)
    torch.manual_seed(15)
    out, grads = run(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 50, dropout_p=p, causal=True),
        [q, k, v],
        dout,
    )
    torch.manual_seed(15)
    keep = dropout_mask(2, h, 40, 50, draw_seed(), p, DEVICE)

    def ref(q, k, v):
        outs = []
        for b, (sq, sk) in enumerate(zip(lens_q, lens_k, strict=True)):
            a, c = int(cu_q[b]), int(cu_k[b])
            mask = keep[b : b + 1, :, :sq, :sk]
            outs.append(
                attention_ref(q[None, a : a + sq], k[None, c : c + sk], v[None, c : c + sk], causal=True,
                              dropout_p=p, dropout_mask=mask)[0]
            )  # fmt: skip
        return torch.cat(outs)

    ref_out, ref_grads = run(ref, [x.double() for x in (q, k, v)], dout.double())
    atol = 5e-5 if DT == torch.float32 else 2e-2
    torch.testing.assert_close(out[0].double(), ref_out[0], atol=atol, rtol=1e-3)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=1e-3)


PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing (no NVIDIA backend)")
def test_kernels_compile_for_hopper_without_a_gpu():
    """Every kernel lowers to an sm_90 cubin (the interpreter never compiles, so CPU CI would miss this)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_90")]
    assert len(lines) == 8, proc.stdout
