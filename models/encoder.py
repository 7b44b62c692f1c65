"""A bidirectional transformer encoder on the shared layers, for masked-LM pretraining and classification.

Token and learned position embeddings, `models.layers.Block`s without the causal mask (pre- or
post-LayerNorm), a masked-LM head (dense, activation, LayerNorm, then the decoder tied to the token
embedding, as BERT's) and, with `num_classes`, a classification head over pooled hidden states ("mean"
over the real tokens, or "cls": the first token). Padding is removed once before the first block and put
back after the last (`models.layers.run_blocks`).

The Long Range Arena baseline is 2 layers, width 64, 2 heads, FFN 128, mean pooling
(configs/model/encoder.yaml).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.gpt2 import check_token_ids
from models.layers import ACTIVATIONS, Block, TransformerCost, check_attn_impl, init_gpt2_weights, run_blocks

POOLINGS = ("mean", "cls")


class Encoder(TransformerCost, nn.Module):
    """input_ids (B, T) int64 and attention_mask (B, T) bool (True on real tokens) -> hidden (B, T, C)."""

    tasks = ("masked_lm", "classification")

    def __init__(
        self,
        vocab_size: int,
        n_positions: int = 512,
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 64,
        n_inner: int | None = None,
        dropout: float = 0.1,
        attn_impl: str = "auto",
        norm_first: bool = True,
        activation: str = "gelu",
        layer_norm_epsilon: float = 1e-5,
        num_classes: int | None = None,
        pooling: str = "mean",
    ):
        super().__init__()
        check_attn_impl(attn_impl, n_embd, n_head)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.vocab_size, self.n_positions, self.num_classes, self.pooling = (
            vocab_size,
            n_positions,
            num_classes,
            pooling,
        )
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.stores_attention_scores = attn_impl == "standard"
        block = dict(
            layer_norm_epsilon=layer_norm_epsilon, attn_impl=attn_impl, causal=False, norm_first=norm_first,
            n_inner=n_inner, activation=activation,
        )  # fmt: skip
        # Post-LN (BERT) normalizes the embeddings; pre-LN normalizes the last block's output instead.
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.ln_emb = nn.Identity() if norm_first else nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout, **block) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=layer_norm_epsilon) if norm_first else nn.Identity()
        self.mlm_transform = nn.Sequential(
            nn.Linear(n_embd, n_embd), ACTIVATIONS[activation](), nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        )
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.classifier = nn.Linear(n_embd, num_classes) if num_classes else None
        self._n_params = sum(p.numel() for p in self.parameters())
        init_gpt2_weights(self, n_layer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) bool or None -> hidden states (B, T, C); padded
        positions hold their embeddings (they take no part in attention)."""
        check_token_ids(input_ids, self.n_positions)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.ln_emb(self.wte(input_ids) + self.wpe(pos)))
        return self.ln_f(run_blocks(self.h, x, attention_mask))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, C) of the positions to predict -> token logits (N, vocab_size)."""
        return nn.functional.linear(self.mlm_transform(hidden), self.wte.weight, self.mlm_bias)

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) bool or None -> class logits (B, num_classes)."""
        if self.classifier is None:
            raise ValueError("this encoder has no classification head: build it with num_classes")
        hidden = self(input_ids, attention_mask)
        if self.pooling == "cls":
            return self.classifier(hidden[:, 0])
        if attention_mask is None:
            return self.classifier(hidden.mean(dim=1))
        keep = attention_mask[..., None].to(hidden.dtype)
        return self.classifier((hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1))

    def num_params(self) -> int:
        """Number of parameters (counted at construction); the tied embedding / decoder counts once."""
        return self._n_params

    def position_params(self) -> int:
        return self.wpe.weight.numel()
