"""Distillation on 1 or N GPUs of one host (torchrun + FSDP2): loss trajectory, throughput, resume.

    torchrun --standalone --nproc-per-node N benchmarks/distill_multi_gpu.py --out DIR \\
        [--steps 20] [--global-batch 8] [--micro 4] [--snapshot-at 10] [--resume-from STATE_DIR]
    python benchmarks/distill_multi_gpu.py --compare DIR [DIR ...]     # table of finished runs

Each process builds the Llama-3.2-1B-shaped random-weight teacher (bf16) and its 8-of-16 hybrid
(fp32 master weights, MIL-initialised; the same shapes as benchmarks/distill_step.py) on its GPU;
rank 0's weights are broadcast so every rank starts from identical models, then the hybridize
Trainer shards teacher and student with FSDP2 (one unit per decoder layer) and trains with reverse
KL under bf16 autocast, activation checkpointing on. The data is one global stream of random-token
micro-batches, the same for every world size: a step takes global_batch / micro micro-batches of it,
split over the ranks (grad_accum = global_batch / (micro * N)), so runs on different numbers of GPUs
see the same data in the same optimizer steps.

With --snapshot-at K the resumable state written at step K is kept as DIR/state-stepK (hard links);
--resume-from copies such a state into DIR/state and continues from it, on any number of GPUs.
Rank 0 writes DIR/result.json: losses and grad norms per step, per-step wall times, tokens/s over
the steps after --warmup (steps that wrote a state excluded), and each rank's peak memory.
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from distill_step import IGNORE_INDEX, SHAPES, build_student, build_teacher  # noqa: E402

from hybridize.config import LossConfig, TrainConfig  # noqa: E402
from hybridize.distill.distributed import joined_world  # noqa: E402
from hybridize.distill.trainer import Trainer  # noqa: E402


def global_stream(shape, micro, count, seed=1):
    """`count` micro-batches of random tokens (one document per row), identical on every rank."""
    seq, vocab = shape["seq"], shape["teacher"]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((micro, 1), IGNORE_INDEX)], dim=1)
        yield {"input_ids": ids, "position_ids": torch.arange(seq).expand(micro, seq).contiguous(),
               "labels": labels, "loss_mask": torch.ones(micro, seq, dtype=torch.long)}


def broadcast_from_rank0(model):
    """Random init on each GPU may differ across ranks; FSDP needs the same full weights everywhere."""
    if dist.is_initialized():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, 0)


def link_copy(source: Path, target: Path):
    """A copy of a state folder made of hard links: instant, and safe because states are replaced, never edited."""
    shutil.copytree(source, target, copy_function=os.link)


def train(args):
    with joined_world() as world:
        run_and_record(args, world)


def run_and_record(args, world):
    """Train the shape on `world`, timing each step; rank 0 writes result.json and prints a line."""
    out = Path(args.out)
    shape = SHAPES[args.shape]
    per_step = args.global_batch // args.micro
    if per_step * args.micro != args.global_batch or per_step % world.size:
        raise SystemExit(f"global batch {args.global_batch} is not micro {args.micro} x a multiple of {world.size} GPUs")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if args.resume_from:
            link_copy(Path(args.resume_from), out / "state")
    if world.sharded:
        dist.barrier()

    started = time.perf_counter()
    teacher = build_teacher(shape, world.device)
    student = build_student(teacher, shape, world.device)
    broadcast_from_rank0(teacher)
    broadcast_from_rank0(student)
    build_seconds = time.perf_counter() - started

    config = TrainConfig(steps=args.steps, micro_batch_size=args.micro, grad_accum=per_step // world.size,
                         seq_len=shape["seq"], lr=args.lr, warmup_steps=2, activation_checkpointing=True,
                         save_every=args.snapshot_at, log_every=1, seed=0)
    trainer = Trainer(student, teacher, config, LossConfig(weights="reverse_kl"), out_dir=out, world=world)
    resumed_at = trainer.step if trainer.resume() else 0

    step_starts, saves = {}, []
    save_state = trainer.save_state

    def save_and_snapshot(path):
        began = time.perf_counter()
        save_state(path)
        saves.append({"step": trainer.step, "seconds": time.perf_counter() - began})
        if world.is_main and args.snapshot_at and trainer.step == args.snapshot_at:
            link_copy(Path(path), out / f"state-step{trainer.step}")

    trainer.save_state = save_and_snapshot

    def timed(stream):  # rank 0 pulls a step's micro-batches when the step starts
        for index, batch in enumerate(stream):
            if index % per_step == 0:
                step_starts[trainer.step + 1] = time.perf_counter()
            yield batch

    cuda = world.device.type == "cuda"  # CPU (gloo) runs only as a smoke test of the script
    stream = global_stream(shape, args.micro, per_step * args.steps)
    if cuda:
        torch.cuda.reset_peak_memory_stats(world.device)
    trainer.train(timed(stream))
    if cuda:
        torch.cuda.synchronize(world.device)
    step_starts[trainer.step + 1] = time.perf_counter()

    peak = torch.tensor([torch.cuda.max_memory_allocated(world.device) / 2**30 if cuda else 0.0], device=world.device)
    peaks = [torch.zeros_like(peak) for _ in range(world.size)]
    if world.sharded:
        dist.all_gather(peaks, peak)
    else:
        peaks = [peak]

    if world.is_main:
        saved_steps = {s["step"] for s in saves}
        seconds = {step: step_starts[step + 1] - step_starts[step] for step in range(resumed_at + 1, trainer.step + 1)}
        timed_steps = [s for s in seconds if s > resumed_at + args.warmup and s not in saved_steps]
        tokens_per_step = args.global_batch * shape["seq"]
        median = statistics.median(seconds[s] for s in timed_steps) if timed_steps else float("nan")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        result = {
            "shape": args.shape, "gpus": world.size, "gpu": torch.cuda.get_device_name(world.device) if cuda else "cpu",
            "global_batch": args.global_batch, "micro": args.micro, "grad_accum": config.grad_accum,
            "seq": shape["seq"], "resumed_at": resumed_at, "resume_from": args.resume_from,
            "losses": trainer.losses, "grad_norms": [row["grad_norm"] for row in metrics],
            "step_seconds": seconds, "timed_steps": timed_steps, "median_step_s": median,
            "tokens_per_s": tokens_per_step / median, "saves": saves, "build_seconds": build_seconds,
            "peak_gib": [p.item() for p in peaks], "torch": torch.__version__,
        }
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{world.size} GPU(s): {len(trainer.losses)} losses, {result['tokens_per_s']:,.0f} tokens/s, "
              f"median step {median * 1e3:.0f} ms, peak {max(result['peak_gib']):.1f} GiB, "
              f"saves {[round(s['seconds'], 1) for s in saves]} s", flush=True)


def compare(dirs):
    """Print each run's throughput and its losses beside the first run's."""
    runs = [json.loads((Path(d) / "result.json").read_text()) for d in dirs]
    reference = runs[0]
    print("| run | GPUs | micro x accum x GPUs | resumed at | median step ms | tokens/s | scaling | peak GiB/GPU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for d, r in zip(dirs, runs):
        scaling = r["tokens_per_s"] / reference["tokens_per_s"]
        print(f"| {Path(d).name} | {r['gpus']} | {r['micro']} x {r['grad_accum']} x {r['gpus']} | {r['resumed_at']} "
              f"| {r['median_step_s'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} | {scaling:.2f}x | {max(r['peak_gib']):.1f} |")
    print()
    names = [Path(d).name for d in dirs]
    print("| step | " + " | ".join(names) + " | max abs diff vs " + names[0] + " |")
    print("|---:|" + "---:|" * (len(names) + 1))
    for step in range(len(reference["losses"])):
        values = [r["losses"][step] if step < len(r["losses"]) else None for r in runs]
        diffs = [abs(v - values[0]) for v in values[1:] if v is not None]
        cells = " | ".join(f"{v:.6f}" if v is not None else "" for v in values)
        print(f"| {step + 1} | {cells} | {max(diffs) if diffs else 0:.2e} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="print the table of finished runs")
    parser.add_argument("--out", help="run folder")
    parser.add_argument("--shape", default="llama3.2-1b", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, all GPUs")
    parser.add_argument("--micro", type=int, default=4, help="sequences per micro-batch on one GPU")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput")
    parser.add_argument("--snapshot-at", type=int, default=0, help="keep the state written at this step")
    parser.add_argument("--resume-from", help="a state folder to continue from")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.compare)
    elif args.out:
        train(args)
    else:
        parser.error("give --out (train) or --compare")


if __name__ == "__main__":
    main()
