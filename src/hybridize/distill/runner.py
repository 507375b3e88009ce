"""`hybridize run`: the staged Apriel-H1 recipe, unattended and resumable.

Run directory::

    recipe.yaml           the resolved recipe (a restart with a different recipe is refused)
    state.json            {"completed": [stage names], "tokens": {stage: cumulative distillation tokens}}
    teacher/              with teacher_sft: the fine-tuned teacher (HF directory), its metrics.jsonl
    base_teacher_eval.json  with teacher_sft: the recipe's teacher before fine-tuning
    teacher_eval.json     the accuracy of the teacher the stages distil from, on the eval rows (unless
                          eval.teacher is false)
    importance/           loo.json/png on the teacher; <stage>-mmr.json/png on the hybrid before a stage
    data/                 rows of `generated` data sources, sampled from the teacher once, with their stats
    <stage>/              the stage's checkpoint (HF directory + layers.json), metrics.jsonl,
                          tensorboard/, eval.json (after training and right after conversion)
    .work/<stage>/        selection.json and the trainer's resumable state while the stage runs
    report.md, pareto.png

Every file is written atomically. Started again on the same directory, the run skips completed
stages, reuses a stage's recorded layer choice, and resumes its training from the last saved
step, so an interrupted run ends with the same weights as an uninterrupted one.
"""

import hashlib
import json
import random
import shutil
from pathlib import Path

import yaml

from hybridize.config import TEACHER_DIR, RecipeConfig, TrainConfig, load_recipe, validate_against_model
from hybridize.convert.checkpoint import load_hybrid, save_hybrid, write_json_atomic
from hybridize.convert.surgery import build_hybrid, select_layers
from hybridize.convert.teacher import load_teacher
from hybridize.data.chat import tokenize_rows
from hybridize.data.packing import batches, pack
from hybridize.data.generic import generic_prompts
from hybridize.data.sources import load_rows, synthetic_rows
from hybridize.data.synthetic import write_jsonl
from hybridize.distill.distributed import World, barrier, init_world, joined_world
from hybridize.distill.trainer import METRICS_FILE, TENSORBOARD_DIR, Trainer
from hybridize.errors import UserError
from hybridize.faults import kill_point
from hybridize.importance import save_importance
from hybridize.importance.loo import leave_one_out
from hybridize.importance.mmr import mmr_scores

IMPORTANCE_ROWS = 16  # held-out rows for LOO


def source_rows(source, split):
    """Rows of a recipe data source that needs no model: a path, built-in synthetic tasks or generic prompts."""
    if source.synthetic is not None:
        s = source.synthetic
        return synthetic_rows(tuple(s.tasks), s.n, s.seed, split, s.knobs)
    if source.generic is not None:
        return generic_prompts(source.generic.n, source.generic.seed)
    if source.generated is not None:
        raise ValueError("generated rows come from a run's teacher: use RecipeRun.rows")
    return load_rows(source.path)


class RecipeRun:
    def __init__(self, recipe: RecipeConfig, run_dir, world: World | None = None):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.work = self.run_dir / ".work"
        self.world = world or init_world()
        self.main = self.world.is_main
        self._rows, self._packed = {}, {}  # per source, and per (rows, seq_len): made once per run

    # -- files -------------------------------------------------------------------------

    def _claim_directory(self):
        """Create the run directory, or check that it belongs to this recipe; drop crash leftovers."""
        resolved = yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
        recipe_file = self.run_dir / "recipe.yaml"
        if recipe_file.is_file():
            if recipe_file.read_text() != resolved:
                raise UserError(f"{self.run_dir} holds a run of a different recipe; use a new --out directory")
        elif self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            raise UserError(f"{self.run_dir} is not empty and holds no recipe.yaml; use a new --out directory")
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.run_dir.glob(".*.staging.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if not recipe_file.is_file():
            staging = self.run_dir / ".recipe.yaml.tmp"
            staging.write_text(resolved)
            staging.replace(recipe_file)

    def _state(self):
        path = self.run_dir / "state.json"
        state = json.loads(path.read_text()) if path.is_file() else {"completed": [], "tokens": {}}
        if isinstance(state["tokens"], int):  # written before stages could branch: one running total
            state["tokens"] = {name: state["tokens"] for name in state["completed"][-1:]}
        return state

    def rows(self, source, split):
        """Rows of any recipe data source, made once per run (the same list for every stage that uses
        the source); `generated` ones are sampled from the teacher once and kept in run_dir/data."""
        key = (source.model_dump_json(), split)
        if key not in self._rows:
            self._rows[key] = self._make_rows(source, split)
        return self._rows[key]

    def _make_rows(self, source, split):
        if source.generated is None:
            return source_rows(source, split)
        spec = source.generated
        key = hashlib.sha256(spec.model_dump_json().encode("utf-8")).hexdigest()[:12]
        path = self.run_dir / "data" / f"generated-{split}-{key}.jsonl"
        if not path.is_file() and self.main:
            from hybridize.data.traces import generate_free_text, generate_traces

            sampling = dict(n_per_prompt=spec.n_per_prompt, temperature=spec.temperature, top_p=spec.top_p,
                            max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, seed=self.recipe.seed)
            generate = generate_traces if spec.verify else generate_free_text
            rows, stats = generate(self.teacher, self.tokenizer, self.rows(spec.prompts, split), **sampling)
            if not rows:
                raise UserError(f"the teacher kept none of its {stats['samples']} samples for the generated data "
                                f"source ({stats}); nothing was written")
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(".tmp")
            write_jsonl(rows, staging)
            write_json_atomic(path.with_suffix(".stats.json"), stats)
            staging.replace(path)
        barrier(self.world)
        return load_rows(str(path))

    def _starting_model(self):
        """The recipe's `student` checkpoint, checked against the teacher, or None."""
        if self.recipe.student is None:
            return None
        model, _ = load_hybrid(self.recipe.student, device=self.world.device)
        if model.config.vocab_size != self.teacher.config.vocab_size:
            raise UserError(f"the student {self.recipe.student} has a vocabulary of {model.config.vocab_size} "
                            f"tokens and the teacher {self.recipe.teacher} one of {self.teacher.config.vocab_size}")
        if model.config.num_hidden_layers != self.teacher.config.num_hidden_layers:
            raise UserError(f"the student {self.recipe.student} has {model.config.num_hidden_layers} layers and the "
                            f"teacher {self.recipe.teacher} {self.teacher.config.num_hidden_layers}")
        return model

    def _starting_tokens(self) -> int:
        """Distillation tokens already in the recipe's `student` checkpoint (0 when starting from the teacher)."""
        if self.recipe.student is None:
            return 0
        from hybridize.convert.checkpoint import load_layers_info

        return int(load_layers_info(self.recipe.student).get("tokens") or 0)

    def _write(self, path, data):
        if self.main:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, data)

    # -- pipeline ----------------------------------------------------------------------

    def run(self):
        self._claim_directory()
        recipe = self.recipe
        self.teacher, self.tokenizer = load_teacher(recipe.teacher, device=self.world.device)
        num_layers = self.teacher.config.num_hidden_layers
        start = self._starting_model()
        initial = sum(kind == "mamba" for kind in getattr(start.config, "mixer_types", [])) if start else 0
        targets = validate_against_model(recipe, num_layers, initial)
        self.eval_rows = self.rows(recipe.data.eval, "test") if recipe.data.eval is not None else []

        state = self._state()
        if recipe.teacher_sft is not None:
            self._finetune_teacher(state)
        self.train_rows = self.rows(recipe.data.train, "train")  # may be generated by the fine-tuned teacher
        if not self.train_rows:
            raise UserError("the training data has no usable rows")
        self._teacher_eval()

        current, previous = start or self.teacher, None
        for stage, target in zip(recipe.stages, targets):
            if stage.name in state["completed"]:
                current, previous = None, stage.name  # loaded only if a later stage starts from it
                continue
            origin = stage.start or previous
            if stage.start is not None or current is None:
                current, _ = load_hybrid(self.run_dir / origin, device=self.world.device)
            base_tokens = state["tokens"].get(origin, 0) if origin else self._starting_tokens()
            current = self._run_stage(stage, target, current, state, base_tokens)
            previous = stage.name
            state["completed"].append(stage.name)
            self._write(self.run_dir / "state.json", state)
            if self.main:
                shutil.rmtree(self.work / stage.name, ignore_errors=True)
            barrier(self.world)
            kill_point(f"stage-done:{stage.name}")
        if self.main:
            from hybridize.report import build_report

            return build_report(self.run_dir)
        return None

    def _teacher_eval(self):
        path = self.run_dir / "teacher_eval.json"
        if not self.eval_rows or not self.recipe.eval.teacher or path.is_file() or not self.main:
            return
        from hybridize.evaluate.evaluator import evaluate

        result = evaluate(self.teacher, self.tokenizer, self.eval_rows, **self._eval_settings())
        self._write(path, result)

    def _eval_settings(self):
        e = self.recipe.eval
        return {"max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size, "limit": e.limit}

    def _batches(self, train: TrainConfig, rows=None):
        rows = rows or self.train_rows
        key = (id(rows), train.seq_len)  # rows lists live in self._rows for the whole run
        if key not in self._packed:  # tokenising is slow (a chat template per row): once per run
            examples, _ = tokenize_rows(rows, self.tokenizer, max_length=train.seq_len)
            self._packed[key] = pack(examples, train.seq_len, pad_id=self.tokenizer.pad_token_id)
        packed = self._packed[key]
        if not packed:
            raise UserError("the training data produced no trainable tokens")
        return lambda: batches(packed, train.micro_batch_size, seed=train.seed, epochs=None)

    def _finetune_teacher(self, state):
        """recipe.teacher_sft: fine-tune the teacher on labels, save it to run_dir/teacher, use it from then on."""
        folder = self.run_dir / TEACHER_DIR
        if TEACHER_DIR not in state["completed"]:
            sft = self.recipe.teacher_sft
            if self.eval_rows and self.main and not (self.run_dir / "base_teacher_eval.json").is_file():
                from hybridize.evaluate.evaluator import evaluate

                base = evaluate(self.teacher, self.tokenizer, self.eval_rows, **self._eval_settings())
                self._write(self.run_dir / "base_teacher_eval.json", base)
            barrier(self.world)
            layers = self.teacher.config.num_hidden_layers
            model = build_hybrid(self.teacher, ["attention"] * layers, seed=sft.train.seed).to(self.world.device)
            work = self.work / TEACHER_DIR
            trainer = Trainer(model, None, sft.train, sft.loss, out_dir=work / "train", world=self.world)
            trainer.resume()
            rows = self.rows(sft.data or self.recipe.data.train, "train")
            result = trainer.train(self._kill_points(TEACHER_DIR, self._batches(sft.train, rows)()))
            model = trainer.full_student()
            if self.main:
                info = {"stage": TEACHER_DIR, "kind": "teacher_sft", "base_teacher": self.recipe.teacher,
                        "sft_tokens": result.tokens, "sft_steps": result.steps,
                        "mixer_types": ["attention"] * layers, "selection": "none", "new_layers": []}
                extra = {METRICS_FILE: work / "train" / METRICS_FILE, TENSORBOARD_DIR: work / "train" / TENSORBOARD_DIR}
                save_hybrid(model, self.tokenizer, folder, layers_info=info, overwrite=True, extra=extra)
            state["completed"].append(TEACHER_DIR)
            self._write(self.run_dir / "state.json", state)
            if self.main:
                shutil.rmtree(work, ignore_errors=True)
            barrier(self.world)
            kill_point(f"stage-done:{TEACHER_DIR}")
        self.teacher, _ = load_hybrid(folder, device=self.world.device)
        self.teacher.eval().requires_grad_(False)

    def _run_stage(self, stage, target, current, state, base_tokens):
        work = self.work / stage.name
        selection_file = work / "selection.json"
        if selection_file.is_file():
            selection = json.loads(selection_file.read_text())
        else:
            selection = self._select(stage, target, current)
            self._write(selection_file, selection)
        barrier(self.world)
        kinds = selection["mixer_types"]
        student = build_hybrid(current, kinds, mil_layout=self.recipe.mil_layout, mixer_init=self.recipe.mixer_init,
                               seed=stage.train.seed)
        student = student.to(self.world.device)

        init_metrics = None
        if self.eval_rows and stage.kind == "distill" and self.main:
            init_metrics = self._teacher_forced(student)

        trainer = Trainer(student, self.teacher, stage.train, stage.loss, out_dir=work / "train", world=self.world)
        trainer.resume()
        rows = self.rows(stage.data, "train") if stage.data is not None else None
        result = trainer.train(self._kill_points(stage.name, self._batches(stage.train, rows)()))
        model = trainer.full_student()
        tokens = base_tokens + result.tokens
        if self.main:
            teacher = str(self.run_dir / TEACHER_DIR) if self.recipe.teacher_sft else self.recipe.teacher
            info = {"stage": stage.name, "kind": stage.kind, "teacher": teacher, "start": stage.start,
                    "mil_layout": self.recipe.mil_layout, "mixer_init": self.recipe.mixer_init, "tokens": tokens,
                    **selection}
            extra = {METRICS_FILE: work / "train" / METRICS_FILE, TENSORBOARD_DIR: work / "train" / TENSORBOARD_DIR}
            save_hybrid(model, self.tokenizer, self.run_dir / stage.name, layers_info=info, overwrite=True, extra=extra)
            evaluation = {"tokens": tokens, "steps": result.steps, "final_loss": result.final_loss}
            if self.eval_rows:
                from hybridize.evaluate.evaluator import evaluate

                evaluation.update(evaluate(model, self.tokenizer, self.eval_rows, teacher=self.teacher,
                                           teacher_accuracy=False, **self._eval_settings()))
                if init_metrics is not None:
                    evaluation["teacher_forced_at_init"] = init_metrics
            self._write(self.run_dir / stage.name / "eval.json", evaluation)
        state["tokens"][stage.name] = tokens
        barrier(self.world)
        return model if model is not None else student

    def _kill_points(self, stage_name, stream):
        for index, batch in enumerate(stream):
            kill_point(f"batch:{stage_name}:{index}")
            yield batch

    def _teacher_forced(self, model):
        from hybridize.evaluate.evaluator import teacher_forced_metrics

        rows = self.eval_rows[: self.recipe.eval.limit] if self.recipe.eval.limit else self.eval_rows
        return teacher_forced_metrics(model, self.teacher, self.tokenizer, rows)

    # -- layer choice ------------------------------------------------------------------

    def _select(self, stage, target, current):
        """The stage's mixer layout and how it was chosen (with the scores it was chosen by)."""
        kinds = list(getattr(current.config, "mixer_types", ["attention"] * current.config.num_hidden_layers))
        existing = [i for i, kind in enumerate(kinds) if kind == "mamba"]
        num_layers = len(kinds)
        if stage.kind == "sft":
            return {"mixer_types": kinds, "selection": "none", "new_layers": []}
        scores = None
        if stage.select == "explicit":
            chosen, _ = select_layers(num_layers, layers=stage.layers, current=existing)
        else:
            if stage.select in ("loo", "reverse"):
                result = self._loo()
                ranking = result["ranking"] if stage.select == "loo" else result["ranking"][::-1]
            elif stage.select == "mmr":
                result = self._mmr(stage, current)
                ranking = result["ranking"]
            else:  # random placement, a baseline for ablations
                ranking = [i for i in range(num_layers) if kinds[i] == "attention"]
                random.Random(stage.train.seed).shuffle(ranking)
                result = None
            scores = result["scores"] if result else None
            chosen, _ = select_layers(num_layers, count=target, ranking=ranking, current=existing)
        for index in chosen:
            kinds[index] = self.recipe.mixer
        return {"mixer_types": kinds, "selection": stage.select, "scores": scores,
                "new_layers": [i for i in chosen if i not in existing]}

    def _held_out_batches(self, window=512, rows=IMPORTANCE_ROWS):
        source = self.eval_rows or self.train_rows
        examples, _ = tokenize_rows(source[:rows], self.tokenizer, max_length=window)
        return batches(pack(examples, window, pad_id=self.tokenizer.pad_token_id), 4, shuffle=False)

    def _loo(self):
        path = self.run_dir / "importance" / "loo.json"
        if path.is_file():
            return json.loads(path.read_text())
        twin = build_hybrid(self.teacher, ["attention"] * self.teacher.config.num_hidden_layers)
        result = leave_one_out(twin.to(self.world.device), self._held_out_batches())
        if self.main:
            save_importance(result, path)
        return result

    def _mmr(self, stage, current):
        path = self.run_dir / "importance" / f"{stage.name}-mmr.json"
        if path.is_file():
            return json.loads(path.read_text())
        probe = stage.train.model_copy(update={"steps": stage.probe_steps, "tokens": None, "save_every": 0,
                                               "warmup_steps": min(stage.train.warmup_steps, stage.probe_steps)})
        make_batches = self._batches(probe, self.rows(stage.data, "train") if stage.data is not None else None)
        result = mmr_scores(current, self.teacher, make_batches, probe, stage.loss, self.recipe.mil_layout)
        if self.main:
            save_importance(result, path)
        return result


def run(recipe_path, run_dir, overrides=()):
    """Run (or resume) every stage of the recipe in `run_dir`; returns the report paths on rank 0."""
    recipe = load_recipe(recipe_path, overrides)
    with joined_world() as world:
        return RecipeRun(recipe, run_dir, world).run()


def distill_stage(teacher, student, data, out, loss="reverse_kl", overwrite=False, **train_options):
    """`hybridize distill`: one distillation stage of an existing hybrid checkpoint, saved to `out`."""
    from hybridize.config import LossConfig, validate
    from hybridize.convert.checkpoint import check_output_dir, load_layers_info

    check_output_dir(out, overwrite)
    with joined_world() as world:
        train = validate(TrainConfig, {k: v for k, v in train_options.items() if v is not None}, source="options")
        spec = validate(LossConfig, {"weights": {name: 1.0 for name in loss.split("+")}}, source="--loss")
        teacher_model, tokenizer = load_teacher(teacher, device=world.device)
        student_model, _ = load_hybrid(student, device=world.device)
        if student_model.config.vocab_size != teacher_model.config.vocab_size:
            raise UserError(f"the student {student} has a vocabulary of {student_model.config.vocab_size} tokens "
                            f"and the teacher {teacher} one of {teacher_model.config.vocab_size}; distil from the "
                            "model it was converted from")
        rows = load_rows(data, split="train")
        examples, _ = tokenize_rows(rows, tokenizer, max_length=train.seq_len)
        packed = pack(examples, train.seq_len, pad_id=tokenizer.pad_token_id)
        if not packed:
            raise UserError(f"{data} produced no trainable tokens")
        work = Path(out).parent / f".{Path(out).name}.train"
        trainer = Trainer(student_model, teacher_model, train, spec, out_dir=work, world=world)
        trainer.resume()
        result = trainer.train(batches(packed, train.micro_batch_size, seed=train.seed, epochs=None))
        model = trainer.full_student()
        if world.is_main:
            info = {**load_layers_info(student), "distilled_from": str(teacher), "data": str(data),
                    "tokens": result.tokens, "steps": result.steps}
            save_hybrid(model, tokenizer, out, layers_info=info, overwrite=overwrite,
                        extra={METRICS_FILE: work / METRICS_FILE, TENSORBOARD_DIR: work / TENSORBOARD_DIR})
            shutil.rmtree(work, ignore_errors=True)
        return result


__all__ = ["RecipeRun", "distill_stage", "run", "source_rows"]
