"""Reading a run directory into one record per checkpoint, plus the teacher's reference accuracy.

The layout read (everything else in the run directory is ignored)::

    run_dir/
      teacher_eval.json   optional: `evaluate()` of the teacher itself (accuracy of the reference row)
      teacher/            the fine-tuned teacher of a recipe with teacher_sft: not a checkpoint row
      <stage>/            every direct subfolder holding layers.json is one checkpoint
        layers.json       "mixer_types": one entry per layer ("attention", "mamba", "identity")
        config.json       the checkpoint's HybridConfig; used for the roofline estimate
        eval.json         `evaluate()` result; may carry "tokens": training tokens seen so far
        state.json        optional {"tokens": N}, read when eval.json has no "tokens"
        bench.json        optional {"throughput_ratio": R}: measured decode throughput / teacher's

Without teacher_eval.json the teacher's accuracy comes from the first checkpoint whose eval.json
has a "teacher" section (`evaluate(..., teacher=T)` writes one). Without bench.json the
throughput ratio is the memory-bandwidth roofline of `bench.roofline` at ESTIMATE_SCENARIO,
marked "estimated": an upper bound, never presented as a measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

from hybridize.config import TEACHER_DIR
from hybridize.errors import UserError

ESTIMATE_SCENARIO = {"input_len": 1, "output_len": 16384, "memory": 80e9}
"""The paper's throughput scenario (1 input token, 16k output tokens) on one 80 GB H100."""


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is not readable JSON") from None


def estimated_ratio(checkpoint: Path) -> float | None:
    """Roofline throughput ratio vs the all-attention twin, from config.json alone (no weights)."""
    import torch

    from hybridize.convert.describe import describe
    from hybridize.modeling.configuration_hybrid import HybridConfig
    from hybridize.modeling.modeling_hybrid import HybridForCausalLM

    if not (checkpoint / "config.json").is_file():
        return None
    config = HybridConfig.from_json_file(str(checkpoint / "config.json"))
    with torch.device("meta"):  # shapes only: parameter counts without memory or init time
        model = HybridForCausalLM(config)
    roof = describe(model, input_len=ESTIMATE_SCENARIO["input_len"], output_len=ESTIMATE_SCENARIO["output_len"],
                    memory=ESTIMATE_SCENARIO["memory"])["roofline"]
    return roof["ratio"] if roof else None


def read_checkpoint(folder: Path) -> dict:
    """One checkpoint's row data; fields that its files do not provide are None."""
    kinds = read_json(folder / "layers.json").get("mixer_types") or []
    evaluation = read_json(folder / "eval.json") if (folder / "eval.json").is_file() else None
    tokens = (evaluation or {}).get("tokens")
    if tokens is None and (folder / "state.json").is_file():
        tokens = read_json(folder / "state.json").get("tokens")
    ratio, source = None, None
    if (folder / "bench.json").is_file():
        ratio, source = read_json(folder / "bench.json").get("throughput_ratio"), "measured"
    if ratio is None:
        ratio = estimated_ratio(folder)
        source = "estimated" if ratio is not None else None
    return {
        "name": folder.name,
        "mixers": sum(kind != "attention" for kind in kinds),
        "layers": len(kinds),
        "tokens": tokens,
        "eval": evaluation,
        "throughput_ratio": ratio,
        "throughput_source": source,
    }


def collect_run(run_dir) -> dict:
    """{"name", "teacher": accuracy section or None, "checkpoints": [...] by mixer count, then name}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    # the fine-tuned teacher (recipe teacher_sft) is the reference row, not a checkpoint
    folders = sorted(p for p in run_dir.iterdir() if (p / "layers.json").is_file() and p.name != TEACHER_DIR)
    if not folders:
        raise UserError(f"{run_dir} holds no checkpoint folders (subfolders with a layers.json)")
    checkpoints = sorted((read_checkpoint(p) for p in folders), key=lambda c: (c["mixers"], c["name"]))
    teacher = None
    if (run_dir / "teacher_eval.json").is_file():
        teacher = read_json(run_dir / "teacher_eval.json")
    else:
        teacher = next((c["eval"]["teacher"] for c in checkpoints if (c["eval"] or {}).get("teacher")), None)
    return {"name": run_dir.resolve().name, "teacher": teacher, "checkpoints": checkpoints}
