"""Model shapes for `hybridize bench --shape`: random-weight models built directly on the device.

Decode throughput does not depend on weight values, so a shape stands in for a real checkpoint of
that architecture. Models are built in the target dtype on the target device (a 15B model is never
materialised in fp32 on the CPU).
"""

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybridize.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family architecture: the fields of its transformers config."""

    name: str
    model_type: str  # "llama" or "mistral"
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 131072

    def transformers_config(self):
        from transformers import LlamaConfig, MistralConfig

        cls = {"llama": LlamaConfig, "mistral": MistralConfig}[self.model_type]
        extra = {"sliding_window": None} if self.model_type == "mistral" else {}
        return cls(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rope_parameters=dict(self.rope_parameters),
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
        )

    def hybrid_config(self, mixer_types=None):
        from hybridize.convert.surgery import hybrid_config_from_teacher

        return hybrid_config_from_teacher(self.transformers_config(), mixer_types)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES = {
    shape.name: shape
    for shape in [
        ModelShape("apriel-15b", "mistral", 50, 5120, 32, 8, 128, 14336, 131072,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        ModelShape("llama3-8b", "llama", 32, 4096, 32, 8, 128, 14336, 128256, rope_parameters=LLAMA3_ROPE),
        ModelShape("smollm2-135m", "llama", 30, 576, 9, 3, 64, 1536, 49152, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, max_position_embeddings=8192),
        ModelShape("tiny", "llama", 4, 64, 4, 2, 16, 96, 96, max_position_embeddings=4096),  # for tests
    ]
}


def get_shape(name) -> ModelShape:
    if isinstance(name, ModelShape):
        return name
    if name not in SHAPES:
        raise UserError(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}")
    return SHAPES[name]


@contextlib.contextmanager
def _building(device, dtype):
    """Create parameters directly on `device` in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def build_teacher(shape, device="cpu", dtype=torch.bfloat16, seed=0):
    """A random-weight transformers model (LlamaForCausalLM / MistralForCausalLM) of this shape."""
    from transformers import LlamaForCausalLM, MistralForCausalLM

    shape = get_shape(shape)
    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM}[shape.model_type]
    torch.manual_seed(seed)
    with _building(device, dtype):
        model = cls(shape.transformers_config())
    return model.eval()


@torch.no_grad()
def varied_teacher(shape, device="cpu", dtype=torch.float32, noise=0.05, seed=0):
    """A random teacher whose greedy output is varied: the default init (std 0.02, unit norms) makes
    the residual stream echo the input embedding and greedy decoding repeat one token; adding
    `noise` to every parameter (norms and biases too) breaks that."""
    model = build_teacher(shape, device, dtype, seed)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, device=device, dtype=dtype, generator=generator) * noise)
    return model


@torch.no_grad()
def build_hybrid_shape(shape, mixer_types, device="cpu", dtype=torch.bfloat16, seed=0):
    """A random-weight HybridForCausalLM of this shape with the given mixer per layer."""
    from hybridize.modeling.modeling_hybrid import HybridForCausalLM, rope_inverse_frequencies

    shape = get_shape(shape)
    config = shape.hybrid_config(mixer_types)
    torch.manual_seed(seed)
    with _building(device, dtype):
        model = HybridForCausalLM(config)
    model.model.rotary_emb.inv_freq = rope_inverse_frequencies(config).to(device)  # fp32, as the teacher's
    return model.eval()


def evenly_spaced(num_layers, count):
    """`count` mixer layers spread evenly over `num_layers` (convert.surgery.select_layers' rule)."""
    from hybridize.convert.surgery import select_layers

    chosen, _ = select_layers(num_layers, count=count)
    return chosen


def mixer_types_for(num_layers, count=None, layers=None):
    """Per-layer mixer list with `count` evenly spaced (or the given `layers`) as Mamba, the rest attention."""
    chosen = set(layers if layers is not None else evenly_spaced(num_layers, count))
    return ["mamba" if i in chosen else "attention" for i in range(num_layers)]


def read_layout(path, num_layers):
    """Mixer types from a layers.json: {"mixer_types": [...]} (as checkpoints write it),
    {"mixer_layers": [indices]}, or a plain list of mixer-layer indices."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"layout file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"layout file {path} is not valid JSON") from None
    if isinstance(data, dict) and "mixer_types" in data:
        kinds = data["mixer_types"]
        if not isinstance(kinds, list) or len(kinds) != num_layers:
            raise UserError(f"{path}: mixer_types must list {num_layers} entries, one per layer")
        bad = [k for k in kinds if k not in ("attention", "mamba", "identity")]
        if bad:
            raise UserError(f"{path}: mixer {bad[0]!r} is not one of attention, mamba, identity")
        return list(kinds)
    layers = data.get("mixer_layers") if isinstance(data, dict) else data
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise UserError(f"{path} must hold mixer_types (one per layer), mixer_layers, or a list of layer indices")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"{path} names layer {bad[0]}, outside 0..{num_layers - 1}")
    return mixer_types_for(num_layers, layers=layers)
