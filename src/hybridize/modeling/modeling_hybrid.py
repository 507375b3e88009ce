"""Hybrid causal LM: a Llama-family decoder whose attention layers are partly replaced by Mamba mixers.

Self-contained (it imports only torch, transformers and its sibling files), so a saved checkpoint
loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` on a machine
without hybridize. When hybridize is installed its kernel dispatch (Triton / external kernels on
GPU) replaces the torch reference ops.

Each layer is pre-norm: h = h + mixer(norm1(h)); h = h + mlp(norm2(h)). The mixer is the teacher's
attention, a Mamba-1 selective-scan mixer with grouped B/C (Mamba-in-Llama layout), or nothing
(`identity`: the whole block is skipped, used by importance probes).

Packed sequences: a token whose position id is 0 starts a new document; attention does not cross
documents and the Mamba state and conv window are reset there.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# the outputs' cache field: `cache` from transformers 5.24 on, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

from .configuration_hybrid import HybridConfig

try:  # fast kernels when hybridize is installed; the torch reference otherwise
    from hybridize.kernels.ops import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
except ImportError:
    from .mamba_ops import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update

try:
    from transformers import initialization as init
except ImportError:  # transformers < 5
    init = nn.init


class HybridRMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden):
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden.to(dtype)


def rope_inverse_frequencies(config):
    """Inverse frequencies for RoPE types default, linear and llama3 (as Hugging Face defines them)."""
    dim = config.head_dim
    scaling = config.rope
    inv_freq = 1.0 / (scaling["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3")


class HybridRotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    @torch.no_grad()
    def forward(self, hidden, position_ids):
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(hidden.dtype), emb.sin().to(hidden.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class HybridAttention(nn.Module):
    """The teacher's grouped-query attention, unchanged (optional q/k RMSNorm as in Qwen3)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = HybridRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = HybridRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, hidden, rotary, attention_mask, cache=None, **_):
        b, l, _ = hidden.shape
        q = self.q_proj(hidden).view(b, l, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(b, l, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(b, l, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update_kv(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            is_causal=attention_mask is None and l > 1,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, l, -1))


class HybridMambaMixer(nn.Module):
    """Mamba-1 selective-scan mixer in the Mamba-in-Llama layout, shaped to take attention weights.

    in_proj emits [z (d_inner) | x (d_xb) | B (d_xb) | C (d_inner)]: x and B have the width of the
    teacher's K/V (so MIL init copies W_V, W_K there), C and z the width of its queries. x is split
    into groups of d_state and each group repeated d_inner/d_xb times to d_inner channels before the
    conv; B is read per group in the scan (head k of d_state channels uses group k // repeat).
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        settings = config.mamba
        self.d_state = settings["d_state"]
        self.d_conv = settings["d_conv"]
        self.dt_rank = settings["dt_rank"]
        self.d_inner = config.num_attention_heads * config.head_dim
        self.d_xb = config.num_key_value_heads * config.head_dim
        self.repeat = self.d_inner // self.d_xb
        self.settings = settings
        hidden = config.hidden_size
        self.in_proj = nn.Linear(hidden, 2 * self.d_inner + 2 * self.d_xb, bias=False)
        self.dt_in_proj = nn.Linear(hidden, self.dt_rank, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=0, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, hidden, bias=False)

    @torch.no_grad()
    def reset_mamba_parameters(self):
        """The fresh init of the scan parameters: A = -(1..N), D = 1, dt in [dt_min, dt_max] log-uniform."""
        s = self.settings
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        init.copy_(self.A_log, torch.log(A))
        init.ones_(self.D)
        bound = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(s["dt_max"]) - math.log(s["dt_min"])) + math.log(s["dt_min"])
        ).clamp(min=s["dt_init_floor"])
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _repeat_groups(self, x):
        """[b, l, d_xb] -> [b, l, d_inner]: each group of d_state channels repeated `repeat` times."""
        b, l, _ = x.shape
        groups = self.d_xb // self.d_state
        return x.view(b, l, groups, 1, self.d_state).expand(b, l, groups, self.repeat, self.d_state).reshape(b, l, -1)

    def forward(self, hidden, token_mask=None, reset=None, cache=None, **_):
        b, l, _ = hidden.shape
        z, x, B, C = self.in_proj(hidden).split([self.d_inner, self.d_xb, self.d_xb, self.d_inner], dim=-1)
        x = self._repeat_groups(x)
        B = B.reshape(b, l, self.d_xb // self.d_state, self.d_state)
        C = C.reshape(b, l, self.d_inner // self.d_state, self.d_state)
        dt = F.linear(self.dt_in_proj(hidden), self.dt_proj.weight)
        A = -torch.exp(self.A_log.float())
        conv_weight = self.conv1d.weight.squeeze(1)
        conv_state, ssm_state = cache.mamba_state(self.layer_idx) if cache is not None else (None, None)

        if l == 1 and ssm_state is not None:  # decoding: one step from the cached state, in place
            xc = F.silu(causal_conv1d_update(conv_state, x[:, 0], conv_weight, self.conv1d.bias))
            y = selective_state_update(
                ssm_state, xc, dt[:, 0], A, B[:, 0], C[:, 0], self.D, z[:, 0], self.dt_proj.bias
            )
            return self.out_proj(y[:, None])

        if token_mask is not None:  # padding must not reach the conv window or the state
            x = x.masked_fill(~token_mask[..., None], 0.0)
        xc, new_conv_state = causal_conv1d(x, conv_weight, self.conv1d.bias, conv_state, reset)
        xc = F.silu(xc)
        if token_mask is not None:
            xc = xc.masked_fill(~token_mask[..., None], 0.0)
        y, new_ssm_state = selective_scan(
            xc, dt, A, B, C, self.D, z, self.dt_proj.bias, initial_state=ssm_state, reset=reset
        )
        if cache is not None:
            cache.set_mamba_state(self.layer_idx, new_conv_state, new_ssm_state)
        return self.out_proj(y)


class HybridMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HybridDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        if self.mixer_type == "identity":
            return
        mixer = HybridAttention if self.mixer_type == "attention" else HybridMambaMixer
        self.mixer = mixer(config, layer_idx)
        self.mlp = HybridMLP(config)
        self.input_layernorm = HybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = HybridRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, rotary, attention_mask, token_mask, reset, cache):
        if self.mixer_type == "identity":
            return hidden
        hidden = hidden + self.mixer(
            self.input_layernorm(hidden),
            rotary=rotary,
            attention_mask=attention_mask,
            token_mask=token_mask,
            reset=reset,
            cache=cache,
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class HybridCache:
    """Decoding state of every layer: K/V for attention layers, conv window + fp32 SSM state for Mamba.

    Batch operations (beam reordering, repeat, select) apply to all of it, so generate's search
    strategies work; cropping is refused since a recurrent state cannot be rewound.
    """

    is_compileable = False

    def __init__(self, config):
        n = config.num_hidden_layers
        self.mixer_types = list(config.mixer_types)
        self.keys = [None] * n
        self.values = [None] * n
        self.conv_states = [None] * n
        self.ssm_states = [None] * n
        self.seen_tokens = 0

    def update_kv(self, key, value, layer_idx):
        """Append this step's K/V [B, H, L, D] to the layer's cache; returns all of it so far.

        K/V live in buffers with room to grow (doubling along the sequence), so a decode step writes
        its token in place instead of copying the whole cache, as a concatenation would at every
        step. While autograd records, it concatenates: an in-place write would break the graph.
        """
        past, cached_k, cached_v = self.seen_tokens, self.keys[layer_idx], self.values[layer_idx]
        total = past + key.shape[-2]
        if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
            if cached_k is not None:
                key = torch.cat([cached_k[..., :past, :], key], dim=-2)
                value = torch.cat([cached_v[..., :past, :], value], dim=-2)
            self.keys[layer_idx], self.values[layer_idx] = key, value
            return key, value
        if cached_k is None or cached_k.shape[-2] < total:
            capacity = max(total, 2 * past)
            grown_k = key.new_empty(*key.shape[:-2], capacity, key.shape[-1])
            grown_v = value.new_empty(*value.shape[:-2], capacity, value.shape[-1])
            if cached_k is not None:
                grown_k[..., :past, :] = cached_k[..., :past, :]
                grown_v[..., :past, :] = cached_v[..., :past, :]
            self.keys[layer_idx], self.values[layer_idx] = cached_k, cached_v = grown_k, grown_v
        cached_k[..., past:total, :] = key
        cached_v[..., past:total, :] = value
        return cached_k[..., :total, :], cached_v[..., :total, :]

    def mamba_state(self, layer_idx):
        return self.conv_states[layer_idx], self.ssm_states[layer_idx]

    def set_mamba_state(self, layer_idx, conv_state, ssm_state):
        self.conv_states[layer_idx] = conv_state.contiguous()
        self.ssm_states[layer_idx] = ssm_state.contiguous()

    def get_seq_length(self, layer_idx=0):
        return self.seen_tokens

    @property
    def is_linear(self):
        """Per layer, whether it holds a recurrent state (transformers >= 5.24's generate asks)."""
        return [kind == "mamba" for kind in self.mixer_types]

    def get_max_cache_shape(self, layer_idx=0):
        return None

    def _apply(self, fn):
        for store in (self.keys, self.values, self.conv_states, self.ssm_states):
            for i, tensor in enumerate(store):
                if tensor is not None:
                    store[i] = fn(tensor)

    def reorder_cache(self, beam_idx):
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices):
        self._apply(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats):
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length):
        raise NotImplementedError("a hybrid cache holds recurrent states, which cannot be cropped")

    def __len__(self):
        return len(self.mixer_types)


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, HybridRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, HybridRotaryEmbedding):  # a computed buffer: models load on the meta device
            init.copy_(module.inv_freq, rope_inverse_frequencies(self.config))
        if isinstance(module, HybridMambaMixer):
            module.reset_mamba_parameters()


def _attention_mask(attention_mask, position_ids, past_length, length, window):
    """Boolean [b, 1, l, past+l] mask (True = attend), or None when plain causal attention is exact."""
    batch = position_ids.shape[0]
    device = position_ids.device
    documents = None
    if past_length == 0 and length > 1 and bool((position_ids[:, 1:] == 0).any()):
        documents = (position_ids == 0).cumsum(-1)
    padded = attention_mask is not None and not bool(attention_mask.all())
    if documents is None and not padded and window is None and (past_length == 0 or length == 1):
        return None
    total = past_length + length
    query = torch.arange(past_length, total, device=device)[:, None]
    key = torch.arange(total, device=device)[None, :]
    mask = (key <= query).expand(batch, length, total)
    if window is not None:
        mask = mask & (key > query - window)
    if padded:
        mask = mask & attention_mask[:, None, -total:].bool()
    if documents is not None:
        mask = mask & (documents[:, :, None] == documents[:, None, :])
    mask = mask | (key == query)  # every row attends at least to itself: no NaN on padding rows
    return mask[:, None]


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = HybridRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.checkpoint_layers = None  # with gradient_checkpointing: only the first N layers (None: all)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ):
        # transformers >= 5.24 passes the cache as `cache`, earlier releases as `past_key_values`
        cache = cache if cache is not None else past_key_values
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, l, _ = hidden.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and not self.training:
            cache = HybridCache(self.config)
        past_length = cache.get_seq_length() if cache is not None else 0

        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -l:]
            else:
                position_ids = torch.arange(past_length, past_length + l, device=hidden.device).expand(b, l)
        mask = _attention_mask(attention_mask, position_ids, past_length, l, self.config.sliding_window)
        token_mask = None
        if attention_mask is not None and not bool(attention_mask[:, -l:].all()):
            token_mask = attention_mask[:, -l:].bool()
        reset = None
        if past_length == 0 and l > 1 and bool((position_ids[:, 1:] == 0).any()):
            reset = position_ids == 0

        rotary = self.rotary_emb(hidden, position_ids)
        recompute = len(self.layers) if self.checkpoint_layers is None else self.checkpoint_layers
        for index, layer in enumerate(self.layers):
            args = (hidden, rotary, mask, token_mask, reset, cache)
            if self.gradient_checkpointing and self.training and index < recompute:
                hidden = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden = layer(*args)
        hidden = self.norm(hidden)
        if cache is not None:
            cache.seen_tokens += l
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_FIELD: cache if use_cache else None})


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the model creates its own HybridCache

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})


__all__ = ["HybridCache", "HybridForCausalLM", "HybridModel", "HybridPreTrainedModel"]
