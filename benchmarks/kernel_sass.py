"""Static cost of the selective-scan kernels, compiled for a GPU architecture on any machine (no GPU needed).

    python benchmarks/kernel_sass.py [--arch 90] [--config 4 16 1 8 4 16 1 8] [--dump DIR]

Triton compiles each kernel for the target with its bundled ptxas, and cuobjdump disassembles it. For
the main loop (the longest backward branch) it prints the warp instructions of one iteration, the
lane-instructions per (time step, channel, state) element (instructions x 32 lanes x warps / the
iteration's T x BD x d_state elements), the registers per thread and the most frequent opcodes.
Integer arguments are specialised as divisible by 16 and the inputs are bf16, as for the Apriel-like
shape of benchmarks/mamba_kernels.py. Needs triton (`pip install triton`); on a CPU-only machine the
compiler still works, only launching does not.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

_ADDRESS = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?\.?(0x[0-9a-f]+|L_x_\d+)")
_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
_GUARD = re.compile(r"^@!?U?P[T0-9]+\s+")

FP32_POINTERS = {"A_ptr", "D_ptr", "dtb_ptr", "h0_ptr", "hT_ptr", "ck_ptr", "dA_ptr", "dD_ptr", "ddtb_ptr", "dh0_ptr",
                 "dhT_ptr"}


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without its predicate guard) of every SASS instruction, in order."""
    out = []
    for line in sass.splitlines():
        match = _ADDRESS.match(line)
        if match:
            out.append((int(match.group(1), 16), _GUARD.sub("", match.group(2).strip())))
    return out


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop: from a backward branch's target up to the branch."""
    labels, pending = {}, None
    for line in sass.splitlines():  # nvdisasm-style labels stand before the instruction they name
        label = _LABEL.match(line)
        if label:
            pending = label.group(1)
        elif pending and _ADDRESS.match(line):
            labels[pending] = int(_ADDRESS.match(line).group(1), 16)
            pending = None
    code = instructions(sass)
    best = None
    for address, text in code:
        branch = _BRANCH.search(text)
        if not branch:
            continue
        target = branch.group(1)
        start = int(target, 16) if target.startswith("0x") else labels.get(target)
        if start is not None and start < address and (best is None or address - start > best[1] - best[0]):
            best = (start, address)
    return [text for address, text in code if best and best[0] <= address <= best[1]]


def opcode(text: str) -> str:
    return text.split()[0]


def compile_kernel(fn, constexprs: dict, num_warps: int, arch: int, fp32_pointers=FP32_POINTERS) -> tuple[str, str]:
    """(SASS, resource usage line) of a @triton.jit or @gluon.jit kernel for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    if type(fn).__name__ == "GluonJITFunction":
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    else:
        from triton.compiler import ASTSource
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_pointers else "*u8" if name == "rst_ptr" else "*bf16"
        else:
            signature[name] = "i32"
        if not name.startswith("sr_"):  # the reset mask is [b, l] uint8: its length stride is 1
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except Exception as error:  # the compiler's own errors are many lines of IR
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        sys.exit(f"{fn.__name__} does not compile for sm_{arch} with {constexprs}, {num_warps} warps: {detail}")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    resources = " ".join(word for line in usage.splitlines() for word in line.split()
                         if word.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))
    return sass, resources


def report(name: str, sass: str, resources: str, elements: int, num_warps: int):
    loop = main_loop(sass)
    per_element = len(loop) * 32 * num_warps / elements
    top = collections.Counter(opcode(text) for text in loop).most_common(8)
    print(f"{name:<12} {resources:<40} loop {len(loop):5d} warp instructions, {per_element:5.1f} per element")
    print("             " + ", ".join(f"{op} {count}" for op, count in top))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100)")
    parser.add_argument("--config", type=int, nargs=8, metavar="N",
                        help="T_fwd BD_fwd warps_fwd NV_fwd T_bwd BD_bwd warps_bwd NV_bwd "
                             "(default: triton_scan.DEFAULT_CONFIG)")
    parser.add_argument("--state", type=int, default=16, help="d_state")
    parser.add_argument("--dump", help="also write each kernel's SASS into this folder")
    args = parser.parse_args(argv)
    try:
        from hybridize.kernels import triton_scan
    except ImportError as error:
        sys.exit(f"kernel_sass needs triton and hybridize on the path ({error})")
    t_f, bd_f, w_f, nv_f, t_b, bd_b, w_b, nv_b = args.config or triton_scan.DEFAULT_CONFIG
    n = args.state
    np2 = 1 << (n - 1).bit_length()
    common = dict(N=n, NP=np2, HAS_Z=True, HAS_D=True, HAS_DTB=True, HAS_RST=True)
    kernels = [
        ("scan fwd", triton_scan._scan_fwd_kernel,
         dict(common, T=t_f, BD=bd_f, NV=min(nv_f, np2), HAS_H0=False, SAVE_CK=True, CKT=t_b), w_f, t_f * bd_f),
        # dB/dC writes as for the Apriel-like groups of 64 (B) and 16 (C) channels
        ("scan bwd", triton_scan._scan_bwd_kernel,
         dict(common, T=t_b, BD=bd_b, NV=min(nv_b, np2), HAS_DHT=False, WANT_DH0=False,
              B_MODE=triton_scan._group_mode(bd_b, 64), C_MODE=triton_scan._group_mode(bd_b, 16)),
         w_b, t_b * bd_b),
    ]
    print(f"sm_{args.arch}, d_state {n}, config {(t_f, bd_f, w_f, nv_f, t_b, bd_b, w_b, nv_b)}")
    for name, fn, constexprs, warps, steps_x_channels in kernels:
        sass, resources = compile_kernel(fn, constexprs, warps, args.arch)
        report(name, sass, resources, steps_x_channels * n, warps)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, name.replace(" ", "_") + ".sass"), "w") as f:
                f.write(sass)


if __name__ == "__main__":
    main()
