"""Where rows come from: a user's file, or the built-in synthetic reasoning tasks by name.

A data spec is a path (JSONL, Parquet, saved dataset) or `synthetic[:task,task...]`, which
generates verifiable problems deterministically (the train and test splits never share one).
"""

from hybridize.data.io import DataError, read_rows
from hybridize.data.synthetic import TASKS, synthesize

DEFAULT_TASKS = ("arithmetic", "variable_tracking", "multi_digit")


def synthetic_rows(tasks=DEFAULT_TASKS, n=96, seed=0, split="test", knobs=None) -> list[dict]:
    """`n` rows split evenly over `tasks` (round-robin order, so any prefix mixes the tasks)."""
    knobs = knobs or {}
    per_task = [synthesize(t, -(-n // len(tasks)), seed=seed, split=split, **knobs.get(t, {})) for t in tasks]
    mixed = [row for group in zip(*per_task) for row in group]
    return mixed[:n]


def load_rows(spec: str, n: int | None = None, seed: int = 0, split: str = "test") -> list[dict]:
    """Rows of a data spec; `n` limits a file and sizes a synthetic set (default 96)."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        tasks = tuple(t for t in spec.partition(":")[2].split(",") if t) or DEFAULT_TASKS
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise DataError(f"unknown synthetic task {unknown[0]!r}; valid: {', '.join(TASKS)}")
        return synthetic_rows(tasks, n or 96, seed, split)
    rows, report = read_rows(spec)
    if report.malformed:
        print(f"{spec}: {report.summary()}")
    return rows[:n] if n else rows
