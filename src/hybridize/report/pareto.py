"""The Pareto plot: accuracy against decode throughput, teacher at 1x, the frontier drawn.

It answers the question a run exists for: how much speed each step of conversion bought and
what it cost in accuracy. Measured and roofline-estimated throughputs get different markers,
since an estimate is an upper bound.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def pareto_front(points):
    """Points (x, y, ...) not beaten on both axes by another, ordered by x; higher is better."""
    front, best = [], float("-inf")
    for point in sorted(points, key=lambda p: (-p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front[::-1]


def plot_pareto(points, path, title, teacher_accuracy=None, references=(), reference_label="reference",
                ylabel="accuracy, mean over tasks (%)") -> Path:
    """Write the plot as PNG atomically; points are (ratio, accuracy, label, measured) tuples.

    Accuracy is a fraction and is shown in percent; the teacher is the star at 1x. `references`
    are (ratio, accuracy, label) points of another study, drawn apart and left out of the frontier.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = list(points)
    if teacher_accuracy is not None:
        everything.append((1.0, teacher_accuracy, "teacher", True))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=150)
    front = pareto_front(everything)
    if len(front) > 1:
        ax.plot([p[0] for p in front], [100 * p[1] for p in front], "--", color="tab:gray", lw=1.5,
                zorder=1, label="Pareto frontier")
    for measured, style in ((True, dict(color="tab:blue", label="checkpoint, measured throughput")),
                            (False, dict(facecolors="none", edgecolors="tab:blue", linewidths=1.8,
                                         label="checkpoint, roofline estimate (upper bound)"))):
        chosen = [p for p in points if p[3] == measured]
        if chosen:
            ax.scatter([p[0] for p in chosen], [100 * p[1] for p in chosen], s=70, zorder=3, **style)
    for x, y, label, _ in points:
        ax.annotate(label, (x, 100 * y), xytext=(7, 7), textcoords="offset points", fontsize=10)
    if references:
        ax.scatter([p[0] for p in references], [100 * p[1] for p in references], marker="s", s=45, color="tab:gray",
                   zorder=2, label=reference_label)
        for x, y, label in references:
            ax.annotate(label, (x, 100 * y), xytext=(6, -12), textcoords="offset points", fontsize=8, color="tab:gray")
    if teacher_accuracy is not None:
        ax.scatter([1.0], [100 * teacher_accuracy], marker="*", s=260, color="tab:red", zorder=4, label="teacher")
        ax.annotate("teacher", (1.0, 100 * teacher_accuracy), xytext=(6, 9), textcoords="offset points",
                    fontsize=10, color="tab:red", fontweight="bold")
    if everything or references:
        xs = [p[0] for p in everything] + [p[0] for p in references]
        ys = [100 * p[1] for p in everything] + [100 * p[1] for p in references]
        ax.set_xlim(min(0.9, min(xs) - 0.1), max(xs) * 1.12 + 0.1)
        ax.set_ylim(max(0.0, min(ys) - 8), min(105.0, max(ys) + 8))
    ax.set_xlabel("decode throughput relative to the teacher (×)", fontsize=12)
    ax.set_ylabel(ylabel, fontsize=12)
    ax.set_title(title, fontsize=13)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=10)
    ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    path = Path(path)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(staging, format="png")
        os.replace(staging, path)
    finally:
        plt.close(fig)
        Path(staging).unlink(missing_ok=True)
    return path
