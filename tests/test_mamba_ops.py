"""The torch reference ops of the Mamba mixer agree with each other and with the plain recurrence."""

import pytest
import torch

from hybridize.modeling import mamba_ops as ops


def random_inputs(b=2, l=29, d=12, n=4, groups=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        x=r(b, l, d), dt=r(b, l, d), A=-torch.rand(d, n, generator=g, dtype=dtype) * 3,
        B=r(b, l, groups, n), C=r(b, l, groups, n), D=r(d), z=r(b, l, d), dt_bias=r(d),
    )


def naive_scan(x, dt, A, B, C, D, z, dt_bias, h):
    """The recurrence written per channel and state, as DESIGN.md states it."""
    b, l, d = x.shape
    n = A.shape[1]
    per_group = d // B.shape[2]
    y = torch.zeros(b, l, d, dtype=torch.float64)
    h = h.double().clone()
    for t in range(l):
        for c in range(d):
            k = c // per_group
            step = torch.nn.functional.softplus(dt[:, t, c].double() + dt_bias[c].double())
            for s in range(n):
                h[:, c, s] = torch.exp(step * A[c, s]) * h[:, c, s] + step * B[:, t, k, s] * x[:, t, c]
            y[:, t, c] = (C[:, t, k].double() * h[:, c]).sum(-1) + D[c] * x[:, t, c]
        y[:, t] *= torch.nn.functional.silu(z[:, t].double())
    return y, h


def test_sequential_scan_matches_the_recurrence_written_per_channel():
    inputs = random_inputs(b=2, l=6, d=6, n=3, groups=2)
    h0 = torch.randn(2, 6, 3)
    y, h = ops.selective_scan_sequential(**inputs, initial_state=h0)
    y_ref, h_ref = naive_scan(**inputs, h=h0)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_scan_equals_sequential_scan_with_state_and_resets(chunk):
    inputs = random_inputs(l=37, seed=chunk)
    h0 = torch.randn(2, 12, 4)
    reset = torch.rand(2, 37) < 0.15
    y1, h1 = ops.selective_scan_sequential(**inputs, initial_state=h0, reset=reset)
    y2, h2 = ops.selective_scan_chunked(**inputs, initial_state=h0, reset=reset, chunk_size=chunk)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h2, atol=1e-5, rtol=1e-5)


def test_chunked_scan_gradients_equal_sequential_scan_gradients():
    inputs = {k: v.requires_grad_() for k, v in random_inputs(l=21).items()}
    h0 = torch.randn(2, 12, 4, requires_grad=True)
    grads = []
    for scan in (ops.selective_scan_sequential, lambda **kw: ops.selective_scan_chunked(**kw, chunk_size=6)):
        y, h = scan(**inputs, initial_state=h0)
        (y.square().sum() + h.sum()).backward()
        grads.append([t.grad.clone() for t in (*inputs.values(), h0)])
        for t in (*inputs.values(), h0):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_packed_documents_with_resets_equal_documents_run_separately():
    inputs = random_inputs(b=1, l=30)
    lengths = [7, 11, 12]
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, [0, 7, 18]] = True
    y, _ = ops.selective_scan(**inputs, reset=reset)
    conv_w, conv_b = torch.randn(12, 4), torch.randn(12)
    yc, _ = ops.causal_conv1d(inputs["x"], conv_w, conv_b, reset=reset)
    start = 0
    for length in lengths:
        part = {k: (v[:, start : start + length] if v.dim() >= 3 else v) for k, v in inputs.items()}
        y_doc, _ = ops.selective_scan(**part)
        yc_doc, _ = ops.causal_conv1d(part["x"], conv_w, conv_b)
        torch.testing.assert_close(y[:, start : start + length], y_doc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(yc[:, start : start + length], yc_doc, atol=1e-6, rtol=1e-6)
        start += length


def test_reference_scan_passes_gradcheck_in_float64():
    inputs = {k: v.requires_grad_() for k, v in random_inputs(b=1, l=5, d=4, n=2, groups=2, dtype=torch.float64).items()}
    h0 = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    reset = torch.tensor([[False, False, True, False, False]])
    names = list(inputs)

    def chunked(*args):
        kw = dict(zip(names, args[:-1]))
        y, h = ops.selective_scan_chunked(**kw, initial_state=args[-1], reset=reset, chunk_size=2)
        return y, h

    assert torch.autograd.gradcheck(chunked, (*inputs.values(), h0))


def test_state_update_reproduces_the_scan_state_at_every_position():
    inputs = random_inputs(l=9)
    state = torch.randn(2, 12, 4)
    conv_state = torch.randn(2, 12, 3)
    conv_w, conv_b = torch.randn(12, 4), torch.randn(12)
    y_scan, h_scan = ops.selective_scan_sequential(**inputs, initial_state=state.clone())
    yc_full, window = ops.causal_conv1d(inputs["x"], conv_w, conv_b, initial_state=conv_state.clone())
    for t in range(9):
        step = {k: (v[:, t] if v.dim() >= 3 else v) for k, v in inputs.items()}
        y_t = ops.selective_state_update(state, **step)
        yc_t = ops.causal_conv1d_update(conv_state, inputs["x"][:, t], conv_w, conv_b)
        torch.testing.assert_close(y_t, y_scan[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(yc_t, yc_full[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, h_scan, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv_state, window, atol=1e-6, rtol=1e-6)


def test_conv_split_in_two_calls_with_carried_window_equals_one_call():
    x = torch.randn(2, 13, 6)
    w, b = torch.randn(6, 4), torch.randn(6)
    y_full, window_full = ops.causal_conv1d(x, w, b)
    y1, window = ops.causal_conv1d(x[:, :5], w, b)
    y2, window2 = ops.causal_conv1d(x[:, 5:], w, b, initial_state=window)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    torch.testing.assert_close(window2, window_full)


def test_conv_window_after_a_late_reset_holds_only_the_new_document():
    x = torch.randn(1, 8, 3)
    reset = torch.zeros(1, 8, dtype=torch.bool)
    reset[0, 6] = True
    _, window = ops.causal_conv1d(x, torch.randn(3, 4), None, reset=reset)
    assert torch.all(window[0, :, 0] == 0)  # input at t=5 belongs to the previous document
    torch.testing.assert_close(window[0, :, 1:], x[0, 6:].T)
