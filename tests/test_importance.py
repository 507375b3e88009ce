"""Layer importance scores are what their definitions say, and rank least important first."""

import json

import pytest
import torch
from tiny import tiny_teacher

from hybridize.convert.surgery import build_hybrid
from hybridize.importance import save_importance
from hybridize.importance.loo import leave_one_out


def hand_batches(seed=0, batch=2, length=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (batch, length), generator=g)
    positions = torch.arange(length).expand(batch, length).clone()
    positions[1, 10:] = torch.arange(length - 10)  # two packed documents in the second row
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], 1)
    labels[1, 9] = -100  # no target across the document boundary
    mask = torch.rand(batch, length, generator=g) < 0.7
    return [{"input_ids": ids, "position_ids": positions, "labels": labels, "loss_mask": mask}]


def reference_kl(model, ablated, batch):
    with torch.no_grad():
        p = torch.log_softmax(model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits, -1)
        q = torch.log_softmax(ablated(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits, -1)
    mask = batch["loss_mask"] & (batch["labels"] >= 0)
    return ((p.exp() * (p - q)).sum(-1)[mask].sum() / mask.sum()).item()


def test_block_scores_equal_kl_against_a_model_built_without_that_layer():
    teacher = build_hybrid(tiny_teacher(), ["attention"] * 4)
    batches = hand_batches()
    result = leave_one_out(teacher, batches)
    for layer in range(4):
        kinds = ["attention"] * 4
        kinds[layer] = "identity"
        ablated = build_hybrid(teacher, kinds)
        assert result["scores"][str(layer)] == pytest.approx(reference_kl(teacher, ablated, batches[0]), rel=1e-4)
    assert result["ranking"] == sorted(range(4), key=lambda i: result["scores"][str(i)])


def test_mixer_scope_keeps_the_mlp_of_the_ablated_layer():
    model = build_hybrid(tiny_teacher(), ["attention", "mamba", "attention", "mamba"])
    batches = hand_batches(seed=1)
    block = leave_one_out(model, batches, scope="block")
    mixer = leave_one_out(model, batches, scope="mixer")
    layer = model.model.layers[1]
    original = layer.mixer.out_proj.weight.detach().clone()
    with torch.no_grad():
        layer.mixer.out_proj.weight.zero_()  # a mixer that contributes nothing
    zeroed = build_hybrid(model, model.config.mixer_types)
    with torch.no_grad():
        layer.mixer.out_proj.weight.copy_(original)
    assert mixer["scores"]["1"] == pytest.approx(reference_kl(model, zeroed, batches[0]), rel=1e-4)
    assert mixer["scores"]["1"] != pytest.approx(block["scores"]["1"])


def test_importance_json_and_chart_are_written(tmp_path):
    model = build_hybrid(tiny_teacher(), ["attention"] * 4)
    result = leave_one_out(model, hand_batches(), metric="ce")
    json_path, png = save_importance(result, tmp_path / "ranking.json")
    saved = json.loads(json_path.read_text())
    assert saved["ranking"] == result["ranking"] and set(saved["scores"]) == {"0", "1", "2", "3"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
