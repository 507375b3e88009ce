"""Decode throughput on one GPU: decode-attention kernel checks and sweep, the greedy gate, bench tables.

    PYTHONPATH=src python3 benchmarks/decode.py [--out DIR] [--shapes apriel-15b,llama3-8b] [--budget-s 420]

1. Kernels: RoPE + append bit-exact against the model's eager rotary; split-KV decode attention against
   SDPA in float64; then a small sweep of the split kernel's tile/warps/stages at the Apriel-15B
   teacher (batch 16) and hybrid (batch 76) steady-state scenarios (context 8192 in a 16385-token
   cache), timed with CUDA events against the copy bandwidth; the fastest becomes the engine default.
   SDPA over the whole buffer with a length mask (the simple graph-capturable option) is timed beside it.
2. Gate: SmolLM2-shaped random models (perturbed so greedy output is varied), bf16: the engine
   (CUDA graph, Triton attention, compiled norms/MLPs) against transformers generate() for 64 tokens;
   a divergence is accepted only after a near-tie (reported).
3. Bench: per shape, steady-state decode at context I + O/2 (I=1, O=16384), batch auto: the teacher and
   its hybrids (evenly spaced Mamba layers), each beside its stock generate() row; then the teacher
   with the compile and the attention backend switched off one at a time.
Prints the tables last; writes JSON to --out.
"""

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridize.bench import decode_attention, runner, shapes
from hybridize.bench.engine import attention_twin, greedy_gate
from hybridize.convert.surgery import build_hybrid
from hybridize.modeling.modeling_hybrid import apply_rotary

COUNTS = {"apriel-15b": [25, 30, 34, 37, 40], "llama3-8b": [16, 19, 22, 24, 26], "smollm2-135m": [15, 18, 20, 22, 24]}


def log(*parts):
    print(*parts, flush=True)


def events_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel_err(got, want):
    got, want = got.double(), want.double()
    return float("nan") if not torch.isfinite(got).all() else ((got - want).norm() / want.norm()).item()


def kernel_checks():
    out = {}
    dev = torch.device("cuda")
    for heads, kv, d in [(32, 8, 128), (9, 3, 64)]:
        b, length = 6, 4096
        q = torch.randn(b, heads, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, kv, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(b, kv, d, device=dev, dtype=torch.bfloat16)
        cos, sin = torch.randn(b, d, device=dev, dtype=torch.bfloat16), torch.randn(b, d, device=dev, dtype=torch.bfloat16)
        positions = torch.tensor([0, 1, 63, 64, 1000, 4095], device=dev)
        keys = torch.full((b, kv, length, d), float("nan"), device=dev, dtype=torch.bfloat16)
        values = keys.clone()
        q_rot = decode_attention.rope_append(q, k, v, cos, sin, positions, keys, values)
        rows = torch.arange(b, device=dev)
        exact = (torch.equal(q_rot, apply_rotary(q[:, :, None], cos[:, None], sin[:, None])[:, :, 0])
                 and torch.equal(keys[rows, :, positions], apply_rotary(k[:, :, None], cos[:, None], sin[:, None])[:, :, 0])
                 and torch.equal(values[rows, :, positions], v))
        emulated = ((q.float() * cos[:, None].float()).bfloat16().float()
                    + (torch.cat([-q[..., d // 2:], q[..., : d // 2]], -1).float() * sin[:, None].float())
                    .bfloat16().float()).bfloat16()
        eager = apply_rotary(q[:, :, None], cos[:, None], sin[:, None])[:, :, 0]
        rope = {"kernel_vs_eager_mismatch": (q_rot != eager).float().mean().item(),
                "kernel_vs_emulated_mismatch": (q_rot != emulated).float().mean().item(),
                "eager_vs_emulated_mismatch": (eager != emulated).float().mean().item()}
        keys.normal_()
        values.normal_()
        lengths = torch.tensor([1, 63, 64, 1000, 3001, 4096], device=dev)
        att = decode_attention.DecodeAttention(b, heads, kv, d, length, dev, torch.bfloat16)
        got = att(q_rot, keys, values, lengths)
        mask = torch.arange(length, device=dev)[None, :] < lengths[:, None]
        want = F.scaled_dot_product_attention(q_rot.double()[:, :, None], keys.double(), values.double(),
                                              attn_mask=mask[:, None, None], enable_gqa=True)[:, :, 0]
        out[f"{heads}/{kv}x{d}"] = {"rope_append_bit_exact": exact, **rope,
                                    "attention_rel_err_bf16": rel_err(got, want), "splits": att.splits}
    return out


def kernel_sweep(bandwidth):
    """Split-KV kernel configs at the Apriel steady-state scenarios; returns (results, best config)."""
    dev = torch.device("cuda")
    heads, kv, d, max_len, context = 32, 8, 128, 16385, 8192
    configs = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 2), (64, 8, 3)]
    results, totals = [], {}
    for batch in (16, 76):
        keys = torch.randn(batch, kv, max_len, d, device=dev, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        q = torch.randn(batch, heads, d, device=dev, dtype=torch.bfloat16)
        lengths = torch.full((batch,), context, device=dev, dtype=torch.long)
        moved = 2 * batch * kv * context * d * 2  # K and V of the valid context, bf16
        for block_n, warps, stages in configs:
            for per_sm in (16,) if (block_n, warps, stages) != (64, 4, 2) else (4, 8, 16, 32):
                decode_attention.DEFAULT_CONFIG.update(programs_per_sm=per_sm)
                try:
                    att = decode_attention.DecodeAttention(batch, heads, kv, d, max_len, dev, torch.bfloat16,
                                                           block_n=block_n, num_warps=warps, num_stages=stages)
                    ms = events_ms(lambda: att(q, keys, values, lengths))
                except Exception as error:  # a config Triton cannot build (shared memory) is skipped
                    results.append({"batch": batch, "config": [block_n, warps, stages, per_sm], "error": str(error)[:200]})
                    continue
                key = (block_n, warps, stages, per_sm)
                totals[key] = totals.get(key, 0.0) + ms
                results.append({"batch": batch, "config": list(key), "splits": att.splits, "ms": ms,
                                "GBps": moved / ms / 1e6, "of_copy": moved / ms / 1e6 / (bandwidth / 1e9)})
        mask = torch.arange(max_len, device=dev)[None, :] < lengths[:, None]
        qs = q[:, :, None]
        ms = events_ms(lambda: F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask[:, None, None],
                                                              enable_gqa=True))
        results.append({"batch": batch, "config": "sdpa, whole buffer + mask", "ms": ms, "GBps": moved / ms / 1e6,
                        "of_copy": moved / ms / 1e6 / (bandwidth / 1e9)})
        torch.cuda.empty_cache()
    complete = {k: v for k, v in totals.items() if sum(1 for r in results if r.get("config") == list(k)) == 2}
    best = min(complete, key=complete.get)
    return results, best


def gate():
    reports = {}
    teacher = shapes.varied_teacher("smollm2-135m")
    models = {
        "twin": lambda: attention_twin(teacher).to("cuda", torch.bfloat16),
        "hybrid 15/30 (MIL)": lambda: build_hybrid(teacher, shapes.mixer_types_for(30, 15)).to("cuda", torch.bfloat16),
    }
    for name, make in models.items():
        model = make()
        for label, options in [("engine", {}), ("engine, sdpa attention", {"attention": "sdpa"})]:
            began = time.time()
            try:
                report = greedy_gate(model, batch=4, prompt_len=32, new_tokens=64, **options)
            except Exception:
                report = {"error": traceback.format_exc()[-1500:]}
            report["seconds"] = round(time.time() - began, 1)
            reports[f"{name} | {label}"] = report
            log("gate", name, label, json.dumps(report))
        del model
        torch.cuda.empty_cache()
    return reports


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="decode-results")
    parser.add_argument("--shapes", default="apriel-15b,llama3-8b")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new shape after this many seconds")
    parser.add_argument("--skip-gate", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--input-len", type=int, default=1)
    parser.add_argument("--output-len", type=int, default=16384)
    args = parser.parse_args()
    began = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers
    import triton

    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "transformers": transformers.__version__}
    log(json.dumps(summary))
    bandwidth = runner.copy_bandwidth(torch.device("cuda"))
    summary["copy_bandwidth_GBps"] = bandwidth / 1e9
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    summary["kernel_checks"] = kernel_checks()
    log("kernel checks", json.dumps(summary["kernel_checks"]))
    if not args.skip_sweep:
        sweep, best = kernel_sweep(bandwidth)
        summary["kernel_sweep"] = sweep
        for row in sweep:
            log("sweep", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
        block_n, warps, stages, per_sm = best
        decode_attention.DEFAULT_CONFIG.update(block_n=block_n, num_warps=warps, num_stages=stages,
                                               programs_per_sm=per_sm)
        log("decode attention config", decode_attention.DEFAULT_CONFIG)
    summary["decode_attention_config"] = dict(decode_attention.DEFAULT_CONFIG)
    (out / "kernels.json").write_text(json.dumps(summary, indent=1))

    if not args.skip_gate:
        summary["gate"] = gate()
        (out / "kernels.json").write_text(json.dumps(summary, indent=1))
    import subprocess

    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv"],
                          capture_output=True, text=True).stdout
    free, total = torch.cuda.mem_get_info()
    log(f"GPU processes:\n{apps}free {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB; this process allocated "
        f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB, reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB")
    log(f"elapsed {time.time() - began:.0f} s")

    tables = []
    for name in [s for s in args.shapes.split(",") if s]:
        if time.time() - began > args.budget_s:
            log(f"skipping {name}: past the time budget")
            continue
        shape = shapes.get_shape(name)
        try:
            result = runner.bench(shape, mixer_layers=COUNTS.get(name), input_len=args.input_len,
                                  output_len=args.output_len, batch="auto", mode="steady", include_stock=True,
                                  json_path=out / f"{name}.json")
            tables.append(runner.format_table(result))
        except Exception:
            log(traceback.format_exc()[-3000:])
            continue
        variants = []
        teacher_batch = result["rows"][0]["batch"]
        runs = [("compile off", {"compile": False}), ("sdpa attention", {"attention": "sdpa"}),
                ("context 65 (weights only)", {"output_len": 128, "batch": teacher_batch})]
        if teacher_batch < 16:  # does one batch of 16 fit past the auto sizing's reserve?
            runs.insert(0, ("batch 16", {"batch": 16}))
        for label, options in runs:
            if time.time() - began > args.budget_s + 60:
                break
            options = {"input_len": args.input_len, "output_len": args.output_len, "batch": "auto", **options}
            try:
                extra = runner.bench(shape, mode="steady", include_stock=False, echo=False, **options)
                row = extra["rows"][0]
                row["model"] = f"teacher, {label}"
                variants.append(row)
                log("variant", label, json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}))
            except Exception:
                log(traceback.format_exc()[-2000:])
        if variants:
            result["rows"] += variants
            runner._ratios(result["rows"])
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))
            tables[-1] = runner.format_table(result)
        log(f"elapsed {time.time() - began:.0f} s")

    log("\n===== summary =====")
    for key, report in summary.get("gate", {}).items():
        log("gate |", key, "|", {k: report.get(k) for k in ("equal", "first_divergence_step", "logit_gap",
                                                              "median_top2_gap", "near_tie", "distinct_tokens",
                                                              "compiled", "compile_error", "error")})
    log("kernel checks |", json.dumps(summary["kernel_checks"]))
    best = [r for r in summary.get("kernel_sweep", []) if "ms" in r]
    for batch in (16, 76):
        rows = sorted((r for r in best if r["batch"] == batch), key=lambda r: r["ms"])
        for r in rows[:3] + [r for r in rows if isinstance(r["config"], str)]:
            log(f"sweep b{batch} | {r['config']} | {r['ms']:.3f} ms | {r['GBps']:.0f} GB/s | {r['of_copy']:.1%}")
    for table in tables:
        log("")
        log(table)
    log(f"total {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
