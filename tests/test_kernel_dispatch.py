"""The kernel dispatch point (CPU): routing rules, the reference on CPU, imports without Triton, and the
layout adapters to the external kernels (checked against stand-ins written from their documented semantics)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hybridize.kernels import ops
from hybridize.modeling import mamba_ops as reference


def scan_inputs(b=2, l=11, d=12, n=4, gb=3, gc=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return dict(
        x=r(b, l, d), dt=r(b, l, d), A=-torch.rand(d, n, generator=g) * 2, B=r(b, l, gb, n), C=r(b, l, gc, n),
        D=r(d), z=r(b, l, d), dt_bias=r(d),
    )


def test_cpu_tensors_route_to_the_reference_and_give_its_results():
    inputs = scan_inputs()
    h0 = torch.randn(2, 12, 4)
    reset = torch.rand(2, 11) < 0.2
    assert ops.backend("selective_scan", **inputs, initial_state=h0, reset=reset) == "reference"
    y, h = ops.selective_scan(**inputs, initial_state=h0, reset=reset)
    y_ref, h_ref = reference.selective_scan(**inputs, initial_state=h0, reset=reset)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)

    step = {k: (v[:, 0] if v.dim() >= 3 else v) for k, v in inputs.items()}
    assert ops.backend("selective_state_update", h0, **step) == "reference"
    s1, s2 = h0.clone(), h0.clone()
    assert torch.equal(ops.selective_state_update(s1, **step), reference.selective_state_update(s2, **step))
    assert torch.equal(s1, s2)

    x, w, bias, window = inputs["x"], torch.randn(12, 4), torch.randn(12), torch.randn(2, 12, 3)
    assert ops.backend("causal_conv1d", x, w, bias, window, reset) == "reference"
    got, want = ops.causal_conv1d(x, w, bias, window, reset), reference.causal_conv1d(x, w, bias, window, reset)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ops.backend("causal_conv1d_update", window, x[:, 0], w, bias) == "reference"
    w1, w2 = window.clone(), window.clone()
    y1 = ops.causal_conv1d_update(w1, x[:, 0], w, bias)
    assert torch.equal(y1, reference.causal_conv1d_update(w2, x[:, 0], w, bias))
    assert torch.equal(w1, w2)


def test_reference_mode_and_bad_mode(monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "reference")
    assert ops.backend("selective_scan", **scan_inputs()) == "reference"
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "fastest")
    with pytest.raises(ValueError, match="HYBRIDIZE_KERNELS"):
        ops.backend("selective_scan", **scan_inputs())


def test_ops_and_the_model_import_and_run_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch\n"
        "from hybridize.kernels import ops\n"
        "import hybridize.modeling.modeling_hybrid as m\n"
        "assert m.selective_scan is ops.selective_scan, 'the model should use the dispatch point'\n"
        "assert ops._triton() is None\n"
        "x = torch.randn(1, 5, 8); w = torch.randn(8, 4)\n"
        "y, win = ops.causal_conv1d(x, w)\n"
        "assert y.shape == (1, 5, 8) and win.shape == (1, 8, 3)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_importing_ops_does_not_import_triton():
    code = "import sys\nfrom hybridize.kernels import ops\nprint('triton' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# routing rules for CUDA calls, exercised on CPU by pretending the tensors are on the GPU


@pytest.fixture
def pretend_cuda(monkeypatch):
    monkeypatch.setattr(ops, "_all_cuda", lambda *tensors: True)
    monkeypatch.delenv("HYBRIDIZE_KERNELS", raising=False)

    def install(external=(), triton=True):
        fakes = {name: (lambda *a, **k: None) for name in external}
        monkeypatch.setattr(ops, "_external", lambda name: fakes.get(name))
        monkeypatch.setattr(ops, "_triton", lambda: (_AlwaysSupports(), _AlwaysSupports()) if triton else None)

    return install


class _AlwaysSupports:
    @staticmethod
    def supports(*args, **kwargs):
        return True


def test_external_scan_only_where_its_semantics_match(pretend_cuda):
    pretend_cuda(external=["selective_scan_fn"])
    same_groups = scan_inputs(gb=3, gc=3)
    assert ops.backend("selective_scan", **same_groups) == "external"
    # the model's GQA layout: B and C have different group counts
    assert ops.backend("selective_scan", **scan_inputs(gb=3, gc=6)) == "triton"
    assert ops.backend("selective_scan", **same_groups, initial_state=torch.zeros(2, 12, 4)) == "triton"
    assert ops.backend("selective_scan", **same_groups, reset=torch.zeros(2, 11, dtype=torch.bool)) == "triton"
    with_grad = dict(same_groups, x=same_groups["x"].requires_grad_())
    assert ops.backend("selective_scan", **with_grad) == "triton"  # mamba_ssm drops the final state's gradient
    with torch.no_grad():
        assert ops.backend("selective_scan", **with_grad) == "external"


def test_triton_mode_skips_external_kernels_and_no_triton_falls_back(pretend_cuda, monkeypatch):
    pretend_cuda(external=["selective_scan_fn", "causal_conv1d_fn"])
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "triton")
    assert ops.backend("selective_scan", **scan_inputs(gb=3, gc=3)) == "triton"
    assert ops.backend("causal_conv1d", torch.randn(1, 5, 8), torch.randn(8, 4)) == "triton"
    pretend_cuda(triton=False)
    assert ops.backend("selective_scan", **scan_inputs()) == "reference"


def test_conv_routing(pretend_cuda):
    pretend_cuda(external=["causal_conv1d_fn", "causal_conv1d_update"])
    x, w = torch.randn(2, 9, 8), torch.randn(8, 4)
    assert ops.backend("causal_conv1d", x, w, None, torch.randn(2, 8, 3)) == "external"
    assert ops.backend("causal_conv1d", x, w, reset=torch.zeros(2, 9, dtype=torch.bool)) == "triton"
    assert ops.backend("causal_conv1d", x, torch.randn(8, 5)) == "triton"  # kernel width 5
    window = torch.randn(2, 8, 3)
    assert ops.backend("causal_conv1d_update", window, x[:, 0], w) == "external"
    assert ops.backend("causal_conv1d_update", window.double(), x[:, 0], w) == "triton"  # window dtype differs


def test_state_update_routing(pretend_cuda):
    pretend_cuda(external=["selective_state_update"])
    inputs = scan_inputs(gb=3, gc=3)
    step = {k: (v[:, 0] if v.dim() >= 3 else v) for k, v in inputs.items()}
    state = torch.zeros(2, 12, 4)
    assert ops.backend("selective_state_update", state, **step) == "external"
    unequal = {k: (v[:, 0] if v.dim() >= 3 else v) for k, v in scan_inputs(gb=3, gc=6).items()}
    assert ops.backend("selective_state_update", state, **unequal) == "triton"
    assert ops.backend("selective_state_update", state.double(), **step) == "reference"  # fp32 state only


# ----------------------------------------------------------------------------------------------
# adapters to the external kernels' layouts, against stand-ins written from their documentation


def fake_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """mamba_ssm's selective_scan_ref semantics: u, delta, z [b, d, l]; B, C [b, g, n, l] (one g for both)."""
    b, d, l = u.shape
    assert B.dim() == 4 and B.shape == C.shape and B.shape[-1] == l and delta_softplus and return_last_state
    dt = delta.float() + (delta_bias[:, None] if delta_bias is not None else 0)
    dt = F.softplus(dt)
    rep = d // B.shape[1]
    Bc = B.float().repeat_interleave(rep, dim=1)  # [b, d, n, l]
    Cc = C.float().repeat_interleave(rep, dim=1)
    h = u.new_zeros(b, d, A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t].float())[..., None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), h


def fake_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm's selective_state_update_ref with heads: state [b, h, p, n], B/C [b, g, n], h % g == 0."""
    b, nh, p, n = state.shape
    g = B.shape[1]
    assert x.shape == (b, nh, p) and A.shape == (nh, p, n) and B.shape == C.shape == (b, g, n) and dt_softplus
    dt = F.softplus(dt + dt_bias)
    Bh = B.repeat_interleave(nh // g, dim=1)[:, :, None, :]
    Ch = C.repeat_interleave(nh // g, dim=1)[:, :, None, :]
    state.copy_(state * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * Bh)
    out = (state * Ch).sum(-1) + D * x
    return out * F.silu(z)


def fake_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                          final_states_out=None, activation=None):
    """causal_conv1d_ref: x [b, d, l] (channel-last strides here), initial_states [b, d, k-1]."""
    assert x.stride(1) == 1, "the adapter passes channel-last x"
    assert initial_states is None or initial_states.stride(1) == 1
    b, d, l = x.shape
    k = weight.shape[1]
    if initial_states is None:
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=d)
    else:
        out = F.conv1d(torch.cat([initial_states, x], dim=-1), weight.unsqueeze(1), bias, padding=0, groups=d)
    return out[..., :l]


def test_external_scan_adapter_matches_the_reference_layout():
    inputs = scan_inputs(gb=3, gc=3)
    y, h = ops.external_selective_scan(fake_selective_scan_fn, **inputs)
    y_ref, h_ref = reference.selective_scan_sequential(**inputs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_external_state_update_adapter_updates_our_state_in_place():
    inputs = scan_inputs(gb=3, gc=3)
    step = {k: (v[:, 0] if v.dim() >= 3 else v) for k, v in inputs.items()}
    s1, s2 = torch.randn(2, 12, 4), None
    s2 = s1.clone()
    y = ops.external_state_update(fake_state_update, s1, **step)
    y_ref = reference.selective_state_update(s2, **step)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)


def test_external_conv_adapter_matches_the_reference_with_initial_window():
    x, w, bias, window = torch.randn(2, 9, 8), torch.randn(8, 4), torch.randn(8), torch.randn(2, 8, 3)
    y = ops.external_causal_conv1d(fake_causal_conv1d_fn, x, w, bias, window)
    y_ref, _ = reference.causal_conv1d(x, w, bias, window)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y = ops.external_causal_conv1d(fake_causal_conv1d_fn, x, w, bias)
    torch.testing.assert_close(y, reference.causal_conv1d(x, w, bias)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_init", [False, True])
def test_final_window_helper_equals_the_reference_window(with_init):
    for l in (1, 2, 3, 9):
        x = torch.randn(2, l, 5)
        init = torch.randn(2, 5, 3) if with_init else None
        reset = torch.rand(2, l) < 0.3
        from hybridize.kernels.common import final_window

        for r in (None, reset):
            _, want = reference.causal_conv1d(x, torch.randn(5, 4), None, init, r)
            torch.testing.assert_close(final_window(x, init, r, 4), want)
