"""The dispatch point of the Mamba mixer's ops (DESIGN.md §4).

Each op picks, in order:
1. an installed external kernel (`mamba_ssm`, `causal_conv1d`) when it supports the call;
2. our Triton kernel (`triton_scan`, `triton_conv`) on CUDA tensors;
3. the torch reference (`hybridize.modeling.mamba_ops`) otherwise, e.g. on CPU.

The external kernels cover less than ours, so they are taken only where their semantics match:
- `mamba_ssm.selective_scan_fn` needs one group count for B and C (ours differ: d_xb/n vs d_inner/n),
  has no initial state and no document resets, and drops the gradient of the final state. Taken for
  equal group counts, no initial state, no resets, and no gradient needed (inference prefill).
- `mamba_ssm`'s Triton `selective_state_update` needs B and C of one shape (equal group counts).
- `causal_conv1d_fn` supports resets only through `seq_idx`, which excludes an initial window and
  final states: taken without resets (the final window is gathered here in torch, so its gradient is
  right); `causal_conv1d_update` is taken when the window has the input's dtype.
With SmolLM2/Apriel-style GQA layouts (B groups != C groups) the scan always runs on our kernels.

`HYBRIDIZE_KERNELS` (read at each call) overrides the choice: `auto` (default), `triton` (skip the
external kernels), `reference` (torch everywhere). Triton is imported lazily, the first time a CUDA
tensor reaches an op, so this module imports on machines without Triton.
"""

import functools
import importlib
import os

import torch

from hybridize.kernels.common import final_window
from hybridize.modeling import mamba_ops as reference

__all__ = ["backend", "causal_conv1d", "causal_conv1d_update", "kernel_mode", "selective_scan", "selective_state_update"]

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_mode():
    """`HYBRIDIZE_KERNELS`, validated. The distillation loss's fused kernel (`triton_kl`) obeys it too."""
    mode = os.environ.get("HYBRIDIZE_KERNELS", "auto").strip().lower()
    if mode not in ("auto", "triton", "reference"):
        raise ValueError(f"HYBRIDIZE_KERNELS must be auto, triton or reference, not {mode!r}")
    return mode


def _optional_import(module, name):
    """`module.name` if the package is installed and imports cleanly, else None."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # a broken or CPU-only build of an optional package must not break the model
        return None


@functools.cache
def triton_module(name):
    """`hybridize.kernels.<name>` when Triton is installed and it imports, else None; imported on first use."""
    try:
        return importlib.import_module(f"hybridize.kernels.{name}")
    except Exception:  # ImportError without Triton; anything a broken install raises
        return None


def _triton():
    """(triton_scan, triton_conv) when Triton is installed and imports, else None."""
    scan, conv = triton_module("triton_scan"), triton_module("triton_conv")
    return (scan, conv) if scan is not None and conv is not None else None


@functools.cache
def _external(name):
    return {
        "selective_scan_fn": lambda: _optional_import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
        "selective_state_update": lambda: _optional_import(
            "mamba_ssm.ops.triton.selective_state_update", "selective_state_update"
        ),
        "causal_conv1d_fn": lambda: _optional_import("causal_conv1d", "causal_conv1d_fn"),
        "causal_conv1d_update": lambda: _optional_import("causal_conv1d", "causal_conv1d_update"),
    }[name]()


def _all_cuda(*tensors):
    return all(t.is_cuda for t in tensors if t is not None)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------
# adapters to the external kernels' layouts ([b, d, l] and [b, groups, n, l])


def external_selective_scan(fn, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """mamba_ssm's selective_scan_fn on our layout; returns (y [b, l, d], final state fp32)."""
    dtype = x.dtype
    out, last = fn(
        x.transpose(1, 2),
        dt.to(dtype).transpose(1, 2),
        A.float(),
        B.to(dtype).permute(0, 2, 3, 1),
        C.to(dtype).permute(0, 2, 3, 1),
        None if D is None else D.float(),
        None if z is None else z.to(dtype).transpose(1, 2),
        None if dt_bias is None else dt_bias.float(),
        delta_softplus=True,
        return_last_state=True,
    )
    return out.transpose(1, 2), last.float()


def external_state_update(fn, state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """mamba_ssm's selective_state_update with the groups as heads: state [b, d, n] -> [b, g, d/g, n]."""
    b, d = x.shape
    g, n = B.shape[1], B.shape[2]
    heads = state.view(b, g, d // g, n)  # a view: the kernel's in-place update lands in `state`
    y = fn(
        heads,
        x.reshape(b, g, d // g),
        dt.reshape(b, g, d // g),
        A.reshape(g, d // g, n),
        B,
        C,
        None if D is None else D.reshape(g, d // g),
        None if z is None else z.reshape(b, g, d // g),
        None if dt_bias is None else dt_bias.reshape(g, d // g),
        dt_softplus=True,
    )
    return y.reshape(b, d)


def external_causal_conv1d(fn, x, weight, bias=None, initial_state=None):
    """causal_conv1d_fn in channel-last layout (no resets); returns y [b, l, d] (window gathered by the caller)."""
    init = None
    if initial_state is not None:  # channel-last [b, d, k-1] view, as the kernel wants with channel-last x
        init = initial_state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    y = fn(
        x.contiguous().transpose(1, 2),
        weight.to(x.dtype),
        None if bias is None else bias.to(x.dtype),
        initial_states=init,
        activation=None,
    )
    return y.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# backend choice (exposed for tests and benchmarks)


def backend(op, *args, **kwargs):
    """Which implementation `op` ("selective_scan", "selective_state_update", "causal_conv1d",
    "causal_conv1d_update") would use for these arguments: "external", "triton" or "reference"."""
    return _CHOOSERS[op](*args, **kwargs)


def _scan_backend(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, reset=None):
    mode = kernel_mode()
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    if mode == "reference" or not _all_cuda(*tensors, reset):
        return "reference"
    if (
        mode == "auto"
        and _external("selective_scan_fn") is not None
        and initial_state is None
        and reset is None
        and B.shape[2] == C.shape[2]
        and x.shape[1] > 0
        and x.dtype in _FAST_DTYPES
        and not _needs_grad(*tensors)
    ):
        return "external"
    kernels = _triton()
    if kernels is not None and kernels[0].supports(x, dt, A, B, C, D, z, dt_bias, initial_state, reset):
        return "triton"
    return "reference"


def _state_update_backend(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    mode = kernel_mode()
    tensors = (state, x, dt, A, B, C, D, z, dt_bias)
    if mode == "reference" or not _all_cuda(*tensors):
        return "reference"
    fast = (
        state.dtype == torch.float32
        and state.is_contiguous()
        and not _needs_grad(*tensors)
        and all(t.dtype in _FAST_DTYPES for t in tensors if t is not None)
        and x.shape[1] % B.shape[1] == 0
        and x.shape[1] % C.shape[1] == 0
    )
    if not fast:
        return "reference"
    if mode == "auto" and _external("selective_state_update") is not None and B.shape == C.shape:
        return "external"
    return "triton" if _triton() is not None else "reference"


def _conv_backend(x, weight, bias=None, initial_state=None, reset=None):
    mode = kernel_mode()
    if mode == "reference" or not _all_cuda(x, weight, bias, initial_state, reset):
        return "reference"
    k = weight.shape[1]
    if (
        mode == "auto"
        and _external("causal_conv1d_fn") is not None
        and reset is None
        and 2 <= k <= 4
        and x.shape[1] > 0
        and x.dtype in _FAST_DTYPES
    ):
        return "external"
    kernels = _triton()
    if kernels is not None and kernels[1].supports(x, weight, bias, initial_state, reset):
        return "triton"
    return "reference"


def _conv_update_backend(conv_state, x, weight, bias=None):
    mode = kernel_mode()
    if mode == "reference" or not _all_cuda(conv_state, x, weight, bias):
        return "reference"
    k = weight.shape[1]
    if _needs_grad(conv_state, x, weight, bias) or k < 2 or x.dtype not in _FAST_DTYPES:
        return "reference"
    if mode == "auto" and _external("causal_conv1d_update") is not None and conv_state.dtype == x.dtype and k <= 4:
        return "external"
    return "triton" if _triton() is not None else "reference"


_CHOOSERS = {
    "selective_scan": _scan_backend,
    "selective_state_update": _state_update_backend,
    "causal_conv1d": _conv_backend,
    "causal_conv1d_update": _conv_update_backend,
}


# ----------------------------------------------------------------------------------------------
# the ops


def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, reset=None):
    """See `mamba_ops.selective_scan`. Returns (y [b, l, d], final state fp32 [b, d, n])."""
    which = _scan_backend(x, dt, A, B, C, D, z, dt_bias, initial_state, reset)
    if which == "external":
        return external_selective_scan(_external("selective_scan_fn"), x, dt, A, B, C, D, z, dt_bias)
    if which == "triton":
        return _triton()[0].selective_scan(x, dt, A, B, C, D, z, dt_bias, initial_state, reset)
    return reference.selective_scan(x, dt, A, B, C, D, z, dt_bias, initial_state, reset)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """See `mamba_ops.selective_state_update`: one step, `state` updated in place; returns y [b, d]."""
    which = _state_update_backend(state, x, dt, A, B, C, D, z, dt_bias)
    if which == "external":
        return external_state_update(_external("selective_state_update"), state, x, dt, A, B, C, D, z, dt_bias)
    if which == "triton":
        return _triton()[0].selective_state_update(state, x, dt, A, B, C, D, z, dt_bias)
    return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias)


def causal_conv1d(x, weight, bias=None, initial_state=None, reset=None):
    """See `mamba_ops.causal_conv1d`. Returns (y [b, l, d], final window [b, d, k-1])."""
    which = _conv_backend(x, weight, bias, initial_state, reset)
    if which == "external":
        y = external_causal_conv1d(_external("causal_conv1d_fn"), x, weight, bias, initial_state)
        return y, final_window(x, initial_state, reset, weight.shape[1])
    if which == "triton":
        return _triton()[1].causal_conv1d(x, weight, bias, initial_state, reset)
    return reference.causal_conv1d(x, weight, bias, initial_state, reset)


def causal_conv1d_update(conv_state, x, weight, bias=None):
    """See `mamba_ops.causal_conv1d_update`: shifts `conv_state` in place; returns y [b, d]."""
    which = _conv_update_backend(conv_state, x, weight, bias)
    if which == "external":
        fn = _external("causal_conv1d_update")
        return fn(x, conv_state, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation=None)
    if which == "triton":
        return _triton()[1].causal_conv1d_update(conv_state, x, weight, bias)
    return reference.causal_conv1d_update(conv_state, x, weight, bias)
