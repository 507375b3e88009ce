"""Achieved memory bandwidth of the Mamba mixer kernels, against a measured copy bandwidth.

    python benchmarks/mamba_kernels.py [--sweep] [--json PATH]

Bytes counted = every input read once + every output written once (in the tensors' own dtypes);
GB/s = bytes / median time (triton.testing.do_bench: CUDA events, L2 flushed before each run).
- copy: torch copy_ of a 2 GiB tensor, bytes read + written.
- scan fwd: x, dt, z, B, C read; y, final state written (A, D, dt_bias are negligible).
- scan fwd+bwd: the forward above, then x, dt, z, B, C, dy read; dx, ddt, dz, dB, dC written
  (the forward's checkpoints and the backward's fp32 atomics are extra traffic, not counted).
- state update: state read + written (fp32), x, dt, z, B, C read, y written.
- conv fwd: x read, y written; conv fwd+bwd adds dy read, dx written.
Shapes: Apriel-15B-like (d_inner 4096, d_xb 1024: B groups 64, C groups 256) and SmolLM2-135M
(d_inner 576, d_xb 192: B groups 12, C groups 36), d_state 16, bf16 inputs, fp32 state.
"""

import argparse
import json
import math
import sys

import torch

try:
    import triton
    from triton.testing import do_bench
except ImportError:  # pragma: no cover
    sys.exit("needs triton and a CUDA GPU")

from hybridize.kernels import triton_conv, triton_scan

SHAPES = {
    "apriel15b": dict(d=4096, gb=64, gc=256),
    "smollm2": dict(d=576, gb=12, gc=36),
}
N = 16
# (T_fwd, BD_fwd, warps_fwd, NV_fwd, T_bwd, BD_bwd, warps_bwd, NV_bwd), see triton_scan.DEFAULT_CONFIG
SWEEP = [
    (8, 16, 1, 8, 8, 8, 1, 4),
    (8, 32, 2, 8, 4, 16, 1, 8),
    (4, 32, 2, 8, 4, 32, 2, 8),
    (8, 16, 1, 8, 8, 16, 1, 8),
    (4, 8, 1, 4, 4, 8, 1, 4),
]


def ms(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def copy_bandwidth():
    src = torch.randn(1 << 29, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src))
    return 2 * nbytes(src) / t / 1e6  # GB/s


def scan_inputs(b, l, d, gb, gc, dtype=torch.bfloat16):
    def r(*shape):
        return torch.randn(*shape, device="cuda").to(dtype)

    return dict(
        x=r(b, l, d), dt=r(b, l, d), A=-torch.exp(torch.rand(d, N, device="cuda") * 2.5),
        B=r(b, l, gb, N), C=r(b, l, gc, N), D=torch.randn(d, device="cuda"), z=r(b, l, d),
        dt_bias=torch.randn(d, device="cuda") * 0.5,
    )


def bench_scan(b, l, d, gb, gc, config=None):
    inp = scan_inputs(b, l, d, gb, gc)
    config = config or triton_scan.pick_config(b, d, d // gb, d // gc)
    with torch.no_grad():
        t_fwd = ms(lambda: triton_scan.selective_scan(**inp, config=config))
    leaves = {k: v.requires_grad_() for k, v in inp.items()}
    dy = torch.randn(b, l, d, device="cuda").to(torch.bfloat16)
    grad_inputs = [leaves[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]

    def fwd_bwd():
        y, _ = triton_scan.selective_scan(**leaves, config=config)
        torch.autograd.grad(y, grad_inputs, dy)

    t_fb = ms(fwd_bwd)
    io = nbytes(inp["x"], inp["dt"], inp["z"], inp["B"], inp["C"])
    y_bytes = nbytes(inp["x"])
    state_bytes = b * d * N * 4
    fwd_bytes = io + y_bytes + state_bytes
    bwd_bytes = io + y_bytes + io  # reads: inputs + dy; writes: dx, ddt, dz, dB, dC (same sizes as inputs)
    ck_bytes = 2 * b * triton.cdiv(l, config[4]) * d * N * 4  # checkpoints written + read (not counted)
    return dict(config=config, fwd_ms=t_fwd, fwd_bytes=fwd_bytes, fb_ms=t_fb, fb_bytes=fwd_bytes + bwd_bytes,
                ck_bytes=ck_bytes)


def bench_state_update(b, d, gb, gc):
    def r(*shape):
        return torch.randn(*shape, device="cuda").to(torch.bfloat16)

    state = torch.randn(b, d, N, device="cuda")
    args = dict(x=r(b, d), dt=r(b, d), A=-torch.exp(torch.rand(d, N, device="cuda")), B=r(b, gb, N),
                C=r(b, gc, N), D=torch.randn(d, device="cuda"), z=r(b, d), dt_bias=torch.randn(d, device="cuda"))
    t = ms(lambda: triton_scan.selective_state_update(state, **args))
    total = 2 * nbytes(state) + nbytes(args["x"], args["dt"], args["z"], args["B"], args["C"]) + nbytes(args["x"])
    return dict(ms=t, bytes=total)


def bench_conv(b, l, d):
    x = torch.randn(b, l, d, device="cuda").to(torch.bfloat16)
    w, bias = torch.randn(d, 4, device="cuda"), torch.randn(d, device="cuda")
    with torch.no_grad():
        t_fwd = ms(lambda: triton_conv.causal_conv1d(x, w, bias))
    xl, wl, bl = x.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_()
    dy = torch.randn_like(x)

    def fwd_bwd():
        y = triton_conv.CausalConv1dFn.apply(xl, wl, bl, None, None)
        torch.autograd.grad(y, [xl, wl, bl], dy)

    t_fb = ms(fwd_bwd)
    return dict(fwd_ms=t_fwd, fwd_bytes=2 * nbytes(x), fb_ms=t_fb, fb_bytes=4 * nbytes(x))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time every scan config in SWEEP")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy:.0f} GB/s")
    rows, results = [], {"device": props.name, "copy_GBps": copy}

    def row(name, shape, t, total):
        gbps = total / t / 1e6
        rows.append((name, shape, t, total / 1e6, gbps, 100 * gbps / copy))
        results[f"{name} {shape}"] = dict(ms=t, MB=total / 1e6, GBps=gbps, pct_copy=100 * gbps / copy)
        print(f"  {name:<28} {shape:<34} {t:9.3f} ms {gbps:8.0f} GB/s {100 * gbps / copy:5.1f}%", flush=True)

    b, l = 8, 4096
    for label, s in SHAPES.items():
        shape = f"{label} b{b} l{l} d{s['d']} g{s['gb']}/{s['gc']}"
        configs = [None] + (SWEEP if args.sweep else [])
        for config in configs:
            r = bench_scan(b, l, s["d"], s["gb"], s["gc"], config)
            tag = "" if config is None else f" {config}"
            name = "scan" + (" (default)" if config is None else tag)
            regs = {k: (getattr(v, "n_regs", None), getattr(v, "n_spills", None))
                    for k, v in triton_scan.COMPILED.items() if k.startswith("scan")}
            print(f"  config {r['config']}: (registers, spills) {regs}; checkpoints {r['ck_bytes'] / 1e6:.0f} MB")
            row(name + " fwd", shape, r["fwd_ms"], r["fwd_bytes"])
            row(name + " fwd+bwd", shape, r["fb_ms"], r["fb_bytes"])
        for batch in (8, 256):
            r = bench_state_update(batch, s["d"], s["gb"], s["gc"])
            row("state update", f"{label} b{batch} d{s['d']}", r["ms"], r["bytes"])
        r = bench_conv(b, l, s["d"])
        row("conv1d fwd", f"{label} b{b} l{l} d{s['d']} k4", r["fwd_ms"], r["fwd_bytes"])
        row("conv1d fwd+bwd", f"{label} b{b} l{l} d{s['d']} k4", r["fb_ms"], r["fb_bytes"])

    print()
    print(f"| op | shape | ms | MB moved | GB/s | % of copy ({copy:.0f} GB/s) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, shape, t, mb, gbps, pct in rows:
        print(f"| {name} | {shape} | {t:.3f} | {mb:.0f} | {gbps:.0f} | {pct:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    assert math.isfinite(copy)


if __name__ == "__main__":
    main()
