"""MIL-Mamba-Replacement (MMR) probes: which remaining attention layer is cheapest to replace next.

Beyond the first bulk conversion, layers that LOO calls unimportant one at a time become critical
in combination (Apriel-H1). MMR asks the current hybrid directly: for each remaining attention
layer, MIL-initialise a mixer there, distil a short probe, and record the distillation loss it
reaches. Layers whose probes end lowest are replaced first.
"""

import time

from hybridize.convert.surgery import build_hybrid
from hybridize.distill.trainer import Trainer


def mmr_scores(model, teacher, make_batches, train_config, loss_spec, mil_layout="apriel", candidates=None,
               tail=0.25, progress=None) -> dict:
    """Probe every attention layer of `model` (a hybrid); the score is the mean loss of the last
    `tail` fraction of the probe's steps (a single final step is too noisy to rank by).

    `make_batches()` returns a fresh batch iterator, so every probe sees the same data.
    """
    kinds = list(model.config.mixer_types)
    candidates = [i for i in (candidates or range(len(kinds))) if kinds[i] == "attention"]
    scores, started = {}, time.time()
    for layer in candidates:
        probe_kinds = list(kinds)
        probe_kinds[layer] = "mamba"
        device = next(model.parameters()).device
        probe = build_hybrid(model, probe_kinds, mil_layout=mil_layout, seed=train_config.seed).to(device)
        result = Trainer(probe, teacher, train_config, loss_spec).train(make_batches())
        losses = result.losses[-max(1, int(len(result.losses) * tail)) :]
        scores[layer] = sum(losses) / len(losses)
        del probe
        if progress is not None:
            progress(layer, scores[layer])
    return {
        "method": "mmr",
        "metric": "distill_loss",
        "probe_steps": train_config.steps,
        "scores": {str(i): s for i, s in scores.items()},
        "ranking": sorted(candidates, key=lambda i: scores[i]),
        "seconds": round(time.time() - started, 1),
    }
