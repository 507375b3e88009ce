"""Configuration of a hybrid attention + Mamba causal LM converted from a Llama-family teacher."""

import math

from transformers import PretrainedConfig

MIXER_TYPES = ("attention", "mamba", "identity")


class HybridConfig(PretrainedConfig):
    """The teacher's base fields plus `mixer_types` (one per layer) and the Mamba mixer's settings.

    `mixer_types` entries are "attention", "mamba" or "identity". `rope` is a dict with `rope_type`
    in {"default", "linear", "llama3"}, `rope_theta` and that type's fields. Neither uses the names
    `layer_types` / `rope_scaling`, which transformers rewrites into its own vocabulary. `mamba`
    holds d_state, d_conv and dt_rank ("auto" = ceil(hidden_size / 16)) plus the fresh-init range of dt.
    """

    model_type = "hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope=None,
        attention_bias=False,
        attention_out_bias=None,
        mlp_bias=False,
        qk_norm=False,
        sliding_window=None,
        tie_word_embeddings=False,
        mixer_types=None,
        mamba=None,
        source_model_type="llama",
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope = {"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}
        self.attention_bias = attention_bias
        # Qwen2 has q/k/v bias without o bias; Llama's attention_bias covers all four.
        self.attention_out_bias = attention_bias if attention_out_bias is None else attention_out_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.sliding_window = sliding_window
        self.mixer_types = list(mixer_types) if mixer_types is not None else ["attention"] * num_hidden_layers
        mamba = dict(mamba or {})
        self.mamba = {
            "d_state": mamba.pop("d_state", 16),
            "d_conv": mamba.pop("d_conv", 4),
            "dt_rank": mamba.pop("dt_rank", "auto"),
            "dt_min": mamba.pop("dt_min", 1e-3),
            "dt_max": mamba.pop("dt_max", 1e-1),
            "dt_init_floor": mamba.pop("dt_init_floor", 1e-4),
        }
        if mamba:
            raise ValueError(f"unknown mamba settings {sorted(mamba)}; valid: {sorted(self.mamba)}")
        if self.mamba["dt_rank"] == "auto":
            self.mamba["dt_rank"] = math.ceil(hidden_size / 16)
        self.source_model_type = source_model_type
        self.use_cache = use_cache
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_hybrid.HybridConfig",
                "AutoModelForCausalLM": "modeling_hybrid.HybridForCausalLM",
            },
        )
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_layout()

    def validate_layout(self):
        """Raise ValueError with one sentence if the layer types or mixer shapes cannot work."""
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries but the model has {self.num_hidden_layers} layers"
            )
        for index, kind in enumerate(self.mixer_types):
            if kind not in MIXER_TYPES:
                raise ValueError(f"layer {index} has mixer {kind!r}; valid mixers are {', '.join(MIXER_TYPES)}")
        if "mamba" in self.mixer_types:
            d_state = self.mamba["d_state"]
            d_inner = self.num_attention_heads * self.head_dim
            d_xb = self.num_key_value_heads * self.head_dim
            if d_xb % d_state or d_inner % d_xb:
                raise ValueError(
                    f"the Mamba mixer needs kv width {d_xb} divisible by d_state {d_state} and query width "
                    f"{d_inner} divisible by kv width"
                )

    @property
    def mixer_layers(self):
        return [i for i, kind in enumerate(self.mixer_types) if kind == "mamba"]
