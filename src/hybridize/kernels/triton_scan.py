"""Triton kernels of the Mamba-1 selective scan (grouped B/C layout) and its one-token state update.

Same semantics and signature as `hybridize.modeling.mamba_ops.selective_scan` / `selective_state_update`:
x, dt, z [b, l, d]; B [b, l, gb, n], C [b, l, gc, n] with channel c reading group c // (d // groups)
(B and C may have different group counts); A [d, n]; D, dt_bias [d]; softplus(dt + dt_bias) inside;
reset [b, l] bool marks document starts; initial and final state fp32 [b, d, n].

Design (memory-bound, the state never leaves registers):
- One program = one batch element x a block of BD channels; it walks the sequence in chunks of T
  steps. Per chunk it loads [T, BD] tiles of x/dt/z and [T, BD, n] tiles of B/C (all loads of a
  chunk in flight together), forms decay a = exp(dt*A) and input g = dt*B*x, and runs a parallel
  scan along time (`tl.associative_scan`) for h_t = a_t h_{t-1} + g_t, seeded with the carried state.
- Forward stores the state at every chunk start (fp32 [b, l/T, d, n]) when a gradient is needed.
- Backward walks the chunks in reverse: recomputes the chunk's states from its checkpoint, then a
  reverse scan gives G_t = dL/dh_t = C_t dy'_t + a_{t+1} G_{t+1}. The shifted a_{t+1} is folded into
  the scan element (first decay, product of the rest, G), so no extra exp or shift is needed.
  Every gradient is local in t given (h_t, G_t): with a_t h_{t-1} = h_t - g_t,
  d(dt)_t = sum_n G (h - g) A + x sum_n G B, dx = dt sum_n G B + D dy', dA = sum_t G (h - g) dt,
  dB = sum_{c in group} G dt x, dC = sum_{c in group} h dy'. B/C/A/D/dt_bias gradients are summed
  in fp32 with atomics after a reduction over the block's channels of one group.

Inputs may be fp32, bf16 or fp16; arithmetic and state are fp32.
"""

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# scalar helpers


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20) in fp32, accurate for very negative x."""
    e = tl.exp(tl.minimum(x, 20.0))
    series = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - 0.25 * e)))  # log1p(e) for small e
    return tl.where(x > 20.0, x, tl.where(e < 1e-2, series, tl.log(1.0 + e)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _fwd_combine(a_l, b_l, a_r, b_r):
    # left = earlier segment, right = later: h = a_r * (a_l h + b_l) + b_r
    return a_l * a_r, b_l * a_r + b_r


@triton.jit
def _rev_combine(fa_l, p_l, g_l, fa_e, p_e, g_e):
    # scan over flipped time: first argument = the later (accumulated) segment, second = the earlier one.
    # A segment [i..j] is (a_i, prod_{i+1..j} a, G_i restricted to the segment).
    t = p_e * fa_l
    return fa_e, t * p_l, g_e + t * g_l


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _scan_fwd_kernel(
    x_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dtb_ptr, h0_ptr, rst_ptr,
    y_ptr, hT_ptr, ck_ptr,
    L, DM, RB, RC, NCHUNK, NCK,
    sx_b, sx_l, sdt_b, sdt_l, sz_b, sz_l,
    sB_b, sB_l, sB_g, sC_b, sC_l, sC_g,
    sr_b, sr_l, sy_b, sy_l,
    N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, BD: tl.constexpr, NV: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_RST: tl.constexpr, SAVE_CK: tl.constexpr, CKT: tl.constexpr,
):
    # tiles are [BD, T, NP] (channels, time, state) and [BD, T]: time sits in each thread's registers,
    # so the scan along it is sequential per thread
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    c = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    nv = (n // NV) * NV + n % NV  # == n; caps the vector width of the B/C accesses at NV
    tt = tl.arange(0, T)
    cm = c < DM
    nm = n < N
    cn = cm[:, None] & nm[None, :]
    A2 = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=cn, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=cm, other=0.0).to(tl.float32)
    state_off = pid_b * DM * N + c[:, None] * N + n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=cn, other=0.0)
    else:
        h = tl.zeros([BD, NP], dtype=tl.float32)
    gB = c // RB
    gC = c // RC
    for ci in range(NCHUNK):
        t = ci * T + tt
        tm = t < L
        if SAVE_CK:  # the state before every CKT-step chunk of the backward
            if (ci * T) % CKT == 0:
                tl.store(ck_ptr + (pid_b * NCK + (ci * T) // CKT) * DM * N + c[:, None] * N + n[None, :], h, mask=cn)
        m2 = cm[:, None] & tm[None, :]
        m3 = m2[:, :, None] & nm[None, None, :]
        xv = tl.load(x_ptr + pid_b * sx_b + c[:, None] + t[None, :] * sx_l, mask=m2, other=0.0).to(tl.float32)
        dtr = tl.load(dt_ptr + pid_b * sdt_b + c[:, None] + t[None, :] * sdt_l, mask=m2, other=0.0).to(tl.float32)
        if HAS_DTB:
            dtr = dtr + dtb[:, None]
        dts = tl.where(m2, _softplus(dtr), 0.0)
        a = tl.exp2(dts[:, :, None] * A2[:, None, :])
        if HAS_RST:
            r = tl.load(rst_ptr + pid_b * sr_b + t * sr_l, mask=tm, other=0)
            a = tl.where((r != 0)[None, :, None], 0.0, a)
        Bv = tl.load(B_ptr + pid_b * sB_b + gB[:, None, None] * sB_g + t[None, :, None] * sB_l + nv[None, None, :],
                     mask=m3, other=0.0).to(tl.float32)
        g = (dts * xv)[:, :, None] * Bv
        P, Q = tl.associative_scan((a, g), 1, _fwd_combine)
        hs = P * h[:, None, :] + Q
        Cv = tl.load(C_ptr + pid_b * sC_b + gC[:, None, None] * sC_g + t[None, :, None] * sC_l + nv[None, None, :],
                     mask=m3, other=0.0).to(tl.float32)
        yv = tl.sum(hs * Cv, axis=2)
        if HAS_D:
            yv = yv + Dv[:, None] * xv
        if HAS_Z:
            zv = tl.load(z_ptr + pid_b * sz_b + c[:, None] + t[None, :] * sz_l, mask=m2, other=0.0).to(tl.float32)
            yv = yv * zv * _sigmoid(zv)
        tl.store(y_ptr + pid_b * sy_b + c[:, None] + t[None, :] * sy_l, yv.to(y_ptr.dtype.element_ty), mask=m2)
        # padded steps have a = 1, g = 0, so the last step holds the state after the last real one
        h = tl.sum(tl.where((tt == T - 1)[None, :, None], hs, 0.0), axis=1)
    tl.store(hT_ptr + state_off, h, mask=cn)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _scan_bwd_kernel(
    x_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dtb_ptr, rst_ptr, ck_ptr,
    dy_ptr, dhT_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddtb_ptr, dh0_ptr,
    L, DM, RB, RC, GB, GC, NCHUNK,
    sx_b, sx_l, sdt_b, sdt_l, sz_b, sz_l,
    sB_b, sB_l, sB_g, sC_b, sC_l, sC_g,
    sr_b, sr_l, sdy_b, sdy_l, so_b, so_l,
    N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, BD: tl.constexpr, NV: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr, HAS_DHT: tl.constexpr,
    HAS_RST: tl.constexpr, WANT_DH0: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr,
):
    # tiles [BD, T, NP] / [BD, T] as in the forward
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    c = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    nv = (n // NV) * NV + n % NV  # == n; caps the vector width of the B/C accesses at NV
    tt = tl.arange(0, T)
    cm = c < DM
    nm = n < N
    cn = cm[:, None] & nm[None, :]
    A = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=cn, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=cm, other=0.0).to(tl.float32)
    state_off = pid_b * DM * N + c[:, None] * N + n[None, :]
    if HAS_DHT:
        carry = tl.load(dhT_ptr + state_off, mask=cn, other=0.0)
    else:
        carry = tl.zeros([BD, NP], dtype=tl.float32)
    gB = c // RB
    gC = c // RC
    gB0 = (pid_d * BD) // RB
    gC0 = (pid_d * BD) // RC
    dA_acc = tl.zeros([BD, NP], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    ddtb_acc = tl.zeros([BD], dtype=tl.float32)
    for cr in range(NCHUNK):
        ci = NCHUNK - 1 - cr
        t = ci * T + tt
        tm = t < L
        m2 = cm[:, None] & tm[None, :]
        m3 = m2[:, :, None] & nm[None, None, :]
        tn = tm[:, None] & nm[None, :]
        h_start = tl.load(ck_ptr + (pid_b * NCHUNK + ci) * DM * N + c[:, None] * N + n[None, :], mask=cn, other=0.0)
        xv = tl.load(x_ptr + pid_b * sx_b + c[:, None] + t[None, :] * sx_l, mask=m2, other=0.0).to(tl.float32)
        dtr = tl.load(dt_ptr + pid_b * sdt_b + c[:, None] + t[None, :] * sdt_l, mask=m2, other=0.0).to(tl.float32)
        if HAS_DTB:
            dtr = dtr + dtb[:, None]
        dts = tl.where(m2, _softplus(dtr), 0.0)
        a = tl.exp2(dts[:, :, None] * A2[:, None, :])
        if HAS_RST:
            r = tl.load(rst_ptr + pid_b * sr_b + t * sr_l, mask=tm, other=0)
            a = tl.where((r != 0)[None, :, None], 0.0, a)
        Bv = tl.load(B_ptr + pid_b * sB_b + gB[:, None, None] * sB_g + t[None, :, None] * sB_l + nv[None, None, :],
                     mask=m3, other=0.0).to(tl.float32)
        dtx = dts * xv
        g = dtx[:, :, None] * Bv
        P, Q = tl.associative_scan((a, g), 1, _fwd_combine)
        hs = P * h_start[:, None, :] + Q
        Cv = tl.load(C_ptr + pid_b * sC_b + gC[:, None, None] * sC_g + t[None, :, None] * sC_l + nv[None, None, :],
                     mask=m3, other=0.0).to(tl.float32)
        dyv = tl.load(dy_ptr + pid_b * sdy_b + c[:, None] + t[None, :] * sdy_l, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + pid_b * sz_b + c[:, None] + t[None, :] * sz_l, mask=m2, other=0.0).to(tl.float32)
            ypre = tl.sum(hs * Cv, axis=2)
            if HAS_D:
                ypre = ypre + Dv[:, None] * xv
            sz = _sigmoid(zv)
            dzv = dyv * ypre * sz * (1.0 + zv * (1.0 - sz))
            tl.store(dz_ptr + pid_b * so_b + c[:, None] + t[None, :] * so_l, dzv.to(dz_ptr.dtype.element_ty), mask=m2)
            dyp = dyv * zv * sz
        else:
            dyp = dyv
        # dC = sum over the group's channels of h * dy'
        dC_el = hs * dyp[:, :, None]
        if C_MODE == 2:  # the block is exactly one group: plain store, no other program writes it
            tl.store(dC_ptr + ((pid_b * L + t[:, None]) * GC + gC0) * N + n[None, :],
                     tl.sum(dC_el, axis=0).to(dC_ptr.dtype.element_ty), mask=tn)
        elif C_MODE == 1:  # the block lies inside one group: sum over it, then one atomic per (t, n)
            tl.atomic_add(dC_ptr + ((pid_b * L + t[:, None]) * GC + gC0) * N + n[None, :], tl.sum(dC_el, axis=0),
                          mask=tn, sem="relaxed")
        else:
            tl.atomic_add(dC_ptr + ((pid_b * L + t[None, :, None]) * GC + gC[:, None, None]) * N + n[None, None, :],
                          dC_el, mask=m3, sem="relaxed")
        # reverse scan for G_t = C_t dy'_t + a_{t+1} G_{t+1}, then the carry from the later chunks
        # (flip + forward scan + flip: time is in registers, so the flips are free, while
        # `reverse=True` costs lane shuffles in Triton 3.6)
        ones = tl.full([BD, T, NP], 1.0, tl.float32)
        _, Pex, G = tl.associative_scan((tl.flip(a, 1), ones, tl.flip(Cv * dyp[:, :, None], 1)), 1, _rev_combine)
        Pex = tl.flip(Pex, 1)
        G = tl.flip(G, 1)
        G = G + Pex * carry[:, None, :]
        carry = tl.sum(tl.where((tt == 0)[None, :, None], a * G, 0.0), axis=1)
        Ghm = G * (hs - g)  # hs - g = a_t h_{t-1}
        dA_acc += tl.sum(Ghm * dts[:, :, None], axis=1)
        sGB = tl.sum(G * Bv, axis=2)
        sGA = tl.sum(Ghm * A[:, None, :], axis=2)
        dxv = dts * sGB
        if HAS_D:
            dxv = dxv + Dv[:, None] * dyp
            dD_acc += tl.sum(dyp * xv, axis=1)
        tl.store(dx_ptr + pid_b * so_b + c[:, None] + t[None, :] * so_l, dxv.to(dx_ptr.dtype.element_ty), mask=m2)
        ddts = sGA + xv * sGB
        ddtr = tl.where(dtr > 20.0, ddts, ddts * _sigmoid(dtr))
        ddtr = tl.where(m2, ddtr, 0.0)
        ddtb_acc += tl.sum(ddtr, axis=1)
        tl.store(ddt_ptr + pid_b * so_b + c[:, None] + t[None, :] * so_l, ddtr.to(ddt_ptr.dtype.element_ty), mask=m2)
        dB_el = G * dtx[:, :, None]
        if B_MODE == 2:
            tl.store(dB_ptr + ((pid_b * L + t[:, None]) * GB + gB0) * N + n[None, :],
                     tl.sum(dB_el, axis=0).to(dB_ptr.dtype.element_ty), mask=tn)
        elif B_MODE == 1:
            tl.atomic_add(dB_ptr + ((pid_b * L + t[:, None]) * GB + gB0) * N + n[None, :], tl.sum(dB_el, axis=0),
                          mask=tn, sem="relaxed")
        else:
            tl.atomic_add(dB_ptr + ((pid_b * L + t[None, :, None]) * GB + gB[:, None, None]) * N + n[None, None, :],
                          dB_el, mask=m3, sem="relaxed")
    tl.atomic_add(dA_ptr + c[:, None] * N + n[None, :], dA_acc, mask=cn, sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + c, dD_acc, mask=cm, sem="relaxed")
    if HAS_DTB:
        tl.atomic_add(ddtb_ptr + c, ddtb_acc, mask=cm, sem="relaxed")
    if WANT_DH0:
        tl.store(dh0_ptr + state_off, carry, mask=cn)


# ----------------------------------------------------------------------------------------------
# one-token state update


@triton.jit
def _state_update_kernel(
    st_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, y_ptr,
    DM, RB, RC,
    sst_b, sst_d, sx_b, sdt_b, sz_b, sB_b, sB_g, sC_b, sC_g,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    c = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    cm = c < DM
    nm = n < N
    cn = cm[:, None] & nm[None, :]
    st_ptrs = st_ptr + pid_b * sst_b + c[:, None] * sst_d + n[None, :]
    st = tl.load(st_ptrs, mask=cn, other=0.0)
    A2 = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=cn, other=0.0).to(tl.float32) * 1.4426950408889634
    xv = tl.load(x_ptr + pid_b * sx_b + c, mask=cm, other=0.0).to(tl.float32)
    dtr = tl.load(dt_ptr + pid_b * sdt_b + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_DTB:
        dtr += tl.load(dtb_ptr + c, mask=cm, other=0.0).to(tl.float32)
    dts = _softplus(dtr)
    Bv = tl.load(B_ptr + pid_b * sB_b + (c // RB)[:, None] * sB_g + n[None, :], mask=cn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * sC_b + (c // RC)[:, None] * sC_g + n[None, :], mask=cn, other=0.0).to(tl.float32)
    st = tl.exp2(dts[:, None] * A2) * st + (dts * xv)[:, None] * Bv
    tl.store(st_ptrs, st, mask=cn)
    yv = tl.sum(st * Cv, axis=1)
    if HAS_D:
        yv += tl.load(D_ptr + c, mask=cm, other=0.0).to(tl.float32) * xv
    if HAS_Z:
        zv = tl.load(z_ptr + pid_b * sz_b + c, mask=cm, other=0.0).to(tl.float32)
        yv = yv * zv * _sigmoid(zv)
    tl.store(y_ptr + pid_b * DM + c, yv.to(y_ptr.dtype.element_ty), mask=cm)


# ----------------------------------------------------------------------------------------------
# launchers

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

COMPILED = {}  # the last launched compiled kernel of each kind (registers and spills, for benchmarks)

# A config is (T_fwd, BD_fwd, warps_fwd, NV_fwd, T_bwd, BD_bwd, warps_bwd, NV_bwd): T the chunk length
# (time steps a program holds at once; T_bwd is also the checkpoint interval and a multiple of T_fwd),
# BD the channels of a program, NV the widest B/C access along d_state, which sets the lanes sharing
# one channel (d_state / NV). Each thread keeps a chunk's whole time axis, so warps split channels:
# warps = BD * d_state / (32 * NV). Chosen from instruction counts of sm_90 builds and H100 timings
# (docs/performance.md): DEFAULT_CONFIG for large batch x channels, SMALL_CONFIG (longer chunks, fewer
# checkpoints) when there are few programs, e.g. SmolLM2's 576 channels.
DEFAULT_CONFIG = (4, 16, 1, 8, 4, 16, 1, 8)
SMALL_CONFIG = (8, 16, 1, 8, 8, 8, 1, 4)


def _last_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _group_mode(BD, per_group):
    """How the backward writes dB/dC: 2 = block is one whole group (store), 1 = inside one (sum + atomic),
    0 = spans groups (elementwise atomics)."""
    if per_group == BD:
        return 2
    return 1 if per_group % BD == 0 else 0


def pick_config(b, d, per_group_B, per_group_C, n=16):
    """Chunk and channel-block sizes: enough programs to fill the GPU, blocks inside one B/C group."""
    small = b * triton.cdiv(d, 16) < 1024
    t_f, bd_f, w_f, nv_f, t_b, bd_b, w_b, nv_b = SMALL_CONFIG if small else DEFAULT_CONFIG
    np2 = triton.next_power_of_2(n)
    nv_f, nv_b = min(nv_f, np2), min(nv_b, np2)
    g = math.gcd(per_group_B, per_group_C)
    # keep the backward block inside one group of B and of C when the groups allow it (the model's C
    # groups are d_state = 16 channels, so a 16-channel block stores dC without atomics)
    while bd_b > 4 and g % bd_b:
        bd_b //= 2
    # one warp covers 32 * NV / n channels: fewer warps for narrow blocks, so time stays in registers
    w_f = max(1, min(w_f, bd_f * np2 // (32 * nv_f)))
    w_b = max(1, min(w_b, bd_b * np2 // (32 * nv_b)))
    return t_f, bd_f, w_f, nv_f, t_b, bd_b, w_b, nv_b


def _check(x, dt, A, B, C):
    b, l, d = x.shape
    n = A.shape[1]
    assert dt.shape == x.shape and A.shape == (d, n)
    assert B.shape[:2] == (b, l) and B.shape[3] == n and d % B.shape[2] == 0
    assert C.shape[:2] == (b, l) and C.shape[3] == n and d % C.shape[2] == 0


def scan_forward(x, dt, A, B, C, D, z, dt_bias, initial_state, reset, save_checkpoints, config):
    b, l, d = x.shape
    n = A.shape[1]
    T, BD, warps, NV, T_b = config[0], config[1], config[2], config[3], config[4]
    if save_checkpoints and T_b % T:
        T = T_b
    nchunk = triton.cdiv(l, T)
    nck = triton.cdiv(l, T_b)
    x, dt, B, C = (_last_contiguous(t) for t in (x, dt, B, C))
    z = _last_contiguous(z) if z is not None else None
    A = A.contiguous()
    y = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
    hT = torch.empty(b, d, n, device=x.device, dtype=torch.float32)
    ck = torch.empty(b, nck, d, n, device=x.device, dtype=torch.float32) if save_checkpoints else hT
    h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else hT
    rst = reset.to(torch.uint8) if reset is not None else x
    zz = z if z is not None else x
    grid = (triton.cdiv(d, BD), b)
    COMPILED["scan_fwd"] = _scan_fwd_kernel[grid](
        x, dt, zz, A, B, C, D if D is not None else A, dt_bias if dt_bias is not None else A, h0, rst,
        y, hT, ck,
        l, d, d // B.shape[2], d // C.shape[2], nchunk, nck,
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), zz.stride(0), zz.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        rst.stride(0), rst.stride(1), y.stride(0), y.stride(1),
        N=n, NP=triton.next_power_of_2(n), T=T, BD=BD, NV=min(NV, triton.next_power_of_2(n)),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_DTB=dt_bias is not None, HAS_H0=initial_state is not None,
        HAS_RST=reset is not None, SAVE_CK=save_checkpoints, CKT=T_b, num_warps=warps,
    )
    return y, hT, (ck if save_checkpoints else None)


def scan_backward(x, dt, A, B, C, D, z, dt_bias, reset, ck, dy, dhT, want_dh0, config):
    b, l, d = x.shape
    n = A.shape[1]
    T, BD, warps, NV = config[4], config[5], config[6], config[7]
    nchunk = triton.cdiv(l, T)
    x, dt, B, C, dy = (_last_contiguous(t) for t in (x, dt, B, C, dy))
    z = _last_contiguous(z) if z is not None else None
    A = A.contiguous()
    gb, gc = B.shape[2], C.shape[2]
    dx = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
    ddt = torch.empty(b, l, d, device=x.device, dtype=dt.dtype)
    dz = torch.empty(b, l, d, device=x.device, dtype=z.dtype) if z is not None else None
    dA = torch.zeros(d, n, device=x.device, dtype=torch.float32)
    rb, rc = d // gb, d // gc
    b_mode, c_mode = _group_mode(BD, rb), _group_mode(BD, rc)
    # exact blocks store the gradient in its final dtype; otherwise fp32 atomics into zeros
    dB = (torch.empty(b, l, gb, n, device=x.device, dtype=B.dtype) if b_mode == 2
          else torch.zeros(b, l, gb, n, device=x.device, dtype=torch.float32))
    dC = (torch.empty(b, l, gc, n, device=x.device, dtype=C.dtype) if c_mode == 2
          else torch.zeros(b, l, gc, n, device=x.device, dtype=torch.float32))
    dD = torch.zeros(d, device=x.device, dtype=torch.float32) if D is not None else None
    ddtb = torch.zeros(d, device=x.device, dtype=torch.float32) if dt_bias is not None else None
    dh0 = torch.empty(b, d, n, device=x.device, dtype=torch.float32) if want_dh0 else None
    dhT = dhT.to(torch.float32).contiguous() if dhT is not None else None
    rst = reset.to(torch.uint8) if reset is not None else x
    zz = z if z is not None else x
    grid = (triton.cdiv(d, BD), b)
    COMPILED["scan_bwd"] = _scan_bwd_kernel[grid](
        x, dt, zz, A, B, C, D if D is not None else A, dt_bias if dt_bias is not None else A, rst, ck,
        dy, dhT if dhT is not None else ck,
        dx, ddt, dz if dz is not None else dx, dA, dB, dC, dD if dD is not None else dA,
        ddtb if ddtb is not None else dA, dh0 if dh0 is not None else dA,
        l, d, rb, rc, gb, gc, nchunk,
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), zz.stride(0), zz.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        rst.stride(0), rst.stride(1), dy.stride(0), dy.stride(1), l * d, d,
        N=n, NP=triton.next_power_of_2(n), T=T, BD=BD, NV=min(NV, triton.next_power_of_2(n)),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_DTB=dt_bias is not None, HAS_DHT=dhT is not None,
        HAS_RST=reset is not None, WANT_DH0=want_dh0,
        B_MODE=b_mode, C_MODE=c_mode, num_warps=warps,
    )
    return dx, ddt, dA, dB, dC, dD, dz, ddtb, dh0


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, reset, config):
        needs_grad = any(ctx.needs_input_grad[:9])
        y, hT, ck = scan_forward(x, dt, A, B, C, D, z, dt_bias, initial_state, reset, needs_grad, config)
        if needs_grad:
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, reset, ck)
            ctx.config = config
            ctx.has_h0 = initial_state is not None
            ctx.dtypes = [t.dtype if t is not None else None for t in (A, B, C, D, dt_bias, initial_state)]
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, dt, A, B, C, D, z, dt_bias, reset, ck = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dx, ddt, dA, dB, dC, dD, dz, ddtb, dh0 = scan_backward(
            x, dt, A, B, C, D, z, dt_bias, reset, ck, dy, dhT, ctx.has_h0 and ctx.needs_input_grad[8], ctx.config
        )
        tA, tB, tC, tD, tdtb, th0 = ctx.dtypes
        cast = lambda g, dtype: None if g is None else g.to(dtype)  # noqa: E731
        return (dx, ddt, cast(dA, tA), cast(dB, tB), cast(dC, tC), cast(dD, tD), dz, cast(ddtb, tdtb),
                cast(dh0, th0), None, None)


def supports(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, reset=None):
    """Whether these kernels take the call: CUDA tensors of supported dtypes, a non-empty sequence."""
    tensors = [t for t in (x, dt, A, B, C, D, z, dt_bias, initial_state) if t is not None]
    if not all(t.is_cuda for t in tensors) or (reset is not None and not reset.is_cuda):
        return False
    if any(t.dtype not in SUPPORTED_DTYPES for t in tensors):
        return False
    if x.dim() != 3 or B.dim() != 4 or C.dim() != 4 or x.shape[1] == 0 or x.shape[2] == 0:
        return False
    d = x.shape[2]
    return d % B.shape[2] == 0 and d % C.shape[2] == 0


def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, reset=None, config=None):
    """Drop-in for `mamba_ops.selective_scan` on CUDA tensors. Returns (y, final_state fp32)."""
    _check(x, dt, A, B, C)
    b, l, d = x.shape
    if config is None:
        config = pick_config(b, d, d // B.shape[2], d // C.shape[2], A.shape[1])
    return SelectiveScanFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, reset, config)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, block=64, num_warps=4):
    """One decode step for a batch of fp32 states [b, d, n], updated in place. Returns y [b, d]."""
    b, d = x.shape
    n = A.shape[1]
    assert state.shape == (b, d, n) and state.dtype == torch.float32 and state.stride(-1) == 1
    x, dt, B, C = (_last_contiguous(t) for t in (x, dt, B, C))
    z = _last_contiguous(z) if z is not None else None
    A = A.contiguous()
    y = torch.empty(b, d, device=x.device, dtype=x.dtype)
    zz = z if z is not None else x
    BD = min(block, triton.next_power_of_2(d))
    grid = (triton.cdiv(d, BD), b)
    COMPILED["state_update"] = _state_update_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else A, zz, dt_bias if dt_bias is not None else A, y,
        d, d // B.shape[1], d // C.shape[1],
        state.stride(0), state.stride(1), x.stride(0), dt.stride(0), zz.stride(0),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        N=n, NP=triton.next_power_of_2(n), BD=BD,
        HAS_Z=z is not None, HAS_D=D is not None, HAS_DTB=dt_bias is not None, num_warps=num_warps,
    )
    return y
