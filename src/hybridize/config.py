"""Recipe and training options as pydantic models, and the recipe loader.

Every model forbids unknown fields, so a typo is an error that names its place and the nearest
valid name ("unknown field 'lerning_rate' in stages[1].train; did you mean 'lr'?") instead of a
setting silently left at its default. `load_recipe` reads YAML, applies `--set key=value`
overrides and turns any validation failure into one UserError sentence.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hybridize.data.sources import DEFAULT_TASKS
from hybridize.data.synthetic import TASKS
from hybridize.distill.losses import LossSpec
from hybridize.errors import UserError


TEACHER_DIR = "teacher"
"""The run directory's folder of the fine-tuned teacher (recipe teacher_sft), which no stage may take."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Names users bring from other trainers, mapped to ours: a misspelt alias still finds a suggestion.
    aliases: ClassVar[dict[str, str]] = {}


class TrainConfig(_Strict):
    """One training run: distillation, SFT or an MMR probe.

    The budget is `steps` or `tokens` (input tokens over all processes; converted to steps with
    micro_batch_size * grad_accum * seq_len * world size), because the LR schedule needs its
    length up front.
    """

    aliases: ClassVar[dict[str, str]] = {
        "learning_rate": "lr",
        "max_steps": "steps",
        "num_steps": "steps",
        "batch_size": "micro_batch_size",
        "per_device_train_batch_size": "micro_batch_size",
        "gradient_accumulation_steps": "grad_accum",
        "max_seq_len": "seq_len",
        "seq_length": "seq_len",
        "max_length": "seq_len",
        "warmup": "warmup_steps",
        "max_grad_norm": "grad_clip",
        "clip_grad": "grad_clip",
        "gradient_checkpointing": "activation_checkpointing",
        "logging_steps": "log_every",
        "save_steps": "save_every",
        "min_lr": "min_lr_ratio",
    }

    steps: Optional[int] = Field(None, ge=1)
    tokens: Optional[int] = Field(None, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(2048, ge=2)
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    seed: int = 0
    bf16: Literal["auto", True, False] = "auto"
    activation_checkpointing: Union[bool, int] = Field(
        False, description="recompute decoder layers in backward: true for all, N for the first N only")
    compile: bool = Field(False, description="torch.compile the layers' norms, MLPs and attention (CUDA)")
    freeze: Union[Literal["none", "non_mixers"], list[str]] = "none"
    log_every: int = Field(10, ge=1)
    save_every: int = Field(0, ge=0, description="steps between resumable states; 0: only at the end")

    @field_validator("activation_checkpointing")
    @classmethod
    def _layer_count(cls, v):
        if not isinstance(v, bool) and v < 0:
            raise ValueError(f"activation_checkpointing takes true, false or a number of layers >= 0, got {v}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps or tokens")
        return self

    def total_steps(self, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.micro_batch_size * self.grad_accum * self.seq_len * world_size))

    def use_bf16(self, device_type: str) -> bool:
        return device_type == "cuda" if self.bf16 == "auto" else self.bf16


class LossConfig(LossSpec):
    """A stage's loss: a LossSpec. In YAML either a name (`loss: reverse_kl`) or the full mapping
    (`loss: {weights: {reverse_kl: 1.0, ce: 0.1}, temperature: 1.0}`)."""

    aliases: ClassVar[dict[str, str]] = {"mix": "weights", "loss_weights": "weights", "beta": "jsd_beta",
                                         "temp": "temperature", "t": "temperature"}


STAGE_KINDS = ("distill", "sft")
SELECTIONS = ("loo", "mmr", "explicit", "random", "reverse")


class StageConfig(_Strict):
    """One stage of a recipe.

    A `distill` stage first raises the number of mixer layers to its target (`count` or
    `fraction` of all layers, chosen by `select`; or the explicit `layers`), then distils the
    teacher into the result. An `sft` stage converts nothing and fine-tunes the current model
    (loss `ce` unless given). `probe_steps` is the length of each MMR probe. A stage starts from
    the previous stage's model, or from the earlier stage named by `start` (a branch, e.g. an SFT
    of a middle checkpoint while later stages go on from it).
    """

    aliases: ClassVar[dict[str, str]] = {"type": "kind", "target": "count", "selection": "select",
                                         "method": "select", "training": "train", "objective": "loss"}

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["distill", "sft"] = "distill"
    count: Optional[int] = Field(None, ge=1)
    fraction: Optional[float] = Field(None, gt=0, le=1)
    select: Optional[Literal["loo", "mmr", "explicit", "random", "reverse"]] = None
    layers: Optional[list[int]] = None
    start: Optional[str] = Field(None, description="an earlier stage to start from (default: the previous one)")
    data: Optional["DataSource"] = Field(None, description="training rows of this stage (default: data.train)")
    probe_steps: int = Field(100, ge=1)
    loss: LossConfig
    train: TrainConfig

    @model_validator(mode="before")
    @classmethod
    def _default_loss(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            loss = data.get("loss", "ce" if data.get("kind") == "sft" else "reverse_kl")
            data["loss"] = {"weights": loss} if isinstance(loss, str) else loss
        return data

    @model_validator(mode="after")
    def _target_fits_kind(self):
        given = [name for name in ("count", "fraction", "layers") if getattr(self, name) is not None]
        if self.kind == "sft":
            if given or self.select is not None:
                raise ValueError(f"an sft stage converts no layers; remove {', '.join(given) or 'select'}")
            return self
        if self.select is None:
            self.select = "explicit" if self.layers is not None else "loo"
        if self.select == "explicit":
            if given != ["layers"]:
                raise ValueError("select: explicit needs `layers` (a list of layer indices) and no count or fraction")
        elif given not in (["count"], ["fraction"]):
            raise ValueError(f"select: {self.select} needs exactly one of count or fraction (layers only with "
                             "select: explicit)")
        return self


class SyntheticSource(_Strict):
    """Built-in reasoning tasks (data.sources.synthetic_rows): `n` rows in all, split evenly over
    `tasks`; `knobs` maps a task to its generator options."""

    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS), min_length=1)
    n: int = Field(ge=1)
    seed: int = 0
    knobs: dict[str, dict[str, int]] = {}

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v):
        for task in v:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}{_did_you_mean(task, TASKS)}; valid: {', '.join(TASKS)}")
        return v

    @model_validator(mode="after")
    def _knobs_of_listed_tasks(self):
        stray = sorted(set(self.knobs) - set(self.tasks))
        if stray:
            raise ValueError(f"knobs given for {stray}, which are not in tasks {self.tasks}")
        return self


class GenericSource(_Strict):
    """`n` non-reasoning prompts (data.generic): writing and explaining everyday topics, no answers."""

    n: int = Field(ge=1)
    seed: int = 0


class GeneratedSource(_Strict):
    """Completions that the run's teacher samples for `prompts`, once per run (cached under
    run_dir/data/). With `verify` (prompts with answers) only those whose answer verifies are kept,
    as `hybridize data generate` does; without, every completion that ended its turn."""

    prompts: "DataSource"
    n_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    verify: bool = True


class DataSource(_Strict):
    """A file or saved dataset (`path`), built-in `synthetic` tasks, `generic` prompts, or the
    teacher's `generated` completions of one of those. A bare string is a path."""

    path: Optional[str] = None
    synthetic: Optional[SyntheticSource] = None
    generic: Optional[GenericSource] = None
    generated: Optional[GeneratedSource] = None

    @model_validator(mode="before")
    @classmethod
    def _string_is_path(cls, data):
        return {"path": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_kind(self):
        given = [name for name in ("path", "synthetic", "generic", "generated") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of path, synthetic, generic or generated")
        return self


GeneratedSource.model_rebuild()


StageConfig.model_rebuild()  # its `data` refers to DataSource, defined above


class DataConfig(_Strict):
    aliases: ClassVar[dict[str, str]] = {"validation": "eval", "test": "eval", "training": "train"}

    train: DataSource
    eval: Optional[DataSource] = None


class EvalConfig(_Strict):
    """Generation settings of the per-stage evaluation."""

    max_new_tokens: int = Field(512, ge=1)
    batch_size: int = Field(16, ge=1)
    limit: Optional[int] = Field(None, ge=1, description="evaluate at most this many rows")
    teacher: bool = Field(True, description="also evaluate the teacher (teacher_eval.json); off when another run "
                                            "of the same teacher and eval rows already did")


class TeacherSFTConfig(_Strict):
    """Fine-tune the teacher itself before any conversion (e.g. a base model into a reasoning
    teacher on the built-in tasks); every stage then distils from the fine-tuned teacher."""

    data: Optional[DataSource] = Field(None, description="training rows (default: data.train)")
    loss: LossConfig = Field(default_factory=lambda: LossConfig(weights="ce"))
    train: TrainConfig

    @field_validator("loss", mode="before")
    @classmethod
    def _name_is_mix(cls, v):
        return {"weights": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _labels_only(self):
        if self.loss.needs_teacher:
            raise ValueError("teacher_sft trains the teacher on labels; its loss can only be ce")
        return self


class RecipeConfig(_Strict):
    """A whole staged conversion. `seed` seeds every stage and synthetic source that sets none itself.

    `student` starts the first stage from an existing hybrid checkpoint of the teacher instead of
    the teacher itself; `mixer_init: random` gives new Mamba layers fresh weights instead of MIL.
    """

    aliases: ClassVar[dict[str, str]] = {"model": "teacher", "dataset": "data", "mixer_type": "mixer",
                                         "layout": "mil_layout", "evaluation": "eval", "init": "mixer_init",
                                         "start_from": "student", "teacher_finetune": "teacher_sft"}

    teacher: str
    teacher_sft: Optional[TeacherSFTConfig] = None
    student: Optional[str] = None
    data: DataConfig
    mixer: Literal["mamba"] = "mamba"
    mil_layout: Literal["apriel", "aligned"] = "apriel"
    mixer_init: Literal["mil", "random"] = "mil"
    stages: list[StageConfig] = Field(min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _unique_names_and_seeds(self):
        names = [stage.name for stage in self.stages]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(repeated)}")
        if TEACHER_DIR in names:
            raise ValueError(f"'{TEACHER_DIR}' is the fine-tuned teacher's folder; name the stage otherwise")
        for index, stage in enumerate(self.stages):
            if stage.start is not None and stage.start not in names[:index]:
                raise ValueError(f"stage {stage.name!r} starts from {stage.start!r}, which is not an earlier stage")
        if self.data.eval is not None and (self.data.eval.generated or self.data.eval.generic):
            raise ValueError("data.eval needs reference answers: give a path or synthetic tasks")
        if self.teacher_sft is not None and self.teacher_sft.data is None and self.data.train.generated is not None:
            raise ValueError("data.train is generated by the fine-tuned teacher, so teacher_sft needs its own data")
        trainings = [stage.train for stage in self.stages] + ([self.teacher_sft.train] if self.teacher_sft else [])
        for train in trainings:
            if "seed" not in train.model_fields_set:
                train.seed = self.seed
        sources = [self.data.train, self.data.eval, *(stage.data for stage in self.stages),
                   self.teacher_sft.data if self.teacher_sft else None]
        for source in _nested(sources):
            for seeded in (source.synthetic, source.generic):
                if seeded is not None and "seed" not in seeded.model_fields_set:
                    seeded.seed = self.seed
        return self


def _nested(sources):
    """Every source in `sources` and the prompt sources inside `generated` ones."""
    for source in sources:
        while source is not None:
            yield source
            source = source.generated.prompts if source.generated is not None else None


# ---------------------------------------------------------------------------------------
# Loading


def load_recipe(path, overrides: list[str] = ()) -> RecipeConfig:
    """The recipe at `path` with `--set key=value` overrides applied (`stages.1.train.lr=1e-4`).

    Values are read as YAML scalars (`true`, `3`, `[1, 2]`). Data paths must exist.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"recipe {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of fields (teacher, data, stages, ...)")
    for item in overrides:
        apply_override(data, item)
    recipe = validate(RecipeConfig, data, source=f"recipe {path}")
    sources = {"data.train": recipe.data.train, "data.eval": recipe.data.eval,
               **{f"stages[{i}].data": stage.data for i, stage in enumerate(recipe.stages)},
               "teacher_sft.data": recipe.teacher_sft.data if recipe.teacher_sft else None}
    for name, source in sources.items():
        for inner in _nested([source]):
            if inner.path is not None and not Path(inner.path).exists():
                raise UserError(f"recipe {path}: {name} path {inner.path} does not exist")
    return recipe


def apply_override(data: dict, item: str) -> None:
    """Set one dotted `key=value` in nested dicts/lists; missing mappings on the way are created."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set {item!r} must look like key=value, e.g. stages.0.train.lr=1e-4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the recipe"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {key}: {where} is a list of {len(node)} entries; "
                                f"{part!r} is not an index in it")
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise UserError(f"--set {key}: {where} holds the single value {node!r}; set {where} as a whole instead")


def validate(model: type[BaseModel], data, source: str = "config"):
    """`model(**data)`, with a ValidationError turned into one UserError sentence about its first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        errors = error.errors()
        # a misspelt field also shows up as the missing one it was meant to be: report the typo
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise UserError(f"{source}: {_describe(model, first)}") from None


def _describe(model: type[BaseModel], error: dict) -> str:
    names, owner = _resolve(model, error["loc"])
    field = names[-1] if names else ""
    parent = _join(names[:-1])
    if error["type"] == "extra_forbidden":
        where = f" in {parent}" if parent else ""
        return f"unknown field '{field}'{where}{_field_suggestion(field, owner)}"
    if error["type"] == "missing":
        where = f" in {parent}" if parent else ""
        return f"missing required field '{field}'{where}"
    message = error["msg"].removeprefix("Value error, ")
    place = _join(names)
    got = f" (got {error['input']!r})" if not isinstance(error["input"], (dict, list)) else ""
    return f"invalid {place}: {message}{got}" if place else message


def _resolve(model: type[BaseModel], loc) -> tuple[list, type[BaseModel] | None]:
    """The user-facing path of an error location (union tags dropped) and the model holding its last field.

    Walks the location through the models' field annotations; pydantic inserts the member type of
    a union (e.g. "list[str]") into the location, which is not a name the user wrote.
    """
    names: list = []
    current: Any = model
    owner = model
    for item in loc:
        if isinstance(item, int):
            names.append(item)
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            owner = current
            if item in current.model_fields:
                names.append(item)
                current = _inner_model(current.model_fields[item].annotation)
            else:  # an unknown field: the error is about it
                names.append(item)
                current = None
        elif current is dict:
            names.append(item)
        # anything else is a union-member tag
    return names, owner


def _inner_model(annotation):
    """The model class inside `X`, `X | None`, `list[X]`; `dict` for mappings; None otherwise."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = getattr(annotation, "__origin__", None)
    if origin is dict:
        return dict
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _join(names: list) -> str:
    out = ""
    for name in names:
        out += f"[{name}]" if isinstance(name, int) else (f".{name}" if out else name)
    return out


def _did_you_mean(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _field_suggestion(name: str, owner: type[BaseModel] | None) -> str:
    if owner is None:
        return ""
    fields = list(owner.model_fields)
    aliases = getattr(owner, "aliases", {})
    match = difflib.get_close_matches(name, fields + list(aliases), n=1, cutoff=0.6)
    if match:
        return f"; did you mean '{aliases.get(match[0], match[0])}'?"
    return f"; valid fields: {', '.join(fields)}"


def validate_against_model(recipe: RecipeConfig, num_layers: int, initial: int = 0) -> list[int | None]:
    """Check every stage's target against a teacher of `num_layers` layers.

    Returns the total number of mixer layers each stage ends with (None for sft stages; for an
    explicit stage, at least its number of listed layers). Targets must lie in 1..num_layers and
    never fall below the count of the model the stage starts from (`initial` mixers for the first
    stage, e.g. those of a `student` checkpoint): stages only add mixers.
    """
    targets: list[int | None] = []
    counts: dict[str, int] = {}  # stage name -> mixer layers of its model
    current, previous = initial, None
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}] ({stage.name})"
        if stage.start is not None:
            current, previous = counts[stage.start], stage.start
        if stage.kind == "sft":
            targets.append(None)
            counts[stage.name], previous = current, stage.name
            continue
        if stage.select == "explicit":
            bad = [i for i in stage.layers if not 0 <= i < num_layers]
            if bad:
                raise UserError(f"{where}: layer {bad[0]} is out of range; the teacher has layers 0..{num_layers - 1}")
            target = max(current, len(set(stage.layers)))
        else:
            target = stage.count if stage.count is not None else round(stage.fraction * num_layers)
            if not 1 <= target <= num_layers:
                what = f"count {stage.count}" if stage.count is not None else f"fraction {stage.fraction}"
                raise UserError(f"{where}: {what} gives {target} mixer layers, outside 1..{num_layers} for "
                                f"a {num_layers}-layer teacher")
            if target < current:
                start = f"stage {previous}" if previous else "the starting model"
                raise UserError(f"{where}: target {target} mixer layers is below the {current} of {start}; "
                                "stages can only add mixer layers")
        targets.append(target)
        counts[stage.name] = current = target
        previous = stage.name
    return targets
