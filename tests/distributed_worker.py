"""A tiny distillation run: helpers for the trainer tests, and under torchrun the two-process test's worker.

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR [STATE_DIR]

trains 5 steps of global batch 4 (2 sequences per process), stopping after 3 (keeping that state
as OUT_DIR/state-step3) and resuming from the saved state, and writes OUT_DIR/losses.json and the
gathered OUT_DIR/student.safetensors. With STATE_DIR, it starts from a copy of that state instead.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_teacher  # noqa: E402

from hybridize.config import LossConfig, TrainConfig  # noqa: E402
from hybridize.convert.surgery import build_hybrid  # noqa: E402
from hybridize.distill.distributed import joined_world  # noqa: E402
from hybridize.distill.trainer import Trainer  # noqa: E402

LAYOUT = ["attention", "mamba", "attention", "mamba"]
VOCAB = 96


def tiny_models(seed=0):
    """(student, teacher): a random tiny Llama and its MIL-initialised hybrid."""
    teacher = tiny_teacher("llama", seed=seed)
    return build_hybrid(teacher, LAYOUT), teacher


def tiny_batches(count, batch_size=2, seq_len=24, seed=0):
    """`count` micro-batches of two packed documents per row, with uneven loss masks.

    Labels follow the packing convention: labels[i] is token i+1 of the same document, -100 at
    a document's last token; each row trains a different share of its positions.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
        cut = torch.randint(4, seq_len - 4, (batch_size,), generator=g)
        index = torch.arange(seq_len).expand(batch_size, seq_len)
        second = index >= cut[:, None]
        positions = torch.where(second, index - cut[:, None], index)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(positions[:, 1:] != 0, ids[:, 1:], -100)
        keep = torch.rand(batch_size, 1, generator=g) * 0.7 + 0.2
        loss_mask = (torch.rand(batch_size, seq_len, generator=g) < keep) & (labels != -100)
        out.append({"input_ids": ids, "position_ids": positions, "labels": labels, "loss_mask": loss_mask})
    return out


def run(out_dir, world=None, micro_batch_size=2, grad_accum=1, steps=5, stop_after=None, start_from=None):
    """Train the tiny student on global batches of 4 sequences; returns the trainer.

    With `stop_after`, the data ends after that many steps, the state is copied to
    `out_dir/state-step{stop_after}`, and a fresh trainer resumes from the saved state and finishes,
    as a restarted job would. With `start_from`, training resumes from a copy of that state.
    """
    out_dir = Path(out_dir)
    if start_from is not None and (world is None or world.is_main):
        shutil.copytree(start_from, out_dir / "state")
    if world is not None and world.sharded:
        torch.distributed.barrier()
    data = tiny_batches(steps * 4 // micro_batch_size, batch_size=micro_batch_size)
    config = TrainConfig(steps=steps, micro_batch_size=micro_batch_size, grad_accum=grad_accum, seq_len=24,
                         lr=3e-3, warmup_steps=1, log_every=1)

    def trainer():
        student, teacher = tiny_models()
        return Trainer(student, teacher, config, LossConfig(weights="reverse_kl"), out_dir=out_dir, world=world)

    if stop_after is not None:
        trainer().train(data[: stop_after * 4 // micro_batch_size])
        if world is None or world.is_main:
            shutil.copytree(out_dir / "state", out_dir / f"state-step{stop_after}")
        resumed = trainer()
        assert resumed.resume()
        resumed.train(data)
        return resumed
    finished = trainer()
    assert finished.resume() == (start_from is not None)
    finished.train(data)
    return finished


if __name__ == "__main__":
    torch.set_num_threads(1)
    with joined_world() as world:
        start_from = sys.argv[2] if len(sys.argv) > 2 else None
        trainer = run(sys.argv[1], world=world, stop_after=None if start_from else 3, start_from=start_from)
        student = trainer.full_student()
        if world.is_main:
            Path(sys.argv[1], "losses.json").write_text(json.dumps(trainer.losses))
            save_file(student.state_dict(), Path(sys.argv[1], "student.safetensors"))
    assert not torch.distributed.is_initialized(), "a finished job leaves the process group it joined"
