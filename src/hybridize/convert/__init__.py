"""Teacher loading, layer surgery with MIL init, and hybrid checkpoints."""

import json
from pathlib import Path

import torch

from hybridize.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_ranking(path) -> list[int]:
    """Layer indices, least important first, from an importance JSON (`{"ranking": [...], ...}`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ranking file {path} does not exist")
    try:
        ranking = json.loads(path.read_text())["ranking"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"ranking file {path} is not JSON with a 'ranking' list of layer indices") from None
    if not isinstance(ranking, list) or not all(isinstance(i, int) for i in ranking):
        raise UserError(f"ranking file {path}: 'ranking' must be a list of layer indices")
    return ranking


def convert(teacher, out, layers=None, count=None, fraction=None, ranking=None, mixer="mamba",
            mil_layout="apriel", mixer_init="mil", dtype="float32", overwrite=False, seed=0):
    """Convert `teacher` (path, .gguf or built-in name) into a hybrid saved at `out`; returns the model."""
    from hybridize.convert.checkpoint import check_output_dir, save_hybrid
    from hybridize.convert.surgery import MIL_LAYOUTS, build_hybrid, select_layers
    from hybridize.convert.teacher import load_teacher, teacher_model_type

    if mixer != "mamba":
        raise UserError(f"unknown mixer {mixer!r}; valid: mamba")
    if mil_layout not in MIL_LAYOUTS:
        raise UserError(f"unknown MIL layout {mil_layout!r}; valid: {', '.join(MIL_LAYOUTS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    check_output_dir(out, overwrite)
    teacher_model_type(str(teacher))
    order = read_ranking(ranking) if ranking is not None else None
    source, tokenizer = load_teacher(str(teacher))
    kinds = list(getattr(source.config, "mixer_types", ["attention"] * source.config.num_hidden_layers))
    current = [i for i, kind in enumerate(kinds) if kind == "mamba"]
    chosen, how = select_layers(source.config.num_hidden_layers, layers, count, fraction, order, current)
    for index in chosen:
        if kinds[index] == "identity":
            raise UserError(f"layer {index} is an identity layer and cannot become a mixer")
        kinds[index] = mixer
    hybrid = build_hybrid(source, kinds, mil_layout=mil_layout, mixer_init=mixer_init, seed=seed)
    info = {
        "teacher": str(teacher),
        "selection": how,
        "ranking_file": str(ranking) if ranking is not None else None,
        "new_layers": [i for i in chosen if i not in current],
        "mixer_init": mixer_init,
        "mil_layout": mil_layout,
    }
    save_hybrid(hybrid, tokenizer, out, layers_info=info, overwrite=overwrite, dtype=DTYPES[dtype])
    return hybrid
