"""The trainer: resume, accumulation, freezing, non-finite losses, metrics, on tiny CPU models."""

import json
import math

import pytest
import torch
from distributed_worker import tiny_batches, tiny_models
from safetensors.torch import load_file
from tiny import tiny_teacher

from hybridize.config import LossConfig, TrainConfig
from hybridize.convert.surgery import build_hybrid
from hybridize.distill.trainer import Trainer, lr_factor
from hybridize.errors import UserError


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(out_dir=None, loss="reverse_kl", teacher=True, **train):
    student, tiny = tiny_models()
    options = dict(steps=6, micro_batch_size=2, seq_len=24, lr=3e-3, warmup_steps=2, weight_decay=0.1, log_every=1)
    config = TrainConfig(**{**options, **train})
    return Trainer(student, tiny if teacher else None, config, LossConfig(weights=loss), out_dir=out_dir)


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metric_rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def interrupted_after(batches, count):
    """Yields `count` batches, then dies as a killed process would."""
    yield from batches[:count]
    raise KeyboardInterrupt


def test_resume_matches_uninterrupted_training(tmp_path):
    data = tiny_batches(12)  # 6 steps of 2 micro-batches
    straight = make_trainer(tmp_path / "straight", grad_accum=2)
    straight.train(data)

    first = make_trainer(tmp_path / "resumed", grad_accum=2, save_every=3)
    with pytest.raises(KeyboardInterrupt):
        first.train(interrupted_after(data, 9))  # killed in step 5, after step 4 was logged but not saved
    assert json.loads((tmp_path / "resumed/state/trainer.json").read_text())["step"] == 3

    second = make_trainer(tmp_path / "resumed", grad_accum=2, save_every=3)
    assert second.resume()
    result = second.train(data)

    assert max_diff(weights(straight.student), weights(second.student)) <= 1e-6
    assert result.steps == 6 and result.losses == pytest.approx(straight.losses, rel=1e-6)
    assert [row["step"] for row in metric_rows(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in metric_rows(tmp_path / "resumed")] == pytest.approx(straight.losses, rel=1e-6)


def test_distillation_loss_decreases_as_the_student_learns_the_teacher():
    trainer = make_trainer(steps=30, lr=3e-3, warmup_steps=0)
    result = trainer.train(tiny_batches(1) * 30)
    assert result.steps == 30
    assert result.final_loss < 0.2 * result.losses[0]


def test_sft_trains_on_labels_without_a_teacher():
    trainer = make_trainer(loss="ce", teacher=False, steps=20, warmup_steps=0, lr=1e-2)
    assert trainer.objective.teacher is None
    result = trainer.train(tiny_batches(1) * 20)
    assert result.final_loss < 0.5 * result.losses[0]


def test_two_micro_batches_of_two_make_the_same_update_as_one_of_four(tmp_path):
    """Uneven masks: a per-micro-batch mean would weigh the two halves differently."""
    halves = tiny_batches(6)
    wholes = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(halves[::2], halves[1::2])]
    masked = [int(h["loss_mask"].sum()) for h in halves[:2]]
    assert masked[0] != masked[1]
    whole = make_trainer(tmp_path / "whole", steps=3, micro_batch_size=4)
    whole.train(wholes)
    split = make_trainer(tmp_path / "split", steps=3, micro_batch_size=2, grad_accum=2)
    split.train(halves)

    # Adam divides by sqrt(v), so where a gradient is near zero fp32 summation-order noise moves a
    # weight by up to ~1e-6; one update moves weights by up to lr = 3e-3
    assert max_diff(weights(whole.student), weights(split.student)) <= 1e-5
    for a, b in zip(metric_rows(tmp_path / "whole"), metric_rows(tmp_path / "split")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["tokens"] == b["tokens"]


def test_freezing_non_mixers_trains_only_the_mamba_mixers():
    trainer = make_trainer(steps=3, freeze="non_mixers")
    before = weights(trainer.student)
    trainer.train(tiny_batches(3))
    after = weights(trainer.student)
    mixers = {name for name in before if name.startswith(("model.layers.1.mixer.", "model.layers.3.mixer."))}
    assert mixers and all(not torch.equal(before[name], after[name]) for name in mixers)
    assert all(torch.equal(before[name], after[name]) for name in before if name not in mixers)


@pytest.mark.parametrize("checkpointing, runs", [(False, 1), (True, 2)])
def test_activation_checkpointing_recomputes_layers_in_backward(checkpointing, runs):
    trainer = make_trainer(steps=1, activation_checkpointing=checkpointing)
    calls = []
    trainer.student.model.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    trainer.train(tiny_batches(1))
    assert len(calls) == runs


def test_freeze_patterns_that_match_nothing_are_refused():
    with pytest.raises(UserError, match=r"freeze pattern 'model\.layerz\.\*' matches no parameter"):
        make_trainer(freeze=["model.layerz.*"])


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_state(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, save_every=1)
    data = tiny_batches(4)

    def poisoned():
        yield from data[:2]
        with torch.no_grad():
            trainer.objective.teacher.lm_head.weight.fill_(math.inf)
        yield from data[2:]

    with pytest.raises(UserError, match="non-finite loss .* at step 3"):
        trainer.train(poisoned())
    assert json.loads((tmp_path / "state/trainer.json").read_text())["step"] == 2
    saved = load_file(tmp_path / "state/model.safetensors")
    assert all(torch.equal(saved[name], value) for name, value in weights(trainer.student).items())


def test_state_of_a_tied_embedding_student_round_trips(tmp_path):
    teacher = tiny_teacher("llama-tied")
    config = TrainConfig(steps=2, micro_batch_size=2, seq_len=24, lr=1e-2)
    make = lambda: Trainer(build_hybrid(teacher, ["attention", "mamba"] * 2), teacher, config,  # noqa: E731
                           LossConfig(weights="forward_kl"), out_dir=tmp_path)
    trained = make()
    trained.train(tiny_batches(2))
    restored = make()
    assert restored.resume()
    assert max_diff(weights(trained.student), weights(restored.student)) == 0
    assert restored.student.lm_head.weight is restored.student.model.embed_tokens.weight


def test_metrics_and_tensorboard_are_written_every_log_step(tmp_path):
    trainer = make_trainer(tmp_path, steps=5, log_every=2, loss="reverse_kl")
    trainer.train(tiny_batches(5))
    rows = metric_rows(tmp_path)
    assert [row["step"] for row in rows] == [2, 4, 5]  # and always the last step
    assert {"step", "tokens", "loss", "reverse_kl", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert rows[-1]["tokens"] == 5 * 2 * 24
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    factors = [lr_factor(step, warmup=4, total=20, min_ratio=0.1) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.1)


def test_a_token_budget_becomes_steps():
    config = TrainConfig(tokens=10_000, micro_batch_size=2, grad_accum=3, seq_len=100)
    assert config.total_steps(world_size=2) == 9  # ceil(10000 / 1200)


def test_activation_checkpointing_can_recompute_only_the_first_layers():
    trainer = make_trainer(steps=1, activation_checkpointing=2)
    calls = {index: [] for index in (1, 3)}
    for index in calls:
        trainer.student.model.layers[index].register_forward_pre_hook(lambda *_, i=index: calls[i].append(1))
    trainer.train(tiny_batches(1))
    assert {index: len(c) for index, c in calls.items()} == {1: 2, 3: 1}  # layer 1 recomputed, layer 3 not


def test_selective_checkpointing_gives_the_same_update():
    runs = []
    for checkpointing in (False, 1, True):
        trainer = make_trainer(steps=2, activation_checkpointing=checkpointing)
        trainer.train(tiny_batches(2))
        runs.append(weights(trainer.student))
    assert max_diff(runs[0], runs[1]) <= 1e-6 and max_diff(runs[0], runs[2]) <= 1e-6


def test_compile_option_compiles_the_layers_pure_torch_parts(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(self))
    trainer = make_trainer(steps=1, compile=True)
    layers = trainer.student.model.layers
    expected = {id(layer.mlp) for layer in layers} | {id(layers[0].mixer), id(layers[2].mixer)}  # attention
    assert expected <= {id(part) for part in compiled}
    assert id(layers[1].mixer) not in {id(part) for part in compiled}  # the Mamba mixer stays eager


def test_a_negative_checkpointing_count_is_refused():
    with pytest.raises(Exception, match="a number of layers >= 0"):
        TrainConfig(steps=1, activation_checkpointing=-1)


def test_training_without_tensorboard_still_writes_metrics(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    trainer = make_trainer(tmp_path, steps=2)
    trainer.train(tiny_batches(2))
    assert [row["step"] for row in metric_rows(tmp_path)] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()
