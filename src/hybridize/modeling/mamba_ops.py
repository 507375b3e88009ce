"""Torch reference ops of the Mamba mixer: selective scan, causal depthwise conv1d, one-token updates.

This file is saved next to every checkpoint (with the model files), so a hybrid loads and runs on a
machine without hybridize. It is also the reference every fast kernel is tested against.

Layout (batch first, as in the model): x, dt, z are [batch, length, channels]; B and C are
[batch, length, groups, d_state], channel c reading group c // (channels // groups); A is
[channels, d_state]. `reset` [batch, length] is True where a new document starts: the recurrent
state and the conv window from before that token are discarded (packed sequences).
"""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def _acc(t):
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def _discretize(x, dt, A, B, dt_bias, reset):
    """Per-step decay exp(dt*A) and input dt*B*x, both [b, l, d, n] in fp32; decay is 0 at resets."""
    d, n = A.shape
    groups = B.shape[2]
    acc = _acc(x)
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    dt = F.softplus(dt)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(acc))
    if reset is not None:
        decay = decay.masked_fill(reset[..., None, None], 0.0)
    B = B.to(acc).repeat_interleave(d // groups, dim=2)  # [b, l, d, n]
    inputs = (dt * x.to(acc)).unsqueeze(-1) * B
    return decay, inputs


def _readout(states, x, C, D, z, out_dtype):
    """y = sum_n C h + D x, gated by silu(z)."""
    d = x.shape[-1]
    acc = _acc(x)
    C = C.to(acc).repeat_interleave(d // C.shape[2], dim=2)
    y = (states * C).sum(-1)
    if D is not None:
        y = y + D.to(acc) * x.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(out_dtype)


def selective_scan_sequential(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, reset=None):
    """Step-by-step scan, the simplest statement of the recurrence. Returns (y, final_state fp32)."""
    b, l, d = x.shape
    decay, inputs = _discretize(x, dt, A, B, dt_bias, reset)
    h = x.new_zeros(b, d, A.shape[1], dtype=_acc(x)) if initial_state is None else initial_state.to(_acc(x))
    states = []
    for t in range(l):
        h = decay[:, t] * h + inputs[:, t]
        states.append(h)
    states = torch.stack(states, dim=1) if l else decay.new_zeros(b, 0, d, A.shape[1])
    return _readout(states, x, C, D, z, x.dtype), h


def _inclusive_scan(decay, inputs):
    """Hillis-Steele scan of h_t = a_t h_{t-1} + u_t along dim 1, starting from h = 0.

    Returns (P, Q) with h_t = P_t * h_init + Q_t. Only products of decays (all in [0, 1]) appear, so
    it is as stable as the sequential loop, unlike cumulative-sum-of-logs formulations.
    """
    P, Q = decay, inputs
    shift = 1
    length = decay.shape[1]
    while shift < length:
        P_prev = F.pad(P[:, :-shift], (0, 0, 0, 0, shift, 0), value=1.0)
        Q_prev = F.pad(Q[:, :-shift], (0, 0, 0, 0, shift, 0), value=0.0)
        Q = P * Q_prev + Q
        P = P * P_prev
        shift *= 2
    return P, Q


def _scan_chunk(h, x, dt, A, B, C, D, z, dt_bias, reset):
    decay, inputs = _discretize(x, dt, A, B, dt_bias, reset)
    P, Q = _inclusive_scan(decay, inputs)
    states = P * h.unsqueeze(1) + Q
    return _readout(states, x, C, D, z, x.dtype), states[:, -1]


def selective_scan_chunked(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, reset=None, chunk_size=32
):
    """Same result as the sequential scan: a log-depth scan inside each chunk, a carry between chunks.

    Under autograd each chunk is recomputed in backward (activation checkpointing), so training
    memory is one chunk's [b, chunk, d, n] tensors instead of the whole sequence's.
    """
    b, l, d = x.shape
    h = x.new_zeros(b, d, A.shape[1], dtype=_acc(x)) if initial_state is None else initial_state.to(_acc(x))
    checkpointed = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)
    )
    ys = []
    for start in range(0, l, chunk_size):
        sl = slice(start, min(start + chunk_size, l))
        args = (h, x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D, None if z is None else z[:, sl], dt_bias,
                None if reset is None else reset[:, sl])
        if checkpointed:
            y, h = torch.utils.checkpoint.checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, h = _scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(b, 0, d)
    return y, h


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """One decode step for a batch of states, updating `state` [b, d, n] (fp32) in place. Returns y [b, d]."""
    decay, inputs = _discretize(x[:, None], dt[:, None], A, B[:, None], dt_bias, None)
    state.mul_(decay[:, 0]).add_(inputs[:, 0])
    return _readout(state[:, None], x[:, None], C[:, None], D, None if z is None else z[:, None], x.dtype)[:, 0]


def causal_conv1d(x, weight, bias=None, initial_state=None, reset=None):
    """Depthwise causal conv over [b, l, d] with kernel [d, k]; returns (y, final window [b, d, k-1]).

    Inputs from before a document start (reset) or before the sequence (without initial state)
    count as zero. The final window holds the last k-1 inputs, zeroed where they precede the last reset.
    """
    b, l, d = x.shape
    k = weight.shape[1]
    past = x.new_zeros(b, k - 1, d) if initial_state is None else initial_state.transpose(1, 2).to(x.dtype)
    padded = torch.cat([past, x], dim=1)  # [b, k-1+l, d]
    # steps since the current document started; "infinite" when no reset occurred in this call
    position = torch.arange(l, device=x.device).expand(b, l)
    if reset is not None:
        last_start = torch.where(reset, position, torch.full_like(position, -(k + l))).cummax(dim=1).values
        since_start = position - last_start
    else:
        since_start = position + k
    y = x.new_zeros(b, l, d) if bias is None else bias.to(x.dtype).expand(b, l, d).clone()
    for tap in range(k):
        lag = k - 1 - tap  # this tap reads the input `lag` steps back
        contribution = weight[:, tap].to(x.dtype) * padded[:, tap : tap + l]
        if reset is not None and lag > 0:
            contribution = contribution.masked_fill((since_start < lag)[..., None], 0.0)
        y = y + contribution
    window = padded[:, -(k - 1) :] if k > 1 else x.new_zeros(b, 0, d)
    if reset is not None and k > 1:
        # window slot j holds the input at time l-(k-1)+j; keep it only if no reset came after it
        slot_time = torch.arange(l - (k - 1), l, device=x.device)
        latest_start = torch.where(reset, position, torch.full_like(position, -(k + l))).max(dim=1).values
        window = window.masked_fill((slot_time[None, :] < latest_start[:, None])[..., None], 0.0)
    return y, window.transpose(1, 2).contiguous()


def causal_conv1d_update(conv_state, x, weight, bias=None):
    """One decode step: shifts `conv_state` [b, d, k-1] in place with x [b, d]; returns y [b, d]."""
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [b, d, k]
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    conv_state.copy_(window[..., 1:])
    return y


def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, reset=None):
    """Default torch path: chunked when the sequence is long enough for it to pay off."""
    if x.shape[1] <= 8:
        return selective_scan_sequential(x, dt, A, B, C, D, z, dt_bias, initial_state, reset)
    return selective_scan_chunked(x, dt, A, B, C, D, z, dt_bias, initial_state, reset)
