"""The paper's HuggingFace baseline: `transformers.GPT2LMHeadModel` behind the same interface as `GPT2`.

Built from a config (no download) with HF's own GPT-2 initialization. `attn_implementation="eager"` is
HF's standard attention (the paper's baseline); "sdpa" uses PyTorch's fused attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import GPT2LMHeadModel

from models.gpt2 import check_token_ids, hf_config, training_flops_per_token

HF_ATTN_IMPLS = ("eager", "sdpa")


class HFGPT2(nn.Module):
    """HF GPT-2 language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        dropout: float = 0.1,
        attn_implementation: str = "eager",
        layer_norm_epsilon: float = 1e-5,
    ):
        super().__init__()
        if attn_implementation not in HF_ATTN_IMPLS:
            raise ValueError(
                f"unknown attn_implementation {attn_implementation!r}; choose one of {HF_ATTN_IMPLS}"
            )
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
        self.vocab_size, self.n_positions = vocab_size, n_positions
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.attn_implementation = attn_implementation
        config = hf_config(
            vocab_size, n_positions, n_layer, n_head, n_embd, dropout, layer_norm_epsilon, attn_implementation
        )
        self.model = GPT2LMHeadModel(config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) int64 token ids, T <= n_positions -> logits (B, T, vocab_size)."""
        check_token_ids(idx, self.n_positions)
        return self.model(input_ids=idx, use_cache=False).logits

    def num_params(self) -> int:
        """Number of parameters; the tied embedding / output matrix counts once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, the same formula as `models.gpt2.GPT2.flops_per_token`."""
        n_params = self.num_params() - self.model.transformer.wpe.weight.numel()
        return training_flops_per_token(n_params, self.n_layer, self.n_embd, seq_len)
