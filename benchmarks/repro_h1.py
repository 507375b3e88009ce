"""Small-scale reproduction of Apriel-H1: the frontier, decode throughput, the ablations, on 1+ GPUs.

    PYTHONPATH=src python benchmarks/repro_h1.py --out runs/repro [--jobs N] [--deadline 540] [--seeds 0 1] [--copy-to DIR]

The reproduction is a set of parts, each a resumable `hybridize run` (or a bench) in its own folder
under --out. A scheduler runs up to --jobs parts at once (default: one per visible GPU), each in its
own process, starting each part as soon as what it waits for is done: the ablations wait for the
frontier's teacher, the staged arm for its 15-mixer checkpoint, a bench for its checkpoint. With more
jobs than GPUs, ablation arms share a GPU (one arm's start-up and evaluation leave the GPU idle that
another's training fills: on an H100 two 135M arms side by side took 211-237 s each against ~200 s
alone); an arm that runs out of memory beside another resumes alone. The frontier, the critical path,
and every bench, a timing, get a GPU to themselves. Each part's output goes to logs/<part>.log. With
--deadline the running parts are stopped after that many seconds; started again, the driver skips what
is done and every part resumes from its last saved step, so it can run in calls of at most 10 minutes.
The parts:

1. frontier/   recipes/repro-h1-small.yaml: SFT of SmolLM2-135M-Instruct into a reasoning teacher,
               then LOO -> 15 of 30 -> MMR -> 18 -> 21 -> 24 mixers (reverse KL), SFT of 18 and 24.
2. bench.json  in every frontier checkpoint: decode throughput against the teacher in the same
               engine and call (bench(), steady state at SCENARIO), with the roofline ratio beside it.
3. ablations/  at 18 of 30 mixers, from the frontier's teacher, per seed:
               - staged (the frontier's 15-mixer checkpoint -> 18 by MMR, the frontier's h18 budget)
                 vs one-shot (0 -> 18 by LOO with the h15 + h18 budget);
               - from the one-shot baseline, one change each at the same budget: forward KL, random
                 placement, most-important-first placement (LOO reversed), MIL layout `aligned`, fresh
                 random mixers, and generic text (the teacher's own completions of `data.generic`
                 prompts, sampled once per run) instead of its reasoning traces.
               A seed changes the stage's data order, the MMR probes' and random choices, and the
               fresh mixers' init; the teacher and (for staged) the 15-mixer start are shared.
               Follow-ups, run only when named in --ablations (not at the arms' budget): one-shot
               then SFT (one-shot-sft), the same with forward KL (forward-kl-sft), and forward KL
               on 12M tokens (forward-kl-12m).
4. summary.md / summary.json: frontier table, ablation table (mean and spread over seeds);
   pareto-paper.png: accuracy retained vs decode throughput, ours beside the paper's checkpoints.

"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from hybridize.report import build_report
from hybridize.report.pareto import plot_pareto

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "repro-h1-small.yaml"
SCENARIO = {"input_len": 1, "output_len": 16384, "mode": "steady"}  # the paper's decode scenario
ABLATIONS = {  # name: change to the one-shot stage (or the recipe), all at the h18 stage's mixer count
    "one-shot": {},
    "forward-kl": {"loss": "forward_kl"},
    "random-placement": {"select": "random"},
    "important-first": {"select": "reverse"},
    "mil-aligned": {"recipe": {"mil_layout": "aligned"}},
    "random-init": {"recipe": {"mixer_init": "random"}},
    # the teacher's free-form text on non-reasoning prompts instead of its reasoning traces: 1,500
    # generic prompts x 4 samples, about 1.5M tokens, so this arm sees its data ~4 times
    "generic-data": {"data": {"generated": {"prompts": {"generic": {"n": 1500}}, "verify": False, "n_per_prompt": 4,
                                            "temperature": 0.8, "max_new_tokens": 384, "batch_size": 512}}},
}
# Beyond the paper's ablations, not held to their budget (run only when named in --ablations): what it takes
# to close the gap to the paper's 97% at 18 mixers. Each is the one-shot arm with a change; "sft" appends the
# frontier's h18-sft stage (2M tokens, the staged h18-sft's total of 8M), "tokens" replaces the budget.
FOLLOW_UPS = {
    "one-shot-sft": {"sft": True},
    "forward-kl-sft": {"loss": "forward_kl", "sft": True},
    "forward-kl-12m": {"loss": "forward_kl", "tokens": 12_000_000},
}
ARMS = {**ABLATIONS, **FOLLOW_UPS}


def arm_result(name: str) -> str:
    """The stage whose checkpoint is an arm's result."""
    return "h18-sft" if ARMS.get(name, {}).get("sft") else "h18"


@dataclass
class Part:
    """One resumable unit of the reproduction: a `hybridize run`, or the bench of one checkpoint."""

    name: str
    ready: Callable[[], bool]  # what it waits for is done
    done: Callable[[], bool]
    exclusive: bool = False  # runs alone on its GPU

    @property
    def log_name(self) -> str:
        return self.name.replace("/", "-")


# Apriel-H1 (notes/apriel-h1.md): (Mamba layers of 50, decode throughput vs teacher, average eval); teacher 0.80
PAPER_POINTS = [("H-25", 1.8, 0.75), ("H-27", 1.9, 0.76), ("H-30", 2.1, 0.74), ("H-30-SFT", 2.1, 0.78),
                ("H-34", 2.5, 0.71), ("H-37", 2.9, 0.69), ("H-40", 3.4, 0.69)]
PAPER_TEACHER = 0.80


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds if seconds else None

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def log(message):
    print(f"[repro {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_recipe(recipe: dict, out: Path):
    """`hybridize run` of a recipe given as a dict, in `out` (resumes a partial run)."""
    from hybridize.distill.runner import run

    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.monotonic()
    run(path, out)
    return time.monotonic() - started


def bench_checkpoint(checkpoint: Path, teacher: str):
    """bench.json for one checkpoint: its decode throughput over the teacher's, same engine and call."""
    from hybridize.bench.runner import bench
    from hybridize.convert.checkpoint import write_json_atomic

    target = checkpoint / "bench.json"
    if target.is_file():
        return json.loads(target.read_text())
    result = bench(str(checkpoint), teacher=teacher, include_stock=False, echo=False, **SCENARIO)
    rows = {row["model"]: row for row in result["rows"] if row.get("path") == "engine"}
    hybrid = next(row for name, row in rows.items() if name != "teacher")
    summary = {"throughput_ratio": hybrid.get("ratio_vs_teacher"), "roofline_ratio": hybrid.get("roofline_ratio"),
               "tok_s": hybrid.get("tok_s"), "teacher_tok_s": rows["teacher"].get("tok_s"),
               "batch": hybrid.get("batch"), "teacher_batch": rows["teacher"].get("batch"),
               "scenario": SCENARIO, "device": result["device"], "date": result["date"], "rows": result["rows"]}
    write_json_atomic(target, summary)
    return summary


def distilled_teacher(base: dict, frontier: Path) -> str:
    """The teacher the frontier's stages distil from: its fine-tuned copy with teacher_sft."""
    return str(frontier / "teacher") if base.get("teacher_sft") else base["teacher"]


def ablation_recipes(base: dict, frontier: Path, seed: int) -> dict[str, dict]:
    """name -> recipe of each ablation run at `seed`."""
    stages = {stage["name"]: stage for stage in base["stages"]}
    h15, h18 = stages["h15"], stages["h18"]
    common = {"teacher": distilled_teacher(base, frontier), "data": base["data"],
              "eval": {**base.get("eval", {}), "teacher": False},
              "mil_layout": base.get("mil_layout", "apriel"), "seed": seed}
    recipes = {"staged": {**common, "student": str(frontier / "h15"), "stages": [dict(copy.deepcopy(h18))]}}
    budget = "tokens" if "tokens" in h15["train"] else "steps"  # the two stages' budgets, in one run
    one_shot_train = dict(h15["train"], **{budget: h15["train"][budget] + h18["train"][budget]})
    for name, change in ARMS.items():
        if change.get("sft") and "h18-sft" not in stages:
            continue  # main() refuses to run such an arm on this recipe
        change = copy.deepcopy(change)
        stage = {"name": "h18", "count": h18["count"], "select": "loo", "loss": "reverse_kl", "train": dict(one_shot_train)}
        stage.update({k: v for k, v in change.items() if k not in ("recipe", "sft", "tokens")})
        if "tokens" in change:
            stage["train"] = {**{k: v for k, v in stage["train"].items() if k != "steps"}, "tokens": change["tokens"]}
        then = [copy.deepcopy(stages["h18-sft"])] if change.get("sft") else []
        recipes[name] = {**copy.deepcopy(common), **change.get("recipe", {}), "stages": [stage, *then]}
    return recipes


def _accuracies(evaluation: dict) -> dict:
    tasks = {task: stats["accuracy"] for task, stats in evaluation["tasks"].items()}
    forced = evaluation.get("teacher_forced") or {}
    return {**tasks, "mean": evaluation["task_mean_accuracy"], "kl": forced.get("kl_teacher_model")}


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(out: Path, seeds) -> dict:
    frontier = out / "frontier"
    teacher = json.loads((frontier / "teacher_eval.json").read_text()) if (frontier / "teacher_eval.json").is_file() else None
    base = json.loads((frontier / "base_teacher_eval.json").read_text()) if (frontier / "base_teacher_eval.json").is_file() else None
    summary = {"teacher": _accuracies(teacher) if teacher else None, "base_teacher": _accuracies(base) if base else None,
               "frontier": {}, "ablations": {}}
    for folder in sorted(frontier.iterdir()) if frontier.is_dir() else []:
        if (folder / "eval.json").is_file() and folder.name != "teacher":
            evaluation = json.loads((folder / "eval.json").read_text())
            layers = json.loads((folder / "layers.json").read_text())
            bench = json.loads((folder / "bench.json").read_text()) if (folder / "bench.json").is_file() else {}
            summary["frontier"][folder.name] = {
                **_accuracies(evaluation), "mixers": layers["mixer_types"].count("mamba"), "tokens": evaluation["tokens"],
                "throughput_ratio": bench.get("throughput_ratio"), "roofline_ratio": bench.get("roofline_ratio")}
    for name in ["staged", *ARMS]:
        per_seed = {}
        for seed in seeds:
            folder = out / "ablations" / f"{name}-s{seed}" / arm_result(name)
            if name == "staged" and seed == seeds[0] and not folder.is_dir():
                folder = frontier / "h18"  # the frontier's h18 is the staged arm's first seed
            if (folder / "eval.json").is_file():
                evaluation = json.loads((folder / "eval.json").read_text())
                per_seed[seed] = {**_accuracies(evaluation), "tokens": evaluation["tokens"]}
        if per_seed:
            keys = next(iter(per_seed.values())).keys()
            summary["ablations"][name] = {"seeds": per_seed,
                                          **{k: _spread([s[k] for s in per_seed.values()]) for k in keys}}
    return summary


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def render(summary: dict) -> str:
    teacher = summary["teacher"] or {}
    tasks = [k for k in teacher if k not in ("mean", "kl")]
    lines = ["## Frontier", "", "| checkpoint | mixers | tokens | " + " | ".join(tasks)
             + " | mean | retained | KL(teacher‖model) | decode throughput vs teacher | roofline ratio |",
             "|---|---:|---:|" + "---:|" * (len(tasks) + 5)]
    for label, row in (("base SmolLM2-135M-Instruct", summary["base_teacher"]), ("teacher (SFT)", teacher)):
        if row:
            lines.append(f"| {label} | 0 | - | " + " | ".join(_pct(row.get(t)) for t in tasks)
                         + f" | {_pct(row['mean'])} | - | - | 1.00x | 1.00x |")
    for name, row in sorted(summary["frontier"].items(), key=lambda item: (item[1]["mixers"], item[0])):
        retained = row["mean"] / teacher["mean"] if teacher.get("mean") else None
        ratio = "-" if row["throughput_ratio"] is None else f"{row['throughput_ratio']:.2f}x"
        roof = "-" if row["roofline_ratio"] is None else f"{row['roofline_ratio']:.2f}x"
        kl = "-" if row["kl"] is None else f"{row['kl']:.4f}"
        lines.append(f"| {name} | {row['mixers']} | {row['tokens'] / 1e6:.1f}M | "
                     + " | ".join(_pct(row.get(t)) for t in tasks)
                     + f" | {_pct(row['mean'])} | {_pct(retained)} | {kl} | {ratio} | {roof} |")
    lines += ["", "## Ablations at 18 of 30 mixers (mean over seeds, [min, max])", "",
              "| variant | seeds | tokens | " + " | ".join(tasks) + " | mean | retained | KL(teacher‖model) |",
              "|---|---|---:|" + "---:|" * (len(tasks) + 3)]
    for name, row in summary["ablations"].items():
        def cell(key, fmt=_pct):
            s = row.get(key)
            if s is None:
                return "-"
            return fmt(s["mean"]) + (f" [{fmt(s['min'])}, {fmt(s['max'])}]" if s["n"] > 1 else "")
        retained = (row["mean"]["mean"] / teacher["mean"]) if teacher.get("mean") and row.get("mean") else None
        lines.append(f"| {name} | {','.join(map(str, row['seeds']))} | {row['tokens']['mean'] / 1e6:.1f}M | "
                     + " | ".join(cell(t) for t in tasks) + f" | {cell('mean')} | {_pct(retained)} | "
                     + cell("kl", lambda v: f"{v:.4f}") + " |")
    return "\n".join(lines) + "\n"


def parts(base: dict, out: Path, seeds, ablations, gpu: bool) -> list[Part]:
    """Every part of the reproduction in priority order, each with what it waits for."""
    frontier = out / "frontier"

    def completed():
        state = frontier / "state.json"
        return json.loads(state.read_text())["completed"] if state.is_file() else []

    def after(*stages):
        return lambda: all(stage in completed() for stage in stages)

    teacher_ready = after("teacher") if base.get("teacher_sft") else (lambda: True)
    stage_names = [stage["name"] for stage in base["stages"]]
    everything = [Part("frontier", lambda: True, after(*stage_names), exclusive=True)]
    if gpu:  # decode throughput is a GPU figure
        everything += [Part(f"bench/{name}", after(name), (frontier / name / "bench.json").is_file, exclusive=True)
                       for name in stage_names]
    # longest first within a seed: an arm that samples its data from the teacher first takes longest
    ablations = sorted(ablations, key=lambda name: "data" not in ARMS.get(name, {}))
    for seed in seeds:
        for name in ablations:
            if name == "staged" and seed == seeds[0]:
                continue  # the frontier's h18 is this arm's first seed
            folder = out / "ablations" / f"{name}-s{seed}"
            ready = after("h15") if name == "staged" else teacher_ready
            everything.append(Part(f"ablation/{name}-s{seed}", ready, (folder / arm_result(name) / "eval.json").is_file))
    return everything


def run_part(name: str, base: dict, out: Path, seeds):
    """Run one part in this process (a worker of `schedule`)."""
    frontier = out / "frontier"
    kind, _, rest = name.partition("/")
    if kind == "frontier":
        run_recipe(base, frontier)
    elif kind == "bench":
        result = bench_checkpoint(frontier / rest, distilled_teacher(base, frontier))
        log(f"bench {rest}: {result['throughput_ratio']:.2f}x (roofline {result['roofline_ratio']:.2f}x)")
    elif kind == "ablation":
        arm, _, seed = rest.rpartition("-s")
        run_recipe(ablation_recipes(base, frontier, int(seed))[arm], out / "ablations" / rest)
    else:
        raise SystemExit(f"unknown part {name!r}")


def plot_against_paper(summary: dict, path: Path):
    """Accuracy retained (model / its teacher) against decode throughput: our frontier and the paper's."""
    teacher = (summary["teacher"] or {}).get("mean")
    points = [(row["throughput_ratio"], row["mean"] / teacher, name, True) for name, row in summary["frontier"].items()
              if teacher and row["throughput_ratio"] is not None]
    if not points:
        return None
    references = [(ratio, accuracy / PAPER_TEACHER, name) for name, ratio, accuracy in PAPER_POINTS]
    return plot_pareto(points, path, "SmolLM2-135M reasoning teacher (ours) vs Apriel-15B (paper)", 1.0,
                       references=references, reference_label="Apriel-H1 paper (15B, 50 layers)",
                       ylabel="accuracy retained, % of the teacher's")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ablations", nargs="*", default=["staged", *ABLATIONS], choices=["staged", *ARMS],
                        help="which arms to run (default: the paper's ablations; the follow-ups "
                             f"{', '.join(FOLLOW_UPS)} only when named)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="parts run at once (default: one per visible GPU, 1 on CPU); more than the GPUs "
                             "puts up to ceil(jobs / GPUs) ablation arms on a GPU")
    parser.add_argument("--deadline", type=float, default=0,
                        help="after this many seconds stop the running parts (they resume from their last saved "
                             "step next time) and start nothing new")
    parser.add_argument("--copy-to", type=Path, help="also write summary.md/json, the plots and the frontier report here")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; summarise what --out holds")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part (a worker of the scheduler)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override the frontier recipe, e.g. teacher_sft.train.tokens=4000000")
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error(f"--jobs takes a number of parts >= 1 (0: one per GPU), got {args.jobs}")
    out = args.out

    from hybridize.config import apply_override

    base = yaml.safe_load(args.recipe.read_text())
    for item in args.overrides:
        apply_override(base, item)
    without_sft = [name for name in args.ablations if ARMS.get(name, {}).get("sft")
                   and "h18-sft" not in [stage.get("name") for stage in base.get("stages", [])]]
    if without_sft:
        parser.error(f"the arms {', '.join(without_sft)} end with the recipe's h18-sft stage, which "
                     f"{args.recipe} does not have")
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args.part, base, out, args.seeds)
        return 0
    failed = []
    if not args.summary_only:
        import torch

        gpus = torch.cuda.device_count()
        jobs = args.jobs or max(gpus, 1)
        todo = parts(base, out, args.seeds, args.ablations, gpu=gpus > 0)
        worker = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--recipe", str(args.recipe),
                  "--seeds", *map(str, args.seeds), *(f"--set={item}" for item in args.overrides)]
        failed = schedule(todo, worker, jobs, gpus, Deadline(args.deadline), out / "logs")
    frontier = out / "frontier"
    if frontier.is_dir() and any(frontier.glob("*/eval.json")):
        build_report(frontier)  # with the bench figures
    summary = summarize(out, args.seeds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(render(summary))
    plot_against_paper(summary, out / "pareto-paper.png")
    print(render(summary))
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for path in (out / "summary.md", out / "summary.json", out / "pareto-paper.png", frontier / "report.md",
                     frontier / "pareto.png"):
            if path.is_file():
                shutil.copy(path, args.copy_to / path.name)
    return 1 if failed else 0


def choose_gpu(part: Part, loads: list[int], exclusive: set[int], per_gpu: int) -> int | None:
    """The GPU `part` starts on, or None while none suits: an exclusive part takes the first idle GPU;
    any other the least busy GPU with room that runs no exclusive part, the last one on ties, so that
    the first GPU, where the frontier starts, is the last one shared."""
    if part.exclusive:
        return next((gpu for gpu, load in enumerate(loads) if load == 0), None)
    room = [gpu for gpu, load in enumerate(loads) if load < per_gpu and gpu not in exclusive]
    return min(room, key=lambda gpu: (loads[gpu], -gpu), default=None)


def schedule(todo: list[Part], worker: list[str], jobs: int, gpus: int, deadline: Deadline, logs: Path) -> list[str]:
    """Run the parts not yet done, up to `jobs` at once spread over `gpus` GPUs (0: on the CPU), each as
    soon as what it waits for is done; returns the names of the parts that failed. A part's output goes
    to logs/<part>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    pending = [part for part in todo if not part.done()]
    running, failed = [], []  # (part, process, log file, start time, GPU)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    per_gpu = -(-jobs // gpus) if gpus else jobs
    while pending or running:
        for entry in list(running):
            part, process, handle, started, _ = entry
            if process.poll() is None:
                continue
            handle.close()
            running.remove(entry)
            seconds = time.monotonic() - started
            tail = (logs / f"{part.log_name}.log").read_text(errors="replace")[-2000:]
            if process.returncode == 0:
                log(f"{part.name} done in {seconds:.0f} s")
            elif per_gpu > 1 and not part.exclusive and "OutOfMemoryError" in tail:
                # two arms do not always fit one GPU (one with MMR probes needs more): resume it alone
                pending.insert(0, dataclasses.replace(part, exclusive=True))
                log(f"{part.name} ran out of GPU memory beside another part after {seconds:.0f} s; "
                    "it resumes alone on a GPU")
            else:
                failed.append(part.name)
                log(f"{part.name} FAILED (exit {process.returncode}) after {seconds:.0f} s; end of its log:\n{tail}")
        if deadline.passed():
            for part, process, handle, _, _ in running:
                process.terminate()
            for part, process, handle, _, _ in running:
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                handle.close()
                log(f"{part.name} stopped at the deadline; it resumes from its last saved step next time")
            break
        for part in [p for p in pending if p.ready()]:
            if len(running) >= jobs:
                break
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            gpu = None
            if gpus:
                loads = [sum(entry[4] == g for entry in running) for g in range(gpus)]
                gpu = choose_gpu(part, loads, {entry[4] for entry in running if entry[0].exclusive}, per_gpu)
                if gpu is None:
                    continue
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            pending.remove(part)
            handle = open(logs / f"{part.log_name}.log", "a")
            process = subprocess.Popen([*worker, "--part", part.name], env=env, stdout=handle, stderr=subprocess.STDOUT)
            running.append((part, process, handle, time.monotonic(), gpu))
            log(f"{part.name} started" + (f" on GPU {gpu}" if gpu is not None else ""))
        if not running:
            if pending:
                log("waiting on parts that failed or did not run: " + ", ".join(p.name for p in pending))
            break
        time.sleep(1)
    return failed


if __name__ == "__main__":
    sys.exit(main())
