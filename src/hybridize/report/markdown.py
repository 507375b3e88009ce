"""report.md: one table row per checkpoint, teacher first, with what each number was measured on."""

from __future__ import annotations

from hybridize.report.collect import ESTIMATE_SCENARIO


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _tokens(value) -> str:
    if value is None:
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return str(int(value))


def _ratio(value, source) -> str:
    return "-" if value is None else f"{value:.2f}x ({source})"


def render_markdown(run: dict) -> str:
    teacher, checkpoints = run["teacher"], run["checkpoints"]
    tasks = sorted({task for c in checkpoints for task in ((c["eval"] or {}).get("tasks") or {})}
                   | set((teacher or {}).get("tasks") or {}))
    header = ["checkpoint", "mixer layers", "tokens", *tasks, "mean", "retained", "KL(teacher‖model)",
              "agreement", "throughput vs teacher"]
    lines = [f"# Run report: {run['name']}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    total = checkpoints[0]["layers"]
    if teacher:
        cells = ["teacher", f"0/{total}", "-", *(_percent(teacher["tasks"].get(t, {}).get("accuracy")) for t in tasks),
                 _percent(teacher["task_mean_accuracy"]), "100.0%", "0", "100.0%", "1.00x (reference)"]
        lines.append("| " + " | ".join(cells) + " |")
    for c in checkpoints:
        evaluation = c["eval"] or {}
        task_stats = evaluation.get("tasks") or {}
        mean = evaluation.get("task_mean_accuracy")
        retained = mean / teacher["task_mean_accuracy"] if teacher and mean is not None and teacher[
            "task_mean_accuracy"] else None
        forced = evaluation.get("teacher_forced") or {}
        kl = forced.get("kl_teacher_model")
        cells = [c["name"], f"{c['mixers']}/{c['layers']}", _tokens(c["tokens"]),
                 *(_percent(task_stats.get(t, {}).get("accuracy")) for t in tasks), _percent(mean),
                 _percent(retained), "-" if kl is None else f"{kl:.4f}", _percent(forced.get("agreement")),
                 _ratio(c["throughput_ratio"], c["throughput_source"])]
        lines.append("| " + " | ".join(cells) + " |")
    rows = {c["eval"]["count"] for c in checkpoints if c["eval"]}
    lines += [
        "",
        f"Accuracy: greedy generation, answer extracted and checked per task, on {', '.join(map(str, sorted(rows)))}"
        " rows; mean = unweighted mean over tasks; retained = mean / teacher's mean.",
        "KL(teacher‖model) and agreement (model's argmax = teacher's argmax): per token, teacher-forced on the "
        "reference assistant tokens.",
        "Throughput: measured = bench.json of the checkpoint; estimated = memory-bandwidth roofline of decode "
        f"(bench/roofline.py) at {ESTIMATE_SCENARIO['input_len']} input / {ESTIMATE_SCENARIO['output_len']} output "
        f"tokens on one {ESTIMATE_SCENARIO['memory'] / 1e9:.0f} GB H100, each model at its largest batch: an upper "
        "bound, not a measurement.",
        "",
        "![accuracy vs throughput](pareto.png)",
        "",
    ]
    return "\n".join(lines)
