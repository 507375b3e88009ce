"""Gluon probes of the selective scan, one channel's states per thread. Not used by the package.

    python benchmarks/gluon_scan_probe.py count [--arch 90]   # any machine with triton >= 3.6: compile and count
    python benchmarks/gluon_scan_probe.py check               # CUDA: compare with the shipped kernels, then time both

Why: Triton lays a [channels, state] tile out with one channel's states over several lanes, so the
scan's sums over the state (y, the backward's Σ G·B) and over a group's channels (dB, dC) both cost
shuffles; docs/performance.md counts them. Gluon, Triton's explicit-layout dialect, lets one thread
own a channel's 16 states: sums over the state are in-thread, and the backward sums dB/dC over
channels through a shared-memory transpose.

Status: compiled for sm_90 and counted on a CPU machine (`count`): 14.8 lane-instructions per
(token, channel, state) in the forward and 35.1 in the backward, against 23.3 and 55.3 for the
shipped kernels. Never run on a GPU (Gluon has no interpreter), so neither result nor speed is
known; `check` is the first thing to run on one.

Scope: d_state 16; the forward as general as the shipped one except resets and initial state; the
backward specialised: length a multiple of T, channels a multiple of 32, z, D and dt bias present, no
resets, no initial or final-state gradient, C groups of exactly 16 channels, B groups a multiple of
32 channels (a program's 32 channels then lie in one B group: one atomic add per state).
"""

from __future__ import annotations

import argparse
import sys

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover
    sys.exit("gluon_scan_probe needs triton >= 3.6 (`pip install triton`)")

N_STATE = 16
CHANNELS = 32  # per program: one warp, one channel per thread
C_GROUP = 16  # channels per C group that the backward's dC transpose assumes
LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _softplus(x):
    e = gl.exp(gl.minimum(x, 20.0))
    series = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - 0.25 * e)))
    return gl.where(x > 20.0, x, gl.where(e < 1e-2, series, gl.log(1.0 + e)))


@gluon.jit
def _sigmoid(x):
    return 1.0 / (1.0 + gl.exp(-x))


@gluon.jit
def _scan_fwd_gluon(
    x_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dtb_ptr, y_ptr, hT_ptr, ck_ptr,
    L, DM, RB, RC, NCHUNK, NCK,
    sx_b, sx_l, sB_b, sB_l, sB_g, sC_b, sC_l, sC_g,
    N: gl.constexpr, T: gl.constexpr, BD: gl.constexpr, SAVE_CK: gl.constexpr, CKT: gl.constexpr,
):
    # x, dt, z and y share strides (contiguous [b, l, d]); a thread holds channel c's N states
    L2: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, N], threads_per_warp=[32, 1], warps_per_cta=[BD // 32, 1],
                                        order=[1, 0])
    LC: gl.constexpr = gl.SliceLayout(1, L2)
    LN: gl.constexpr = gl.SliceLayout(0, L2)
    pid_d = gl.program_id(0)
    pid_b = gl.program_id(1).to(gl.int64)
    c = pid_d * BD + gl.arange(0, BD, layout=LC)
    n = gl.arange(0, N, layout=LN)
    cm = c < DM
    cn = gl.expand_dims(cm, 1) & gl.expand_dims(n < N, 0)
    c2 = gl.expand_dims(c, 1)
    n2 = gl.expand_dims(n, 0)
    A2 = gl.load(A_ptr + c2 * N + n2, mask=cn, other=0.0) * LOG2E
    dtb = gl.load(dtb_ptr + c, mask=cm, other=0.0)
    Dv = gl.load(D_ptr + c, mask=cm, other=0.0)
    h = gl.zeros([BD, N], gl.float32, layout=L2)
    io = pid_b * sx_b + c
    B_p = B_ptr + pid_b * sB_b + gl.expand_dims(c // RB, 1) * sB_g + n2
    C_p = C_ptr + pid_b * sC_b + gl.expand_dims(c // RC, 1) * sC_g + n2
    for ci in range(NCHUNK):
        if SAVE_CK:
            if (ci * T) % CKT == 0:  # the state before every CKT-step chunk of the backward
                gl.store(ck_ptr + (pid_b * NCK + (ci * T) // CKT) * DM * N + c2 * N + n2, h, mask=cn)
        for s in gl.static_range(T):  # unrolled: the loads of later steps issue early
            t = ci * T + s
            m1 = cm & (t < L)
            m2 = cn & (t < L)
            xv = gl.load(x_ptr + io + t * sx_l, mask=m1, other=0.0).to(gl.float32)
            dts = gl.where(m1, _softplus(gl.load(dt_ptr + io + t * sx_l, mask=m1, other=0.0).to(gl.float32) + dtb), 0.0)
            Bv = gl.load(B_p + t * sB_l, mask=m2, other=0.0).to(gl.float32)
            Cv = gl.load(C_p + t * sC_l, mask=m2, other=0.0).to(gl.float32)
            h = gl.exp2(gl.expand_dims(dts, 1) * A2) * h + gl.expand_dims(dts * xv, 1) * Bv
            yv = gl.sum(h * Cv, axis=1) + Dv * xv  # in-thread: a channel's states are one thread's
            zv = gl.load(z_ptr + io + t * sx_l, mask=m1, other=0.0).to(gl.float32)
            gl.store(y_ptr + io + t * sx_l, (yv * zv * _sigmoid(zv)).to(y_ptr.dtype.element_ty), mask=m1)
    gl.store(hT_ptr + pid_b * DM * N + c2 * N + n2, h, mask=cn)


@gluon.jit
def _scan_bwd_gluon(
    x_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dtb_ptr, ck_ptr,
    dy_ptr, dx_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddtb_ptr,
    L, DM, RB, RC, GB, GC, NCHUNK,
    sx_b, sx_l, sB_b, sB_l, sB_g, sC_b, sC_l, sC_g,
    N: gl.constexpr, T: gl.constexpr, BD: gl.constexpr, GSC: gl.constexpr,
):
    L2: gl.constexpr = gl.BlockedLayout([1, N], [32, 1], [1, 1], [1, 0])
    LC: gl.constexpr = gl.SliceLayout(1, L2)
    LN: gl.constexpr = gl.SliceLayout(0, L2)
    # [C groups, channels of a group, state]: a thread sums one (group, state) column of GSC channels
    LC3: gl.constexpr = gl.BlockedLayout([1, GSC, 1], [BD // GSC, 1, 32 // (BD // GSC)], [1, 1, 1], [2, 1, 0])
    # [1, channels, state]: two threads per state, each summing half the channels, then one shuffle
    LB3: gl.constexpr = gl.BlockedLayout([1, BD // 2, 1], [1, 2, 16], [1, 1, 1], [2, 1, 0])
    SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    LCs: gl.constexpr = gl.SliceLayout(1, LC3)
    pid_d = gl.program_id(0)
    pid_b = gl.program_id(1).to(gl.int64)
    c = pid_d * BD + gl.arange(0, BD, layout=LC)
    n = gl.arange(0, N, layout=LN)
    c2 = gl.expand_dims(c, 1)
    n2 = gl.expand_dims(n, 0)
    A = gl.load(A_ptr + c2 * N + n2)
    A2 = A * LOG2E
    dtb = gl.load(dtb_ptr + c)
    Dv = gl.load(D_ptr + c)
    carry = gl.zeros([BD, N], gl.float32, layout=L2)  # dL/dh_t flowing back into step t - 1, times a_t
    dA_acc = gl.zeros([BD, N], gl.float32, layout=L2)
    dD_acc = gl.zeros([BD], gl.float32, layout=LC)
    ddtb_acc = gl.zeros([BD], gl.float32, layout=LC)
    buf = gl.allocate_shared_memory(gl.float32, [BD, N], SH)
    io = pid_b * sx_b + c
    B_p = B_ptr + pid_b * sB_b + gl.expand_dims(c // RB, 1) * sB_g + n2
    C_p = C_ptr + pid_b * sC_b + gl.expand_dims(c // RC, 1) * sC_g + n2
    gi = gl.arange(0, BD // GSC, layout=gl.SliceLayout(1, LCs))
    ni = gl.arange(0, N, layout=gl.SliceLayout(0, LCs))
    nb = gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, LB3)))
    c_group = (pid_d * BD) // RC + gl.expand_dims(gi, 1)
    b_group = (pid_d * BD) // RB
    for cr in range(NCHUNK):
        ci = NCHUNK - 1 - cr
        # recompute the chunk's states from its checkpoint, keeping all T in registers
        h = gl.load(ck_ptr + (pid_b * NCHUNK + ci) * DM * N + c2 * N + n2)
        hs = ()
        for s in gl.static_range(T):
            t = ci * T + s
            dts = _softplus(gl.load(dt_ptr + io + t * sx_l).to(gl.float32) + dtb)
            xv = gl.load(x_ptr + io + t * sx_l).to(gl.float32)
            Bv = gl.load(B_p + t * sB_l).to(gl.float32)
            h = gl.exp2(gl.expand_dims(dts, 1) * A2) * h + gl.expand_dims(dts * xv, 1) * Bv
            hs = hs + (h,)
        for s in gl.static_range(T - 1, -1, -1):
            t = ci * T + s
            dtr = gl.load(dt_ptr + io + t * sx_l).to(gl.float32) + dtb
            dts = _softplus(dtr)
            xv = gl.load(x_ptr + io + t * sx_l).to(gl.float32)
            Bv = gl.load(B_p + t * sB_l).to(gl.float32)
            Cv = gl.load(C_p + t * sC_l).to(gl.float32)
            dyv = gl.load(dy_ptr + io + t * sx_l).to(gl.float32)
            zv = gl.load(z_ptr + io + t * sx_l).to(gl.float32)
            a = gl.exp2(gl.expand_dims(dts, 1) * A2)
            hc = hs[s]
            ypre = gl.sum(hc * Cv, axis=1) + Dv * xv
            sz = _sigmoid(zv)
            gl.store(dz_ptr + io + t * sx_l, (dyv * ypre * sz * (1.0 + zv * (1.0 - sz))).to(dz_ptr.dtype.element_ty))
            dyp = dyv * zv * sz  # dL/dy before the gate
            dtx = dts * xv
            G = Cv * gl.expand_dims(dyp, 1) + carry  # dL/dh_t
            carry = a * G
            Ghm = G * (hc - gl.expand_dims(dtx, 1) * Bv)  # G * a_t * h_{t-1}
            dA_acc += Ghm * gl.expand_dims(dts, 1)
            sGB = gl.sum(G * Bv, axis=1)
            sGA = gl.sum(Ghm * A, axis=1)
            gl.store(dx_ptr + io + t * sx_l, (dts * sGB + Dv * dyp).to(dx_ptr.dtype.element_ty))
            dD_acc += dyp * xv
            ddtr = (sGA + xv * sGB) * _sigmoid(dtr)
            ddtb_acc += ddtr
            gl.store(ddt_ptr + io + t * sx_l, ddtr.to(ddt_ptr.dtype.element_ty))
            # dC: the block holds whole C groups, so one plain store per (group, state)
            buf.store(hc * gl.expand_dims(dyp, 1))
            gl.thread_barrier()
            dCs = gl.sum(buf.reshape([BD // GSC, GSC, N]).load(LC3), axis=1)
            gl.thread_barrier()
            # dB: the block lies inside one B group, so one atomic add per state
            buf.store(G * gl.expand_dims(dtx, 1))
            gl.thread_barrier()
            dBs = gl.sum(gl.sum(buf.reshape([1, BD, N]).load(LB3), axis=1), axis=0)
            gl.thread_barrier()
            gl.store(dC_ptr + ((pid_b * L + t) * GC + c_group) * N + gl.expand_dims(ni, 0),
                     dCs.to(dC_ptr.dtype.element_ty))
            gl.atomic_add(dB_ptr + ((pid_b * L + t) * GB + b_group) * N + nb, dBs, sem="relaxed")
    gl.atomic_add(dA_ptr + c2 * N + n2, dA_acc, sem="relaxed")
    gl.atomic_add(dD_ptr + c, dD_acc, sem="relaxed")
    gl.atomic_add(ddtb_ptr + c, ddtb_acc, sem="relaxed")


def scan_forward(x, dt, A, B, C, D, z, dt_bias, T=4, checkpoint_every=4):
    """(y, final state, checkpoints [b, l / checkpoint_every, d, n]) as `triton_scan.scan_forward` returns them."""
    b, l, d = x.shape
    assert A.shape == (d, N_STATE) and d % CHANNELS == 0 and checkpoint_every % T == 0
    assert dt.stride() == x.stride() == z.stride() and x.is_contiguous()
    y = torch.empty_like(x)
    hT = torch.empty(b, d, N_STATE, device=x.device, dtype=torch.float32)
    nck = triton.cdiv(l, checkpoint_every)
    ck = torch.empty(b, nck, d, N_STATE, device=x.device, dtype=torch.float32)
    _scan_fwd_gluon[(d // CHANNELS, b)](
        x, dt, z, A, B, C, D, dt_bias, y, hT, ck,
        l, d, d // B.shape[2], d // C.shape[2], triton.cdiv(l, T), nck,
        x.stride(0), x.stride(1), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        N=N_STATE, T=T, BD=CHANNELS, SAVE_CK=True, CKT=checkpoint_every, num_warps=1)
    return y, hT, ck


def scan_backward(x, dt, A, B, C, D, z, dt_bias, ck, dy, T=4):
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias) from checkpoints taken every T steps; see the module's scope."""
    b, l, d = x.shape
    gb, gc = B.shape[2], C.shape[2]
    assert l % T == 0 and d % CHANNELS == 0 and d // gc == C_GROUP and (d // gb) % CHANNELS == 0
    assert ck.shape == (b, l // T, d, N_STATE) and dy.stride() == x.stride()
    dx, ddt, dz = torch.empty_like(x), torch.empty_like(dt), torch.empty_like(z)
    dA = torch.zeros(d, N_STATE, device=x.device)
    dB = torch.zeros(b, l, gb, N_STATE, device=x.device)  # fp32: summed by atomics
    dC = torch.empty_like(C)
    dD = torch.zeros(d, device=x.device)
    ddtb = torch.zeros(d, device=x.device)
    _scan_bwd_gluon[(d // CHANNELS, b)](
        x, dt, z, A, B, C, D, dt_bias, ck, dy, dx, ddt, dz, dA, dB, dC, dD, ddtb,
        l, d, d // gb, d // gc, gb, gc, l // T,
        x.stride(0), x.stride(1), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        N=N_STATE, T=T, BD=CHANNELS, GSC=C_GROUP, num_warps=1)
    return dx, ddt, dA, dB, dC, dD, dz, ddtb


def count(arch: int) -> None:
    """Compile both probes for sm_<arch> and print their main loops' instruction counts (no GPU needed)."""
    import kernel_sass  # beside this script

    fp32 = kernel_sass.FP32_POINTERS | {"dB_ptr"}
    for name, fn, constexprs, T in [
        ("gluon fwd", _scan_fwd_gluon, dict(N=N_STATE, T=4, BD=CHANNELS, SAVE_CK=True, CKT=4), 4),
        ("gluon bwd", _scan_bwd_gluon, dict(N=N_STATE, T=4, BD=CHANNELS, GSC=C_GROUP), 4),
    ]:
        sass, resources = kernel_sass.compile_kernel(fn, constexprs, 1, arch, fp32_pointers=fp32)
        kernel_sass.report(name, sass, resources, T * CHANNELS * N_STATE, 1)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check() -> None:
    """Relative differences against the shipped Triton kernels, then times at the Apriel-like shape."""
    from triton.testing import do_bench

    from mamba_kernels import scan_inputs  # beside this script

    from hybridize.kernels import triton_scan

    config = (4, 16, 1, 8, 4, 16, 1, 8)  # the shipped default: checkpoints every 4 steps, as the probes take
    grads = ["dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias"]
    for shape in [(2, 64, 128, 2, 8), (2, 1000, 256, 4, 16), (8, 4096, 4096, 64, 256)]:
        inputs = tuple(scan_inputs(*shape).values())  # x, dt, A, B, C, D, z, dt_bias
        y0, h0, ck0 = triton_scan.scan_forward(*inputs, None, None, True, config)
        y1, h1, ck1 = scan_forward(*inputs)
        print(shape, f"fwd  y {_rel(y1, y0):.1e}  hT {_rel(h1, h0):.1e}  ck {_rel(ck1, ck0):.1e}", flush=True)
        dy = torch.randn_like(inputs[0])
        g0 = triton_scan.scan_backward(*inputs, None, ck0, dy, None, False, config)[:8]
        g1 = scan_backward(*inputs, ck0, dy)
        print(shape, "bwd ", "  ".join(f"{k} {_rel(a, b):.1e}" for k, a, b in zip(grads, g1, g0)), flush=True)
    inputs = tuple(scan_inputs(8, 4096, 4096, 64, 256).values())
    dy = torch.randn_like(inputs[0])
    ck = triton_scan.scan_forward(*inputs, None, None, True, config)[2]
    rows = [("shipped fwd", lambda: triton_scan.scan_forward(*inputs, None, None, True, config)),
            ("gluon fwd", lambda: scan_forward(*inputs)),
            ("shipped bwd", lambda: triton_scan.scan_backward(*inputs, None, ck, dy, None, False, config)),
            ("gluon bwd", lambda: scan_backward(*inputs, ck, dy))]
    print("| kernel, b8 l4096 d4096 g64/256 | ms |\n|---|---:|")
    for name, fn in rows:
        print(f"| {name} | {do_bench(fn, warmup=5, rep=50, return_mode='median'):.3f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("count", help="compile for a GPU architecture and count (no GPU needed)").add_argument(
        "--arch", type=int, default=90, help="compute capability x 10 (90 = H100)")
    sub.add_parser("check", help="on CUDA: compare with the shipped kernels, then time both")
    args = parser.parse_args(argv)
    if args.command == "count":
        count(args.arch)
    elif not torch.cuda.is_available():
        sys.exit("check launches the kernels and needs a CUDA GPU; `count` works without one")
    else:
        check()


if __name__ == "__main__":
    main()
