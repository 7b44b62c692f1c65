"""GPT-2 against HuggingFace's GPT2LMHeadModel (the independent reference), plus its API contracts."""

import logging
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from train_utils import compose_train
from transformers import GPT2Config, GPT2LMHeadModel

from models.gpt2 import GPT2
from models.hf_gpt2 import HFGPT2, from_hf, to_hf


def model_config(name: str, *overrides: str):
    """configs/model/<name>.yaml as train.py composes it, with the GPT-2 BPE data (vocab 50257, seq 1024)."""
    return compose_train(
        Path("unused"), ["~experiment", f"model={name}", "data=openwebtext", *overrides]
    ).model


TINY = dict(vocab_size=97, n_positions=32, n_layer=2, n_head=4, n_embd=64)
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")


def random_hf(dtype=torch.float64, seed=0, **size) -> GPT2LMHeadModel:
    """HF GPT-2 with its own random init, every weight perturbed so zero biases / unit LN can't hide bugs."""
    torch.manual_seed(seed)
    hf = HFGPT2(**(size or TINY)).model.to(dtype)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return hf.eval()


def tokens(batch=2, seq=32, vocab=97, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def grads_in_hf_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients by parameter name (the same in both models); ours transposed into HF's Conv1D layout."""
    ours = isinstance(model, GPT2)
    return {n: p.grad.t() if ours and n.endswith(CONV1D) else p.grad for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("attn_impl", ["standard", "sdpa"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_logits_match_hf_both_directions(attn_impl, dtype, tol):
    hf = random_hf(dtype)
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        ours = from_hf(hf, attn_impl=attn_impl)
        assert not ours.training and ours.lm_head.weight.dtype == dtype
        torch.testing.assert_close(ours(x), ref, atol=tol, rtol=tol)
        # ours -> HF: a model of ours with its own init, converted, must agree with itself.
        torch.manual_seed(3)
        mine = GPT2(**TINY, attn_impl=attn_impl).to(dtype).eval()
        torch.testing.assert_close(to_hf(mine)(x).logits, mine(x), atol=tol, rtol=tol)


def test_hf_wrapper_eager_and_sdpa_agree_and_match_inner_model():
    torch.manual_seed(0)
    eager = HFGPT2(**TINY, attn_implementation="eager").double().eval()
    sdpa = HFGPT2(**TINY, attn_implementation="sdpa").double().eval()
    sdpa.load_state_dict(eager.state_dict())
    x = tokens()
    with torch.no_grad():
        logits = eager(x)
        assert logits.shape == (2, 32, TINY["vocab_size"])
        torch.testing.assert_close(logits, eager.model(x).logits, atol=0, rtol=0)
        torch.testing.assert_close(sdpa(x), logits, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("attn_impl", ["standard", "sdpa"])
def test_gradients_match_hf(attn_impl):
    hf = random_hf(torch.float64)
    ours = from_hf(hf, attn_impl=attn_impl)
    x, y = tokens(seed=1), tokens(seed=2)
    for logits in (hf(x).logits, ours(x)):
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    g_hf, g_ours = grads_in_hf_layout(hf), grads_in_hf_layout(ours)
    assert g_hf.keys() == g_ours.keys()
    for name, g in g_hf.items():
        assert g_ours[name].abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(g_ours[name], g, atol=1e-10, rtol=1e-8, msg=name)


def test_round_trip_is_exact():
    torch.manual_seed(0)
    ours = GPT2(**TINY, dropout=0.1, attn_impl="sdpa").train()
    hf = to_hf(ours)
    assert hf.training and hf.config.resid_pdrop == hf.config.attn_pdrop == hf.config.embd_pdrop == 0.1
    back = from_hf(hf, attn_impl="sdpa")
    assert back.training and back.dropout == 0.1
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert back.lm_head.weight is back.transformer.wte.weight  # still tied
    assert hf.lm_head.weight is hf.transformer.wte.weight


def test_from_hf_rejects_architectures_it_cannot_represent():
    size = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=50, bos_token_id=None, eos_token_id=None)
    with pytest.raises(ValueError, match="n_inner"):
        from_hf(GPT2LMHeadModel(GPT2Config(**size, n_inner=64)))
    hf = GPT2LMHeadModel(GPT2Config(**size, attn_pdrop=0.0))
    with pytest.raises(ValueError, match=r"dropout=p"):
        from_hf(hf)
    assert from_hf(hf, dropout=0.0).dropout == 0.0


@pytest.mark.parametrize(
    "size,n_layer,n_head,n_embd,millions",
    [("small", 12, 12, 768, 124), ("medium", 24, 16, 1024, 355), ("large", 36, 20, 1280, 774)],
)
def test_param_counts_and_configs(size, n_layer, n_head, n_embd, millions):
    sizes = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    targets = {f"gpt2-{size}.yaml": GPT2}
    if size != "large":
        targets[f"hf-gpt2-{size}.yaml"] = HFGPT2
    with torch.device("meta"):
        counts = {GPT2(**sizes).num_params(), HFGPT2(**sizes).num_params()}
        for file, cls in targets.items():
            net = hydra.utils.instantiate(model_config(file.removesuffix(".yaml")))
            assert type(net) is cls
            assert (net.n_layer, net.n_head, net.n_embd, net.vocab_size) == (n_layer, n_head, n_embd, 50257)
            counts.add(net.num_params())
    assert len(counts) == 1 and round(counts.pop() / 1e6) == millions


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_flops_per_token_matches_counted_matmul_flops(seq_len):
    """PaLM's 6N + 12 L d T against the matmul FLOPs torch counts in a real forward + backward (GPT-2 small).

    Full-matrix attention ("standard") is what the formula assumes; the formula also counts the bias and
    LayerNorm parameters (6 FLOPs each per token), hence the small tolerance. HF's model has the same
    parameters, so `HFGPT2.flops_per_token` must give the same number.
    """
    with torch.device("meta"):
        model = GPT2(attn_impl="standard", dropout=0.0, n_positions=seq_len)
        x = torch.randint(0, 50257, (1, seq_len))
        hf = HFGPT2(dropout=0.0, n_positions=seq_len)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    counted = counter.get_total_flops() / seq_len
    assert model.flops_per_token(seq_len) == pytest.approx(counted, rel=2e-3)
    assert hf.flops_per_token(seq_len) == model.flops_per_token(seq_len)


def test_bad_attn_impl_and_sizes_are_rejected():
    with pytest.raises(ValueError, match=r"unknown attn_impl 'flash2'.*'flash', 'standard', 'sdpa', 'auto'"):
        GPT2(**TINY, attn_impl="flash2")
    with pytest.raises(ValueError, match=r"unknown attn_implementation 'flash'.*'eager', 'sdpa'"):
        HFGPT2(**TINY, attn_implementation="flash")
    with pytest.raises(ValueError, match="n_embd=64 must be a multiple of n_head=5"):
        GPT2(**{**TINY, "n_head": 5})
    with pytest.raises(ValueError, match=r"attn_impl='flash' supports head dims .* got n_embd/n_head=8"):
        GPT2(**{**TINY, "n_head": 8}, attn_impl="flash")


@pytest.mark.parametrize("cls", [GPT2, HFGPT2])
def test_too_long_sequence_names_n_positions(cls):
    model = cls(**TINY)
    with pytest.raises(ValueError, match=r"sequence length 33 exceeds .*n_positions=32.*model.n_positions"):
        model(tokens(seq=33))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(tokens()[0])


def test_dropout_only_in_training_including_attention_probs():
    torch.manual_seed(0)
    model = GPT2(**TINY, dropout=0.1, attn_impl="standard")
    x = tokens()
    model.eval()
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
        model.train()
        assert not torch.allclose(model(x), ref)
        # Only the attention-probability dropout left on: it alone must still change the output.
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        for impl in ("standard", "sdpa", "flash"):  # flash: float32 in the Triton interpreter on CPU
            model.attn_impl = impl
            assert not torch.allclose(model(x), ref), impl
        model.eval()
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_logs_it(caplog):
    torch.manual_seed(0)
    model = GPT2(**TINY, attn_impl="auto").eval()
    with caplog.at_level(logging.INFO, logger="models.gpt2"), torch.no_grad():
        out = model(tokens())
        model(tokens())
    assert [r.getMessage() for r in caplog.records] == [
        "attn_impl='auto': using 'sdpa' attention (cpu, torch.float32, head_dim 16)"
    ]
    model.attn_impl = "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), out, atol=0, rtol=0)
    # On CUDA, flash needs half precision (and a supported head dim); the rule needs no GPU to check.
    wide = GPT2(**{**TINY, "n_head": 1}, attn_impl="auto")  # head_dim 64
    assert wide._resolve_attn_impl(torch.device("cuda")) == "sdpa"  # float32 weights, no autocast
    assert wide.half()._resolve_attn_impl(torch.device("cuda")) == "flash"
    narrow = GPT2(**{**TINY, "n_head": 8}, attn_impl="auto").half()  # head_dim 8: no flash kernel for it
    assert narrow._resolve_attn_impl(torch.device("cuda")) == "sdpa"


def test_tiny_config_trains_a_step():
    cfg = model_config("gpt2-tiny", "model.vocab_size=97", "model.n_positions=256")
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg)
    x = tokens(batch=2, seq=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_flash_matches_hf_cpu_interpreter():
    """Tiny model (2 layers, T=64, float32) so the Triton interpreter stays fast."""
    size = dict(vocab_size=97, n_positions=64, n_layer=2, n_head=2, n_embd=64)
    hf = random_hf(torch.float32, **size)
    ours = from_hf(hf, attn_impl="flash")
    x, y = tokens(batch=1, seq=64, seed=1), tokens(batch=1, seq=64, seed=2)
    ref, out = hf(x).logits, ours(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    F.cross_entropy(ref.flatten(0, 1), y.flatten()).backward()
    F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
    g_hf, g_ours = grads_in_hf_layout(hf), grads_in_hf_layout(ours)
    for name, g in g_hf.items():
        assert rel_err(g_ours[name], g) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_matches_hf_gpu_mixed_precision(dtype):
    """Under autocast, ours-flash must be about as close to the float32 answer as HF eager is."""
    size = dict(vocab_size=1000, n_positions=512, n_layer=2, n_head=4, n_embd=256)
    hf = random_hf(torch.float32, **size).cuda()
    ours = from_hf(hf, attn_impl="flash")
    x = tokens(batch=2, seq=512, vocab=1000, seed=1).cuda()
    y = tokens(batch=2, seq=512, vocab=1000, seed=2).cuda()

    def logits_and_grads(model, autocast_dtype=None):
        model.zero_grad()
        with torch.autocast(
            "cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None
        ):
            logits = model(x) if model is ours else model(x).logits
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        return logits.detach().float(), grads_in_hf_layout(model)

    ref_logits, ref_grads = logits_and_grads(hf)  # float32, no autocast
    hf_logits, hf_grads = logits_and_grads(hf, dtype)
    our_logits, our_grads = logits_and_grads(ours, dtype)
    assert rel_err(our_logits, ref_logits) <= 2 * rel_err(hf_logits, ref_logits) + 1e-3
    for name, g in ref_grads.items():
        assert rel_err(our_grads[name], g) <= 2 * rel_err(hf_grads[name], g) + 1e-3, name
