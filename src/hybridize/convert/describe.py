"""What `hybridize inspect` reports: per-layer mixer and parameter counts, cache sizes, roofline speed-up."""

from hybridize.bench.roofline import decode_cost, roofline_ratio
from hybridize.convert.surgery import hybrid_config_from_teacher


def describe(model, context=8192, input_len=1, output_len=16384, memory=80e9) -> dict:
    """Layer table and decode-cost estimate of a teacher or hybrid, against its all-attention twin."""
    config = hybrid_config_from_teacher(model.config)
    layers = []
    for index, kind in enumerate(config.mixer_types):
        params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"model.layers.{index}."))
        layers.append({"index": index, "mixer": kind, "parameters": params})
    parameters = sum(p.numel() for p in model.parameters())
    cost = decode_cost(config, parameters)
    dense = hybrid_config_from_teacher(config, ["attention"] * config.num_hidden_layers)
    dense_parameters = parameters + sum(
        _attention_params(config) - layer["parameters"] + _mlp_and_norm_params(config)
        if layer["mixer"] == "identity" else _attention_params(config) - _mixer_params(model, layer["index"])
        for layer in layers if layer["mixer"] != "attention"
    )
    dense_cost = decode_cost(dense, dense_parameters)
    return {
        "model_type": config.source_model_type if config.mixer_types.count("attention") == len(layers) else "hybrid",
        "layers": layers,
        "parameters": parameters,
        "kv_bytes_per_token": cost.kv_bytes_per_token,
        "recurrent_bytes_per_sequence": cost.recurrent_bytes_per_sequence,
        "context": context,
        "step_speedup_batch1": dense_cost.bytes_per_step(1, context) / cost.bytes_per_step(1, context),
        "scenario": {"input_len": input_len, "output_len": output_len, "memory_bytes": memory},
        "roofline": roofline_ratio(cost, dense_cost, input_len, output_len, memory),
    }


def _attention_params(config):
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    params = config.hidden_size * (q + 2 * kv) + q * config.hidden_size
    if config.attention_bias:
        params += q + 2 * kv
    if config.attention_out_bias:
        params += config.hidden_size
    if config.qk_norm:
        params += 2 * config.head_dim
    return params


def _mlp_and_norm_params(config):
    mlp = 3 * config.hidden_size * config.intermediate_size
    if config.mlp_bias:
        mlp += 2 * config.intermediate_size + config.hidden_size
    return mlp + 2 * config.hidden_size


def _mixer_params(model, index):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"model.layers.{index}.mixer."))
