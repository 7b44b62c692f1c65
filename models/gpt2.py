"""GPT-2 (Radford et al., 2019) as trained in the FlashAttention paper, in the style of nanoGPT.

Pre-LayerNorm transformer blocks, learned absolute position embeddings, input and output embeddings
tied, GELU with the tanh approximation (HF's "gelu_new"), dropout on the embeddings, the attention
probabilities and both residual branches, and GPT-2's initialization. Module and parameter names are
HuggingFace's, so `from_hf` / `to_hf` convert weights key for key (HF's Conv1D stores the Linear weights
transposed, that is the only change).

Sizes used in the paper (vocab 50257, 1024 positions):
    small  = n_layer 12, n_head 12, n_embd  768  (124M parameters)
    medium = n_layer 24, n_head 16, n_embd 1024  (355M)
    large  = n_layer 36, n_head 20, n_embd 1280  (774M)

Attention implementations (`attn_impl`), all causal, all taking q, k, v as (B, T, H, D):
    "flash"    -- `kernels.flash_attn_func`, the Triton FlashAttention kernel (fp16/bf16 on CUDA)
    "standard" -- `kernels.reference.standard_attention`, materializes the (T, T) matrix (the baseline)
    "sdpa"     -- `torch.nn.functional.scaled_dot_product_attention`
    "auto"     -- "flash" on CUDA in float16/bfloat16 (autocast or weights), "sdpa" otherwise; the
                  choice is logged when it changes
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from kernels import HEAD_DIMS, flash_attn_func
from kernels.reference import standard_attention

log = logging.getLogger(__name__)

ATTN_IMPLS = ("flash", "standard", "sdpa", "auto")
VOCAB_ALIGN = 64  # the output projection's GEMMs see the vocabulary padded to a multiple of this
SIZES = {
    "small": dict(n_layer=12, n_head=12, n_embd=768),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "large": dict(n_layer=36, n_head=20, n_embd=1280),
}


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_impl: str, dropout_p: float
) -> torch.Tensor:
    """Causal self-attention with the chosen implementation: q, k, v (B, T, H, D) -> (B, T, H, D)."""
    if attn_impl == "flash":
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
    if attn_impl == "standard":
        return standard_attention(q, k, v, dropout_p=dropout_p, causal=True)
    if attn_impl == "sdpa":  # SDPA wants (B, H, T, D).
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True).transpose(1, 2)
    raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {ATTN_IMPLS}")


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # fused q, k, v projection
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_impl: str) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        # c_attn's output is [q | k | v], each C = n_head * head_dim wide: view as (B, T, 3, H, D).
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(dim=2)
        y = causal_attention(q, k, v, attn_impl, self.dropout if self.training else 0.0)  # (B, T, H, D)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, layer_norm_epsilon: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor, attn_impl: str) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_impl)
        return x + self.mlp(self.ln_2(x))


def training_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token: 6 * N + 12 * n_layer * n_embd * seq_len.

    The formula of PaLM (Chowdhery et al., 2022, appendix B) and of Megatron-LM / FlashAttention-2, which
    nanoGPT uses for MFU. 6 * N counts the weight matmuls (2 FLOPs per multiply-add, backward twice the
    forward); 12 * n_layer * n_embd * seq_len counts the two attention matmuls (q k^T and p v) over the
    full (seq_len, seq_len) matrix -- the causal mask's skipped half is not subtracted, as in those papers.
    N is the parameter count without the position embeddings (a lookup, no matmul); the token embedding
    stays in because it is also the output projection (tied weights).
    """
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def check_token_ids(idx: torch.Tensor, n_positions: int) -> None:
    """Raise a ValueError unless idx is (batch, seq_len) token ids with seq_len <= n_positions."""
    if idx.ndim != 2:
        raise ValueError(f"idx must be (batch, seq_len) token ids, got shape {tuple(idx.shape)}")
    if idx.shape[1] > n_positions:
        raise ValueError(
            f"sequence length {idx.shape[1]} exceeds the model's n_positions={n_positions} (its learned "
            "position table); raise model.n_positions in the config or shorten the sequences"
        )


class GPT2(nn.Module):
    """GPT-2 language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

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
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {ATTN_IMPLS}")
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
        if attn_impl == "flash" and n_embd // n_head not in HEAD_DIMS:
            raise ValueError(
                f"attn_impl='flash' supports head dims {HEAD_DIMS}, got n_embd/n_head={n_embd // n_head}; "
                "change n_embd or n_head, or use attn_impl='sdpa'"
            )
        self.vocab_size, self.n_positions = vocab_size, n_positions
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.dropout, self.layer_norm_epsilon = dropout, layer_norm_epsilon
        self.attn_impl = attn_impl
        self._auto_choice: str | None = None  # what attn_impl="auto" resolved to last (for the log line)

        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(n_positions, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList(Block(n_embd, n_head, dropout, layer_norm_epsilon) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd, eps=layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input / output embeddings

        # GPT-2 init: N(0, 0.02) weights, zero biases; the projections that write into the residual stream
        # are scaled by 1/sqrt(2 * n_layer) (two residual branches per block).
        self.apply(self._init_weights)
        # Counted once here: under FSDP, self.parameters() later holds only this rank's shard.
        self._n_params = sum(p.numel() for p in self.parameters())
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) int64 token ids, T <= n_positions -> logits (B, T, vocab_size) in the compute dtype."""
        check_token_ids(idx, self.n_positions)
        T = idx.shape[1]
        attn_impl = self._resolve_attn_impl(idx.device)
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_impl)
        # The output projection runs on the embedding padded with zero rows to a multiple of 64 and the
        # logits are sliced back: the same values, but GEMMs over 50304 rather than the odd 50257 columns,
        # which sent cuBLAS to an unaligned kernel (8.4 of 59 ms per compiled 4K step on an H100).
        weight = F.pad(self.lm_head.weight, (0, 0, 0, -self.vocab_size % VOCAB_ALIGN))
        return F.linear(self.transformer.ln_f(x), weight)[..., : self.vocab_size]

    def _resolve_attn_impl(self, device: torch.device) -> str:
        if self.attn_impl != "auto":
            return self.attn_impl
        # The dtype attention will see: autocast's if it is on, else the weights'.
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = self.transformer.wte.weight.dtype
        head_dim = self.n_embd // self.n_head
        half = dtype in (torch.float16, torch.bfloat16)
        choice = "flash" if device.type == "cuda" and half and head_dim in HEAD_DIMS else "sdpa"
        if choice != self._auto_choice:
            msg = "attn_impl='auto': using %r attention (%s, %s, head_dim %d)"
            log.info(msg, choice, device, dtype, head_dim)
            self._auto_choice = choice
        return choice

    def num_params(self) -> int:
        """Number of parameters (counted at construction); the tied embedding / output matrix counts once."""
        return self._n_params

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at this sequence length; see `training_flops_per_token`."""
        n_params = self.num_params() - self.transformer.wpe.weight.numel()
        return training_flops_per_token(n_params, self.n_layer, self.n_embd, seq_len)


# --- conversion to and from HuggingFace's GPT2LMHeadModel ------------------------------------------------

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
