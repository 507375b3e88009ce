"""Distillation-step throughput on one GPU: hybridize's Trainer against a naive eager step.

    PYTHONPATH=src python benchmarks/distill_step.py [--shapes smollm2-135m llama3.2-1b] [--out DIR]
    PYTHONPATH=src python benchmarks/distill_step.py --tiny        # CPU smoke test of every path

Shapes (random weights; the teacher is a transformers LlamaForCausalLM built on the device in bf16,
the student comes from `build_hybrid` with evenly spaced layers converted to Mamba, MIL-initialised):
- smollm2-135m: 30 layers, hidden 576, 9 heads / 3 kv, head_dim 64, MLP 1536, vocab 49152, tied;
  15 of 30 layers converted; micro-batch 16 x 2048 tokens.
- llama3.2-1b: 16 layers, hidden 2048, 32 heads / 8 kv, head_dim 64, MLP 8192, vocab 128256, tied,
  rope llama3; 8 of 16 converted; micro-batch 8 x 4096 tokens, activation checkpointing on.

Paths (every one: student fp32 master weights under bf16 autocast, teacher bf16 and frozen,
reverse KL at T=1, one optimizer step per global batch, grad clipping at 1.0):
- trainer: `hybridize.distill.trainer.Trainer` as shipped: teacher hidden states + chunked reverse KL
  (`distillation_loss`, the lm_head projections inside 512-token chunks), Triton scan/conv kernels,
  fused AdamW, activation checkpointing where the shape says so.
- trainer+bf16head: the same, with the student's final-norm output cast to the autocast dtype (bf16)
  before the loss (a forward hook, `cast_head_input` below). Since the trainer does this cast itself
  (2026-11-27) the hook is a no-op, kept so the earlier commands still run.
- trainer+bf16head+chunk2048: the same with LossSpec.chunk_size = 2048 (fewer [V, D] grad_weight
  accumulations per step).
- trainer+bf16head+chunk2048+compile (not run by default): the same with TrainConfig.compile, i.e.
  torch.compile on the pure-torch parts of every decoder layer (`hybridize.distill.compile`: RMSNorms,
  MLPs, the student's attention; the Mamba mixer stays eager), teacher and student.
- trainer+chunk2048+compile+ckptN (not run by default): the same, recomputing only the first N of
  the student's layers in backward (TrainConfig.activation_checkpointing = N) where the shape
  checkpoints: spare memory traded for recomputation time.
- baseline (naive eager): stock transformers teacher forward returning full logits [B, S, V]; the
  hybrid student's own forward (HybridForCausalLM, full bf16 logits) with HYBRIDIZE_KERNELS=reference
  (torch reference scan/conv); loss = (exp(lq) * (lq - lp)).sum(-1) token mean with
  lq, lp = torch.log_softmax(logits.float(), -1) on the full [B, S, V]; autograd backward; no
  activation checkpointing; torch.nn.utils.clip_grad_norm_; torch.optim.AdamW(fused=False), i.e. the
  default foreach implementation. When the global batch does not fit, the largest micro-batch that
  does (halving from the global batch) is used with gradient accumulation to the same global batch.

Timing: warm-up steps first (Triton JIT, cuBLAS heuristics), then `--steps` timed steps: wall clock
between two torch.cuda.synchronize() calls, plus CUDA events at each step boundary (median reported).
tokens/s = global batch * seq / step time. Peak memory = torch.cuda.max_memory_allocated over the
variant (teacher and student weights included).

FLOPs per token: 2 * P_teacher + 6 * P_student, P = unique parameters (the tied embedding/lm_head
matrix counted once: that is the lm_head matmul; the embedding lookup costs nothing). Activation
checkpointing's recomputation is not counted (MFU, not HFU). "MFU+attn" adds causal attention
FLOPs: 2 * S * n_heads * head_dim per token per attention layer forward (QK^T and PV over S/2 keys on
average), x1 for the teacher's layers and x3 (forward + backward) for the student's attention layers.
MFU = FLOPs/token * tokens/s / 989e12 (H100 SXM dense bf16 peak).

With --profile-shape, one extra step of each trainer variant at that shape runs under torch.profiler;
GPU kernel time is broken down by phase (teacher forward, student forward, loss, backward incl.
recomputation, optimizer, other) and kind (matmul, attention, Mamba scan, Mamba conv, other).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import gc  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import hybridize.distill.trainer as trainer_module  # noqa: E402
from hybridize.config import TrainConfig  # noqa: E402
from hybridize.convert.surgery import build_hybrid, select_layers  # noqa: E402
from hybridize.distill.losses import IGNORE_INDEX, LossSpec  # noqa: E402
from hybridize.distill.trainer import Trainer, trained_positions  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM dense bf16

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES = {
    "smollm2-135m": dict(
        teacher=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                     max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
        convert=15, seq=2048, batch=16, checkpointing=False),
    "llama3.2-1b": dict(
        teacher=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     max_position_embeddings=131072, rope_parameters=LLAMA3_ROPE),
        convert=8, seq=4096, batch=8, checkpointing=True),
    "tiny": dict(  # CPU smoke test
        teacher=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                     max_position_embeddings=256,
                     rope_parameters=dict(LLAMA3_ROPE, original_max_position_embeddings=64)),
        convert=2, seq=64, batch=4, checkpointing=True),
}

# name: (bf16 head input, loss chunk size, TrainConfig.compile, layers recomputed in backward where
# the shape checkpoints: None = all). The bf16 head hook is a no-op since the trainer casts itself.
TRAINER_VARIANTS = {
    "trainer": (False, 512, False, None),
    "trainer+bf16head": (True, 512, False, None),
    "trainer+bf16head+chunk2048": (True, 2048, False, None),
    "trainer+bf16head+chunk2048+compile": (True, 2048, True, None),
    "trainer+chunk2048+compile+ckpt8": (False, 2048, True, 8),
    "trainer+chunk2048+compile+ckpt4": (False, 2048, True, 4),
    "trainer+chunk2048+compile+ckpt0": (False, 2048, True, 0),
}
DEFAULT_VARIANTS = ["trainer", "trainer+bf16head", "trainer+bf16head+chunk2048", "baseline"]


# ---------------------------------------------------------------------------------------------
# the proposed change, as an opt-in hook


def _head_input_in_autocast_dtype(module, args, output):
    kind = output.device.type
    if torch.is_autocast_enabled(kind) and output.dtype == torch.float32:
        return output.to(torch.get_autocast_dtype(kind))
    return None


def cast_head_input(student):
    """Cast the student's final hidden state to the autocast dtype, so the chunked loss's student-side
    matmuls run in bf16 instead of fp32. Returns the hook handle (`.remove()` undoes it)."""
    return student.model.norm.register_forward_hook(_head_input_in_autocast_dtype)


# ---------------------------------------------------------------------------------------------
# models, data, FLOPs


def build_teacher(shape, device):
    config = LlamaConfig(**shape["teacher"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        teacher = LlamaForCausalLM(config)
    return teacher.to(torch.bfloat16).eval().requires_grad_(False)


def build_student(teacher, shape, device):
    layers = teacher.config.num_hidden_layers
    chosen, _ = select_layers(layers, count=shape["convert"])
    kinds = ["mamba" if i in chosen else "attention" for i in range(layers)]
    with torch.device(device):
        student = build_hybrid(teacher, kinds)
    return student.to(device).float()


def make_batches(shape, micro, device, count=2):
    """`count` distinct micro-batches (cycled) of random tokens: one document per row, no padding."""
    seq, vocab = shape["seq"], shape["teacher"]["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((micro, 1), IGNORE_INDEX)], dim=1)
        out.append({k: v.to(device) for k, v in dict(
            input_ids=ids, position_ids=torch.arange(seq).expand(micro, seq).contiguous(), labels=labels,
            loss_mask=torch.ones(micro, seq, dtype=torch.long)).items()})
    return out


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once


def flops_per_token(teacher, student, seq):
    c = teacher.config
    attn_width = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    dense = 2 * n_params(teacher) + 6 * n_params(student)
    per_layer = 2 * seq * attn_width  # causal QK^T + PV, forward, per token
    student_attn = sum(kind == "attention" for kind in student.config.mixer_types)
    attention = per_layer * (c.num_hidden_layers + 3 * student_attn)
    return dense, attention


# ---------------------------------------------------------------------------------------------
# timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Marks step boundaries: wall clock over the timed steps (synchronised) and CUDA events per step."""

    def __init__(self, device, warmup, timed, on_profile_start=None):
        self.device, self.warmup, self.timed = device, warmup, timed
        self.events, self.t0, self.t1 = [], None, None
        self.on_profile_start = on_profile_start

    def mark(self, step):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        if step == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()
        if step == self.warmup + self.timed:
            sync(self.device)
            self.t1 = time.perf_counter()
            if self.on_profile_start is not None:
                self.on_profile_start()

    def result(self):
        seconds = (self.t1 - self.t0) / self.timed
        median = None
        if self.events:
            sync(self.device)
            span = self.events[self.warmup : self.warmup + self.timed + 1]
            median = statistics.median(a.elapsed_time(b) for a, b in zip(span, span[1:])) / 1e3
        return seconds, median


@contextmanager
def memory_scope(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    peak = {}
    try:
        yield peak
    finally:
        if device.type == "cuda":
            peak["allocated"] = torch.cuda.max_memory_allocated(device) / 2**30
            peak["reserved"] = torch.cuda.max_memory_reserved(device) / 2**30


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# profiling


class Profiler:
    """torch.profiler around the last step; annotations mark the phases the breakdown groups by."""

    def __init__(self, device, trace_path):
        self.device, self.trace_path = device, trace_path
        self.prof = None

    def start(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=activities)
        self.prof.start()

    def stop(self):
        sync(self.device)
        self.prof.stop()
        self.prof.export_chrome_trace(self.trace_path)


@contextmanager
def phase_annotations(teacher, student):
    """record_function ranges around the teacher forward, the student forward and the loss."""
    from torch.profiler import record_function

    def wrap(fn, name):
        def wrapped(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return wrapped

    original_loss = trainer_module.distillation_loss
    trainer_module.distillation_loss = wrap(original_loss, "bench:loss")
    teacher.model.forward = wrap(teacher.model.forward, "bench:teacher_fwd")
    student.model.forward = wrap(student.model.forward, "bench:student_fwd")
    try:
        yield
    finally:
        trainer_module.distillation_loss = original_loss
        del teacher.model.forward, student.model.forward  # back to the class's method


def kernel_kind(name):
    n = name.lower()
    if "_scan_" in n or "state_update" in n:
        return "mamba scan"
    if "_conv_" in n:
        return "mamba conv"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk", "gemv")):
        return "matmul"
    return "other"


KINDS = ["matmul", "attention", "mamba scan", "mamba conv", "other"]
PHASES = ["teacher fwd", "student fwd", "loss", "backward+recompute", "optimizer", "other (main thread)"]


def breakdown(trace_path):
    """{phase: {kind: ms}} of GPU kernel time, the phase read from the CPU range that launched it."""
    with open(trace_path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    ranges = {}  # tid -> [(start, end, phase)]
    main_tids = set()
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "user_annotation":
            continue
        name = e.get("name", "")
        phase = {"bench:teacher_fwd": "teacher fwd", "bench:student_fwd": "student fwd",
                 "bench:loss": "loss"}.get(name)
        if phase is None and name.startswith("Optimizer.step"):
            phase = "optimizer"
        if phase is None:
            continue
        ranges.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"], phase))
        if phase != "optimizer":
            main_tids.add(e["tid"])
    launches = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = (e["tid"], e["ts"])
    table = {p: dict.fromkeys(KINDS, 0.0) for p in PHASES}
    first = last = None
    for e in events:
        if e.get("cat") != "kernel":
            continue
        start, end = e["ts"], e["ts"] + e["dur"]
        first = start if first is None else min(first, start)
        last = end if last is None else max(last, end)
        tid, ts = launches.get(e.get("args", {}).get("correlation"), (None, None))
        phase = None
        for lo, hi, name in ranges.get(tid, ()):
            if lo <= ts <= hi:
                phase = name
                break
        if phase is None:
            phase = "other (main thread)" if tid in main_tids else "backward+recompute"
        table[phase][kernel_kind(e["name"])] += e["dur"] / 1e3
    span = (last - first) / 1e3 if first is not None else 0.0
    return table, span


def print_breakdown(title, table, span):
    busy = sum(sum(row.values()) for row in table.values())
    print(f"\n{title}: GPU kernel time {busy:.1f} ms over a {span:.1f} ms span of kernels "
          f"({100 * busy / max(span, 1e-9):.0f}% busy)")
    print(f"| phase | {' | '.join(KINDS)} | total |")
    print("|---|" + "---:|" * (len(KINDS) + 1))
    for phase in PHASES:
        row = table[phase]
        print(f"| {phase} | " + " | ".join(f"{row[k]:.1f}" for k in KINDS) + f" | {sum(row.values()):.1f} |")
    totals = {k: sum(table[p][k] for p in PHASES) for k in KINDS}
    print("| **total** | " + " | ".join(f"{totals[k]:.1f}" for k in KINDS) + f" | {busy:.1f} |")


# ---------------------------------------------------------------------------------------------
# the paths


def run_trainer(name, teacher, shape, device, args, profile_to=None):
    bf16_head, chunk, compiled, recomputed = TRAINER_VARIANTS[name]
    micro = shape["batch"]
    student = build_student(teacher, shape, device)
    if bf16_head:
        cast_head_input(student)
    total = args.warmup + args.steps + (1 if profile_to else 0)
    checkpointing = shape["checkpointing"] and (True if recomputed is None else recomputed)
    config = TrainConfig(steps=total, micro_batch_size=micro, seq_len=shape["seq"], lr=1e-5, bf16=True,
                         activation_checkpointing=checkpointing, compile=compiled, log_every=10**9, grad_clip=1.0)
    trainer = Trainer(student, teacher, config, LossSpec(weights={"reverse_kl": 1.0}, chunk_size=chunk))
    batches = make_batches(shape, micro, device)
    profiler = Profiler(device, profile_to) if profile_to else None
    clock = StepClock(device, args.warmup, args.steps, profiler.start if profiler else None)

    def stream():
        for i in range(total):
            clock.mark(i)
            yield batches[i % len(batches)]

    with phase_annotations(teacher, student) if profiler else nullcontext():
        result = trainer.train(stream())
        if profiler:
            profiler.stop()
        else:
            clock.mark(total)
    seconds, median = clock.result()
    extra = {"final_loss": result.final_loss, "micro": micro, "accum": 1, "n_student": n_params(student)}
    if compiled:  # the teacher is shared with later variants: back to eager
        for module in teacher.modules():
            module._compiled_call_impl = None
    del trainer, student, result
    return seconds, median, extra


def _baseline_micro_step(teacher, student, batch, num_tokens, bf16):
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    with torch.no_grad():
        t_logits = teacher(**inputs).logits  # [B, S, V] bf16
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        s_logits = student(**inputs).logits  # [B, S, V] bf16
    lq = torch.log_softmax(s_logits.float(), dim=-1)
    lp = torch.log_softmax(t_logits.float(), dim=-1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    loss = (kl * trained_positions(batch)).sum() / num_tokens
    loss.backward()
    return loss.detach()


def run_baseline(teacher, shape, device, args):
    """Naive eager step with the torch reference Mamba ops; halves the micro-batch until it fits."""
    previous = os.environ.get("HYBRIDIZE_KERNELS")
    os.environ["HYBRIDIZE_KERNELS"] = "reference"
    try:
        global_batch = shape["batch"]
        micro, ooms = global_batch, []
        while micro >= 1:
            student = build_student(teacher, shape, device)
            student.train()
            params = list(student.parameters())
            opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=False)
            batches = make_batches(shape, micro, device)
            accum = global_batch // micro
            num_tokens = float(sum(trained_positions(b).sum() for b in batches[:1])) * accum
            total = args.baseline_warmup + args.baseline_steps
            clock = StepClock(device, args.baseline_warmup, args.baseline_steps)
            oom = False
            try:
                losses = []
                for step in range(total):
                    clock.mark(step)
                    loss = sum(_baseline_micro_step(teacher, student, batches[(step * accum + j) % len(batches)],
                                                    num_tokens, args.bf16) for j in range(accum))
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    losses.append(loss.item())
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                clock.mark(total)
            except torch.OutOfMemoryError:
                oom = True
            if not oom:
                seconds, median = clock.result()
                extra = {"final_loss": losses[-1], "micro": micro, "accum": accum, "ooms": ooms,
                         "n_student": n_params(student)}
                del opt, student, params, batches
                return seconds, median, extra
            ooms.append(micro)
            print(f"  baseline: micro-batch {micro} ran out of memory", flush=True)
            opt.zero_grad(set_to_none=True)
            del opt, student, params, batches, clock
            free(device)
            micro //= 2
        raise RuntimeError(f"baseline: even micro-batch 1 runs out of memory (tried {ooms})")
    finally:
        if previous is None:
            os.environ.pop("HYBRIDIZE_KERNELS", None)
        else:
            os.environ["HYBRIDIZE_KERNELS"] = previous


# ---------------------------------------------------------------------------------------------
# main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama3.2-1b", "smollm2-135m"], choices=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        choices=[*TRAINER_VARIANTS, "baseline"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the trainer paths")
    parser.add_argument("--baseline-warmup", type=int, default=1)
    parser.add_argument("--baseline-steps", type=int, default=2, help="timed steps of the baseline")
    parser.add_argument("--deadline", type=float, default=0,
                        help="start no further variant after this many seconds (0: no limit)")
    parser.add_argument("--profile-shape", default="llama3.2-1b",
                        help="profile one step of each trainer variant at this shape ('' for none)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.json, traces")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test at a tiny shape")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes, args.profile_shape = ["tiny"], "tiny"
        args.warmup, args.steps, args.baseline_warmup, args.baseline_steps = 1, 2, 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.bf16 = True
    out = args.out
    if out:
        os.makedirs(out, exist_ok=True)

    import transformers

    header = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "kernels": os.environ.get("HYBRIDIZE_KERNELS", "auto")}
    try:
        import triton

        header["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(header), flush=True)

    rows, profiles = [], {}
    # trainer variants of every shape first, the (slow) baselines last
    plan = [(sh, v) for sh in args.shapes for v in args.variants if v != "baseline"]
    plan += [(sh, "baseline") for sh in args.shapes if "baseline" in args.variants]
    started = time.perf_counter()
    teacher = teacher_shape = None
    infos = {}
    for shape_name, variant in plan:
        if args.deadline and time.perf_counter() - started > args.deadline:
            print(f"  skipped {shape_name} / {variant}: past the --deadline of {args.deadline} s", flush=True)
            rows.append({"shape": shape_name, "path": variant, "seq": SHAPES[shape_name]["seq"],
                         "error": "skipped (deadline)"})
            continue
        shape = SHAPES[shape_name]
        if teacher_shape != shape_name:
            teacher = None
            free(device)
            teacher, teacher_shape = build_teacher(shape, device), shape_name
            if shape_name not in infos:
                probe = build_student(teacher, shape, device)
                dense, attention = flops_per_token(teacher, probe, shape["seq"])
                infos[shape_name] = {
                    "p_teacher": n_params(teacher), "p_student": n_params(probe), "flops_dense": dense,
                    "flops_attn": attention, "attn_impl": teacher.config._attn_implementation,
                    "mamba_layers": [i for i, k in enumerate(probe.config.mixer_types) if k == "mamba"]}
                del probe
                free(device)
                print(f"\n== {shape_name}: {json.dumps(infos[shape_name])}", flush=True)
        dense, attention = infos[shape_name]["flops_dense"], infos[shape_name]["flops_attn"]
        tokens = shape["batch"] * shape["seq"]
        profile_to = None
        if variant != "baseline" and shape_name == args.profile_shape:
            profile_to = f"/tmp/trace_{shape_name}_{variant}.json"
        row = {"shape": shape_name, "path": variant, "seq": shape["seq"], "tokens_per_step": tokens}
        t_start = time.perf_counter()
        try:
            with memory_scope(device) as peak:
                if variant == "baseline":
                    seconds, median, extra = run_baseline(teacher, shape, device, args)
                else:
                    seconds, median, extra = run_trainer(variant, teacher, shape, device, args, profile_to)
            row.update(extra)
            row.update(step_s=seconds, step_s_median_events=median, tokens_per_s=tokens / seconds,
                       peak_gb=peak.get("allocated"), peak_reserved_gb=peak.get("reserved"),
                       mfu=dense * tokens / seconds / PEAK_FLOPS,
                       mfu_attn=(dense + attention) * tokens / seconds / PEAK_FLOPS)
        except Exception as error:  # keep the other variants' numbers
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        row["wall_s"] = time.perf_counter() - t_start
        free(device)
        rows.append(row)
        print("  " + json.dumps(row), flush=True)
        if profile_to and "error" not in row:
            try:
                table, span = breakdown(profile_to)
                profiles[f"{shape_name}/{variant}"] = {"table": table, "span_ms": span}
                print_breakdown(f"{shape_name} / {variant}, one step", table, span)
                if out and variant == [v for v in args.variants if v != "baseline"][-1]:
                    with open(profile_to, "rb") as src, gzip.open(f"{out}/trace_{shape_name}.json.gz", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                os.remove(profile_to)
            except Exception:
                traceback.print_exc()
        if out:
            with open(f"{out}/results.json", "w") as f:
                json.dump({"header": header, "shapes": infos, "rows": rows, "profiles": profiles}, f, indent=1)
    teacher = None
    free(device)

    print_table(rows)
    for key, value in profiles.items():
        print_breakdown(key, value["table"], value["span_ms"])
    return 0 if all("error" not in r for r in rows) else 1


def print_table(rows):
    base = {r["shape"]: r["tokens_per_s"] for r in rows if r["path"] == "baseline" and "tokens_per_s" in r}
    print("\n| shape | path | micro-batch | seq | tokens/s | step ms | peak GB | MFU | MFU+attn | vs baseline |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['path']} | | {r['seq']} | {r['error'][:80]} | | | | | |")
            continue
        micro = f"{r['micro']}" + (f" x{r['accum']} accum" if r["accum"] > 1 else "")
        peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"
        speed = f"{r['tokens_per_s'] / base[r['shape']]:.2f}x" if r["shape"] in base else "-"
        print(f"| {r['shape']} | {r['path']} | {micro} | {r['seq']} | {r['tokens_per_s']:,.0f} | "
              f"{1e3 * r['step_s']:.1f} | {peak} | {100 * r['mfu']:.1f}% | {100 * r['mfu_attn']:.1f}% | {speed} |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
