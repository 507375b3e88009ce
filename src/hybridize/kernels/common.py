"""Pure-torch helpers shared by the fast paths (no Triton import here)."""

import torch


def final_window(x, initial_state, reset, k):
    """The conv's final window [b, d, k-1]: the last k-1 inputs, zeroed where they precede the last reset.

    Same rule as `mamba_ops.causal_conv1d`; plain torch indexing, so autograd flows into x and the
    initial window.
    """
    b, l, d = x.shape
    if k == 1:
        return x.new_zeros(b, d, 0)
    past = x.new_zeros(b, k - 1, d) if initial_state is None else initial_state.transpose(1, 2).to(x.dtype)
    window = torch.cat([past, x[:, max(l - (k - 1), 0) :]], dim=1)[:, -(k - 1) :]
    if reset is not None:
        position = torch.arange(l, device=x.device)
        latest = torch.where(reset, position, torch.full_like(position, -(k + l))).max(dim=1).values
        slot_time = torch.arange(l - (k - 1), l, device=x.device)
        window = window.masked_fill((slot_time[None, :] < latest[:, None])[..., None], 0.0)
    return window.transpose(1, 2).contiguous()
