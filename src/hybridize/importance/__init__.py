"""Layer importance: leave-one-out on a model, MMR probes on a hybrid; JSON scores and a bar chart."""

import json
import os
import tempfile
from pathlib import Path


def save_importance(result: dict, out: Path) -> tuple[Path, Path]:
    """Write the result JSON (atomically) and a bar chart PNG beside it; returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(staging, out)
    png = out.with_suffix(".png")
    plot_scores(result, png)
    return out, png


def plot_scores(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(int(i) for i in result["scores"])
    scores = [result["scores"][str(i)] for i in layers]
    chosen = set(result["ranking"][: len(layers) // 2])
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(layers) + 2), 3.6), dpi=120)
    ax.bar(layers, scores, color=["#d62728" if i in chosen else "#1f77b4" for i in layers])
    unit = {"kl": "KL(reference || ablated), nats/token", "ce": "cross-entropy, nats/token",
            "distill_loss": "probe distillation loss"}.get(result.get("metric"), result.get("metric", "score"))
    ax.set_xlabel("layer")
    ax.set_ylabel(unit)
    ax.set_title(f"{result['method'].upper()} importance (red: least important half)")
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def run_loo(teacher, data="synthetic", out="ranking.json", scope="block", metric="kl", rows=16, window=512,
            batch_size=4, seed=0):
    """`hybridize importance loo`: rank a teacher's (or hybrid's) layers on held-out rows; saves JSON + PNG."""
    from hybridize.convert.surgery import build_hybrid
    from hybridize.convert.teacher import load_teacher
    from hybridize.data.chat import tokenize_rows
    from hybridize.data.packing import batches, pack
    from hybridize.data.sources import load_rows
    from hybridize.importance.loo import leave_one_out
    from hybridize.modeling.modeling_hybrid import HybridForCausalLM

    model, tokenizer = load_teacher(str(teacher))
    if not isinstance(model, HybridForCausalLM):  # the exact all-attention twin runs the ablations
        model = build_hybrid(model, ["attention"] * model.config.num_hidden_layers)
    examples, _ = tokenize_rows(load_rows(data, rows, seed=seed, split="test"), tokenizer, max_length=window)
    packed = pack(examples, window, pad_id=tokenizer.pad_token_id)
    result = leave_one_out(model, batches(packed, batch_size, shuffle=False), scope=scope, metric=metric)
    result.update({"model": str(teacher), "data": str(data), "rows": rows})
    return result, save_importance(result, Path(out))


def run_mmr(teacher, student, data="synthetic", out="mmr.json", probe_steps=100, seq_len=512, micro_batch_size=4,
            lr=1e-4, mil_layout="apriel", rows=None, seed=0):
    """`hybridize importance mmr`: probe each remaining attention layer of `student`; saves JSON + PNG."""
    from hybridize.config import LossConfig, TrainConfig
    from hybridize.convert.checkpoint import load_hybrid
    from hybridize.convert.teacher import load_teacher
    from hybridize.data.chat import tokenize_rows
    from hybridize.data.packing import batches, pack
    from hybridize.data.sources import load_rows
    from hybridize.importance.mmr import mmr_scores

    teacher_model, tokenizer = load_teacher(str(teacher))
    current, _ = load_hybrid(student)
    config = TrainConfig(steps=probe_steps, seq_len=seq_len, micro_batch_size=micro_batch_size, lr=lr,
                         seed=seed, log_every=max(1, probe_steps))
    examples, _ = tokenize_rows(load_rows(data, rows, seed=seed, split="train"), tokenizer, max_length=seq_len)
    packed = pack(examples, seq_len, pad_id=tokenizer.pad_token_id)
    result = mmr_scores(current, teacher_model, lambda: batches(packed, micro_batch_size, seed=seed, epochs=None),
                        config, LossConfig(weights={"reverse_kl": 1.0}), mil_layout)
    result.update({"model": str(student), "teacher": str(teacher), "data": str(data)})
    return result, save_importance(result, Path(out))
