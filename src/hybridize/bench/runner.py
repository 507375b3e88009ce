"""`hybridize bench`: decode throughput of a teacher and its hybrids in one run, against the roofline.

Every model is measured in the same engine (`bench.engine.DecodeEngine`: preallocated caches, CUDA
graphs, greedy sampling in the graph), optionally beside the stock transformers `generate` path of the
same model, and against the memory-bandwidth roofline (`bench.roofline`) computed with the copy
bandwidth measured at the start of the run.

Modes (notes/performance.md):
- "full": N sequences of I random input tokens each generate exactly O tokens; output tok/s = N*O /
  wall time (prefill included; prefill time reported apart).
- "steady": one decode step of the same scenario at its mean context I + O/2, with the batch that fits
  I+O-token sequences; the caches are filled with random values instead of a prefill. Equals the mean
  step of a full generation (attention cost is linear in context) without the prefill share.

Models are built (or loaded) one at a time and freed before the next, so each one's batch and peak
memory are its own. "auto" batch = the most sequences whose full caches fit in the free device memory
measured after loading the weights, less a reserve for activations.
"""

import datetime
import gc
import json
import time
from pathlib import Path

import torch

from hybridize.bench.engine import DecodeEngine, attention_twin, cache_bytes_per_sequence, hybrid_sharing, mean_context
from hybridize.bench.roofline import decode_cost
from hybridize.bench.shapes import (
    SHAPES,
    ModelShape,
    build_hybrid_shape,
    build_teacher,
    get_shape,
    mixer_types_for,
    read_layout,
)
from hybridize.errors import UserError
from hybridize.evaluate.generate import cache_keyword

MODES = ("full", "steady")
GiB = 2**30


# ----------------------------------------------------------------------------------------------
# device facts


def device_memory(device):
    """(free, total) bytes: measured on CUDA; available system memory on CPU."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)
    try:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total
    except ImportError:  # pragma: no cover
        import os

        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def copy_bandwidth(device, size=2**30, repeats=10):
    """Bytes read + written per second by a device-to-device copy of `size` bytes (median)."""
    if device.type != "cuda":
        size = min(size, 2**26)
    src = torch.empty(size // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - began
        if i >= 2:
            times.append(elapsed)
    del src, dst
    return 2 * size / sorted(times)[len(times) // 2]


def auto_batch(free_bytes, per_sequence_bytes, reserve_bytes, cap=1024):
    """Most sequences whose caches (per_sequence_bytes each) fit in free_bytes - reserve_bytes."""
    return int(max(0, min(cap, (free_bytes - reserve_bytes) // per_sequence_bytes)))


def parameters_read(model):
    """Parameters a decode step reads: all, less the input embedding when it is not tied to lm_head
    (a step reads only B of its rows)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:
        total -= embed.numel()
    return total


def _reserve_bytes(config, mode, prefill_tokens):
    """Device memory kept free beside weights and caches: workspaces, the decode step's activations,
    and in full mode one prefill chunk's activations."""
    reserve = 512 * 2**20
    if mode == "full":
        d, i = config.hidden_size, config.intermediate_size
        d_inner = config.num_attention_heads * config.head_dim
        per_token = 2 * (8 * d + 3 * i + 6 * d_inner) + 4 * 4 * d_inner
        reserve += prefill_tokens * per_token
    return reserve


def _per_sequence_extra(config):
    """Decode-step activations per sequence: logits (bf16 + fp32) and a few hidden-size vectors."""
    return 6 * config.vocab_size + 2 * (16 * config.hidden_size + 4 * config.intermediate_size)


# ----------------------------------------------------------------------------------------------
# what to measure


class _Candidate:
    """One row to measure: a name and a builder returning (engine model, stock model)."""

    def __init__(self, name, build, mixer_types=None):
        self.name, self.build, self.mixer_types = name, build, mixer_types


def _load(spec, device, dtype):
    from hybridize.convert.teacher import load_teacher

    model, _ = load_teacher(spec, dtype=dtype, device=device)
    return model


def _is_hybrid(model):
    from hybridize.modeling.modeling_hybrid import HybridForCausalLM

    return isinstance(model, HybridForCausalLM) and any(k != "attention" for k in model.config.mixer_types)


def _layouts(num_layers, mixer_layers, layout):
    """[(name, mixer_types)] for the hybrid rows asked for."""
    if mixer_layers is not None and layout is not None:
        raise UserError("give either mixer_layers or layout, not both")
    rows = []
    if layout is not None:
        kinds = read_layout(layout, num_layers) if isinstance(layout, (str, Path)) else list(layout)
        if len(kinds) != num_layers:
            raise UserError(f"the layout has {len(kinds)} entries; the model has {num_layers} layers")
        rows.append((f"hybrid {kinds.count('mamba')}/{num_layers}", kinds))
    if mixer_layers is not None:
        counts = [mixer_layers] if isinstance(mixer_layers, int) else list(mixer_layers)
        for count in counts:
            if not 0 < count <= num_layers:
                raise UserError(f"mixer layer count {count} must be between 1 and the layer count {num_layers}")
            rows.append((f"hybrid {count}/{num_layers}", mixer_types_for(num_layers, count)))
    return rows


def _candidates(model_or_shape, teacher, mixer_layers, layout, device, dtype):
    if isinstance(model_or_shape, str) and model_or_shape in SHAPES and not Path(model_or_shape).exists():
        from hybridize.convert.teacher import BUILTIN_TEACHERS

        if model_or_shape not in BUILTIN_TEACHERS:
            model_or_shape = get_shape(model_or_shape)
    if isinstance(model_or_shape, ModelShape):
        shape = model_or_shape
        if teacher is not None:
            raise UserError("a --shape is its own teacher; leave out --teacher")

        def teacher_build():
            model = build_teacher(shape, device, dtype)
            return attention_twin(model), model

        rows = [_Candidate("teacher", teacher_build, ["attention"] * shape.num_hidden_layers)]
        for name, kinds in _layouts(shape.num_hidden_layers, mixer_layers, layout):
            rows.append(_Candidate(name, lambda kinds=kinds: (lambda m: (m, m))(
                build_hybrid_shape(shape, kinds, device, dtype)), kinds))
        return shape.name, rows

    def loader(source):
        if isinstance(source, torch.nn.Module):
            return lambda: source.to(device=device, dtype=dtype).eval()
        return lambda: _load(source, device, dtype)

    load_model = loader(model_or_shape)
    label = model_or_shape if isinstance(model_or_shape, str) else type(model_or_shape).__name__
    first = load_model()
    num_layers = first.config.num_hidden_layers
    hybrid = _is_hybrid(first)
    first_kinds = list(first.config.mixer_types) if hybrid else ["attention"] * num_layers
    del first
    rows = []
    if hybrid:
        if mixer_layers is not None or layout is not None:
            raise UserError(f"{label} is already a hybrid; mixer_layers/layout apply to a teacher model")
        if teacher is not None:
            load_teacher_model = loader(teacher)
            rows.append(_Candidate("teacher", lambda: (lambda m: (attention_twin(m), m))(load_teacher_model()),
                                   None))
        name = f"hybrid {first_kinds.count('mamba')}/{num_layers}"
        rows.append(_Candidate(name, lambda: (lambda m: (m, m))(load_model()), first_kinds))
        return str(label), rows
    if teacher is not None:
        raise UserError(f"{label} is not a hybrid; give --teacher only with a hybrid model")
    rows.append(_Candidate("teacher", lambda: (lambda m: (attention_twin(m), m))(load_model()), first_kinds))
    for name, kinds in _layouts(num_layers, mixer_layers, layout):
        rows.append(_Candidate(f"{name} (random mixers)",
                               lambda kinds=kinds: (lambda m: (m, m))(hybrid_sharing(load_model(), kinds)), kinds))
    return str(label), rows


# ----------------------------------------------------------------------------------------------
# measurements


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _measure_engine(model, batch, input_len, output_len, mode, steps, engine_options, seed):
    device = next(model.parameters()).device
    total = input_len + output_len
    engine = DecodeEngine(model, batch, total, **engine_options)
    try:
        engine.capture()
        row = {"path": "engine", "attention": engine.attention, "graphs": engine.graph is not None,
               "compiled": engine.use_compile, "compile_error": engine.compile_error,
               "splits": engine.decode_attention.splits if engine.decode_attention is not None else None}
        if mode == "steady":
            context = mean_context(input_len, output_len)
            warm = 2
            room = total - 1 - context - warm
            if room < 3:
                raise UserError(f"steady mode times at least 3 decode steps after context {context}; "
                                f"--output-len {output_len} leaves room for {max(room, 0)}, use at least "
                                f"{output_len + 2 * (3 - room)}")
            steps = min(steps, room // 3)
            engine.fill_synthetic(context, seed=seed)
            for _ in range(warm):
                engine.step()
            ms = engine.time_steps(steps, repeats=3)
            row.update(context=context, steps=steps * 3, ms_per_step=ms, tok_s=batch * 1e3 / ms)
        else:
            generator = torch.Generator().manual_seed(seed)
            ids = torch.randint(3, model.config.vocab_size, (batch, input_len), generator=generator)
            _sync(device)
            began = time.perf_counter()
            engine.generate(ids, output_len)
            _sync(device)
            wall = time.perf_counter() - began
            row.update(context=mean_context(input_len, output_len), wall_s=wall, tok_s=batch * output_len / wall,
                       prefill_ms=engine.last_timing["prefill_ms"],
                       ms_per_step=engine.last_timing["decode_ms"] / max(1, output_len - 1))
        return row
    finally:
        engine.release()
        del engine


class _StepTimer:
    """A logits processor that stamps the time of every generation step (after a device sync)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def _stock_cache(model, batch, context, generator):
    """A stock cache (HybridCache / DynamicCache) already holding `context` random tokens."""
    from hybridize.modeling.modeling_hybrid import HybridCache, HybridForCausalLM

    config = model.config
    device, dtype = next(model.parameters()).device, model.dtype
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (batch, config.num_key_value_heads, context, head_dim)

    def rand(*size, dtype=dtype):
        return torch.randn(*size, device=device, dtype=dtype, generator=generator)

    if isinstance(model, HybridForCausalLM):
        cache = HybridCache(config)
        for i, kind in enumerate(config.mixer_types):
            if kind == "attention":
                cache.keys[i], cache.values[i] = rand(*shape), rand(*shape)
            elif kind == "mamba":
                mixer = model.model.layers[i].mixer
                cache.conv_states[i] = rand(batch, mixer.d_inner, mixer.d_conv - 1)
                cache.ssm_states[i] = rand(batch, mixer.d_inner, mixer.d_state, dtype=torch.float32) * 0.1
        cache.seen_tokens = context
        return cache
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # older signature
        cache = DynamicCache()
    for i in range(config.num_hidden_layers):
        cache.update(rand(*shape), rand(*shape), i)
    return cache


def _measure_stock(model, batch, input_len, output_len, mode, stock_steps, seed):
    """The stock transformers `generate` path (eager, its own cache, SDPA), greedy."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    device_generator = torch.Generator(device=device).manual_seed(seed)
    timer = _StepTimer(device)
    fed = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    options = dict(do_sample=False, eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([timer]))
    try:
        with torch.inference_mode():
            if mode == "steady":
                context = mean_context(input_len, output_len)
                cache = _stock_cache(model, batch, context, device_generator)
                ids = torch.randint(3, model.config.vocab_size, (batch, context + 1), generator=generator).to(device)
                model.generate(ids, attention_mask=torch.ones_like(ids), **{cache_keyword(): cache},
                               max_new_tokens=stock_steps + 1, **options)
                del cache
                if any(n != 1 for n in fed):  # generate re-ran the context instead of one token a step
                    raise RuntimeError(f"generate fed {fed} tokens per step to a filled cache, not 1")
                intervals = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
                ms = sorted(intervals)[len(intervals) // 2] * 1e3
                return {"path": "stock", "context": context, "steps": len(intervals), "ms_per_step": ms,
                        "tok_s": batch * 1e3 / ms}
            ids = torch.randint(3, model.config.vocab_size, (batch, input_len), generator=generator).to(device)
            _sync(device)
            began = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, **options)
            _sync(device)
            wall = time.perf_counter() - began
            intervals = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
            ms = sorted(intervals)[len(intervals) // 2] * 1e3 if intervals else None
            return {"path": "stock", "context": mean_context(input_len, output_len), "wall_s": wall,
                    "tok_s": batch * output_len / wall, "ms_per_step": ms}
    finally:
        hook.remove()


def _free(device, keep=0):
    """Return freed memory to the device; if more than `keep` bytes (+1 GiB) stay allocated, compiled
    code may hold a dropped model: clear the compile caches too."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if torch.cuda.memory_allocated(device) > keep + GiB:
            from torch import _dynamo

            _dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# the API


def bench(model_or_shape, teacher=None, mixer_layers=None, layout=None, input_len=1, output_len=16384,
          batch="auto", mode="steady", include_stock=True, *, steps=32, stock_steps=4, device=None, dtype=None,
          attention=None, graphs=None, compile=None, prefill_tokens=8192, memory=None, max_batch=1024,
          json_path=None, echo=True, seed=0) -> dict:
    """Measure decode throughput of a teacher and hybrids; returns (and optionally writes) a dict.

    model_or_shape: a ModelShape (`shapes.get_shape(name)`; random weights built on the device), a
      model directory / .gguf / built-in name, or a loaded model. A shape or a teacher model gives a
      teacher row plus one hybrid row per entry of `mixer_layers` (counts, evenly spaced) or for
      `layout` (a layers.json path or a list of mixer types); the hybrids of a real teacher share its
      weights with random Mamba mixers (throughput only). A hybrid model gives its own row, after the
      row of `teacher` when given.
    batch: an int, or "auto": the most sequences whose I+O-token caches fit beside the weights in
      the measured free memory (or in `memory` bytes when given), at most `max_batch`.
    mode: "full" or "steady" (see the module docstring). include_stock adds the stock transformers
      `generate` row of each model at the same batch (steady: `stock_steps` steps from a filled cache).
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if input_len < 1 or output_len < 2:
        raise UserError("input_len must be at least 1 and output_len at least 2")
    if not (batch == "auto" or (isinstance(batch, int) and batch > 0)):
        raise UserError(f"batch must be a positive integer or 'auto', not {batch!r}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    engine_options = dict(attention=attention, graphs=graphs, compile=compile, prefill_tokens=prefill_tokens)
    label, candidates = _candidates(model_or_shape, teacher, mixer_layers, layout, device, dtype)

    total_memory = device_memory(device)[1]
    bandwidth = copy_bandwidth(device)
    total_len = input_len + output_len
    result = {
        "date": datetime.date.today().isoformat(),
        "model": label,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_memory_bytes": total_memory,
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "mode": mode,
        "input_len": input_len,
        "output_len": output_len,
        "context": mean_context(input_len, output_len),
        "note": _mode_note(mode, input_len, output_len),
        "rows": [],
    }
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass

    for candidate in candidates:
        _free(device)
        _reset_peak(device)
        model, stock_model = candidate.build()
        config = model.config
        cost = decode_cost(config, parameters_read(model))
        weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        free = memory if memory is not None else device_memory(device)[0]
        per_sequence = cache_bytes_per_sequence(config, total_len, dtype) + _per_sequence_extra(config)
        reserve = _reserve_bytes(config, mode, prefill_tokens)
        rows_batch = batch if batch != "auto" else auto_batch(free, per_sequence, reserve, max_batch)
        if rows_batch < 1:
            del model, stock_model
            raise UserError(
                f"not even one sequence of {total_len} tokens fits for {candidate.name}: its caches need "
                f"{per_sequence / GiB:.2f} GiB and {max(0, free - reserve) / GiB:.2f} GiB are free beside the weights")
        common = {"model": candidate.name, "mixer_layers": config.mixer_types.count("mamba"),
                  "attention_layers": config.mixer_types.count("attention"), "batch": rows_batch,
                  "weights_GiB": weights_bytes / GiB, "cache_GiB_per_sequence": per_sequence / GiB,
                  "free_GiB_beside_weights": free / GiB}
        roofline = cost.tokens_per_second(rows_batch, result["context"], bandwidth)
        rows = []
        if include_stock:  # first, while only the weights are allocated
            _reset_peak(device)
            try:
                stock = _measure_stock(stock_model, rows_batch, input_len, output_len, mode, stock_steps, seed)
                stock.update(common, peak_memory_GiB=_gib(_peak(device)), roofline_tok_s=roofline)
            except torch.OutOfMemoryError as error:
                stock = dict(common, path="stock", error="out of memory", detail=str(error).splitlines()[0][:300])
            rows.append(stock)
            _free(device, keep=weights_bytes)
        _reset_peak(device)
        try:
            row = _measure_engine(model, rows_batch, input_len, output_len, mode, steps, engine_options, seed)
            row.update(common, peak_memory_GiB=_gib(_peak(device)), roofline_tok_s=roofline)
        except torch.OutOfMemoryError as error:
            row = dict(common, path="engine", error="out of memory", detail=str(error).splitlines()[0][:300])
        rows.insert(0, row)
        for row in rows:
            result["rows"].append(row)
            _echo(echo, row)
        del model, stock_model
        _free(device)

    _ratios(result["rows"])
    if json_path is not None:
        from hybridize.convert.checkpoint import write_json_atomic

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, result)
    if echo:
        print(format_table(result))
    return result


def _gib(value):
    return None if value is None else value / GiB


def _mode_note(mode, input_len, output_len):
    if mode == "steady":
        return (f"steady-state decode at context {mean_context(input_len, output_len)} = I + O/2 with the batch that "
                f"fits {input_len + output_len}-token sequences; caches filled with random values, prefill not "
                "included: the mean decode step of the full generation (notes/performance.md)")
    return f"full generation of {output_len} tokens after {input_len} input tokens; tok/s = N*O / wall time"


def _ratios(rows):
    """Per path, each row's throughput and roofline against the teacher row of that path."""
    for row in rows:
        if "tok_s" in row:
            row["roofline_fraction"] = row["tok_s"] / row["roofline_tok_s"]
    teachers = {row["path"]: row for row in rows if row["model"] == "teacher" and "tok_s" in row}
    for row in rows:
        base = teachers.get(row["path"])
        if base is None or "tok_s" not in row:
            continue
        row["ratio_vs_teacher"] = row["tok_s"] / base["tok_s"]
        row["roofline_ratio"] = row["roofline_tok_s"] / base["roofline_tok_s"]
        row["ratio_of_roofline_ratio"] = row["ratio_vs_teacher"] / row["roofline_ratio"]


def _echo(echo, row):
    if echo:
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print(json.dumps(shown), flush=True)


def format_table(result) -> str:
    """A Markdown table of the rows (and the scenario line above it)."""
    head = (f"{result['model']} on {result['device']} ({result['dtype']}), copy bandwidth "
            f"{result['copy_bandwidth_GBps']:.0f} GB/s; {result['note']}")
    columns = ["model", "path", "mixers", "batch", "ms/step", "tok/s", "roofline tok/s", "% roofline",
               "vs teacher", "roofline ratio", "% of roofline ratio", "peak GiB"]
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def fmt(value, pattern):
        return "–" if value is None else pattern.format(value)

    for row in result["rows"]:
        if "error" in row:
            cells = [row["model"], row["path"], str(row["mixer_layers"]), str(row["batch"]), row["error"]] + [""] * 7
        else:
            cells = [row["model"], row["path"], str(row["mixer_layers"]), str(row["batch"]),
                     fmt(row.get("ms_per_step"), "{:.2f}"), fmt(row.get("tok_s"), "{:.0f}"),
                     fmt(row.get("roofline_tok_s"), "{:.0f}"), fmt(row.get("roofline_fraction"), "{:.1%}"),
                     fmt(row.get("ratio_vs_teacher"), "{:.2f}x"), fmt(row.get("roofline_ratio"), "{:.2f}x"),
                     fmt(row.get("ratio_of_roofline_ratio"), "{:.1%}"), fmt(row.get("peak_memory_GiB"), "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
