"""torch.compile for training: the pure-torch parts of every decoder layer, one module at a time.

Compiled: the RMSNorms and MLPs of the student and the teacher, and the hybrid's attention mixers
(a stock transformers teacher's attention keeps its own SDPA path). The Mamba mixer stays eager: its scan and conv are Triton kernels inside autograd Functions, which a graph would
only break around. Compiling parts rather than whole layers keeps every graph free of the cache
and checkpointing branches, so each compiles once per shape. On an H100 at the Llama-3.2-1B shape
this cut a distillation step from 1116 to 976 ms (docs/performance.md), most of it elementwise
work in the backward.
"""

from __future__ import annotations

from torch import nn


def compile_layers(*models: nn.Module | None) -> list[nn.Module]:
    """Compile the norms, MLP and hybrid attention mixer of every decoder layer in place; returns the parts."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):  # one graph per part and shape: many parts
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    compiled = []
    for model in models:
        if model is None:
            continue
        for layer in model.model.layers:
            parts = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm", "mlp")]
            if getattr(layer, "mixer_type", None) == "attention":
                parts.append(layer.mixer)
            for part in parts:
                if part is not None:
                    part.compile(dynamic=False)
                    compiled.append(part)
    return compiled
