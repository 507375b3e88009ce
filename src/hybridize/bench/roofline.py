"""Memory-bandwidth roofline of a decode step (notes/performance.md).

bytes per step = P * b_w + B * (L_a * l * kv + L_s * 2 * S): every weight is read once per step,
every attention layer reads its K/V of the whole context, every recurrent layer reads and writes its
fixed-size state. time >= bytes / bandwidth, tokens/s <= B / time. A hybrid gains twice: fewer bytes
per sequence, and more sequences fit in memory.
"""

import math
from dataclasses import asdict, dataclass

H100_BANDWIDTH = 3.0e12  # bytes/s, measured device-to-device copy (notes/performance.md)
H100_MEMORY = 80e9


@dataclass(frozen=True)
class DecodeCost:
    """What a decode step moves, derived from a (hybrid or teacher) config."""

    parameters: int
    attention_layers: int
    recurrent_layers: int
    kv_bytes_per_token_per_layer: int
    state_bytes_per_layer: int
    weight_bytes: int

    @property
    def kv_bytes_per_token(self):
        return self.attention_layers * self.kv_bytes_per_token_per_layer

    @property
    def recurrent_bytes_per_sequence(self):
        return self.recurrent_layers * self.state_bytes_per_layer

    def bytes_per_step(self, batch, context):
        per_sequence = self.kv_bytes_per_token * context + 2 * self.recurrent_bytes_per_sequence
        return self.weight_bytes + batch * per_sequence

    def tokens_per_second(self, batch, context, bandwidth=H100_BANDWIDTH):
        return batch * bandwidth / self.bytes_per_step(batch, context)

    def max_batch(self, sequence_length, memory=H100_MEMORY, reserve=0.05):
        """Most sequences of `sequence_length` tokens whose caches fit beside the weights."""
        free = memory * (1 - reserve) - self.weight_bytes
        per_sequence = self.kv_bytes_per_token * sequence_length + self.recurrent_bytes_per_sequence
        return max(0, math.floor(free / per_sequence))

    def to_dict(self):
        return {**asdict(self), "kv_bytes_per_token": self.kv_bytes_per_token,
                "recurrent_bytes_per_sequence": self.recurrent_bytes_per_sequence}


def decode_cost(config, parameters, weight_bytes=2, kv_bytes=2, state_bytes=4, conv_bytes=2) -> DecodeCost:
    """Cost model of a HybridConfig or a Llama-family config (all attention)."""
    kinds = getattr(config, "mixer_types", None) or ["attention"] * config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d_inner = config.num_attention_heads * head_dim
    mamba = getattr(config, "mamba", None) or {"d_state": 16, "d_conv": 4}
    state = d_inner * mamba["d_state"] * state_bytes + (mamba["d_conv"] - 1) * d_inner * conv_bytes
    return DecodeCost(
        parameters=parameters,
        attention_layers=kinds.count("attention"),
        recurrent_layers=kinds.count("mamba"),
        kv_bytes_per_token_per_layer=2 * kv_heads * head_dim * kv_bytes,
        state_bytes_per_layer=state,
        weight_bytes=parameters * weight_bytes,
    )


def roofline_ratio(hybrid: DecodeCost, teacher: DecodeCost, input_len, output_len, memory=H100_MEMORY,
                   bandwidth=H100_BANDWIDTH):
    """Upper bound of hybrid/teacher output throughput, each at its own max batch, mean context.

    The mean decode step of an O-token generation sees context I + O/2 (attention cost is linear in it).
    """
    total, mean_context = input_len + output_len, input_len + output_len / 2
    batches = [cost.max_batch(total, memory) for cost in (hybrid, teacher)]
    if min(batches) == 0:
        return None
    speeds = [c.tokens_per_second(b, mean_context, bandwidth) for c, b in zip((hybrid, teacher), batches)]
    return {"ratio": speeds[0] / speeds[1], "hybrid_batch": batches[0], "teacher_batch": batches[1],
            "hybrid_tokens_per_s": speeds[0], "teacher_tokens_per_s": speeds[1]}
