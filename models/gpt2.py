"""GPT-2 (Radford et al., 2019) as trained in the FlashAttention paper, in the style of nanoGPT.

Pre-LayerNorm transformer blocks (`models.layers.Block`), learned absolute position embeddings, input and
output embeddings tied, GELU with the tanh approximation (HF's "gelu_new"), dropout on the embeddings, the
attention probabilities and both residual branches, and GPT-2's initialization. Module and parameter names
are HuggingFace's, so `models.hf_gpt2.from_hf` / `to_hf` convert weights key for key.

Sizes (vocab 50257): configs/model/size/ (small 124M, medium 355M, large 774M parameters).
Attention implementations (`attn_impl`): see `models.layers`; all causal here.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import (
    Block,
    TransformerCost,
    check_attn_impl,
    choose_attn_impl,
    compute_dtype,
    init_gpt2_weights,
    run_blocks,
)

log = logging.getLogger(__name__)

VOCAB_ALIGN = 64  # the output projection's GEMMs see the vocabulary padded to a multiple of this


def check_token_ids(idx: torch.Tensor, n_positions: int) -> None:
    """Raise a ValueError unless idx is (batch, seq_len) token ids with seq_len <= n_positions."""
    if idx.ndim != 2:
        raise ValueError(f"idx must be (batch, seq_len) token ids, got shape {tuple(idx.shape)}")
    if idx.shape[1] > n_positions:
        raise ValueError(
            f"sequence length {idx.shape[1]} exceeds the model's n_positions={n_positions} (its learned "
            "position table); raise model.n_positions in the config or shorten the sequences"
        )


class GPT2(TransformerCost, nn.Module):
    """GPT-2 language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    tasks = ("causal_lm",)

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        dropout: float = 0.1,
        attn_impl: str = "auto",
        layer_norm_epsilon: float = 1e-5,
    ):
        super().__init__()
        check_attn_impl(attn_impl, n_embd, n_head)
        self.vocab_size, self.n_positions = vocab_size, n_positions
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.dropout, self.layer_norm_epsilon = dropout, layer_norm_epsilon
        self._auto_choice: str | None = None  # what attn_impl="auto" resolved to last (for the log line)

        block = dict(layer_norm_epsilon=layer_norm_epsilon, attn_impl=attn_impl, causal=True, norm_first=True)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(n_positions, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList(Block(n_embd, n_head, dropout, **block) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd, eps=layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input / output embeddings
        # Counted once here: under FSDP, self.parameters() later holds only this rank's shard.
        self._n_params = sum(p.numel() for p in self.parameters())
        init_gpt2_weights(self, n_layer)

    @property
    def attn_impl(self) -> str:
        return self.transformer.h[0].attn.attn_impl if self.n_layer else "auto"

    @attn_impl.setter
    def attn_impl(self, value: str) -> None:
        check_attn_impl(value, self.n_embd, self.n_head)
        for block in self.transformer.h:
            block.attn.attn_impl = value

    @property
    def stores_attention_scores(self) -> bool:
        return self.attn_impl not in ("flash", "auto", "sdpa")

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) int64 token ids, T <= n_positions; attention_mask: (B, T) bool, True on real tokens
        (right padding), or None -> logits (B, T, vocab_size) in the compute dtype."""
        check_token_ids(idx, self.n_positions)
        T = idx.shape[1]
        self._resolve_attn_impl(idx.device)
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        x = run_blocks(self.transformer.h, x, attention_mask)
        # The output projection runs on the embedding padded with zero rows to a multiple of 64 and the
        # logits are sliced back: the same values, but GEMMs over 50304 rather than the odd 50257 columns,
        # which sent cuBLAS to an unaligned kernel.
        weight = F.pad(self.lm_head.weight, (0, 0, 0, -self.vocab_size % VOCAB_ALIGN))
        return F.linear(self.transformer.ln_f(x), weight)[..., : self.vocab_size]

    def _resolve_attn_impl(self, device: torch.device) -> str:
        """attn_impl, with "auto" resolved for `device` and the compute dtype (logged when it changes)."""
        if self.attn_impl != "auto":
            return self.attn_impl
        dtype = compute_dtype(device, self.transformer.wte.weight.dtype)  # what attention will see
        head_dim = self.n_embd // self.n_head
        choice = choose_attn_impl(device, dtype, head_dim)
        if choice != self._auto_choice:
            msg = "attn_impl='auto': using %r attention (%s, %s, head_dim %d)"
            log.info(msg, choice, device, dtype, head_dim)
            self._auto_choice = choice
        return choice

    def num_params(self) -> int:
        """Number of parameters (counted at construction); the tied embedding / output matrix counts once."""
        return self._n_params

    def position_params(self) -> int:
        return self.transformer.wpe.weight.numel()
