"""The Triton kernels of the Mamba mixer against the torch reference in float64 (CUDA only).

Fresh random inputs for every check; relative error ||out - ref|| / ||ref|| <= 1e-3 for fp32 inputs
and 1e-2 for bf16 inputs (state and accumulation fp32), for the outputs and every gradient. Outputs are
allocated over memory poisoned with NaN, so an element the kernel forgot to write fails the check.
"""

import sys
from pathlib import Path

import pytest
import torch
from gpu_checks import poison, rel_err

from hybridize.kernels import ops
from hybridize.modeling import mamba_ops as reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

POISON = 64 << 20  # floats of NaN written over free memory before each kernel call

if torch.cuda.is_available():
    from hybridize.kernels import triton_conv, triton_scan

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}

# (batch, length, d_inner, d_state, B groups, C groups); lengths not multiples of any block size
SCAN_SHAPES = [
    (2, 1, 64, 16, 4, 4),
    (2, 7, 48, 16, 3, 12),
    (2, 129, 576, 16, 12, 36),  # SmolLM2-135M's mixer: d_inner 576, d_xb 192
    (1, 1000, 128, 16, 2, 8),
    (2, 33, 40, 5, 2, 8),  # d_state not a power of two, groups of 20 and 5 channels
]


def scan_inputs(b, l, d, n, gb, gc, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    return dict(
        x=r(b, l, d), dt=r(b, l, d), A=-torch.exp(torch.rand(d, n, generator=g, device="cuda") * 2.5),
        B=r(b, l, gb, n), C=r(b, l, gc, n), D=torch.randn(d, generator=g, device="cuda"), z=r(b, l, d),
        dt_bias=torch.randn(d, generator=g, device="cuda") * 0.5,
    )


def run_scan(fn, inputs, h0, reset, gy, gh, **kw):
    """(y, final state, grads of every input and h0) for loss = <y, gy> + <h, gh>."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    h0 = h0.detach().clone().requires_grad_() if h0 is not None else None
    y, h = fn(**leaves, initial_state=h0, reset=reset, **kw)
    loss = (y.to(gy.dtype) * gy).sum() + (h.to(gh.dtype) * gh).sum()
    loss.backward()
    grads = {f"d{k}": v.grad for k, v in leaves.items() if v is not None}
    if h0 is not None:
        grads["dh0"] = h0.grad
    return y.detach(), h.detach(), grads


def check_scan(shape, dtype, seed, with_options=True, config=None):
    b, l, d, n, gb, gc = shape
    inputs = scan_inputs(b, l, d, n, gb, gc, dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1000)
    h0 = reset = None
    if with_options:
        h0 = torch.randn(b, d, n, generator=g, device="cuda")
        reset = torch.rand(b, l, generator=g, device="cuda") < 0.05
        reset[0, l // 2] = True
        reset[-1, 0] = False  # else at length 1 every sequence drops h0: dA and dh0 are exactly 0, a case of its own
    else:
        inputs.update(D=None, z=None, dt_bias=None)
    gy = torch.randn(b, l, d, generator=g, device="cuda").to(dtype)  # representable in the output dtype
    gh = torch.randn(b, d, n, generator=g, device="cuda")

    poison(POISON)
    y, h, grads = run_scan(triton_scan.selective_scan, inputs, h0, reset, gy, gh, config=config)
    ref_inputs = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    y_ref, h_ref, grads_ref = run_scan(
        reference.selective_scan_chunked, ref_inputs, h0.double() if h0 is not None else None, reset,
        gy.double(), gh.double(),
    )
    assert y.dtype == dtype and h.dtype == torch.float32
    errors = {"y": rel_err(y, y_ref), "final_state": rel_err(h, h_ref)}
    for k, v in grads_ref.items():
        assert grads[k].dtype == (inputs[k[1:]].dtype if k != "dh0" else torch.float32)
        errors[k] = rel_err(grads[k], v)
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"{shape} {dtype} seed {seed}: {bad} (all: {errors})"
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_reset_at_every_first_position_cuts_the_initial_state_out_of_the_gradients(dtype):
    # the exact reference is dh0 = 0 and dA = 0 (no step sees a previous state); the kernels must give
    # zeros, or rounding noise far below the gradient the same inputs give without the resets
    b, l, d, n = 2, 1, 64, 16
    inputs = scan_inputs(b, l, d, n, 4, 4, dtype, seed=7)
    h0 = torch.randn(b, d, n, device="cuda")
    gy, gh = torch.randn(b, l, d, device="cuda").to(dtype), torch.randn(b, d, n, device="cuda")
    everywhere = torch.ones(b, l, dtype=torch.bool, device="cuda")
    _, _, cut = run_scan(triton_scan.selective_scan, inputs, h0, everywhere, gy, gh)
    _, _, kept = run_scan(triton_scan.selective_scan, inputs, h0, None, gy, gh)
    assert torch.count_nonzero(cut["dh0"]) == 0
    assert cut["dA"].norm() <= 1e-5 * kept["dA"].norm(), (cut["dA"].norm().item(), kept["dA"].norm().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=[f"l{s[1]}-d{s[2]}-n{s[3]}-g{s[4]}x{s[5]}" for s in SCAN_SHAPES])
def test_scan_forward_and_backward_match_float64_reference(shape, dtype):
    check_scan(shape, dtype, seed=hash((shape, str(dtype))) % 10_000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scan_without_optional_inputs(dtype):
    check_scan((2, 45, 96, 16, 2, 6), dtype, seed=7, with_options=False)


@pytest.mark.parametrize("config", [(4, 16, 1, 8, 4, 16, 1, 8), (8, 16, 1, 8, 8, 8, 1, 4), (8, 32, 2, 8, 4, 16, 1, 8),
                                    (4, 32, 2, 8, 4, 32, 2, 8), (8, 16, 1, 8, 8, 16, 1, 8), (4, 8, 1, 4, 4, 8, 1, 4)])
def test_every_benchmarked_config_is_correct(config):
    check_scan((2, 150, 256, 16, 4, 16), torch.bfloat16, seed=sum(config), config=config)


def test_scan_accepts_the_models_strided_views():
    """z, B, C arrive as slices of one projection (last dim contiguous, other strides wider)."""
    b, l, d, n, gb, gc = 2, 37, 96, 16, 2, 6
    proj = torch.randn(b, l, 2 * d + 2 * gb * n + gc * n, device="cuda", dtype=torch.bfloat16)
    z, B, C, _ = proj.split([d, gb * n, gc * n, d + gb * n], dim=-1)
    B, C = B.reshape(b, l, gb, n), C.reshape(b, l, gc, n)
    inputs = scan_inputs(b, l, d, n, gb, gc, torch.bfloat16, 3)
    inputs.update(z=z, B=B, C=C)
    y, h = triton_scan.selective_scan(**inputs)
    y_ref, h_ref = reference.selective_scan_chunked(**{k: v.double() for k, v in inputs.items()})
    assert rel_err(y, y_ref) <= 1e-2 and rel_err(h, h_ref) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_update_matches_the_scan_state_at_every_position(dtype):
    b, l, d, n, gb, gc = 3, 12, 576, 16, 12, 36
    inputs = scan_inputs(b, l, d, n, gb, gc, dtype, seed=11)
    state0 = torch.randn(b, d, n, device="cuda")
    state, h_ref = state0.clone(), state0.double()
    ref_inputs = {k: v.double() for k, v in inputs.items()}

    def prefix(tensors, start, stop):
        return {k: (v[:, start:stop] if v.dim() >= 3 else v) for k, v in tensors.items()}

    y_scan, _ = triton_scan.selective_scan(**inputs, initial_state=state0)
    for t in range(l):
        poison(POISON)
        step = {k: (v[:, t] if v.dim() >= 3 else v) for k, v in inputs.items()}
        y_t = triton_scan.selective_state_update(state, **step)
        y_ref, h_ref = reference.selective_scan_sequential(**prefix(ref_inputs, t, t + 1), initial_state=h_ref)
        _, h_scan = triton_scan.selective_scan(**prefix(inputs, 0, t + 1), initial_state=state0)
        assert y_t.dtype == dtype
        assert rel_err(y_t, y_ref[:, 0]) <= TOL[dtype], t
        assert rel_err(y_t, y_scan[:, t]) <= TOL[dtype], t
        assert rel_err(state, h_ref) <= TOL[dtype], t
        assert rel_err(state, h_scan) <= TOL[dtype], t


CONV_SHAPES = [(2, 1, 64, 4), (2, 7, 48, 4), (2, 129, 576, 4), (1, 1000, 128, 4), (2, 33, 40, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=[f"l{s[1]}-d{s[2]}-k{s[3]}" for s in CONV_SHAPES])
@pytest.mark.parametrize("with_options", [True, False], ids=["init-reset-bias", "plain"])
def test_conv_forward_backward_and_window_match_float64_reference(shape, dtype, with_options):
    b, l, d, k = shape
    g = torch.Generator(device="cuda").manual_seed(l * 31 + d)
    x = torch.randn(b, l, d, generator=g, device="cuda").to(dtype)
    w = torch.randn(d, k, generator=g, device="cuda")
    bias = torch.randn(d, generator=g, device="cuda") if with_options else None
    init = torch.randn(b, d, k - 1, generator=g, device="cuda").to(dtype) if with_options else None
    reset = None
    if with_options:
        reset = torch.rand(b, l, generator=g, device="cuda") < 0.1
        reset[-1, l // 2] = True
    gy = torch.randn(b, l, d, generator=g, device="cuda").to(dtype)
    gw = torch.randn(b, d, k - 1, generator=g, device="cuda").to(dtype)

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
        y, window = fn(leaves[0], leaves[1], leaves[2], leaves[3], reset)
        ((y.to(gy.dtype) * gy).sum() + (window.to(gw.dtype) * gw).sum()).backward()
        return y.detach(), window.detach(), [t.grad if t is not None else None for t in leaves]

    poison(POISON)
    y, window, grads = run(triton_conv.causal_conv1d, (x, w, bias, init))
    y_ref, window_ref, grads_ref = run(
        reference.causal_conv1d, [t.double() if t is not None else None for t in (x, w, bias, init)]
    )
    assert y.dtype == dtype
    errors = {"y": rel_err(y, y_ref), "window": rel_err(window, window_ref)}
    for name, got, want in zip(["dx", "dw", "dbias", "dinit"], grads, grads_ref):
        if want is not None:
            errors[name] = rel_err(got, want)
    bad = {k_: v for k_, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"{shape} {dtype}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_update_steps_equal_the_full_conv(dtype):
    b, l, d, k = 3, 9, 576, 4
    x = torch.randn(b, l, d, device="cuda").to(dtype)
    w, bias = torch.randn(d, k, device="cuda"), torch.randn(d, device="cuda")
    window = torch.randn(b, d, k - 1, device="cuda").to(dtype)
    y_full, window_full = reference.causal_conv1d(x.double(), w.double(), bias.double(), window.double())
    for t in range(l):
        poison(POISON)
        y_t = triton_conv.causal_conv1d_update(window, x[:, t], w, bias)
        assert rel_err(y_t, y_full[:, t]) <= TOL[dtype]
    assert rel_err(window, window_full) <= TOL[dtype]


def test_cuda_calls_dispatch_to_triton_and_cpu_calls_to_the_reference(monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "triton")
    inputs = scan_inputs(2, 9, 48, 16, 3, 12, torch.bfloat16, 5)
    assert ops.backend("selective_scan", **inputs) == "triton"
    assert ops.backend("causal_conv1d", inputs["x"], torch.randn(48, 4, device="cuda")) == "triton"
    cpu = {k: v.cpu() for k, v in inputs.items()}
    assert ops.backend("selective_scan", **cpu) == "reference"
    y, _ = ops.selective_scan(**inputs)
    y_direct, _ = triton_scan.selective_scan(**inputs)
    assert torch.equal(y, y_direct)


def test_hybrid_model_on_cuda_matches_the_reference_path(monkeypatch):
    """The mixer through the dispatch point (Triton) vs the torch reference: logits, gradients, decoding."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny import tiny_teacher

    from hybridize.convert.surgery import build_hybrid

    torch.manual_seed(0)
    model = build_hybrid(tiny_teacher("llama"), ["attention", "mamba", "mamba", "mamba"]).cuda()
    ids = torch.randint(0, 96, (2, 45), device="cuda")

    def forward_backward(mode):
        monkeypatch.setenv("HYBRIDIZE_KERNELS", mode)
        model.zero_grad()
        out = model(ids, use_cache=False)
        out.logits.float().square().mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    logits_ref, grads_ref = forward_backward("reference")
    logits, grads = forward_backward("triton")
    assert rel_err(logits, logits_ref) <= 1e-4
    for k, v in grads_ref.items():
        assert rel_err(grads[k], v) <= 1e-3, k

    # prefill through the scan, then one token at a time through the state updates
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "triton")
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :20], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(20, 45):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1), full) <= 1e-4
