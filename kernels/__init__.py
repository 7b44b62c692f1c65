"""FlashAttention kernels in Triton (exact attention by tiling and recomputation).

from kernels import flash_attn_func, flash_attn_varlen_func, block_sparse_flash_attn_func
"""

from kernels.attention import (
    HEAD_DIMS,
    block_sparse_flash_attn_func,
    flash_attn_func,
    flash_attn_varlen_func,
)
from kernels.flash_fwd import SPARSE_BLOCK
from kernels.masks import butterfly_block_mask, local_global_block_mask, pad_input, unpad_input
from kernels.reference import attention_ref, standard_attention

__all__ = [
    "HEAD_DIMS",
    "SPARSE_BLOCK",
    "attention_ref",
    "block_sparse_flash_attn_func",
    "butterfly_block_mask",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "local_global_block_mask",
    "pad_input",
    "standard_attention",
    "unpad_input",
]
