"""The fused distillation-loss kernel (triton_kl) at training sizes, against the torch formulas of
`hybridize.distill.losses` (CUDA only), and `distillation_loss` through it against the torch path.

bf16 logits, as the lm_head matmul writes them under autocast; the reference runs the torch formulas
in fp32 on the same bf16 logits. Relative error ||out - ref|| / ||ref||: 1e-4 for per-row values and
fp32 gradients, 1e-2 for bf16 gradients and for the losses and parameter gradients end to end.
Outputs are allocated over memory poisoned with NaN, so an element the kernel forgot to write fails.
"""

import pytest
import torch
from gpu_checks import poison, rel_err

from hybridize.distill import losses
from hybridize.distill.losses import LossSpec, _grad_logits, _log_probs, _values, distillation_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

POISON = 1 << 30  # floats of NaN written over free memory before each kernel call

if torch.cuda.is_available():
    from hybridize.kernels import triton_kl

MIXES = [
    ({"reverse_kl": 1.0}, 1.0),
    ({"reverse_kl": 1.0, "ce": 0.1}, 2.0),
    ({"forward_kl": 0.5, "reverse_kl": 0.5, "ce": 0.0}, 1.5),
]






def logits(rows, vocab, seed):
    """bf16 student and teacher logits of an LM head: row scales from peaked to flat, a related teacher."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g, device="cuda") * 8 + 0.5
    s = torch.randn(rows, vocab, generator=g, device="cuda") * scale
    t = s + torch.randn(rows, vocab, generator=g, device="cuda") * 2
    labels = torch.randint(0, vocab, (rows,), generator=g, device="cuda")
    labels[::7] = -100
    return s.bfloat16(), t.bfloat16(), labels


def torch_formulas(s, t, labels, weights, T, scale):
    spec = LossSpec(weights=weights, temperature=T)
    lq, lp, ls = _log_probs(s.float(), t.float(), spec)
    values = _values(spec, lq, lp, ls, labels)
    grad = _grad_logits(spec, lq, lp, ls, labels, values).mul_(scale)
    return torch.stack([values[n] for n in weights], 1), grad


@pytest.mark.parametrize("vocab", [49152, 128256])
@pytest.mark.parametrize("rows", [512, 2048])
@pytest.mark.parametrize("weights,T", MIXES, ids=["rkl", "rkl+ce-T2", "fkl+rkl+ce0-T1.5"])
def test_kernel_matches_torch_formulas_at_training_sizes(rows, vocab, weights, T):
    s, t, labels = logits(rows, vocab, seed=rows + vocab)
    scale = torch.tensor(1 / 3000, device="cuda")
    ref_values, ref_grad = torch_formulas(s, t, labels, weights, T, scale)

    poison(POISON)
    values, grad = triton_kl.values_and_grad(s, t, labels, weights, T, scale)
    assert values.shape == (rows, len(weights)) and grad.dtype == torch.bfloat16
    assert rel_err(values, ref_values) <= 1e-4
    assert rel_err(grad, ref_grad) <= 1e-2

    poison(POISON)
    _, grad32 = triton_kl.values_and_grad(s, t, labels, weights, T, scale, grad_dtype=torch.float32)
    assert rel_err(grad32, ref_grad) <= 1e-4


def loss_and_grads(inputs, spec, monkeypatch, mode):
    monkeypatch.setenv("HYBRIDIZE_KERNELS", mode)
    sh, sw, sb, th, tw, tb, mask, labels = inputs
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (sh, sw, sb)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, stats = distillation_loss(
            leaves[0], leaves[1], th, tw, mask, spec, labels, student_head_bias=leaves[2], teacher_head_bias=tb
        )
    loss.backward()
    return loss.detach(), {n: st["sum"] for n, st in stats.items()}, [x.grad for x in leaves if x is not None]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("weights,T", MIXES, ids=["rkl", "rkl+ce-T2", "fkl+rkl+ce0-T1.5"])
def test_distillation_loss_through_the_kernel_matches_the_torch_path(weights, T, bias, monkeypatch):
    """bf16 activations and teacher, fp32 student head (master weights), chunks of 512 with a partial last."""
    g = torch.Generator(device="cuda").manual_seed(17)
    b, s, ds, dt, vocab = 4, 500, 576, 960, 49152

    def r(*shape, std=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(dtype)

    inputs = (
        r(b, s, ds, dtype=torch.bfloat16), r(vocab, ds, std=0.05), r(vocab, std=0.1) if bias else None,
        r(b, s, dt, dtype=torch.bfloat16), r(vocab, dt, std=0.05, dtype=torch.bfloat16),
        r(vocab, std=0.1, dtype=torch.bfloat16) if bias else None,
        torch.rand(b, s, generator=g, device="cuda") < 0.9,
        torch.randint(0, vocab, (b, s), generator=g, device="cuda"),
    )
    spec = LossSpec(weights=weights, temperature=T, chunk_size=512)

    calls = []
    kernel = triton_kl.values_and_grad

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(triton_kl, "values_and_grad", counted)
    fused = loss_and_grads(inputs, spec, monkeypatch, "auto")
    assert len(calls) == 4  # 1800-odd masked tokens in chunks of 512
    reference = loss_and_grads(inputs, spec, monkeypatch, "reference")
    assert len(calls) == 4

    assert rel_err(fused[0], reference[0]) <= 1e-2
    for name in weights:
        assert rel_err(fused[1][name], reference[1][name]) <= 1e-2, name
    for got, want in zip(fused[2], reference[2]):
        assert got.dtype == want.dtype
        assert rel_err(got, want) <= 1e-2


def test_jsd_mixes_stay_on_the_torch_path(monkeypatch):
    monkeypatch.delenv("HYBRIDIZE_KERNELS", raising=False)
    assert losses._fused_kernel(LossSpec(weights={"reverse_kl": 1.0}), torch.device("cuda"), torch.bfloat16)
    assert losses._fused_kernel(LossSpec(weights={"jsd": 1.0}), torch.device("cuda"), torch.bfloat16) is None


def test_bf16_weight_gradient_accumulates_in_fp32_without_a_product_temporary():
    g = torch.Generator(device="cuda").manual_seed(5)
    vocab, rows, dim = 49152, 512, 1024
    grad_logits = torch.randn(rows, vocab, generator=g, device="cuda").bfloat16()
    hidden = torch.randn(rows, dim, generator=g, device="cuda").bfloat16()
    grad_w = torch.randn(vocab, dim, generator=g, device="cuda")
    want = grad_w.double() + grad_logits.double().T @ hidden.double()

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    losses._accumulate_grad_weight(grad_w, grad_logits, hidden)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    if losses._ADDMM_INTO_FP32:  # exact products, fp32 sums; no [V, D] temporary
        assert rel_err(grad_w, want) <= 1e-5
        assert extra < vocab * dim * 2
    else:  # the product rounded to bf16, then added
        assert rel_err(grad_w, want) <= 1e-2
