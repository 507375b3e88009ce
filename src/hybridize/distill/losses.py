"""Distillation losses, computed chunk by chunk so full [tokens, vocab] logits never exist.

Per token, with teacher logits t, student logits s and temperature T,
log p = log_softmax(t / T) (teacher), log q = log_softmax(s / T) (student):

    reverse_kl   sum q (log q - log p)                         mode-seeking; the default
    forward_kl   sum p (log p - log q)                         mean-covering
    jsd          beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                 beta weighs the teacher (the convention of TRL's GKD); beta = 0.5 is the
                 symmetric Jensen-Shannon divergence
    ce           -log softmax(s)[label], at temperature 1; label -100 is ignored

No T^2 factor is applied to the divergences; fold one into the weights if wanted.
Everything is computed from log-probabilities, so a probability that underflows to 0 gives
0 * finite, never 0 * log 0. Logits are assumed finite (no -inf vocabulary masking).

Alignment: hidden states and labels arrive already aligned with their targets, i.e. the
caller has shifted them: row i of the hidden states produces the logits scored against
labels[i] (in a causal LM, hidden state i predicts token i + 1). Nothing here shifts.

On CUDA, mixes without jsd run each chunk's softmax algebra in one fused Triton kernel
(`hybridize.kernels.triton_kl`, same formulas) instead of the torch ones below;
HYBRIDIZE_KERNELS=reference keeps the torch formulas everywhere.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hybridize.kernels.ops import kernel_mode, triton_module

IGNORE_INDEX = -100
LOSS_NAMES = ("reverse_kl", "forward_kl", "jsd", "ce")
TEACHER_LOSSES = ("reverse_kl", "forward_kl", "jsd")


class LossSpec(BaseModel):
    """A weighted mix of loss components, e.g. ``{"reverse_kl": 1.0, "ce": 0.1}``.

    ``weights`` also accepts a bare name (weight 1). A weight of 0 keeps a component in
    the logged stats without letting it train. ``chunk_size`` counts masked tokens per chunk:
    peak memory inside the loss is about seven fp32 [chunk_size, vocab] buffers with the torch
    formulas, and the two logits plus their gradient, in the matmul dtype, with the fused kernel.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[str, float]
    temperature: float = Field(1.0, gt=0)
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    chunk_size: int = Field(512, ge=1)

    @field_validator("weights", mode="before")
    @classmethod
    def _name_to_mix(cls, v):
        return {v: 1.0} if isinstance(v, str) else v

    @field_validator("weights")
    @classmethod
    def _known_names(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError(f"empty loss mix; valid names: {', '.join(LOSS_NAMES)}")
        unknown = sorted(set(v) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"unknown loss {unknown}; valid names: {', '.join(LOSS_NAMES)}")
        bad = {k: w for k, w in v.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
        return v

    @property
    def needs_teacher(self) -> bool:
        return any(name in TEACHER_LOSSES for name in self.weights)


# ---------------------------------------------------------------------------------------
# Per-token formulas (fp32, differentiable), shared by the chunked path and the reference


def kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) per position from logits [..., V] -> [...], in fp32."""
    lp = torch.log_softmax(p_logits.float() / temperature, dim=-1)
    lq = torch.log_softmax(q_logits.float() / temperature, dim=-1)
    return _kl(lp, lq)


def _kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(a || b) from log-probs; exp(la) underflowing to 0 contributes 0."""
    return (la.exp() * (la - lb)).sum(-1)


def _log_mixture(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta p + (1 - beta) q), computed in log space."""
    return torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))


def _log_probs(s: torch.Tensor, t: torch.Tensor | None, spec: LossSpec):
    """fp32 log-probs: student at T (lq), teacher at T (lp), student at T=1 for CE (ls)."""
    T = spec.temperature
    s = s.float()
    lq = torch.log_softmax(s / T, dim=-1)
    lp = torch.log_softmax(t.float() / T, dim=-1) if spec.needs_teacher else None
    ls = None
    if "ce" in spec.weights:
        ls = lq if T == 1.0 else torch.log_softmax(s, dim=-1)
    return lq, lp, ls


def _values(spec: LossSpec, lq, lp, ls, labels) -> dict[str, torch.Tensor]:
    """Per-token value of every component in the mix."""
    out = {}
    for name in spec.weights:
        if name == "reverse_kl":
            out[name] = _kl(lq, lp)
        elif name == "forward_kl":
            out[name] = _kl(lp, lq)
        elif name == "jsd":
            b = spec.jsd_beta
            lm = _log_mixture(lp, lq, b)
            out[name] = b * _kl(lp, lm) + (1 - b) * _kl(lq, lm)
        else:  # ce
            valid = labels != IGNORE_INDEX
            picked = ls.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            out[name] = torch.where(valid, -picked, 0.0)
    return out


def _grad_logits(spec: LossSpec, lq, lp, ls, labels, values) -> torch.Tensor:
    """d(sum_c w_c * value_c) / d(student logits), per token, in closed form.

    With z = s / T and q = softmax(z), a loss whose derivative w.r.t. q is g has
    dL/dz = q * (g - sum(q * g)). For reverse KL g = log q - log p (+ const, which cancels);
    for JSD g = (1 - beta)(log q - log m); forward KL gives dL/dz = q - p; CE (at T = 1)
    gives softmax(s) - onehot(label). dL/ds = dL/dz / T.
    """
    q = lq.exp()
    grad = torch.zeros_like(lq)
    for name, w in spec.weights.items():
        if w != 0:
            alpha = w if name == "ce" else w / spec.temperature
            grad.add_(_dvalue_dz(name, spec, q, lq, lp, ls, labels, values[name]), alpha=alpha)
    return grad


def _dvalue_dz(name, spec, q, lq, lp, ls, labels, value) -> torch.Tensor:
    """One component's gradient w.r.t. its scaled logits; built in place to bound [chunk, V] temporaries."""
    if name == "reverse_kl":
        return (lq - lp).sub_(value.unsqueeze(-1)).mul_(q)
    if name == "forward_kl":
        return lp.exp().neg_().add_(q)
    if name == "jsd":
        g = _log_mixture(lp, lq, spec.jsd_beta).neg_().add_(lq).mul_(1 - spec.jsd_beta)
        return g.sub_((q * g).sum(-1, keepdim=True)).mul_(q)
    g = ls.exp()  # ce
    g.scatter_add_(-1, labels.clamp_min(0).unsqueeze(-1), -torch.ones_like(g[..., :1]))
    return g.mul_((labels != IGNORE_INDEX).unsqueeze(-1))


def token_losses_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    spec: LossSpec,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted per-token loss [..., ] from full logits [..., V]; the direct, unchunked formula.

    Differentiable through autograd. Meant for evaluation and small inputs: it holds several
    fp32 copies of the full logits.
    """
    _check_inputs(spec, teacher_logits is not None, labels)
    lq, lp, ls = _log_probs(student_logits, teacher_logits, spec)
    values = _values(spec, lq, lp, ls, labels)
    return sum(spec.weights[name] * v for name, v in values.items())


def _check_inputs(spec: LossSpec, has_teacher: bool, labels) -> None:
    if spec.needs_teacher and not has_teacher:
        raise ValueError(f"loss mix {sorted(spec.weights)} needs the teacher")
    if "ce" in spec.weights and labels is None:
        raise ValueError("loss mix contains 'ce' but no labels were given")


# ---------------------------------------------------------------------------------------
# Chunked path
#
# Why a custom autograd.Function and not per-chunk torch.utils.checkpoint: both keep the peak
# at O(chunk * V), but checkpointing must redo every chunk's student AND teacher projection
# in backward (the teacher logits cannot be kept without O(tokens * V) memory), i.e. the two
# largest matmuls run twice, and autograd's generic backward keeps extra [chunk, V]
# intermediates of log_softmax alive. Here the gradient w.r.t. the chunk's logits is known in
# closed form (_grad_logits) while the logits are live, so each projection runs once and the
# chunk's logits are turned straight into grad_hidden [chunk, D] and an fp32 grad_weight
# [V, D] accumulator. Between forward and backward only those (activation- and weight-sized)
# gradients are stored; backward just multiplies them by the incoming scalar.


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """lm_head in the operands' dtype (fp32 accumulation in the matmul), result in that dtype."""
    logits = h @ w.T
    if b is not None:
        logits = logits + b
    return logits


def _triton_kl():
    """The fused kernel's module, or None without a working Triton; imported on first CUDA use."""
    return triton_module("triton_kl")


def _fused_kernel(spec: LossSpec, device: torch.device, dtype: torch.dtype):
    """`triton_kl` where it runs this loss (CUDA, a mix without jsd, Triton present, HYBRIDIZE_KERNELS
    not "reference"), else None: the torch formulas."""
    if kernel_mode() == "reference" or device.type != "cuda":
        return None
    kernel = _triton_kl()
    return kernel if kernel is not None and kernel.supports(spec.weights, dtype) else None


# addmm's out_dtype overload (low-precision operands, fp32 output, CUDA only) came with torch 2.8;
# accumulating in place into an fp32 `self` was checked on 2.11, so older releases keep the fallback.
_ADDMM_INTO_FP32 = torch.__version__ >= (2, 11)


def _accumulate_grad_weight(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (fp32) += g.T @ h, with g and h in the matmul dtype."""
    if g.dtype == torch.float32:
        grad_w.addmm_(g.T, h)
    elif g.is_cuda and _ADDMM_INTO_FP32:
        # cuBLAS writes the bf16/fp16 product straight into the fp32 accumulator: no [V, D] temporary
        # and no rounding of the product to the low precision before the add.
        torch.addmm(grad_w, g.T, h, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w += g.T @ h  # low-precision product, fp32 accumulation


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_h, s_w, s_b, t_h, t_w, t_b, labels, spec, scale, need):
        # s_h [M, Ds] / t_h [M, Dt]: masked-in rows only; labels [M] or None.
        # need = (grad for s_h, s_w, s_b). Matmuls run in the student hidden's dtype (the
        # weight is cast once if it differs, as autocast would); softmax math is fp32.
        dtype = s_h.dtype
        w = s_w.to(dtype)
        b = s_b.to(dtype) if s_b is not None else None
        if spec.needs_teacher:
            tw = t_w.to(t_h.dtype)
            tb = t_b.to(t_h.dtype) if t_b is not None else None

        names = list(spec.weights)
        sums = torch.zeros(len(names), dtype=torch.float32, device=s_h.device)
        grad_h = torch.empty_like(s_h) if need[0] else None
        grad_w = torch.zeros(s_w.shape, dtype=torch.float32, device=s_w.device) if need[1] else None
        grad_b = torch.zeros(s_w.shape[0], dtype=torch.float32, device=s_w.device) if need[2] else None
        fused = _fused_kernel(spec, s_h.device, dtype)

        with torch.autocast(s_h.device.type, enabled=False):
            for i in range(0, s_h.shape[0], spec.chunk_size):
                rows = slice(i, i + spec.chunk_size)
                h = s_h[rows]
                t = _project(t_h[rows], tw, tb) if spec.needs_teacher else None
                y = labels[rows] if labels is not None else None
                if fused is not None:  # reads the logits as the matmul wrote them
                    values, g = fused.values_and_grad(
                        _project(h, w, b), t, y, spec.weights, spec.temperature, scale, grad=any(need)
                    )
                    del t
                    sums += values.sum(0)
                else:
                    t = t.float() if t is not None else None
                    lq, lp, ls = _log_probs(_project(h, w, b).float(), t, spec)
                    del t
                    values = _values(spec, lq, lp, ls, y)
                    sums += torch.stack([values[n].sum() for n in names])
                    g = _grad_logits(spec, lq, lp, ls, y, values).mul_(scale) if any(need) else None
                    del lq, lp, ls
                if g is not None:
                    if grad_b is not None:
                        grad_b += g.sum(0, dtype=torch.float32)
                    g = g.to(dtype)
                    if grad_h is not None:
                        grad_h[rows] = g @ w
                    if grad_w is not None:
                        _accumulate_grad_weight(grad_w, g, h)
                    del g

        weights = torch.tensor([spec.weights[n] for n in names], device=sums.device)
        loss = (weights * sums).sum() * scale
        ctx.save_for_backward(
            grad_h,
            grad_w.to(s_w.dtype) if grad_w is not None else None,
            grad_b.to(s_b.dtype) if grad_b is not None else None,
        )
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        grads = [g * grad_loss if g is not None else None for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None


def distillation_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head_weight: torch.Tensor | None,
    mask: torch.Tensor,
    spec: LossSpec,
    labels: torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Loss of one micro-batch, with the lm_head projections done chunk by chunk.

    student_hidden [B, S, Ds], teacher_hidden [B, S, Dt] (already aligned with the targets,
    see the module docstring), head weights [V, D], mask [B, S] (bool or 0/1: which tokens
    count), labels [B, S] (needed for "ce"). The teacher may be None for a CE-only mix and
    never receives gradient.

    num_tokens is the masked-token count of the whole accumulated batch (all micro-batches,
    all ranks); the loss is sum over this micro-batch's masked tokens / num_tokens, so the sum
    of the micro-batch losses is the exact token mean over the accumulated batch (default:
    mask.sum(), i.e. this micro-batch alone). CE sums over masked tokens whose label is not
    -100 and uses the same denominator.

    Returns (loss, stats): stats[name] = {"sum": un-normalised sum over tokens, "tokens":
    count}, both detached, for logging (all-reduce sums and counts, then divide).
    """
    _check_inputs(spec, teacher_hidden is not None and teacher_head_weight is not None, labels)
    B, S, D = student_hidden.shape
    for name, x in (("mask", mask), ("labels", labels)):
        if x is not None and x.shape != (B, S):
            raise ValueError(f"{name} shape {tuple(x.shape)} != hidden's [B, S] = {(B, S)}")
    if spec.needs_teacher:
        if teacher_hidden.shape[:2] != (B, S):
            raise ValueError(f"teacher hidden {tuple(teacher_hidden.shape)} vs student {(B, S, D)}")
        if teacher_head_weight.shape[0] != student_head_weight.shape[0]:
            raise ValueError("student and teacher heads have different vocabulary sizes")

    idx = mask.reshape(-1).bool().nonzero().squeeze(1)
    s_h = student_hidden.reshape(B * S, D).index_select(0, idx)
    t_h = y = None
    if spec.needs_teacher:
        t_h = teacher_hidden.detach().reshape(B * S, -1).index_select(0, idx)
    if labels is not None:
        y = labels.reshape(-1).index_select(0, idx)
    if num_tokens is None:
        num_tokens = idx.numel()
    scale = 1.0 / torch.as_tensor(num_tokens, dtype=torch.float32, device=s_h.device).clamp(min=1)

    grad_on = torch.is_grad_enabled()
    need = tuple(
        grad_on and x is not None and x.requires_grad
        for x in (student_hidden, student_head_weight, student_head_bias)
    )
    t_w = teacher_head_weight.detach() if teacher_head_weight is not None else None
    t_b = teacher_head_bias.detach() if teacher_head_bias is not None else None
    loss, sums = _ChunkedLoss.apply(
        s_h, student_head_weight, student_head_bias, t_h, t_w, t_b, y, spec, scale, need
    )

    stats = {}
    for name, total in zip(spec.weights, sums):
        count = (y != IGNORE_INDEX).sum() if name == "ce" else torch.tensor(idx.numel())
        stats[name] = {"sum": total.detach(), "tokens": count.to(total.device)}
    return loss, stats
