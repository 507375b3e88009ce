"""One trainer for distillation, SFT and short MMR probes.

Batches are dicts of [micro_batch, seq] tensors: `input_ids`, `position_ids` (a 0 starts a new
packed document), `labels` (the next-token target of each position, -100 where there is none)
and `loss_mask` (which positions are trained); an `attention_mask` is passed on when present.
Hidden state i is scored against labels[i], so nothing is shifted here. A position counts when
its loss_mask is set and it has a target.

Each optimizer step consumes `grad_accum` micro-batches per process. Their losses are divided by
the masked-token count of the whole step (all micro-batches on all processes, all-reduced before
the forward), so accumulation and data parallelism give the token mean of the global batch, not a
mean of per-micro-batch means.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from hybridize.distill import distributed
from hybridize.distill.compile import compile_layers
from hybridize.distill.distributed import World
from hybridize.distill.losses import IGNORE_INDEX, LossSpec, distillation_loss
from hybridize.errors import UserError

if TYPE_CHECKING:  # hybridize.config imports this package (for LossSpec)
    from hybridize.config import TrainConfig

logger = logging.getLogger(__name__)

STATE_DIR = "state"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_loss: float
    losses: list[float] = field(default_factory=list)


class DistillationObjective(nn.Module):
    """The student, the teacher (None for SFT) and the chunked loss of one micro-batch.

    One module because under FSDP2 it is the root unit: the loss reads the full lm_head weights,
    and those are gathered only inside a unit's forward (see distributed.shard_objective).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, spec: LossSpec):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.spec = spec

    def forward(self, batch: dict, num_tokens: torch.Tensor):
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": batch.get("attention_mask"),
            "use_cache": False,
        }
        labels = batch["labels"]
        teacher_hidden = teacher_head = None
        if self.teacher is not None:
            if isinstance(self.teacher, FSDPModule):
                self.teacher.unshard()  # its embeddings, final norm and lm_head
            with torch.no_grad():
                teacher_hidden = self.teacher.model(**inputs).last_hidden_state
            teacher_head = self.teacher.lm_head
        hidden = self.student.model(**inputs).last_hidden_state
        if torch.is_autocast_enabled(hidden.device.type):
            # fp32 weights leave the final norm's output in fp32; the loss's vocabulary matmuls run
            # in its input dtype, so cast as autocast would (fp32 there cost +63% step time at 1B)
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden = hidden.to(dtype)
            if teacher_hidden is not None:
                teacher_hidden = teacher_hidden.to(dtype)
        head = self.student.lm_head
        loss, stats = distillation_loss(
            hidden,
            head.weight,
            teacher_hidden,
            teacher_head.weight if teacher_head is not None else None,
            trained_positions(batch),
            self.spec,
            labels=labels if "ce" in self.spec.weights else None,
            num_tokens=num_tokens,
            student_head_bias=head.bias,
            teacher_head_bias=teacher_head.bias if teacher_head is not None else None,
        )
        if isinstance(self.teacher, FSDPModule):
            self.teacher.reshard()
        return loss, stats


def trained_positions(batch: dict) -> torch.Tensor:
    """Positions that count: in the loss mask and with a target."""
    return batch["loss_mask"].bool() & (batch["labels"] != IGNORE_INDEX)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


_MIXER_PARAM = re.compile(r"^model\.layers\.(\d+)\.mixer\.")


def trainable_names(student: nn.Module, freeze) -> set[str]:
    """Names of the parameters that train under `freeze` ("none", "non_mixers" or globs to freeze)."""
    names = [name for name, _ in student.named_parameters()]
    if freeze == "none":
        return set(names)
    if freeze == "non_mixers":
        kinds = list(getattr(student.config, "mixer_types", []))
        keep = set()
        for name in names:
            match = _MIXER_PARAM.match(name)
            if match and kinds[int(match.group(1))] == "mamba":
                keep.add(name)
        if not keep:
            raise UserError("freeze: non_mixers leaves nothing to train; the student has no mamba layers")
        return keep
    for glob in freeze:
        if not any(fnmatch(name, glob) for name in names):
            raise UserError(f"freeze pattern {glob!r} matches no parameter; names look like {names[0]!r}")
    keep = {name for name in names if not any(fnmatch(name, glob) for glob in freeze)}
    if not keep:
        raise UserError(f"freeze patterns {freeze} cover every parameter; nothing is left to train")
    return keep


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], config: TrainConfig, device: torch.device):
    """AdamW; matrices decay, while biases, norms, D and A_log (a log-rate, not a weight) do not."""
    decays = {name: p.ndim >= 2 and not name.endswith("A_log") for name, p in named_params}
    groups = [
        {"params": [p for name, p in named_params if decays[name]], "weight_decay": config.weight_decay},
        {"params": [p for name, p in named_params if not decays[name]], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=config.lr,
        betas=config.betas,
        fused=device.type in ("cuda", "cpu"),  # single-kernel update where torch has one
    )


class Trainer:
    """Trains `student` in place against `teacher` (or on labels alone when the loss is CE-only).

    Under torchrun the models are sharded with FSDP2 here; pass the models on the process's
    device (see distributed.init_world). With `out_dir`, rank 0 writes `metrics.jsonl`,
    TensorBoard events under `tensorboard/` and the resumable state under `state/`.
    """

    def __init__(self, student, teacher, train_config: TrainConfig, loss_spec: LossSpec, out_dir=None,
                 world: World | None = None):
        if loss_spec.needs_teacher and teacher is None:
            raise UserError(f"the loss {sorted(loss_spec.weights)} needs a teacher")
        self.config = train_config
        self.spec = loss_spec
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = next(student.parameters()).device
        self.world = world or distributed.current_world(self.device)
        self.bf16 = train_config.use_bf16(self.device.type)
        self.total_steps = train_config.total_steps(self.world.size)
        torch.manual_seed(train_config.seed)

        if not loss_spec.needs_teacher:
            teacher = None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        keep = trainable_names(student, train_config.freeze)
        for name, param in student.named_parameters():
            param.requires_grad_(name in keep)
        student.train()
        checkpointing = train_config.activation_checkpointing  # True: every layer; N > 0: the first N
        if checkpointing:
            student.model.gradient_checkpointing = True
            student.model.checkpoint_layers = None if checkpointing is True else checkpointing
        if train_config.compile:
            compile_layers(student, teacher)

        self.student = student
        self.objective = DistillationObjective(student, teacher, loss_spec)
        if self.world.sharded:
            distributed.shard_objective(self.objective)
        self.params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, train_config, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, train_config.warmup_steps, self.total_steps, train_config.min_lr_ratio),
        )
        self.step = 0
        self.tokens = 0
        self.micro_batches = 0  # consumed by this rank: the data position
        self.losses: list[float] = []
        self._saved_step = None  # the step of the state last written or read

    # ---------------------------------------------------------------------------------
    # Training

    def train(self, batches: Iterable[dict]) -> TrainResult:
        """Run until the configured number of steps; returns all steps' losses, earlier runs' included.

        `batches` is the global stream of micro-batches, the same on every rank and from its
        start on every run: each rank keeps its share, and after `load_state` the micro-batches
        already consumed are skipped, so a resumed run sees exactly the data it would have seen.
        """
        stream = distributed.shard_batches(batches, self.world)
        stream = itertools.islice(stream, self.micro_batches, None)
        metrics = _Metrics(self.out_dir, self.world, self.step, self.total_steps)
        try:
            while self.step < self.total_steps:
                micro = list(itertools.islice(stream, self.config.grad_accum))
                if not self._train_step(micro, metrics):
                    logger.warning("the data ran out after %d of %d steps", self.step, self.total_steps)
                    break
                if self.out_dir is not None and self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_state(self.out_dir / STATE_DIR)
        finally:
            metrics.close()
        if self.out_dir is not None and self._saved_step != self.step:
            self.save_state(self.out_dir / STATE_DIR)
        final = self.losses[-1] if self.losses else float("nan")
        return TrainResult(self.step, self.tokens, final, list(self.losses))

    def _train_step(self, micro: list[dict], metrics: _Metrics) -> bool:
        """One optimizer step over `micro`; False (nothing done) when any rank ran short of data."""
        micro = [{k: v.to(self.device) for k, v in batch.items()} for batch in micro]
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in micro:
            counts[0] += trained_positions(batch).sum()
            counts[1] += batch["input_ids"].numel()
        counts[2] = len(micro) < self.config.grad_accum
        distributed.all_reduce_sum(counts, self.world)
        if counts[2] > 0:
            return False
        num_tokens = counts[0]
        started = time.perf_counter()

        names = list(self.spec.weights)
        totals = torch.zeros(1 + 2 * len(names), dtype=torch.float64, device=self.device)
        for batch in micro:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss, stats = self.objective(batch, num_tokens)
            loss.backward()
            totals[0] += loss.detach()
            for i, name in enumerate(names):
                totals[1 + 2 * i] += stats[name]["sum"]
                totals[2 + 2 * i] += stats[name]["tokens"]
        distributed.all_reduce_sum(totals, self.world)

        grads = [p.grad for _, p in self.params if p.grad is not None]
        norm = distributed.full_tensor(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())
        summary = torch.cat([totals, norm.to(self.device, torch.float64).reshape(1)]).tolist()  # one sync
        loss_value, grad_norm = summary[0], summary[-1]
        step = self.step + 1
        if not math.isfinite(loss_value):
            raise UserError(f"non-finite loss ({loss_value}) at step {step}; nothing was updated or saved, so lower "
                            "the learning rate or check the data and resume from the last state")
        if not math.isfinite(grad_norm):
            raise UserError(f"non-finite gradient norm at step {step}; nothing was updated or saved, so lower the "
                            "learning rate or check the data and resume from the last state")
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_([p for _, p in self.params], self.config.grad_clip, norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.step = step
        self.tokens += int(counts[1])
        self.micro_batches += len(micro)
        self.losses.append(loss_value)
        components = {name: summary[1 + 2 * i] / max(summary[2 + 2 * i], 1) for i, name in enumerate(names)}
        metrics.update(step, self.tokens, loss_value, components, lr, grad_norm, int(counts[1]),
                       time.perf_counter() - started, self.config.log_every)
        return True

    # ---------------------------------------------------------------------------------
    # Resumable state

    def save_state(self, path) -> None:
        """Write weights, optimizer, scheduler, RNG and position to `path`, atomically (all ranks call)."""
        path = Path(path)
        model_state, optim_state = distributed.full_state(self.student, self.optimizer)
        if self.world.is_main:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staging."))
            try:
                save_file(_unshared(model_state), staging / "model.safetensors")
                torch.save({"optimizer": optim_state, "scheduler": self.scheduler.state_dict()},
                           staging / "optimizer.pt")
                torch.save(_rng_state(), staging / "rng.pt")
                info = {"step": self.step, "tokens": self.tokens, "losses": self.losses,
                        "micro_batches": self.micro_batches * self.world.size,  # of the global stream
                        "micro_batches_per_step": self.config.grad_accum * self.world.size,
                        "micro_batch_size": self.config.micro_batch_size, "world_size": self.world.size}
                (staging / "trainer.json").write_text(json.dumps(info) + "\n")
                _replace_dir(staging, path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self._saved_step = self.step
        distributed.barrier(self.world)

    def load_state(self, path) -> None:
        """Continue from a state written by `save_state`, by any number of processes.

        The state is whole (gathered weights, optimizer state keyed by parameter name) and its data
        position counts micro-batches of the global stream, so it resumes on a different number of
        processes as long as a step takes as many micro-batches as before: with twice the processes,
        half the grad_accum.
        """
        from safetensors.torch import load_file

        path = Path(path)
        info_file = path / "trainer.json"
        if not info_file.is_file():
            raise UserError(f"{path} holds no training state (no trainer.json)")
        info = json.loads(info_file.read_text())
        if "micro_batches_per_step" not in info:  # older states count each rank's position alone
            if info["world_size"] != self.world.size:
                raise UserError(f"the state in {path} was saved by {info['world_size']} processes; resume it "
                                f"with the same number, not {self.world.size}")
            info["micro_batches"] *= info["world_size"]
            info["micro_batches_per_step"] = self.config.grad_accum * self.world.size
            info["micro_batch_size"] = self.config.micro_batch_size
        per_step = self.config.grad_accum * self.world.size
        saved_per_step, saved_size = info["micro_batches_per_step"], info["micro_batch_size"]
        if saved_per_step != per_step or saved_size != self.config.micro_batch_size:
            raise UserError(
                f"the state in {path} was trained on global batches of {saved_per_step} micro-batches of "
                f"{saved_size}, this run's are {per_step} of {self.config.micro_batch_size} (grad_accum "
                f"{self.config.grad_accum} x {self.world.size} processes); set micro_batch_size and grad_accum "
                "so that they match")
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        distributed.load_full_state(self.student, load_file(path / "model.safetensors"),
                                    self.optimizer, blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        self.step, self.tokens = info["step"], info["tokens"]
        self.micro_batches = info["micro_batches"] // self.world.size  # this rank's share of the stream
        self.losses = info["losses"]
        self._saved_step = self.step
        if self.world.is_main and self.out_dir is not None:
            _trim_metrics(self.out_dir / METRICS_FILE, self.step)
        distributed.barrier(self.world)

    def full_student(self) -> nn.Module | None:
        """The student with full weights, for saving as a checkpoint: on rank 0, None elsewhere.

        Under FSDP every rank must call it; the weights are gathered into a fresh CPU copy.
        """
        if not self.world.sharded:
            return self.student
        state, _ = distributed.full_state(self.student)
        if not self.world.is_main:
            return None
        copy = type(self.student)(self.student.config)
        copy.load_state_dict(state)
        return copy.eval()

    def resume(self) -> bool:
        """Load `out_dir/state` when it exists; True if it did."""
        if self.out_dir is None or not (self.out_dir / STATE_DIR / "trainer.json").is_file():
            return False
        self.load_state(self.out_dir / STATE_DIR)
        return True


# -------------------------------------------------------------------------------------
# Helpers


class _Metrics:
    """metrics.jsonl and TensorBoard on rank 0, plus a progress bar on a terminal or log lines otherwise."""

    def __init__(self, out_dir: Path | None, world: World, step: int, total: int):
        self.on = world.is_main
        self.total = total
        self.file = self.writer = self.bar = None
        self.tokens, self.seconds = 0, 0.0
        if not self.on:
            return
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(out_dir / METRICS_FILE, "a")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # a declared dependency, but a hand-made environment may lack it
                logger.warning("tensorboard is not installed: metrics go to %s only", METRICS_FILE)
            else:
                # purge_step drops events a killed run wrote past the state it is resumed from
                self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=step + 1 if step else None)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)

    def update(self, step, tokens, loss, components, lr, grad_norm, step_tokens, seconds, every):
        if not self.on:
            return
        self.tokens += step_tokens
        self.seconds += seconds
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step % every and step != self.total:
            return
        row = {"step": step, "tokens": tokens, "loss": loss, **components, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": self.tokens / max(self.seconds, 1e-9)}
        self.tokens, self.seconds = 0, 0.0
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is None:
            logger.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f",
                        step, self.total, loss, lr, grad_norm, row["tokens_per_s"])

    def close(self):
        for handle in (self.file, self.writer, self.bar):
            if handle is not None:
                handle.close()


def _unshared(state: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied embeddings): give later aliases their own copy."""
    seen, out = set(), {}
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a finished staging directory to `target`; an older `target` is swapped out, then removed."""
    if target.exists():
        retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop rows past `step`, which a killed run logged after its last state: the resumed run logs them again."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write("".join(row + "\n" for row in rows))
    os.replace(staging, path)
