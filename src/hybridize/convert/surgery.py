"""Layer surgery: build a hybrid from a teacher (or from an earlier hybrid) and MIL-initialise new mixers.

MIL (Mamba-in-Llama) initialisation copies x <- W_V, B <- W_K, C <- W_Q, out_proj <- W_O. Two
layouts of the query side:

- `apriel`: C and out_proj take W_Q rows / W_O columns in order, as the published checkpoints do.
  Mamba head k (d_state channels) reads K/V group k // repeat, which is the right kv head but, when
  head_dim > d_state, a different d_state-slice of it than the query slice in C.
- `aligned`: C head k and out_proj block k take the query slice that matches the K/V slice head k
  reads, so every channel starts as a partial q.k product over one slice, and its value (x) is the
  slice W_O expects. Same architecture, only the initial weights differ.
"""

import torch

from hybridize.errors import UserError
from hybridize.modeling.configuration_hybrid import HybridConfig
from hybridize.modeling.modeling_hybrid import HybridForCausalLM, HybridMambaMixer

MIL_LAYOUTS = ("apriel", "aligned")
MIXER_INITS = ("mil", "random")


def hybrid_config_from_teacher(config, mixer_types=None) -> HybridConfig:
    """HybridConfig carrying a Llama/Mistral/Qwen2/Qwen3 (or hybrid) config's base fields."""
    if isinstance(config, HybridConfig):
        data = config.to_dict()
        for key in ("auto_map", "architectures", "model_type", "transformers_version"):
            data.pop(key, None)
        if mixer_types is not None:
            data["mixer_types"] = list(mixer_types)
        return HybridConfig(**data)

    model_type = config.model_type
    rope = getattr(config, "rope_parameters", None)
    if rope is None:  # transformers 4 naming
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope["rope_theta"] = config.rope_theta
    rope = dict(rope)
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise UserError(f"RoPE type {rope['rope_type']!r} is not supported; supported: default, linear, llama3")

    attention_bias = getattr(config, "attention_bias", False)
    attention_out_bias = attention_bias
    if model_type == "qwen2":  # q/k/v carry a bias, o does not
        attention_bias, attention_out_bias = True, False
    sliding_window = None
    if model_type == "mistral":
        sliding_window = getattr(config, "sliding_window", None)
    elif getattr(config, "use_sliding_window", False):
        raise UserError(f"{model_type} teachers with use_sliding_window=true are not supported")

    layers = config.num_hidden_layers
    return HybridConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=getattr(config, "initializer_range", 0.02),
        rms_norm_eps=config.rms_norm_eps,
        rope=rope,
        attention_bias=attention_bias,
        attention_out_bias=attention_out_bias,
        mlp_bias=getattr(config, "mlp_bias", False),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding_window,
        tie_word_embeddings=getattr(config, "tie_word_embeddings", False),
        mixer_types=list(mixer_types) if mixer_types is not None else ["attention"] * layers,
        source_model_type=model_type,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def query_permutation(config: HybridConfig, layout: str) -> torch.Tensor:
    """Row order of W_Q (= column order of W_O) that MIL copies into C (and out_proj)."""
    d_state, head_dim = config.mamba["d_state"], config.head_dim
    d_inner = config.num_attention_heads * head_dim
    if layout == "apriel":
        return torch.arange(d_inner)
    if layout != "aligned":
        raise UserError(f"unknown MIL layout {layout!r}; valid: {', '.join(MIL_LAYOUTS)}")
    if head_dim % d_state:
        raise UserError(f"the aligned MIL layout needs head_dim {head_dim} divisible by d_state {d_state}")
    slices = head_dim // d_state
    repeat = config.num_attention_heads // config.num_key_value_heads
    rows = []
    for head in range(d_inner // d_state):
        group, copy = divmod(head, repeat)  # head reads K/V group `group` (kv head, slice)
        kv_head, piece = divmod(group, slices)
        query_head = kv_head * repeat + copy
        start = query_head * head_dim + piece * d_state
        rows.append(torch.arange(start, start + d_state))
    return torch.cat(rows)


@torch.no_grad()
def mil_initialise(mixer: HybridMambaMixer, attention: dict, config: HybridConfig, layout: str):
    """Copy the attention projections (`q_proj.weight` ... `o_proj.weight`) into a fresh mixer."""
    d_inner, d_xb = mixer.d_inner, mixer.d_xb
    order = query_permutation(config, layout)
    weight = mixer.in_proj.weight
    weight[d_inner : d_inner + d_xb] = attention["v_proj.weight"]
    weight[d_inner + d_xb : d_inner + 2 * d_xb] = attention["k_proj.weight"]
    weight[d_inner + 2 * d_xb :] = attention["q_proj.weight"][order]
    mixer.out_proj.weight.copy_(attention["o_proj.weight"][:, order])


def _source_layers(model):
    """Per layer: (mixer kind, dict of that layer's parameters with the prefix removed)."""
    state = model.state_dict()
    config = model.config
    kinds = config.mixer_types if isinstance(config, HybridConfig) else ["attention"] * config.num_hidden_layers
    layers = []
    for index, kind in enumerate(kinds):
        prefix = f"model.layers.{index}."
        params = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        params = {k.replace("self_attn.", "mixer.", 1): v for k, v in params.items()}
        layers.append((kind, params))
    return layers


def build_hybrid(source, mixer_types, mil_layout="apriel", mixer_init="mil", seed=0) -> HybridForCausalLM:
    """A hybrid whose layer i has mixer `mixer_types[i]`, taking every weight it can from `source`.

    Layers that keep their kind copy the source's weights; attention -> mamba layers are
    MIL-initialised (or fresh with mixer_init="random"); embeddings, norms and MLPs are copied.
    Works from a teacher (all attention) and from an earlier hybrid alike.
    """
    if mixer_init not in MIXER_INITS:
        raise UserError(f"unknown mixer init {mixer_init!r}; valid: {', '.join(MIXER_INITS)}")
    config = hybrid_config_from_teacher(source.config, mixer_types)
    layers = _source_layers(source)
    for index, (old, new) in enumerate(zip([kind for kind, _ in layers], config.mixer_types)):
        if old != new and not (old == "attention" and new in ("mamba", "identity")):
            raise UserError(f"layer {index} is {old!r} in the source and cannot become {new!r}")
    torch.manual_seed(seed)
    hybrid = HybridForCausalLM(config).float().eval()
    target = hybrid.state_dict()
    source_state = source.state_dict()
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if key in source_state:
            target[key].copy_(source_state[key])
    for index, ((old, params), new) in enumerate(zip(layers, config.mixer_types)):
        if new == "identity":
            continue
        for name, value in params.items():
            if old == new or not name.startswith("mixer."):
                target[f"model.layers.{index}.{name}"].copy_(value)
        if old == "attention" and new == "mamba" and mixer_init == "mil":
            attention = {k[len("mixer.") :]: v.float() for k, v in params.items() if k.startswith("mixer.")}
            mil_initialise(hybrid.model.layers[index].mixer, attention, config, mil_layout)
    if config.tie_word_embeddings:
        hybrid.tie_weights()
    return hybrid


def select_layers(num_layers, layers=None, count=None, fraction=None, ranking=None, current=None):
    """Indices of the layers to convert, and how they were chosen.

    Exactly one of `layers` (explicit), `count` or `fraction` is given. Counts are totals of mixer
    layers; layers already converted in `current` count towards them. New layers come from
    `ranking` (least important first) when given, otherwise evenly spaced.
    """
    current = sorted(current or [])
    if sum(x is not None for x in (layers, count, fraction)) != 1:
        raise UserError("give exactly one of --layers, --count or --fraction")
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"layer index {bad[0]} is out of range; the model has layers 0..{num_layers - 1}")
        return sorted(set(current) | set(layers)), "explicit"
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {fraction}")
        count = round(fraction * num_layers)
    if not 0 < count <= num_layers:
        raise UserError(f"--count {count} must be between 1 and the layer count {num_layers}")
    if count < len(current):
        raise UserError(f"the model already has {len(current)} mixer layers, more than the target {count}")
    if ranking is not None:
        bad = [i for i in ranking if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"the ranking names layer {bad[0]}, outside 0..{num_layers - 1}")
        candidates = [i for i in ranking if i not in current]
        if len(candidates) < count - len(current):
            raise UserError(f"the ranking has too few layers for {count} mixer layers")
        return sorted(current + candidates[: count - len(current)]), "ranking"
    spaced = [int((i + 0.5) * num_layers / count) for i in range(count)]
    chosen = list(current)
    for index in spaced:
        if len(chosen) == count:
            break
        if index not in chosen:
            chosen.append(index)
    for index in range(num_layers):  # top up when spacing collides with existing layers
        if len(chosen) == count:
            break
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen), "evenly_spaced"
