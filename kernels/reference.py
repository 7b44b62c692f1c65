"""Standard attention in plain PyTorch: it materializes the full (seqlen_q, seqlen_k) score matrix.

This is the paper's "PyTorch standard attention" baseline and the reference every kernel test
compares against (run on float64 inputs it is the exact answer up to float64 rounding).

Layout follows flash-attn: q is (batch, seqlen_q, nheads, headdim); k and v are
(batch, seqlen_k, nheads_k, headdim) with nheads a multiple of nheads_k (MQA / GQA).
"""

from __future__ import annotations

import math

import torch


def causal_mask(seqlen_q: int, seqlen_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bottom-right aligned causal mask, (seqlen_q, seqlen_k) bool, True where attention is allowed.

    Query i may attend key j when j <= i + (seqlen_k - seqlen_q), as in flash-attn 2.
    """
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def block_mask_to_dense(block_mask: torch.Tensor, seqlen_q: int, seqlen_k: int, block: int) -> torch.Tensor:
    """Expand a (h, ceil(seqlen_q/block), ceil(seqlen_k/block)) block mask to (h, seqlen_q, seqlen_k) bool."""
    dense = block_mask.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return dense[..., :seqlen_q, :seqlen_k]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Standard attention: softmax(q k^T * scale + mask) v, computed with the full score matrix.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0.
        causal: bottom-right aligned causal mask (see `causal_mask`).
        softmax_scale: defaults to 1/sqrt(headdim).
        attn_mask: optional bool mask broadcastable to (batch, nheads, seqlen_q, seqlen_k), True = keep.
        dropout_p: dropout probability on the attention probabilities.
        dropout_mask: optional bool keep-mask broadcastable to (batch, nheads, seqlen_q, seqlen_k).
            When given it is used instead of drawing a fresh mask (tests recover the kernel's mask).
        upcast: compute in float32 (the "same precision" PyTorch reference runs with upcast=False).
        return_lse: also return the log-sum-exp of the scaled, masked scores, (batch, nheads, seqlen_q) float32.

    Returns:
        out: (batch, seqlen_q, nheads, headdim) in q's dtype; rows with no allowed key are zero.
        lse (if return_lse): natural-log log-sum-exp per row; -inf for rows with no allowed key.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    nheads, nheads_k = q.shape[2], k.shape[2]
    if nheads != nheads_k:
        k = k.repeat_interleave(nheads // nheads_k, dim=2)
        v = v.repeat_interleave(nheads // nheads_k, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    keep = None
    if causal:
        keep = causal_mask(q.shape[1], k.shape[1], q.device)
    if attn_mask is not None:
        keep = attn_mask if keep is None else keep & attn_mask
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    if keep is not None:
        # Fully-masked rows give NaN in softmax; flash attention returns zeros for them.
        attn = attn.masked_fill(~keep, 0.0)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(attn) >= dropout_p
        attn = attn.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", attn, v).to(dtype)
    if return_lse:
        return out, torch.logsumexp(scores.float(), dim=-1)
    return out


def standard_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's baseline as a drop-in for `flash_attn_func`: (batch, seqlen, nheads, headdim) in and out.

    Plain PyTorch as HuggingFace / Megatron implement it: S = q k^T * scale, masked_fill, softmax,
    dropout, S v, each a separate kernel reading and writing the (seqlen_q, seqlen_k) matrix.
    attn_mask: optional bool mask broadcastable to (batch, nheads, seqlen_q, seqlen_k), True = keep;
    every row must keep at least one key.
    """
    nheads, nheads_k = q.shape[2], k.shape[2]
    if nheads != nheads_k:
        k = k.repeat_interleave(nheads // nheads_k, dim=2)
        v = v.repeat_interleave(nheads // nheads_k, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    attn = torch.nn.functional.dropout(attn, p=dropout_p)
    return torch.matmul(attn, v).transpose(1, 2)
