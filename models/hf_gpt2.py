"""HuggingFace GPT-2: the paper's baseline model and weight conversion to and from `models.gpt2.GPT2`.

`HFGPT2` is `transformers.GPT2LMHeadModel` behind the same interface as `GPT2`, built from a config (no
download) with HF's own GPT-2 initialization. `attn_implementation="eager"` is HF's standard attention
(the paper's baseline); "sdpa" uses PyTorch's fused attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel

from models.gpt2 import GPT2, check_token_ids
from models.layers import TransformerCost

HF_ATTN_IMPLS = ("eager", "sdpa")


class HFGPT2(TransformerCost, nn.Module):
    """HF GPT-2 language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    tasks = ("causal_lm",)

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
        self.stores_attention_scores = attn_implementation == "eager"
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

    def position_params(self) -> int:
        return self.model.transformer.wpe.weight.numel()


# --- conversion to and from GPT2 ------------------------------------------------

# HF's Conv1D keeps these weights as (in_features, out_features), nn.Linear as (out, in).
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _transpose_conv1d(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Same keys in both models; Conv1D <-> Linear weights transposed (the map is its own inverse)."""
    return {k: (v.t() if k.endswith(_CONV1D_WEIGHTS) else v) for k, v in state_dict.items()}


def from_hf(hf_model: GPT2LMHeadModel, attn_impl: str = "auto", dropout: float | None = None) -> GPT2:
    """Our GPT2 with the weights of `hf_model`, on its device, in its dtype and train/eval mode.

    `dropout` defaults to the HF config's (its resid/embd/attn_pdrop must then agree).
    """
    cfg = hf_model.config
    unsupported = {
        "activation_function in ('gelu_new', 'gelu_pytorch_tanh')": cfg.activation_function
        in ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner None or 4 * n_embd": cfg.n_inner in (None, 4 * cfg.n_embd),
        "scale_attn_weights=True": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx=False": not cfg.scale_attn_by_inverse_layer_idx,
        "add_cross_attention=False": not cfg.add_cross_attention,
        "tie_word_embeddings=True": cfg.tie_word_embeddings,
    }
    missing = [need for need, ok in unsupported.items() if not ok]
    if missing:
        raise ValueError(f"this HF GPT-2 config has no equivalent here; it needs {', '.join(missing)}")
    if dropout is None:
        if not cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop:
            raise ValueError(
                f"HF config has resid_pdrop={cfg.resid_pdrop}, embd_pdrop={cfg.embd_pdrop}, "
                f"attn_pdrop={cfg.attn_pdrop}; this model has one dropout rate: pass from_hf(..., dropout=p)"
            )
        dropout = cfg.resid_pdrop
    weight = hf_model.transformer.wte.weight
    with torch.device(weight.device):
        model = GPT2(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.n_positions,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            dropout=dropout,
            attn_impl=attn_impl,
            layer_norm_epsilon=cfg.layer_norm_epsilon,
        )
    model.to(weight.dtype).load_state_dict(_transpose_conv1d(hf_model.state_dict()))
    return model.train(hf_model.training)


def hf_config(
    vocab_size: int,
    n_positions: int,
    n_layer: int,
    n_head: int,
    n_embd: int,
    dropout: float,
    layer_norm_epsilon: float = 1e-5,
    attn_implementation: str = "eager",
) -> GPT2Config:
    """The HF GPT2Config of the architecture above (GELU tanh, tied embeddings, one dropout rate)."""
    eos = 50256 if vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        layer_norm_epsilon=layer_norm_epsilon,
        activation_function="gelu_new",
        bos_token_id=eos,
        eos_token_id=eos,
        use_cache=False,
        attn_implementation=attn_implementation,
    )


def to_hf(model: GPT2, attn_implementation: str = "eager") -> GPT2LMHeadModel:
    """HF GPT2LMHeadModel with `model`'s weights, on its device, in its dtype and train/eval mode."""
    cfg = hf_config(
        model.vocab_size,
        model.n_positions,
        model.n_layer,
        model.n_head,
        model.n_embd,
        model.dropout,
        model.layer_norm_epsilon,
        attn_implementation,
    )
    weight = model.transformer.wte.weight
    with torch.device(weight.device):
        hf_model = GPT2LMHeadModel(cfg)
    hf_model.to(weight.dtype).load_state_dict(_transpose_conv1d(model.state_dict()))
    return hf_model.train(model.training)
