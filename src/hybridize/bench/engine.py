"""A static-batch decode engine for measuring a HybridForCausalLM (DESIGN.md §9, notes/performance.md).

It runs the model's own modules and weights: prefill is the model's forward with a cache adapter
over preallocated buffers (chunked); a decode step calls each layer's norms, MLP, attention
projections and Mamba mixer, and reimplements only the cache plumbing and the attention over the
cache. What it keeps on the device:
- per attention layer K and V [B, kv_heads, max_len, head_dim] in the model dtype;
- per Mamba layer the conv window [B, d_inner, d_conv - 1] (model dtype) and the SSM state
  [B, d_inner, d_state] (fp32), updated in place by `hybridize.kernels.ops`;
- `lengths` [B]: tokens in the cache of each sequence, read by RoPE, the K/V append and the attention.
Since nothing in a decode step depends on a host-side length, the step (greedy argmax included) is
captured once as a CUDA graph and replayed for every token. On CPU the same step runs eagerly, so the
tests cover the code path.

Attention backends of the decode step:
- "triton": `decode_attention` (RoPE + append in one kernel, split-KV flash-decoding that reads K/V
  only up to each sequence's length). The default on CUDA.
- "sdpa": torch RoPE + `index_copy_` append + `scaled_dot_product_attention` over the whole buffer with
  a boolean mask from `lengths` (graph-capturable, but reads all max_len positions). The CPU path.

The teacher is measured as its all-attention twin (`attention_twin`), which shares the teacher's
tensors and reproduces its logits.
"""

import gc
import math
import time

import torch
import torch.nn.functional as F

from hybridize.errors import UserError
from hybridize.modeling.modeling_hybrid import (
    HybridForCausalLM,
    HybridMambaMixer,
    apply_rotary,
    rope_inverse_frequencies,
)

ATTENTION_BACKENDS = ("triton", "sdpa")


def _triton_available():
    import importlib.util

    return importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------------------------
# models that share weights


def _share_into(model, state, skip=()):
    """Load `state` into a meta-device `model` by assignment (no copy); every tensor must be given."""
    state = {k: v for k, v in state.items() if not any(k.startswith(prefix) for prefix in skip)}
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not any(k.startswith(prefix) for prefix in skip)]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def _teacher_state(teacher):
    """The teacher's tensors under the hybrid's names (self_attn -> mixer)."""
    return {k.replace(".self_attn.", ".mixer.", 1): v for k, v in teacher.state_dict().items()}


def _finish(model, device):
    model.model.rotary_emb.inv_freq = rope_inverse_frequencies(model.config).to(device)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


@torch.no_grad()
def attention_twin(teacher) -> HybridForCausalLM:
    """The teacher as an all-attention HybridForCausalLM sharing its tensors (no copy, no extra memory)."""
    from hybridize.convert.surgery import hybrid_config_from_teacher

    if isinstance(teacher, HybridForCausalLM):
        return teacher
    config = hybrid_config_from_teacher(teacher.config)
    with torch.device("meta"):
        twin = HybridForCausalLM(config)
    _share_into(twin, _teacher_state(teacher))
    return _finish(twin, teacher.device)


@torch.no_grad()
def hybrid_sharing(teacher, mixer_types, seed=0) -> HybridForCausalLM:
    """A hybrid with `mixer_types` that shares the teacher's embeddings, norms, MLPs and kept attention
    layers, with freshly initialised (random, not MIL) Mamba mixers in the teacher's dtype and device.

    For throughput measurement: no copy of the teacher, so the memory is what the hybrid needs once
    the caller drops the teacher. Use `convert.surgery.build_hybrid` for a hybrid to train.
    """
    from hybridize.convert.surgery import hybrid_config_from_teacher

    config = hybrid_config_from_teacher(teacher.config, mixer_types)
    with torch.device("meta"):
        hybrid = HybridForCausalLM(config)
    mixers = [f"model.layers.{i}.mixer." for i, kind in enumerate(config.mixer_types) if kind != "attention"]
    skipped = [f"model.layers.{i}." for i, kind in enumerate(config.mixer_types) if kind == "identity"]
    _share_into(hybrid, _teacher_state(teacher), skip=mixers + skipped)
    dtype, device = teacher.dtype, teacher.device
    torch.manual_seed(seed)
    for index, kind in enumerate(config.mixer_types):
        if kind == "mamba":
            with torch.device(device):
                mixer = HybridMambaMixer(config, index)
            mixer.reset_mamba_parameters()
            hybrid.model.layers[index].mixer = mixer.to(dtype)
    return _finish(hybrid, device)


# ----------------------------------------------------------------------------------------------
# the cache adapter the model's own forward writes into during prefill


class _StaticCache:
    """HybridCache's interface over the engine's buffers: prefill chunks write in place."""

    is_compileable = False

    def __init__(self, engine):
        self.engine = engine
        self.seen_tokens = 0
        self.fresh = True  # no state yet: the first prefill chunk starts the Mamba layers from none

    def get_seq_length(self, layer_idx=0):
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx=0):
        return self.engine.max_len

    def update_kv(self, key, value, layer_idx):
        start, length = self.seen_tokens, key.shape[2]
        k, v = self.engine.keys[layer_idx], self.engine.values[layer_idx]
        k[:, :, start : start + length].copy_(key)
        v[:, :, start : start + length].copy_(value)
        return k[:, :, : start + length], v[:, :, : start + length]

    def mamba_state(self, layer_idx):
        if self.fresh:
            return None, None
        return self.engine.conv_states[layer_idx], self.engine.ssm_states[layer_idx]

    def set_mamba_state(self, layer_idx, conv_state, ssm_state):
        self.engine.conv_states[layer_idx].copy_(conv_state)
        self.engine.ssm_states[layer_idx].copy_(ssm_state)

    def __len__(self):
        return len(self.engine.kinds)


# ----------------------------------------------------------------------------------------------
# the engine


def cache_bytes_per_sequence(config, max_len, dtype=torch.bfloat16):
    """Bytes of the engine's buffers for one sequence of `max_len` tokens."""
    size = torch.empty(0, dtype=dtype).element_size()
    kinds = config.mixer_types
    kv = 2 * config.num_key_value_heads * config.head_dim * size * max_len
    d_inner = config.num_attention_heads * config.head_dim
    state = d_inner * config.mamba["d_state"] * 4 + d_inner * (config.mamba["d_conv"] - 1) * size
    return kinds.count("attention") * kv + kinds.count("mamba") * state


class DecodeEngine:
    """Static batch of `batch` sequences of up to `max_len` tokens on one model.

        engine = DecodeEngine(model, batch=4, max_len=256)
        tokens = engine.generate(input_ids, max_new_tokens=64)   # greedy, [4, 64]

    `graphs` (default: on CUDA) captures the decode step as a CUDA graph; `compile` (default: on CUDA)
    wraps the layers' norms and MLPs in `torch.compile` (same modules, fused pointwise kernels,
    eager rounding emulated) for the decode step; `prefill_tokens` bounds the tokens of one prefill
    chunk over the whole batch.
    """

    def __init__(self, model, batch, max_len, attention=None, graphs=None, compile=None, prefill_tokens=8192,
                 splits=None):
        if not isinstance(model, HybridForCausalLM):
            model = attention_twin(model)
        config = model.config
        self.model = model.eval()
        self.config = config
        self.batch, self.max_len = int(batch), int(max_len)
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        cuda = self.device.type == "cuda"
        if attention is None:
            attention = "triton" if cuda and _triton_available() else "sdpa"
        if attention not in ATTENTION_BACKENDS:
            raise UserError(f"unknown attention backend {attention!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
        if attention == "triton" and not cuda:
            raise UserError("the triton attention backend needs a CUDA device; use attention='sdpa'")
        window = config.sliding_window
        if window is not None and window < self.max_len:
            raise UserError(f"the engine has no sliding-window attention: max_len {self.max_len} exceeds the "
                            f"model's window {window}")
        self.attention = attention
        self.use_graphs = cuda if graphs is None else bool(graphs)
        if self.use_graphs and not cuda:
            raise UserError("CUDA graphs need a CUDA device")
        self.use_compile = cuda if compile is None else bool(compile)
        self.prefill_chunk = max(1, int(prefill_tokens) // self.batch)
        self.kinds = list(config.mixer_types)
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim

        b, dev = self.batch, self.device
        self.keys, self.values, self.conv_states, self.ssm_states = {}, {}, {}, {}
        try:
            for i, kind in enumerate(self.kinds):
                if kind == "attention":
                    shape = (b, self.kv_heads, self.max_len, self.head_dim)
                    self.keys[i] = torch.zeros(shape, device=dev, dtype=self.dtype)
                    self.values[i] = torch.zeros(shape, device=dev, dtype=self.dtype)
                elif kind == "mamba":
                    mixer = model.model.layers[i].mixer
                    self.conv_states[i] = torch.zeros(b, mixer.d_inner, mixer.d_conv - 1, device=dev, dtype=self.dtype)
                    self.ssm_states[i] = torch.zeros(b, mixer.d_inner, mixer.d_state, device=dev, dtype=torch.float32)
        except torch.OutOfMemoryError:
            self.release()
            raise UserError(f"the caches of {b} sequences of {self.max_len} tokens do not fit in device memory; "
                            "use a smaller batch") from None
        self.lengths = torch.zeros(b, device=dev, dtype=torch.long)  # tokens in the cache before this step
        self.kv_lengths = torch.zeros(b, device=dev, dtype=torch.long)  # ... and with this step's token
        self.tokens = torch.zeros(b, device=dev, dtype=torch.long)  # the input token of the next step
        self.out = torch.zeros(b, self.max_len, device=dev, dtype=torch.long)  # generated tokens
        self.step_index = torch.zeros(1, device=dev, dtype=torch.long)
        self.cache = _StaticCache(self)
        self.decode_attention = None
        if attention == "triton":
            from hybridize.bench.decode_attention import DecodeAttention

            self.decode_attention = DecodeAttention(b, self.heads, self.kv_heads, self.head_dim, self.max_len,
                                                    dev, self.dtype, splits=splits)
        self._modules_for_step()
        self.graph = None
        self.compile_error = None
        self.last_timing = None

    # -- setup ---------------------------------------------------------------------------------

    def _modules_for_step(self):
        """Per layer (norm1, mixer, norm2, mlp) as called by the decode step, compiled or not."""
        layers = self.model.model.layers
        wrap = lambda module: module  # noqa: E731
        if self.use_compile:
            wrap = _compiler()
        self.layers = []
        for i, layer in enumerate(layers):
            if self.kinds[i] == "identity":
                continue
            self.layers.append((i, self.kinds[i], wrap(layer.input_layernorm), layer.mixer,
                                wrap(layer.post_attention_layernorm), wrap(layer.mlp)))
        self.final_norm = wrap(self.model.model.norm)

    def release(self):
        """Drop the buffers and the graph (memory back to the allocator's cache)."""
        self.graph = None
        self.keys, self.values, self.conv_states, self.ssm_states = {}, {}, {}, {}
        self.decode_attention = None
        self.layers = []
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reset(self):
        """Empty every sequence: lengths 0, Mamba windows and states zero."""
        self.lengths.zero_()
        self.step_index.zero_()
        for buffer in (*self.conv_states.values(), *self.ssm_states.values()):
            buffer.zero_()
        self.cache.seen_tokens = 0
        self.cache.fresh = True

    # -- the decode step -----------------------------------------------------------------------

    def _attention_step(self, index, attention, hidden, cos, sin):
        b = hidden.shape[0]
        q = attention.q_proj(hidden).view(b, self.heads, self.head_dim)
        k = attention.k_proj(hidden).view(b, self.kv_heads, self.head_dim)
        v = attention.v_proj(hidden).view(b, self.kv_heads, self.head_dim)
        if attention.q_norm is not None:
            q, k = attention.q_norm(q), attention.k_norm(k)
        keys, values = self.keys[index], self.values[index]
        if self.attention == "triton":
            from hybridize.bench.decode_attention import rope_append

            q = rope_append(q, k, v, cos[:, 0], sin[:, 0], self.lengths, keys, values)
            out = self.decode_attention(q, keys, values, self.kv_lengths)
        else:
            q = apply_rotary(q[:, :, None], cos, sin)  # [b, heads, 1, d]
            k = apply_rotary(k[:, :, None], cos, sin)
            rows = (torch.arange(b, device=hidden.device)[:, None] * self.kv_heads
                    + torch.arange(self.kv_heads, device=hidden.device)[None, :]) * self.max_len
            rows = (rows + self.lengths[:, None]).reshape(-1)
            keys.view(-1, self.head_dim).index_copy_(0, rows, k.reshape(-1, self.head_dim))
            values.view(-1, self.head_dim).index_copy_(0, rows, v.reshape(-1, self.head_dim))
            mask = torch.arange(self.max_len, device=hidden.device)[None, :] < self.kv_lengths[:, None]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None],
                                                 enable_gqa=self.heads != self.kv_heads)
        return attention.o_proj(out.reshape(b, 1, self.heads * self.head_dim))

    def _step(self):
        """One greedy token for every sequence; reads and writes only device buffers."""
        backbone = self.model.model
        hidden = backbone.embed_tokens(self.tokens[:, None])
        cos, sin = backbone.rotary_emb(hidden, self.lengths[:, None])
        torch.add(self.lengths, 1, out=self.kv_lengths)
        for index, kind, norm1, mixer, norm2, mlp in self.layers:
            mixed = norm1(hidden)
            if kind == "attention":
                mixed = self._attention_step(index, mixer, mixed, cos, sin)
            else:
                mixed = mixer(mixed, cache=self.cache)
            hidden = hidden + mixed
            hidden = hidden + mlp(norm2(hidden))
        hidden = self.final_norm(hidden)
        logits = self.model.lm_head(hidden[:, -1]).float()
        token = logits.argmax(-1)
        self.tokens.copy_(token)
        self.lengths.add_(1)
        self.out.index_copy_(1, self.step_index, token[:, None])
        self.step_index.add_(1).remainder_(self.max_len)

    @torch.inference_mode()
    def capture(self, warmup=3):
        """Compile (if asked), warm up and capture the decode step; leaves the engine reset.

        A compiler failure falls back to the eager modules (recorded in `compile_error`), so it costs
        speed, not the measurement."""
        if not self.use_graphs and not self.use_compile:
            return
        self.cache.fresh = False
        try:
            self._warmup_and_capture(warmup)
        except Exception as error:
            if not self.use_compile:
                raise
            self.compile_error = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            self.use_compile = False
            self.graph = None
            self._modules_for_step()
            self._warmup_and_capture(warmup)
        self.reset()

    def _warmup_and_capture(self, warmup):
        self._warmup(warmup)
        if self.use_graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self.graph = graph

    def _warmup(self, steps):
        if self.device.type != "cuda":
            for _ in range(steps):
                self._step()
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(steps):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def step(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self._step()

    # -- prefill and generation ----------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids):
        """Run the prompts [B, I] through the model in chunks; returns the last position's logits [B, V]."""
        if input_ids.shape[0] != self.batch:
            raise UserError(f"the engine holds {self.batch} sequences, got {input_ids.shape[0]} prompts")
        length = input_ids.shape[1]
        if length < 1 or length > self.max_len:
            raise UserError(f"prompt length {length} must be between 1 and the engine's max_len {self.max_len}")
        self.reset()
        input_ids = input_ids.to(self.device)
        logits = None
        for start in range(0, length, self.prefill_chunk):
            chunk = input_ids[:, start : start + self.prefill_chunk]
            positions = torch.arange(start, start + chunk.shape[1], device=self.device).expand(self.batch, -1)
            out = self.model.model(input_ids=chunk, position_ids=positions, past_key_values=self.cache, use_cache=True)
            self.cache.fresh = False
            logits = self.model.lm_head(out.last_hidden_state[:, -1])
        self.lengths.fill_(length)
        return logits

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens):
        """Greedy continuation [B, max_new_tokens] of prompts of equal length (no end-of-sequence stop)."""
        if input_ids.shape[1] + max_new_tokens > self.max_len:
            raise UserError(f"{input_ids.shape[1]} prompt + {max_new_tokens} new tokens exceed max_len {self.max_len}")
        if self.graph is None and (self.use_graphs or self.use_compile):
            self.capture()
        began = self._clock()
        first = self.prefill(input_ids).float().argmax(-1)
        self.tokens.copy_(first)
        self.out[:, 0] = first
        self.step_index.fill_(1)
        prefilled = self._clock()
        for _ in range(max_new_tokens - 1):
            self.step()
        done = self._clock()
        self.last_timing = {"prefill_ms": (prefilled - began) * 1e3, "decode_ms": (done - prefilled) * 1e3}
        return self.out[:, :max_new_tokens].clone()

    def _clock(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # -- steady-state measurement --------------------------------------------------------------

    @torch.inference_mode()
    def fill_synthetic(self, context, seed=0):
        """Put every sequence at `context` tokens with random caches and states (no prefill).

        Decode cost does not depend on cache values; random (not zero) data keeps the hardware honest.
        """
        if not 0 < context < self.max_len:
            raise UserError(f"context {context} must be between 1 and max_len - 1 = {self.max_len - 1}")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.reset()
        for store in (self.keys, self.values):
            for buffer in store.values():
                buffer.normal_(generator=generator)  # whole buffer: contiguous, no temporary
        for buffer in self.conv_states.values():
            buffer.normal_(generator=generator)
        for buffer in self.ssm_states.values():
            buffer.normal_(generator=generator).mul_(0.1)
        self.tokens.random_(0, self.config.vocab_size, generator=generator)
        self.lengths.fill_(context)
        self.cache.seen_tokens = context
        self.cache.fresh = False

    def time_steps(self, steps, repeats=3):
        """Median milliseconds per decode step over `repeats` runs of `steps` steps (context grows by
        steps * repeats; keep that small against the context)."""
        if self.graph is None and (self.use_graphs or self.use_compile):
            raise RuntimeError("call capture() before fill_synthetic() and time_steps()")
        times = []
        cuda = self.device.type == "cuda"
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    self.step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / steps)
            else:
                began = time.perf_counter()
                for _ in range(steps):
                    self.step()
                times.append((time.perf_counter() - began) * 1e3 / steps)
        return sorted(times)[len(times) // 2]


def _compiler():
    """torch.compile for the decode step's norms and MLPs: one compiled graph per module class and
    shape, shared by every layer; eager bf16 rounding emulated so tokens match the eager model."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    options = {"emulate_precision_casts": True} if hasattr(inductor_config, "emulate_precision_casts") else {}
    return lambda module: torch.compile(module, options=options)


def greedy_agreement(engine_tokens, reference_tokens, reference_logits=None):
    """Compare two greedy continuations [B, T]. Returns a dict: equal, first divergence (sequence,
    step), and with the reference's per-step logits the gap between the two tokens' logits there and
    the median top-1/top-2 gap over all steps (a near-tie is a gap far below the median)."""
    engine_tokens, reference_tokens = engine_tokens.cpu(), reference_tokens.cpu()
    same = engine_tokens == reference_tokens
    report = {"equal": bool(same.all()), "tokens": int(same.numel()), "distinct_tokens": int(reference_tokens.unique().numel())}
    if report["equal"]:
        return report
    steps = (~same).float().argmax(dim=1)
    diverged = (~same).any(dim=1)
    first_step = int(steps[diverged].min())
    sequence = int(torch.nonzero(diverged & (steps == first_step))[0, 0])
    report.update(first_divergence_step=first_step, sequence=sequence)
    if reference_logits is not None:
        logits = reference_logits[first_step][sequence].float().cpu()
        gap = (logits[reference_tokens[sequence, first_step]] - logits[engine_tokens[sequence, first_step]]).item()
        tops = torch.stack([step.float().cpu().topk(2, dim=-1).values for step in reference_logits])
        report.update(logit_gap=gap, median_top2_gap=float((tops[..., 0] - tops[..., 1]).median()),
                      top_logit=float(logits.max()))
        report["near_tie"] = abs(gap) <= max(0.05 * report["median_top2_gap"], 2 * 2.0**-7 * abs(report["top_logit"]))
    return report


@torch.no_grad()
def greedy_gate(model, batch=2, prompt_len=16, new_tokens=64, seed=0, **engine_options):
    """The engine's greedy tokens against the model's own `generate()` on the same random prompts.

    Returns `greedy_agreement`'s report plus the engine's settings. Prompts have equal length (the
    engine's static batch); end-of-sequence is ignored on both sides."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=generator).to(device)
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    engine = DecodeEngine(model, batch, prompt_len + new_tokens, **engine_options)
    try:
        tokens = engine.generate(ids, new_tokens)
        report = greedy_agreement(tokens, reference.sequences[:, prompt_len:], reference.logits)
        report.update(attention=engine.attention, graphs=engine.graph is not None, compiled=engine.use_compile,
                      compile_error=engine.compile_error)
    finally:
        engine.release()
    return report


def mean_context(input_len, output_len):
    """Mean context of the decode steps of an (input_len, output_len) generation."""
    return input_len + math.ceil(output_len / 2)
