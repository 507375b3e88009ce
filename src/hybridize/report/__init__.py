"""Run report: a markdown table of every checkpoint and a Pareto plot of accuracy vs throughput.

`build_report(run_dir)` reads the layout described in `hybridize.report.collect` and writes
`report.md` and `pareto.png` into the run directory, each atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hybridize.report.collect import collect_run
from hybridize.report.markdown import render_markdown
from hybridize.report.pareto import plot_pareto


def _write_text_atomic(path: Path, text: str) -> None:
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(staging, path)


def build_report(run_dir) -> tuple[Path, Path]:
    """Write run_dir/report.md and run_dir/pareto.png; returns their paths."""
    run_dir = Path(run_dir)
    run = collect_run(run_dir)
    report_path, plot_path = run_dir / "report.md", run_dir / "pareto.png"
    _write_text_atomic(report_path, render_markdown(run))
    points = [(c["throughput_ratio"], c["eval"]["task_mean_accuracy"], f"{c['mixers']} mixer" + "s" * (c["mixers"] != 1),
               c["throughput_source"] == "measured")
              for c in run["checkpoints"] if c["eval"] and c["throughput_ratio"] is not None]
    teacher = run["teacher"]["task_mean_accuracy"] if run["teacher"] else None
    plot_pareto(points, plot_path, f"Accuracy vs decode throughput: {run['name']}", teacher)
    return report_path, plot_path
