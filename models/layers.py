"""Transformer layers shared by every model: attention, MLP and block, plus the stack runner.

Tensors are (B, T, C) for a padded batch: B sequences, T positions, C = n_embd channels; q, k, v are
(B, T, H, D) with H heads of D = C / H channels. A batch with a padding mask is unpadded once before
the first block (`run_blocks`): the blocks then see packed tokens (total_tokens, C) with their
`Packing`, and attention runs through the varlen kernel; after the last block the batch is padded back.

Attention implementations (`attn_impl`, chosen once at construction):
    "flash"        -- `kernels.flash_attn_func` / `flash_attn_varlen_func`, the Triton kernels
    "standard"     -- `kernels.reference.standard_attention`: materializes the (T, T) scores (the baseline)
    "sdpa"         -- `torch.nn.functional.scaled_dot_product_attention`
    "auto"         -- "flash" on CUDA in float16/bfloat16 with a supported head dim, else "sdpa"
    "block_sparse" -- `kernels.block_sparse_flash_attn_func` with a butterfly block mask, built once per
                      sequence length and cached
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import (
    HEAD_DIMS,
    block_sparse_flash_attn_func,
    butterfly_block_mask,
    flash_attn_func,
    flash_attn_varlen_func,
    unpad_input,
)
from kernels.reference import standard_attention

ATTN_IMPLS = ("flash", "standard", "sdpa", "auto", "block_sparse")
VARLEN_IMPLS = ("flash", "auto")  # take packed tokens; the others mask the padded keys instead
ACTIVATIONS = {"gelu_tanh": lambda: nn.GELU(approximate="tanh"), "gelu": nn.GELU, "relu": nn.ReLU}


def check_attn_impl(attn_impl: str, n_embd: int, n_head: int) -> None:
    """Raise a ValueError naming the fix unless `attn_impl` can run heads of n_embd / n_head channels."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {ATTN_IMPLS}")
    if n_embd % n_head != 0:
        raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
    if attn_impl in ("flash", "block_sparse") and n_embd // n_head not in HEAD_DIMS:
        raise ValueError(
            f"attn_impl={attn_impl!r} supports head dims {HEAD_DIMS}, got n_embd/n_head={n_embd // n_head}; "
            "change n_embd or n_head, or use attn_impl='sdpa'"
        )


def choose_attn_impl(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """What "auto" runs: "flash" on CUDA in float16 / bfloat16 with a supported head dim, else "sdpa"."""
    half = dtype in (torch.float16, torch.bfloat16)
    return "flash" if device.type == "cuda" and half and head_dim in HEAD_DIMS else "sdpa"


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls on `device` run in for inputs of `dtype`: autocast's where it is on, else `dtype`."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded (B, T) batch went when it was packed to (total_tokens, ...).

    indices: (total_tokens,) int64 positions in the flattened B * T batch; cu_seqlens: (B + 1,) int32
    cumulative lengths; max_seqlen: the longest sequence.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


class Attention(nn.Module):
    """Multi-head self-attention with a fused q, k, v projection (GPT-2's names: c_attn, c_proj).

    forward(x (B, T, C), key_mask (B, T) bool or None) -> (B, T, C); or, with `packing`, packed x
    (total_tokens, C) -> (total_tokens, C). key_mask (True = real token) hides padded keys from the
    implementations that run on the padded batch.
    """

    def __init__(
        self, n_embd: int, n_head: int, dropout: float, attn_impl: str = "flash", causal: bool = False
    ):
        super().__init__()
        check_attn_impl(attn_impl, n_embd, n_head)
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.dropout, self.causal, self.attn_impl = dropout, causal, attn_impl
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # [q | k | v], each n_head * head_dim wide
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)
        self._block_masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None, packing: Packing | None = None
    ) -> torch.Tensor:
        qkv = self.c_attn(x).unflatten(-1, (3, self.n_head, self.head_dim))  # (..., 3, H, D)
        q, k, v = qkv.unbind(dim=-3)
        p = self.dropout if self.training else 0.0
        if packing is not None:
            y = flash_attn_varlen_func(
                q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen, packing.max_seqlen,
                dropout_p=p, causal=self.causal,
            )  # fmt: skip
        else:
            y = self.attend(q, k, v, p, key_mask)
        return self.resid_dropout(self.c_proj(y.flatten(-2)))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dropout_p: float,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """q, k, v (B, T, H, D) -> (B, T, H, D) with this module's implementation."""
        impl = self.resolved_impl(q.device, q.dtype)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T): keys kept
        if impl == "flash" and mask is None:
            return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=self.causal)
        if impl == "block_sparse":
            if mask is not None:
                raise ValueError(
                    "attn_impl='block_sparse' takes no padding mask; pad to full length without a mask, "
                    "or use attn_impl='flash' (varlen) for padded batches"
                )
            block_mask = self.block_mask(q.shape[1], q.device)
            return block_sparse_flash_attn_func(q, k, v, block_mask, dropout_p=dropout_p, causal=self.causal)
        if impl == "standard":
            return standard_attention(q, k, v, dropout_p=dropout_p, causal=self.causal, attn_mask=mask)
        if impl == "sdpa":  # SDPA wants (B, H, T, D) and one mask: fold the causal one into it.
            if mask is not None and self.causal:
                mask = mask & torch.ones(q.shape[1], q.shape[1], dtype=torch.bool, device=q.device).tril()
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=self.causal and mask is None
            )
            return y.transpose(1, 2)
        raise ValueError(f"attn_impl={impl!r} with a key mask: unpad the batch (run_blocks does) instead")

    def resolved_impl(self, device: torch.device, dtype: torch.dtype) -> str:
        """attn_impl, with "auto" resolved for q, k, v of `dtype` on `device` (`choose_attn_impl`)."""
        return choose_attn_impl(device, dtype, self.head_dim) if self.attn_impl == "auto" else self.attn_impl

    def block_mask(self, seqlen: int, device: torch.device) -> torch.Tensor:
        """The butterfly block mask for `seqlen` positions, built once per length and device."""
        key = (seqlen, device)
        if key not in self._block_masks:
            self._block_masks[key] = butterfly_block_mask(seqlen, device=device)
        return self._block_masks[key]


class MLP(nn.Module):
    """Position-wise feed-forward: (..., C) -> (..., C) through `n_inner` hidden units (GPT-2's names)."""

    def __init__(self, n_embd: int, n_inner: int, dropout: float, activation: str = "gelu_tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {tuple(ACTIVATIONS)}")
        self.c_fc = nn.Linear(n_embd, n_inner)
        self.act = ACTIVATIONS[activation]()
        self.c_proj = nn.Linear(n_inner, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Transformer block: attention then MLP, each a residual branch (GPT-2's names: ln_1, attn, ln_2, mlp).

    norm_first=True is pre-LayerNorm (GPT-2: x + f(ln(x))); False is post-LayerNorm (BERT: ln(x + f(x))).
    forward takes (B, T, C) with an optional key_mask, or packed (total_tokens, C) with its `Packing`.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float,
        layer_norm_epsilon: float = 1e-5,
        attn_impl: str = "flash",
        causal: bool = False,
        norm_first: bool = True,
        n_inner: int | None = None,
        activation: str = "gelu_tanh",
    ):
        super().__init__()
        self.norm_first = norm_first
        self.ln_1 = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.attn = Attention(n_embd, n_head, dropout, attn_impl, causal)
        self.ln_2 = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.mlp = MLP(n_embd, n_inner or 4 * n_embd, dropout, activation)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None, packing: Packing | None = None
    ) -> torch.Tensor:
        if self.norm_first:
            x = x + self.attn(self.ln_1(x), key_mask, packing)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, key_mask, packing))
        return self.ln_2(x + self.mlp(x))


def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Run `blocks` over x (B, T, C); attention_mask (B, T) bool (True = real token) or None.

    With a mask, flash attention ("flash", or "auto" where it picks flash) unpads the batch once before
    the first block and pads it back after the last; the other implementations mask the padded keys in
    every layer. Either way the padded positions of the output are those of x, untouched.
    """
    if attention_mask is None:
        for block in blocks:
            x = block(x)
        return x
    if attention_mask.shape != x.shape[:2] or attention_mask.device != x.device:
        raise ValueError(
            f"attention_mask must be (batch, seqlen) = {tuple(x.shape[:2])} on {x.device} (True on real "
            f"tokens), got {tuple(attention_mask.shape)} on {attention_mask.device}"
        )
    mask = attention_mask.bool()
    if blocks[0].attn.resolved_impl(x.device, compute_dtype(x.device, x.dtype)) != "flash":
        h = x
        for block in blocks:
            h = block(h, key_mask=mask)
        return torch.where(mask[..., None], h, x)
    packed, indices, cu_seqlens, max_seqlen = unpad_input(x, mask)
    packing = Packing(indices, cu_seqlens, max_seqlen)
    for block in blocks:
        packed = block(packed, packing=packing)
    return x.flatten(0, 1).index_copy(0, indices, packed).view_as(x)


# --- cost of a transformer network: FLOPs and training memory ----------------------------------------------


def training_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token: 6 * N + 12 * n_layer * n_embd * seq_len.

    The formula of PaLM (Chowdhery et al., 2022, appendix B) and of Megatron-LM / FlashAttention-2, which
    nanoGPT uses for MFU. 6 * N counts the weight matmuls (2 FLOPs per multiply-add, backward twice the
    forward); 12 * n_layer * n_embd * seq_len counts the two attention matmuls (q k^T and p v) over the
    full (seq_len, seq_len) matrix -- the causal mask's skipped half is not subtracted, as in those papers.
    N is the parameter count without the position embeddings (a lookup, no matmul).
    """
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def estimate_training_memory(
    num_params: int,
    micro_batch: int,
    seq_len: int,
    n_layer: int,
    n_embd: int,
    n_head: int,
    vocab_size: int,
    attention_stores_scores: bool,
    activation_bytes: int = 2,
) -> int:
    """Rough peak training memory (bytes) of a transformer on one device, with AdamW.

    fp32 weights, gradients and two Adam moments (16 B/param) plus a 16-bit weight copy (2 B/param);
    activations per layer `s*b*h*(34 + 5*a*s/h)` bytes at 16 bits (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", eq. 1), without the `5*a*s/h` term when attention
    does not store its (B, H, T, T) scores (FlashAttention); logits in 16 bits plus their fp32 copy and
    gradient (10 B per logit). `activation_bytes=4` doubles the activation terms for fp32 training.
    """
    s, b, h, a = seq_len, micro_batch, n_embd, n_head
    per_layer = s * b * h * (34 + (5 * a * s / h if attention_stores_scores else 0))
    activations = n_layer * per_layer * activation_bytes / 2
    logits = b * s * vocab_size * (activation_bytes + 8)
    return int(18 * num_params + activations + logits)


class TransformerCost:
    """FLOPs and memory of a network from its sizes: a mixin for the models.

    The network sets `n_layer`, `n_embd`, `n_head`, `vocab_size` (its widest output per token) and
    `stores_attention_scores`, and defines `num_params()` and `position_params()`.
    """

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    stores_attention_scores: bool

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at this sequence length; see `training_flops_per_token`."""
        return training_flops_per_token(
            self.num_params() - self.position_params(), self.n_layer, self.n_embd, seq_len
        )

    def training_memory(self, micro_batch: int, seq_len: int, activation_bytes: int = 2) -> int:
        """`estimate_training_memory` for this network at (micro_batch, seq_len)."""
        return estimate_training_memory(
            self.num_params(), micro_batch, seq_len, self.n_layer, self.n_embd, self.n_head,
            self.vocab_size, self.stores_attention_scores, activation_bytes,
        )  # fmt: skip


def init_gpt2_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's init: N(0, 0.02) linear and embedding weights, zero biases, and the projections that write
    into the residual stream (`c_proj`) scaled by 1/sqrt(2 * n_layer) (two residual branches per block)."""

    def init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    model.apply(init)  # children before parents, the order of the random draws
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
