"""Block masks for `block_sparse_flash_attn_func` and the padding helpers of `flash_attn_varlen_func`.

A block mask is a bool tensor (heads, n_q_blocks, n_k_blocks); entry [h, i, j] lets query block i
attend key block j, each block covering `SPARSE_BLOCK` (128) positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.flash_fwd import SPARSE_BLOCK


def _block_grid(seqlen_q: int, seqlen_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(triton.cdiv(seqlen_q, SPARSE_BLOCK), device=device)[:, None]
    j = torch.arange(triton.cdiv(seqlen_k, SPARSE_BLOCK), device=device)[None, :]
    return i, j


def butterfly_block_mask(
    seqlen_q: int,
    seqlen_k: int | None = None,
    max_stride: int | None = None,
    global_blocks: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The flat butterfly pattern used by the paper's block-sparse FlashAttention.

    Block (i, j) is nonzero when i == j or when i XOR j is a power of two no larger than `max_stride`
    (default: all strides): the union of the supports of the butterfly factors, so n blocks keep about
    (1 + log2 n) / n of the matrix. `global_blocks` > 0 also keeps the first rows and columns of blocks.

    Returns: (1, ceil(seqlen_q / 128), ceil(seqlen_k / 128)) bool.
    """
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    i, j = _block_grid(seqlen_q, seqlen_k, device)
    x = i ^ j
    is_pow2 = (x & (x - 1)) == 0  # true for 0 (the diagonal) and for powers of two
    if max_stride is not None:
        is_pow2 &= x <= max_stride
    mask = is_pow2
    if global_blocks > 0:
        mask = mask | (i < global_blocks) | (j < global_blocks)
    return mask[None]


def local_global_block_mask(
    seqlen_q: int,
    seqlen_k: int | None = None,
    window_blocks: int = 1,
    global_blocks: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sliding-window plus global blocks (Longformer / BigBird style).

    Block (i, j) is nonzero when |i - j| <= window_blocks, or i < global_blocks, or j < global_blocks.

    Returns: (1, ceil(seqlen_q / 128), ceil(seqlen_k / 128)) bool.
    """
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    i, j = _block_grid(seqlen_q, seqlen_k, device)
    mask = ((i - j).abs() <= window_blocks) | (i < global_blocks) | (j < global_blocks)
    return mask[None]


@triton.jit
def _block_list_kernel(Mask, Idx, Cnt, n_rows, n_cols, stride_h, stride_r, stride_c, BLOCK: tl.constexpr):
    """Row `program_id(0)` of head `program_id(1)`: the nonzero columns in increasing order, then the zero
    ones (a stable sort by descending mask value), into Idx (heads, n_rows, n_cols); their count into Cnt."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    m = tl.load(Mask + h * stride_h + row * stride_r + cols * stride_c, mask=ok, other=0).to(tl.int32)
    before = tl.cumsum(m, 0)  # nonzero columns up to and including this one
    count = tl.sum(m, 0)
    pos = tl.where(m != 0, before - 1, count + cols - before)
    out = (h * n_rows + row).to(tl.int64)
    tl.store(Idx + out * n_cols + pos, cols, mask=ok)
    tl.store(Cnt + out, count)


def block_sparse_lists(
    block_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index lists of a (h, n_q_blocks, n_k_blocks) bool block mask, built on its device in two launches.

    Returns q2k_idx (h, nq, nk) int32 whose row (h, i) starts with the nonzero key blocks of query block
    i in increasing order, q2k_cnt (h, nq) int32 their count, and k2q_idx (h, nk, nq) / k2q_cnt (h, nk)
    the same for the transposed mask (used by the backward pass).
    """
    m = block_mask.view(torch.uint8)
    h, nq, nk = m.shape
    lists = []
    for rows, cols, s_r, s_c in ((nq, nk, m.stride(1), m.stride(2)), (nk, nq, m.stride(2), m.stride(1))):
        idx = torch.empty((h, rows, cols), dtype=torch.int32, device=m.device)
        cnt = torch.empty((h, rows), dtype=torch.int32, device=m.device)
        _block_list_kernel[(rows, h)](
            m, idx, cnt, rows, cols, m.stride(0), s_r, s_c, BLOCK=triton.next_power_of_2(cols)
        )
        lists += [idx, cnt]
    return tuple(lists)


def unpad_input(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop the padding of a batch: (batch, seqlen, ...) -> (total_tokens, ...).

    Args:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen) bool or 0/1, True / 1 for real tokens.

    Returns:
        hidden_unpad: (total_tokens, ...) the real tokens in batch-major order.
        indices: (total_tokens,) int64 positions in the flattened (batch * seqlen) input.
        cu_seqlens: (batch + 1,) int32 cumulative lengths, for `flash_attn_varlen_func`.
        max_seqlen: the longest sequence (a Python int: this syncs with the device).
    """
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"attention_mask must have shape (batch, seqlen) = {tuple(hidden_states.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, int(seqlens.max().item())


def pad_input(hidden_unpad: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of `unpad_input`: (total_tokens, ...) -> (batch, seqlen, ...), zeros at the padding."""
    out = hidden_unpad.new_zeros((batch * seqlen, *hidden_unpad.shape[1:]))
    out[indices] = hidden_unpad
    return out.reshape(batch, seqlen, *hidden_unpad.shape[1:])
