"""Triton kernels of the depthwise causal conv1d (with initial window and document resets) and its
one-token update. Semantics of `hybridize.modeling.mamba_ops.causal_conv1d` / `causal_conv1d_update`.

y[t, c] = bias[c] + sum_{m=0}^{k-1} w[c, k-1-m] * x[t-m, c], where x at negative times comes from the
initial window (slot k-1+t-m) or is zero, and the tap of lag m is dropped when a document starts in
(t-m, t] (a reset at any of t-m+1 .. t). One program = one batch element x a block of time steps x a
block of channels; accumulation in fp32. The backward kernel computes dx (the transposed taps, with the
same reset rule), the per-program partial sums of dw and dbias (fp32 atomics), and the gradient of the
initial window. The final window is gathered in torch by the caller (differentiable there).
"""

import torch
import triton
import triton.language as tl

from hybridize.kernels.common import final_window


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, rst_ptr, y_ptr,
    L, DM,
    sx_b, sx_l, si_b, si_d, si_k, sr_b, sr_l, sw_d, sw_k,
    K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_RST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_d * BD + tl.arange(0, BD)
    tm = t < L
    cm = c < DM
    if HAS_BIAS:
        acc = tl.zeros([BT, BD], dtype=tl.float32) + tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.zeros([BT, BD], dtype=tl.float32)
    drop = tl.zeros([BT], dtype=tl.int1)
    for m in tl.static_range(K):
        if HAS_RST and m >= 1:
            tr = t - m + 1
            drop = drop | (tl.load(rst_ptr + pid_b * sr_b + tr * sr_l, mask=tm & (tr >= 0), other=0) != 0)
        s = t - m
        wv = tl.load(w_ptr + c * sw_d + (K - 1 - m) * sw_k, mask=cm, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + pid_b * sx_b + s[:, None] * sx_l + c[None, :],
                     mask=(tm & (s >= 0))[:, None] & cm[None, :], other=0.0).to(tl.float32)
        if HAS_INIT:
            xv += tl.load(init_ptr + pid_b * si_b + c[None, :] * si_d + (K - 1 + s[:, None]) * si_k,
                          mask=(tm & (s < 0))[:, None] & cm[None, :], other=0.0).to(tl.float32)
        contrib = xv * wv[None, :]
        if HAS_RST:
            contrib = tl.where(drop[:, None], 0.0, contrib)
        acc += contrib
    tl.store(y_ptr + pid_b * L * DM + t[:, None] * DM + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


@triton.jit
def _conv_dx(dy_ptr, w_ptr, rst_ptr, pid_b, s, c, L, cm, sdy_b, sdy_l, sr_b, sr_l, sw_d, sw_k,
             K: tl.constexpr, HAS_RST: tl.constexpr):
    """Gradient of the input at times s (may be negative: initial window): sum over taps of dy[s+m] w."""
    acc = tl.zeros([s.shape[0], c.shape[0]], dtype=tl.float32)
    drop = tl.zeros([s.shape[0]], dtype=tl.int1)
    for m in tl.static_range(K):
        t = s + m
        if HAS_RST and m >= 1:  # the tap of lag m from s is dropped if a document starts in s+1 .. s+m
            drop = drop | (tl.load(rst_ptr + pid_b * sr_b + t * sr_l, mask=(t >= 0) & (t < L), other=0) != 0)
        wv = tl.load(w_ptr + c * sw_d + (K - 1 - m) * sw_k, mask=cm, other=0.0).to(tl.float32)
        dyv = tl.load(dy_ptr + pid_b * sdy_b + t[:, None] * sdy_l + c[None, :],
                      mask=((t >= 0) & (t < L))[:, None] & cm[None, :], other=0.0).to(tl.float32)
        contrib = dyv * wv[None, :]
        if HAS_RST:
            contrib = tl.where(drop[:, None], 0.0, contrib)
        acc += contrib
    return acc


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, init_ptr, rst_ptr, dy_ptr,
    dx_ptr, dw_ptr, db_ptr, dinit_ptr,
    L, DM,
    sx_b, sx_l, si_b, si_d, si_k, sr_b, sr_l, sw_d, sw_k, sdy_b, sdy_l,
    K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_RST: tl.constexpr, WANT_DINIT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_d * BD + tl.arange(0, BD)
    tm = t < L
    cm = c < DM
    # dx for this block's times
    dxv = _conv_dx(dy_ptr, w_ptr, rst_ptr, pid_b, t, c, L, cm, sdy_b, sdy_l, sr_b, sr_l, sw_d, sw_k, K, HAS_RST)
    tl.store(dx_ptr + pid_b * L * DM + t[:, None] * DM + c[None, :], dxv.to(dx_ptr.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])
    if WANT_DINIT:
        if pid_t == 0:
            j = tl.arange(0, KP)
            s0 = j - (K - 1)
            dinit = _conv_dx(dy_ptr, w_ptr, rst_ptr, pid_b, s0, c, L, cm, sdy_b, sdy_l, sr_b, sr_l, sw_d, sw_k,
                             K, HAS_RST)
            tl.store(dinit_ptr + pid_b * DM * (K - 1) + c[None, :] * (K - 1) + j[:, None], dinit,
                     mask=(j < K - 1)[:, None] & cm[None, :])
    # dw, dbias: sum over this block's outputs of dy * (the input each tap read)
    dyv = tl.load(dy_ptr + pid_b * sdy_b + t[:, None] * sdy_l + c[None, :], mask=tm[:, None] & cm[None, :],
                  other=0.0).to(tl.float32)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + c, tl.sum(dyv, axis=0), mask=cm, sem="relaxed")
    drop = tl.zeros([BT], dtype=tl.int1)
    for m in tl.static_range(K):
        if HAS_RST and m >= 1:
            tr = t - m + 1
            drop = drop | (tl.load(rst_ptr + pid_b * sr_b + tr * sr_l, mask=tm & (tr >= 0), other=0) != 0)
        s = t - m
        xv = tl.load(x_ptr + pid_b * sx_b + s[:, None] * sx_l + c[None, :],
                     mask=(tm & (s >= 0))[:, None] & cm[None, :], other=0.0).to(tl.float32)
        if HAS_INIT:
            xv += tl.load(init_ptr + pid_b * si_b + c[None, :] * si_d + (K - 1 + s[:, None]) * si_k,
                          mask=(tm & (s < 0))[:, None] & cm[None, :], other=0.0).to(tl.float32)
        prod = dyv * xv
        if HAS_RST:
            prod = tl.where(drop[:, None], 0.0, prod)
        tl.atomic_add(dw_ptr + c * K + (K - 1 - m), tl.sum(prod, axis=0), mask=cm, sem="relaxed")


@triton.jit
def _conv_update_kernel(
    st_ptr, x_ptr, w_ptr, b_ptr, y_ptr,
    DM, sst_b, sst_d, sst_k, sx_b, sw_d, sw_k,
    K: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    c = pid_d * BD + tl.arange(0, BD)
    j = tl.arange(0, KP)
    cm = c < DM
    xv = tl.load(x_ptr + pid_b * sx_b + c, mask=cm, other=0.0)
    base = st_ptr + pid_b * sst_b + c[:, None] * sst_d
    # window slot j (0..K-1): state[j] for j < K-1, x for j = K-1
    win = tl.load(base + j[None, :] * sst_k, mask=cm[:, None] & (j < K - 1)[None, :], other=0.0).to(tl.float32)
    win = tl.where((j == K - 1)[None, :], xv.to(tl.float32)[:, None], win)
    wv = tl.load(w_ptr + c[:, None] * sw_d + j[None, :] * sw_k, mask=cm[:, None] & (j < K)[None, :],
                 other=0.0).to(tl.float32)
    yv = tl.sum(win * wv, axis=1)
    if HAS_BIAS:
        yv += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_b * DM + c, yv.to(y_ptr.dtype.element_ty), mask=cm)
    # shift: new state slot j = window slot j + 1
    nxt = tl.load(base + (j[None, :] + 1) * sst_k, mask=cm[:, None] & (j < K - 2)[None, :], other=0.0)
    nxt = tl.where((j == K - 2)[None, :], xv.to(nxt.dtype)[:, None], nxt)
    tl.debug_barrier()
    tl.store(base + j[None, :] * sst_k, nxt.to(st_ptr.dtype.element_ty), mask=cm[:, None] & (j < K - 1)[None, :])


BT_DEFAULT, BD_DEFAULT = 64, 64


def conv_forward(x, weight, bias, initial_state, reset):
    b, l, d = x.shape
    k = weight.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
    init = initial_state if initial_state is not None else x
    rst = reset.to(torch.uint8) if reset is not None else x
    BT, BD = BT_DEFAULT, min(BD_DEFAULT, triton.next_power_of_2(d))
    grid = (triton.cdiv(l, BT), triton.cdiv(d, BD), b)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, init, rst, y,
        l, d,
        x.stride(0), x.stride(1), init.stride(0), init.stride(1), init.stride(-1), rst.stride(0), rst.stride(-1),
        weight.stride(0), weight.stride(1),
        K=k, BT=BT, BD=BD, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None,
        HAS_RST=reset is not None, num_warps=4,
    )
    return y


def conv_backward(x, weight, bias, initial_state, reset, dy, want_dinit):
    b, l, d = x.shape
    k = weight.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
    dw = torch.zeros(d, k, device=x.device, dtype=torch.float32)
    db = torch.zeros(d, device=x.device, dtype=torch.float32) if bias is not None else None
    dinit = torch.empty(b, d, k - 1, device=x.device, dtype=torch.float32) if want_dinit else None
    init = initial_state if initial_state is not None else x
    rst = reset.to(torch.uint8) if reset is not None else x
    BT, BD = BT_DEFAULT, min(BD_DEFAULT, triton.next_power_of_2(d))
    grid = (triton.cdiv(l, BT), triton.cdiv(d, BD), b)
    _conv_bwd_kernel[grid](
        x, weight, init, rst, dy,
        dx, dw, db if db is not None else dw, dinit if dinit is not None else dw,
        l, d,
        x.stride(0), x.stride(1), init.stride(0), init.stride(1), init.stride(-1), rst.stride(0), rst.stride(-1),
        weight.stride(0), weight.stride(1), dy.stride(0), dy.stride(1),
        K=k, KP=triton.next_power_of_2(max(k - 1, 1)), BT=BT, BD=BD,
        HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_RST=reset is not None,
        WANT_DINIT=want_dinit, num_warps=4,
    )
    return dx, dw, db, dinit


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, reset):
        y = conv_forward(x, weight, bias, initial_state, reset)
        ctx.save_for_backward(x, weight, bias, initial_state, reset)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, initial_state, reset = ctx.saved_tensors
        want_dinit = initial_state is not None and ctx.needs_input_grad[3]
        dx, dw, db, dinit = conv_backward(x, weight, bias, initial_state, reset, dy, want_dinit)
        return (dx, dw.to(weight.dtype), db.to(bias.dtype) if db is not None else None,
                dinit.to(initial_state.dtype) if dinit is not None else None, None)


def supports(x, weight, bias=None, initial_state=None, reset=None):
    tensors = [t for t in (x, weight, bias, initial_state) if t is not None]
    if not all(t.is_cuda for t in tensors) or (reset is not None and not reset.is_cuda):
        return False
    ok = (torch.float32, torch.bfloat16, torch.float16)
    return all(t.dtype in ok for t in tensors) and x.dim() == 3 and x.shape[1] > 0 and weight.shape[1] >= 2


def causal_conv1d(x, weight, bias=None, initial_state=None, reset=None):
    """Drop-in for `mamba_ops.causal_conv1d` on CUDA tensors: (y, final window [b, d, k-1])."""
    k = weight.shape[1]
    y = CausalConv1dFn.apply(x, weight, bias, initial_state, reset)
    return y, final_window(x, initial_state, reset, k)


def causal_conv1d_update(conv_state, x, weight, bias=None, block=64):
    """One decode step: shifts `conv_state` [b, d, k-1] in place with x [b, d]; returns y [b, d]."""
    b, d = x.shape
    k = weight.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(b, d, device=x.device, dtype=x.dtype)
    BD = min(block, triton.next_power_of_2(d))
    grid = (triton.cdiv(d, BD), b)
    _conv_update_kernel[grid](
        conv_state, x, weight, bias if bias is not None else weight, y,
        d, conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), x.stride(0),
        weight.stride(0), weight.stride(1),
        K=k, KP=triton.next_power_of_2(k), BD=BD, HAS_BIAS=bias is not None, num_warps=4,
    )
    return y
