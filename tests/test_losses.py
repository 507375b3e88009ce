"""Chunked distillation losses against a direct, unchunked reference: values and gradients."""

import importlib.util
import os
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from triton_interpreter import PATCH

from hybridize.distill import losses
from hybridize.distill.losses import (
    IGNORE_INDEX,
    LossSpec,
    _grad_logits,
    _log_probs,
    _values,
    distillation_loss,
    kl_per_token,
    token_losses_from_logits,
)

B, S, DS, DT, V = 2, 37, 16, 24, 101


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny; intra-op threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(seed, b=B, s=S, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(b, s, DS, generator=g)
    sw = torch.randn(V, DS, generator=g) * 0.5
    th = torch.randn(b, s, DT, generator=g)
    tw = torch.randn(V, DT, generator=g) * 0.5
    mask = torch.rand(b, s, generator=g) < 0.7
    labels = torch.randint(0, V, (b, s), generator=g)
    labels[torch.rand(b, s, generator=g) < 0.2] = -100
    sh, sw = (x.to(dtype).requires_grad_() for x in (sh, sw))
    return sh, sw, th.to(dtype), tw.to(dtype), mask, labels


def reference_loss(sh, sw, th, tw, mask, labels, weights, T=1.0, beta=0.5):
    """Plain full-logit formulas, mean over masked tokens."""
    s = (sh @ sw.T).float()
    t = (th @ tw.T).float()
    lq = torch.log_softmax(s / T, dim=-1)
    lp = torch.log_softmax(t / T, dim=-1)
    q, p = lq.exp(), lp.exp()
    m = beta * p + (1 - beta) * q
    per_name = {
        "reverse_kl": lambda: (q * (lq - lp)).sum(-1),
        "forward_kl": lambda: (p * (lp - lq)).sum(-1),
        "jsd": lambda: beta * (p * (lp - m.log())).sum(-1) + (1 - beta) * (q * (lq - m.log())).sum(-1),
        "ce": lambda: F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels),
    }
    per = sum(w * per_name[n]() for n, w in weights.items())
    return (per * mask).sum() / mask.sum()


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


CASES = [
    ({"reverse_kl": 1.0}, 1.0, 0.5),
    ({"forward_kl": 1.0}, 1.0, 0.5),
    ({"jsd": 1.0}, 1.0, 0.1),
    ({"jsd": 1.0}, 1.0, 0.5),
    ({"jsd": 1.0}, 1.0, 0.9),
    ({"ce": 1.0}, 1.0, 0.5),
    ({"reverse_kl": 1.0, "forward_kl": 0.3, "jsd": 0.5, "ce": 0.1}, 1.0, 0.5),
    ({"reverse_kl": 1.0, "ce": 0.2}, 2.0, 0.5),
    ({"forward_kl": 1.0, "jsd": 1.0}, 2.0, 0.3),
]


@pytest.mark.parametrize("chunk", [7, 16])
@pytest.mark.parametrize("weights,T,beta", CASES)
def test_chunked_loss_matches_unchunked_reference_in_value_and_gradient(weights, T, beta, chunk):
    sh, sw, th, tw, mask, labels = make_inputs(seed=chunk + len(weights) + int(10 * beta))
    spec = LossSpec(weights=weights, temperature=T, jsd_beta=beta, chunk_size=chunk)
    assert int(mask.sum()) % chunk != 0 and S % chunk != 0

    loss, stats = distillation_loss(sh, sw, th, tw, mask, spec, labels=labels)
    ref = reference_loss(sh, sw, th, tw, mask, labels, weights, T, beta)
    assert (loss - ref).abs().item() <= 1e-5
    for got, want in zip(grads(loss, sh, sw), grads(ref, sh, sw)):
        assert (got - want).abs().max().item() <= 1e-5
    assert set(stats) == set(weights)
    for name, st in stats.items():
        counted = mask & (labels != -100) if name == "ce" else mask
        assert int(st["tokens"]) == int(counted.sum())
    assert abs(sum(w * stats[n]["sum"] for n, w in weights.items()) / mask.sum() - loss.item()) <= 1e-5


def test_head_bias_gets_its_gradient_and_matches_reference():
    sh, sw, th, tw, mask, labels = make_inputs(seed=3)
    sb = (torch.randn(V) * 0.5).requires_grad_()
    tb = torch.randn(V) * 0.5
    spec = LossSpec(weights={"reverse_kl": 1.0, "ce": 0.5}, chunk_size=9)
    loss, _ = distillation_loss(sh, sw, th, tw, mask, spec, labels, student_head_bias=sb, teacher_head_bias=tb)
    s = sh @ sw.T + sb
    t = th @ tw.T + tb
    per = token_losses_from_logits(s, t, spec, labels)
    ref = (per * mask).sum() / mask.sum()
    assert (loss - ref).abs().item() <= 1e-5
    for got, want in zip(grads(loss, sh, sw, sb), grads(ref, sh, sw, sb)):
        assert (got - want).abs().max().item() <= 1e-5


def test_token_losses_from_logits_matches_plain_log_softmax_reference():
    sh, sw, th, tw, mask, labels = make_inputs(seed=4)
    weights = {"reverse_kl": 1.0, "jsd": 0.5, "ce": 0.1}
    spec = LossSpec(weights=weights, temperature=1.5, jsd_beta=0.3)
    per = token_losses_from_logits(sh @ sw.T, th @ tw.T, spec, labels)
    full = torch.ones_like(mask)
    ref = reference_loss(sh, sw, th, tw, full, labels, weights, T=1.5, beta=0.3)
    assert per.shape == (B, S)
    assert (per.mean() - ref).abs().item() <= 1e-5


def test_gradient_accumulation_over_micro_batches_equals_whole_batch_only_with_global_token_count():
    sh, sw, th, tw, mask, labels = make_inputs(seed=5, b=6)
    mask[:2, : S // 4] = False  # micro-batches get unequal masked-token counts
    spec = LossSpec(weights={"reverse_kl": 1.0, "ce": 0.1}, chunk_size=10)
    total = mask.sum()

    whole, _ = distillation_loss(sh, sw, th, tw, mask, spec, labels)
    whole_grads = grads(whole, sh, sw)

    parts = [slice(0, 2), slice(2, 4), slice(4, 6)]
    accumulated = sum(
        distillation_loss(sh[p], sw, th[p], tw, mask[p], spec, labels[p], num_tokens=total)[0] for p in parts
    )
    acc_grads = grads(accumulated, sh, sw)
    assert (accumulated - whole).abs().item() <= 1e-5
    for got, want in zip(acc_grads, whole_grads):
        assert (got - want).abs().max().item() <= 1e-5

    naive = sum(distillation_loss(sh[p], sw, th[p], tw, mask[p], spec, labels[p])[0] for p in parts) / 3
    naive_grads = grads(naive, sh, sw)
    assert max((n - w).abs().max().item() for n, w in zip(naive_grads, whole_grads)) > 1e-4


def test_reverse_kl_of_identical_distributions_is_zero_with_zero_gradient():
    sh, sw, _, _, mask, _ = make_inputs(seed=6)
    spec = LossSpec(weights="reverse_kl", chunk_size=8)
    loss, _ = distillation_loss(sh, sw, sh.detach(), sw.detach(), mask, spec)
    assert abs(loss.item()) <= 1e-6
    for g in grads(loss, sh, sw):
        assert g.abs().max().item() <= 1e-6


def test_divergences_are_non_negative_and_finite_when_probabilities_underflow():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 9, V, generator=g) * 200  # softmax underflows to exact zeros
    t = torch.randn(4, 9, V, generator=g) * 200
    assert (torch.softmax(s, -1) == 0).any() and (torch.softmax(t, -1) == 0).any()
    for name in ("reverse_kl", "forward_kl", "jsd"):
        for scale in (1.0, 200.0):
            per = token_losses_from_logits(s / scale, t / scale, LossSpec(weights=name))
            assert torch.isfinite(per).all()
            assert per.min().item() >= -1e-5
    assert torch.isfinite(kl_per_token(t, s)).all()

    s.requires_grad_()
    spec = LossSpec(weights={"reverse_kl": 1.0, "jsd": 1.0, "forward_kl": 1.0})
    token_losses_from_logits(s, t, spec).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_teacher_receives_no_gradient():
    sh, sw, th, tw, mask, labels = make_inputs(seed=8)
    th.requires_grad_()
    tw.requires_grad_()
    loss, _ = distillation_loss(sh, sw, th, tw, mask, LossSpec(weights={"forward_kl": 1.0, "ce": 1.0}), labels)
    loss.backward()
    assert th.grad is None and tw.grad is None
    assert sh.grad is not None and sw.grad is not None


def test_bf16_inputs_run_and_stay_close_to_fp32():
    spec = LossSpec(weights={"reverse_kl": 1.0, "ce": 0.1}, chunk_size=11)
    sh, sw, th, tw, mask, labels = make_inputs(seed=9)
    ref, _ = distillation_loss(sh, sw, th, tw, mask, spec, labels)
    ref_grads = grads(ref, sh, sw)

    bh, bw, bth, btw, _, _ = make_inputs(seed=9, dtype=torch.bfloat16)
    loss, _ = distillation_loss(bh, bw, bth, btw, mask, spec, labels)
    got = grads(loss, bh, bw)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 0.03 * abs(ref.item())
    for g, r in zip(got, ref_grads):
        assert g.dtype == torch.bfloat16
        assert (g.float() - r).abs().max().item() <= 0.05 * r.abs().max().item()


def test_bf16_activations_with_fp32_head_weight_give_fp32_weight_gradient():
    spec = LossSpec(weights="reverse_kl", chunk_size=11)
    sh, sw, th, tw, mask, _ = make_inputs(seed=10)
    bh = sh.detach().bfloat16().requires_grad_()
    loss, _ = distillation_loss(bh, sw, th.bfloat16(), tw, mask, spec)
    gh, gw = grads(loss, bh, sw)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32


class AllocationTracker(TorchDispatchMode):
    """Records every op output's shape, and the peak bytes of storages created under it and still alive."""

    def __init__(self):
        super().__init__()
        self.shapes, self.live, self.now, self.peak = [], {}, 0, 0

    def _release(self, key):
        nbytes, refs = self.live.pop(key)
        if refs > 1:
            self.live[key] = (nbytes, refs - 1)
        else:
            self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                storage = t.untyped_storage()
                key = storage.data_ptr()
                nbytes, refs = self.live.get(key, (storage.nbytes(), 0))
                self.now += nbytes if refs == 0 else 0
                self.live[key] = (nbytes, refs + 1)
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.now)
        return out


def run_tracked(fn, b, s, d=8, v=1000):
    g = torch.Generator().manual_seed(11)
    sh = torch.randn(b, s, d, generator=g, requires_grad=True)
    sw = torch.randn(v, d, generator=g, requires_grad=True)
    th, tw = torch.randn(b, s, d, generator=g), torch.randn(v, d, generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    labels = torch.randint(0, v, (b, s), generator=g)
    with AllocationTracker() as tracker:
        fn(sh, sw, th, tw, mask, labels).backward()
    return tracker


def test_chunked_loss_peak_memory_is_a_few_chunk_buffers_and_independent_of_sequence_length():
    b, v, chunk = 2, 1000, 16
    spec = LossSpec(weights={"reverse_kl": 1.0, "jsd": 1.0, "ce": 0.1}, chunk_size=chunk)
    chunk_buffer = chunk * v * 4

    def chunked(sh, sw, th, tw, mask, labels):
        return distillation_loss(sh, sw, th, tw, mask, spec, labels)[0]

    def unchunked(sh, sw, th, tw, mask, labels):
        return token_losses_from_logits(sh @ sw.T, th @ tw.T, spec, labels).mean()

    short, long = run_tracked(chunked, b, 128), run_tracked(chunked, b, 256)
    assert all(torch.Size(x).numel() <= chunk * v for x in long.shapes)  # never [B, S, V]
    assert long.peak <= 10 * chunk_buffer < b * 256 * v * 4 / 3
    assert long.peak <= 1.1 * short.peak

    reference = run_tracked(unchunked, b, 256)  # the tracker does see full logits when they exist
    assert (b, 256, v) in reference.shapes and reference.peak > b * 256 * v * 4


def test_loss_spec_validation():
    assert LossSpec(weights="reverse_kl").weights == {"reverse_kl": 1.0}
    with pytest.raises(ValueError, match="reverse_kl, forward_kl, jsd, ce"):
        LossSpec(weights={"kl": 1.0})
    with pytest.raises(ValueError):
        LossSpec(weights={"ce": -1.0})
    with pytest.raises(ValueError):
        LossSpec(weights="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError):
        LossSpec(weights="ce", chunk_size=0)


def test_missing_labels_or_teacher_is_an_error_and_ce_only_needs_no_teacher():
    sh, sw, th, tw, mask, labels = make_inputs(seed=12)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(sh, sw, th, tw, mask, LossSpec(weights="ce"))
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(sh, sw, None, None, mask, LossSpec(weights="reverse_kl"), labels)
    loss, stats = distillation_loss(sh, sw, None, None, mask, LossSpec(weights="ce", chunk_size=5), labels)
    ref = F.cross_entropy((sh @ sw.T)[mask], labels[mask], reduction="sum") / mask.sum()
    assert (loss - ref).abs().item() <= 1e-5
    assert int(stats["ce"]["tokens"]) == int((mask & (labels != -100)).sum())


def test_no_grad_call_returns_loss_without_graph():
    sh, sw, th, tw, mask, _ = make_inputs(seed=13)
    with torch.no_grad():
        loss, stats = distillation_loss(sh, sw, th, tw, mask, LossSpec(weights="forward_kl", chunk_size=6))
    assert not loss.requires_grad
    assert torch.allclose(loss, stats["forward_kl"]["sum"] / stats["forward_kl"]["tokens"])


# ---------------------------------------------------------------------------------------
# The fused Triton kernel (hybridize.kernels.triton_kl): routing here, numerics in Triton's CPU
# interpreter (tests/gpu/test_kl_kernel.py runs it compiled, at training sizes)


def test_fused_kernel_is_chosen_only_on_cuda_for_mixes_without_jsd(monkeypatch):
    fake_kernel = SimpleNamespace(supports=lambda weights, dtype: "jsd" not in weights)
    monkeypatch.setattr(losses, "_triton_kl", lambda: fake_kernel)
    monkeypatch.delenv("HYBRIDIZE_KERNELS", raising=False)
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    kl_ce = LossSpec(weights={"reverse_kl": 1.0, "ce": 0.1})

    assert losses._fused_kernel(kl_ce, cuda, bf16) is fake_kernel
    assert losses._fused_kernel(kl_ce, cpu, bf16) is None
    assert losses._fused_kernel(LossSpec(weights={"jsd": 1.0, "ce": 0.1}), cuda, bf16) is None
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "triton")
    assert losses._fused_kernel(kl_ce, cuda, bf16) is fake_kernel
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "reference")
    assert losses._fused_kernel(kl_ce, cuda, bf16) is None
    monkeypatch.delenv("HYBRIDIZE_KERNELS")
    monkeypatch.setattr(losses, "_triton_kl", lambda: None)  # Triton missing or broken
    assert losses._fused_kernel(kl_ce, cuda, bf16) is None


def test_the_loss_imports_and_runs_on_cpu_without_importing_triton():
    code = (
        "import sys, torch\n"
        "from hybridize.distill.losses import LossSpec, distillation_loss\n"
        "h = torch.randn(1, 4, 8, requires_grad=True); w = torch.randn(11, 8, requires_grad=True)\n"
        "loss, _ = distillation_loss(h, w, h.detach(), w.detach(), torch.ones(1, 4), LossSpec(weights='forward_kl'))\n"
        "loss.backward()\n"
        "print('triton' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def check_fused_kernel_against_torch_formulas():
    """Values and fp32 gradients of triton_kl.values_and_grad against `_log_probs`/`_values`/`_grad_logits`
    computed from the same (possibly bf16-rounded) logits. Blocks narrower than the vocabulary make the
    online logsumexp rescale, and the last block partial; rows range from near-uniform to softmaxes that
    underflow, with large common offsets, a teacher equal to the student, and an ignored label."""
    from hybridize.kernels import triton_kl

    g = torch.Generator().manual_seed(0)
    row_scale = torch.tensor([1.0, 5.0, 30.0, 0.1, 200.0, 3.0])[:, None]
    row_offset = torch.tensor([0.0, 50.0, -300.0, 7.0, 0.0, -20.0])[:, None]
    mixes = [
        ({"reverse_kl": 1.0}, 1.0),
        ({"forward_kl": 0.7, "ce": 0.3}, 2.0),
        ({"ce": 1.0}, 2.0),  # CE alone is at T = 1 whatever the spec says
        ({"ce": 0.5, "reverse_kl": 1.0, "forward_kl": 0.0}, 2.0),  # weight 0: a value, no gradient
        ({"reverse_kl": 1.0, "ce": 1.0}, 1.0),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        for vocab, block_v in ((1000, 128), (77, 32), (77, None)):
            s = (torch.randn(6, vocab, generator=g) * row_scale + row_offset).to(dtype)
            t = (torch.randn(6, vocab, generator=g) * 3).to(dtype)
            t[3] = s[3]
            labels = torch.randint(0, vocab, (6,), generator=g)
            labels[1] = IGNORE_INDEX
            for weights, T in mixes:
                spec = LossSpec(weights=weights, temperature=T)
                lq, lp, ls = _log_probs(s.float(), t.float(), spec)
                ref_values = _values(spec, lq, lp, ls, labels)
                ref_grad = _grad_logits(spec, lq, lp, ls, labels, ref_values) * 0.25
                values, grad = triton_kl.values_and_grad(
                    s, t, labels, weights, T, scale=torch.tensor(0.25), grad_dtype=torch.float32, block_v=block_v
                )
                case = f"{dtype} V={vocab} block={block_v} {weights} T={T}"
                assert values.shape == (6, len(weights)) and grad.shape == s.shape, case
                assert rel_err(values, torch.stack([ref_values[n] for n in weights], 1)) <= 1e-5, case
                assert rel_err(grad, ref_grad) <= 1e-4, case
                if "reverse_kl" in weights:
                    assert abs(values[3, list(weights).index("reverse_kl")]) <= 1e-5, case  # teacher == student

    values_only, no_grad = triton_kl.values_and_grad(s, t, labels, {"forward_kl": 1.0}, grad=False)
    assert no_grad is None and values_only.shape == (6, 1)
    _, low_precision = triton_kl.values_and_grad(s, t, labels, {"reverse_kl": 1.0})
    assert low_precision.dtype == torch.bfloat16


def rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


INTERPRETER_CHECK = PATCH + """
import sys
sys.path.insert(0, {tests!r})
import test_losses
test_losses.check_fused_kernel_against_torch_formulas()
print("ok")
"""


def test_fused_kernel_matches_torch_formulas_in_the_triton_interpreter():
    """check_fused_kernel_against_torch_formulas, run by Triton's CPU interpreter in a fresh process (it
    must be on before Triton loads). Skipped where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    code = INTERPRETER_CHECK.format(tests=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
