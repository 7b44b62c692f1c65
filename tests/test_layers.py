"""The shared transformer layers (models/layers.py): a block with a padding mask against float64 attention
on each sequence alone, unpad-once against unpad-per-layer, and the block-sparse backend's cached mask.

On the CPU flash runs float32 in the Triton interpreter, so sizes stay small; on a GPU the same tests
run in float16 with a tolerance to match."""

import copy

import pytest
import torch

from kernels import pad_input, unpad_input
from models.gpt2 import GPT2
from models.layers import Block, Packing, run_blocks

C, H = 32, 2  # head dim 16
DEVICE, DTYPE, TOL = (
    ("cuda", torch.float16, 2e-2) if torch.cuda.is_available() else ("cpu", torch.float32, 1e-4)
)
LENGTHS = [24, 9, 17]  # right-padded to 24


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, C) float32 and its mask (B, T) bool, True on the first LENGTHS[b] positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENGTHS), max(LENGTHS), C, generator=g)
    mask = torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]
    return x.to(DEVICE, DTYPE), mask.to(DEVICE)


def make_blocks(n: int, attn_impl: str, causal: bool, norm_first: bool) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        Block(C, H, dropout=0.0, attn_impl=attn_impl, causal=causal, norm_first=norm_first) for _ in range(n)
    )
    for p in blocks.parameters():  # LayerNorm weights and biases away from 1 and 0 too
        torch.nn.init.normal_(p, std=0.3)
    return blocks.eval().to(DEVICE, DTYPE)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("attn_impl", ["flash", "standard", "sdpa"])
def test_masked_block_matches_float64_on_each_sequence_alone(attn_impl, causal, norm_first):
    """Real positions equal the float64 block run on that sequence alone, without padding; padded
    positions keep their input exactly."""
    blocks = make_blocks(1, attn_impl, causal, norm_first)
    reference = copy.deepcopy(blocks).double()
    for block in reference:
        block.attn.attn_impl = "standard"
    x, mask = padded_batch()
    with torch.no_grad():
        out = run_blocks(blocks, x, mask)
        for b, n in enumerate(LENGTHS):
            ref = run_blocks(reference, x[b : b + 1, :n].double())[0]
            torch.testing.assert_close(out[b, :n].double(), ref, atol=TOL, rtol=TOL)
    assert torch.equal(out[~mask], x[~mask])


def test_unpad_once_equals_unpad_per_layer():
    """run_blocks unpads before the first block and pads after the last: the same as doing both per layer."""
    blocks = make_blocks(3, "flash", causal=False, norm_first=True)
    x, mask = padded_batch(seed=1)
    with torch.no_grad():
        once = run_blocks(blocks, x, mask)
        h = x
        for block in blocks:
            packed, indices, cu_seqlens, max_seqlen = unpad_input(h, mask)
            out = block(packed, packing=Packing(indices, cu_seqlens, max_seqlen))
            h = torch.where(mask[..., None], pad_input(out, indices, *mask.shape), h)
    torch.testing.assert_close(once, h, atol=TOL / 10, rtol=TOL / 10)
    assert not torch.allclose(once[mask], x[mask])


def test_gpt2_with_right_padding_matches_each_sequence_alone():
    torch.manual_seed(0)
    model = GPT2(vocab_size=97, n_positions=32, n_layer=2, n_head=H, n_embd=C, dropout=0.0, attn_impl="flash")
    model = model.eval().to(DEVICE, DTYPE)
    idx = torch.randint(0, 97, (len(LENGTHS), max(LENGTHS))).to(DEVICE)
    _, mask = padded_batch()
    with torch.no_grad():
        logits = model(idx, attention_mask=mask)
        for b, n in enumerate(LENGTHS):
            torch.testing.assert_close(logits[b, :n], model(idx[b : b + 1, :n])[0], atol=TOL, rtol=TOL)
        with pytest.raises(ValueError, match=r"attention_mask must be \(batch, seqlen\) = \(3, 24\)"):
            model(idx, attention_mask=mask[:, :-1])


def test_block_sparse_caches_its_mask_and_matches_dense_where_all_blocks_are_kept():
    """At 256 positions the butterfly keeps both 128-blocks of every row: block-sparse equals dense flash."""
    sparse = make_blocks(1, "block_sparse", causal=True, norm_first=True)
    dense = copy.deepcopy(sparse)
    dense[0].attn.attn_impl = "flash"
    x = torch.randn(1, 256, C, generator=torch.Generator().manual_seed(2)).to(DEVICE, DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(run_blocks(sparse, x), run_blocks(dense, x), atol=TOL / 10, rtol=TOL / 10)
    attn = sparse[0].attn
    assert attn.block_mask(256, x.device) is attn.block_mask(256, x.device)
    assert attn.block_mask(256, x.device).all()
    with pytest.raises(ValueError, match="block_sparse.*padding mask"):
        run_blocks(sparse, x, torch.ones(1, 256, dtype=torch.bool, device=DEVICE))
