"""Triton kernels of the decode engine: RoPE + K/V append, and split-KV decode attention.

Both read the sequence lengths from a device tensor, so a decode step that uses them can be captured
once as a CUDA graph and replayed at every context length.

- `rope_append`: one launch per attention layer applies the rotary embedding to q and k of the new
  token and writes k and v into the preallocated cache [B, kv_heads, max_len, head_dim] at each
  sequence's position. It rounds after every operation exactly as the model's eager
  `apply_rotary` (x*cos and rotate_half(x)*sin rounded to the model dtype, then their sum), so the
  engine reproduces the model bit for bit here (bf16 rounded on the bits, fp32 products with mul.rn,
  so no compiler folds the rounding away or fuses a product into an FMA).
- `decode_attention` (flash-decoding): stage 1 splits each sequence's valid keys [0, length) into
  `splits` ranges; one program = (sequence, kv head, range) holds the kv head's whole query group
  (padded to 16 rows for `tl.dot`) and walks its range in tiles of BLOCK_N keys with an online
  softmax, writing a partial output and its log-sum-exp. Stage 2 combines the ranges. It reads
  K/V only up to the current length, never the rest of the buffer.

Torch references of both live in `hybridize.bench.engine` (the engine's CPU path) and the tests.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = 1.4426950408889634


@triton.jit
def _round(x, dtype: tl.constexpr, BF16: tl.constexpr):
    """fp32 -> dtype -> fp32 with round-to-nearest-even, as an eager op's output. bf16 is rounded on the
    bits (the conversion pair could otherwise be simplified away or contracted into an FMA)."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rope_append_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr,
    H, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, ss_b, sqo_b, sqo_h,
    skc_b, skc_h, skc_l, svc_b, svc_h, svc_l,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BF16: tl.constexpr, EXACT_MUL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)  # rotate_half reads the other half
    dtype = qo_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + b * sc_b + d, mask=dm, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * ss_b + d, mask=dm, other=0.0).to(tl.float32)
    if head < H:
        src = q_ptr + b * sq_b + head * sq_h
    else:
        src = k_ptr + b * sk_b + (head - H) * sk_h
    x = tl.load(src + d, mask=dm, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=dm, other=0.0).to(tl.float32)
    rotated = tl.where(d < half, -xp, xp)
    # eager order of rounding: bf16(x*cos) + bf16(rot*sin), rounded again
    if EXACT_MUL:  # fp32 on CUDA: mul.rn keeps the products from being fused into an FMA
        first, second = libdevice.mul_rn(x, cos), libdevice.mul_rn(rotated, sin)
    else:
        first, second = _round(x * cos, dtype, BF16), _round(rotated * sin, dtype, BF16)
    out = _round(first + second, dtype, BF16).to(dtype)
    if head < H:
        tl.store(qo_ptr + b * sqo_b + head * sqo_h + d, out, mask=dm)
    else:
        kvh = head - H
        pos = tl.load(pos_ptr + b).to(tl.int64)
        tl.store(kc_ptr + b * skc_b + kvh * skc_h + pos * skc_l + d, out.to(kc_ptr.dtype.element_ty), mask=dm)
        v = tl.load(v_ptr + b * sv_b + kvh * sv_h + d, mask=dm, other=0.0)
        tl.store(vc_ptr + b * svc_b + kvh * svc_h + pos * svc_l + d, v.to(vc_ptr.dtype.element_ty), mask=dm)


def rope_append(q, k, v, cos, sin, positions, k_cache, v_cache):
    """q [B, H, D], k/v [B, KV, D] (last dim contiguous), cos/sin [B, D], positions [B] (int):
    writes rotated k and v into the caches at `positions`, returns rotated q [B, H, D]."""
    b, h, d = q.shape
    kv = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and cos.stride(-1) == sin.stride(-1) == 1
    q_out = torch.empty(b, h, d, device=q.device, dtype=q.dtype)
    _rope_append_kernel[(b, h + kv)](
        q, k, v, cos, sin, positions, q_out, k_cache, v_cache,
        h, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        D=d, BLOCK_D=triton.next_power_of_2(d), BF16=q.dtype == torch.bfloat16,
        EXACT_MUL=q.dtype == torch.float32 and q.is_cuda, num_warps=1,
    )
    return q_out


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, mo_ptr, ml_ptr, scale_log2,
    KV, sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, smo_b, smo_h, smo_s, sml_b, sml_h,
    G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // KV).to(tl.int64)
    kvh = pid % KV
    length = tl.load(len_ptr + b).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)

    rows = tl.arange(0, BLOCK_H)
    hm = rows < G
    heads = kvh * G + rows
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sv_b + kvh * sv_h

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        kv_mask = nm[:, None] & dm[None, :]
        k = tl.load(k_base + n[:, None].to(tl.int64) * sk_l + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nm[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * sv_l + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    filled = l_i > 0
    out = acc / tl.where(filled, l_i, 1.0)[:, None]
    lse = tl.where(filled, m_i + tl.log2(tl.where(filled, l_i, 1.0)), float("-inf"))
    tl.store(mo_ptr + b * smo_b + heads[:, None] * smo_h + split * smo_s + d[None, :], out,
             mask=hm[:, None] & dm[None, :])
    tl.store(ml_ptr + b * sml_b + heads * sml_h + split, lse, mask=hm)


@triton.jit
def _combine_kernel(
    mo_ptr, ml_ptr, o_ptr, H, smo_b, smo_h, smo_s, sml_b, sml_h, so_b, so_h,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    s = tl.arange(0, BLOCK_S)
    sm = s < SPLITS
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    lse = tl.load(ml_ptr + b * sml_b + h * sml_h + s, mask=sm, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.where(sm & (lse > float("-inf")), tl.exp2(lse - top), 0.0)
    parts = tl.load(mo_ptr + b * smo_b + h * smo_h + s[:, None] * smo_s + d[None, :],
                    mask=sm[:, None] & dm[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty), mask=dm)


# block_n keys per tile, warps and software-pipelining stages of the split kernel; programs per
# multiprocessor that `pick_splits` aims for (benchmarks/decode.py sweeps these)
DEFAULT_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4}


def pick_splits(batch, kv_heads, max_len, multiprocessors, block_n=64, programs_per_sm=4):
    """Key ranges per sequence: enough programs to fill the GPU in many waves (the last wave's tail
    stays small), each range at least 4 tiles long at the longest context."""
    want = triton.cdiv(programs_per_sm * multiprocessors, batch * kv_heads)
    most = max(1, max_len // (4 * block_n))
    return int(max(1, min(triton.next_power_of_2(want), 1 << (most.bit_length() - 1), 64)))


class DecodeAttention:
    """Split-KV decode attention with its scratch buffers preallocated (graph-capturable)."""

    def __init__(self, batch, heads, kv_heads, head_dim, max_len, device, dtype, splits=None, block_n=None,
                 num_warps=None, num_stages=None):
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        block_n = block_n or DEFAULT_CONFIG["block_n"]
        num_warps = num_warps or DEFAULT_CONFIG["num_warps"]
        num_stages = num_stages or DEFAULT_CONFIG["num_stages"]
        if splits is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16
            splits = pick_splits(batch, kv_heads, max_len, sms, block_n, DEFAULT_CONFIG["programs_per_sm"])
        self.splits, self.block_n, self.num_warps, self.num_stages = splits, block_n, num_warps, num_stages
        self.mid_out = torch.empty(batch, heads, splits, head_dim, device=device, dtype=torch.float32)
        self.mid_lse = torch.empty(batch, heads, splits, device=device, dtype=torch.float32)
        self.out = torch.empty(batch, heads, head_dim, device=device, dtype=dtype)
        self.scale_log2 = head_dim**-0.5 * LOG2E

    def __call__(self, q, k_cache, v_cache, lengths):
        """q [B, H, D]; caches [B, KV, max_len, D]; lengths [B] = valid keys (the new one included)."""
        b = q.shape[0]
        group = self.heads // self.kv_heads
        mo, ml, out = self.mid_out, self.mid_lse, self.out
        d = self.head_dim
        _split_kernel[(b * self.kv_heads, self.splits)](
            q, k_cache, v_cache, lengths, mo, ml, self.scale_log2,
            self.kv_heads, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            mo.stride(0), mo.stride(1), mo.stride(2), ml.stride(0), ml.stride(1),
            G=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=self.block_n, D=d,
            BLOCK_D=max(16, triton.next_power_of_2(d)), SPLITS=self.splits, IEEE=q.dtype == torch.float32,
            num_warps=self.num_warps, num_stages=self.num_stages,
        )
        _combine_kernel[(b * self.heads,)](
            mo, ml, out, self.heads, mo.stride(0), mo.stride(1), mo.stride(2), ml.stride(0), ml.stride(1),
            out.stride(0), out.stride(1),
            SPLITS=self.splits, BLOCK_S=max(2, triton.next_power_of_2(self.splits)), D=d,
            BLOCK_D=triton.next_power_of_2(d), num_warps=1,
        )
        return out
