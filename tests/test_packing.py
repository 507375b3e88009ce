"""Packing: a packed window trains each document exactly as if it were alone, reproducibly."""

import random

import pytest
import torch
import torch.nn.functional as F

from hybridize.convert.surgery import build_hybrid
from hybridize.data.packing import IGNORE_INDEX, batches, pack, pad_batch
from tiny import COMMON, tiny_teacher

WINDOW = 32


def _document(rng, length):
    return {"input_ids": [rng.randrange(3, COMMON["vocab_size"]) for _ in range(length)],
            "loss_mask": [rng.random() < 0.7 for _ in range(length)]}


def _documents(lengths, seed=0):
    rng = random.Random(seed)
    return [_document(rng, n) for n in lengths]


@pytest.fixture(scope="module")
def hybrid():
    return build_hybrid(tiny_teacher("llama"), ["attention", "mamba", "identity", "mamba"]).eval()


def _token_losses(logits, labels):
    """Per-position cross-entropy of logits[i] against labels[i]; 0 where the label is ignored."""
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")


def _alone(model, document):
    """Per-token losses of one document run by itself, labels built independently of packing."""
    ids = torch.tensor(document["input_ids"])
    targets = torch.tensor(document["loss_mask"])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:-1] = torch.where(targets[1:], ids[1:], IGNORE_INDEX)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits
    return _token_losses(logits, labels[None])[0], labels


@torch.no_grad()
def test_packed_batch_gives_each_document_the_losses_it_has_alone(hybrid):
    # Lengths fill windows exactly (10+7+15, 20+12), then a padded last window (9 + 23 pads).
    documents = _documents([10, 7, 15, 20, 12, 9])
    packed = pack(documents, WINDOW)
    assert len(packed) == 3
    (batch,) = batches(packed, batch_size=3, shuffle=False)
    logits = hybrid(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    losses = _token_losses(logits, batch["labels"])
    flat_losses, flat_labels = losses.reshape(-1), batch["labels"].reshape(-1)
    start = 0
    for document in documents:
        n = len(document["input_ids"])
        alone, labels = _alone(hybrid, document)
        assert torch.equal(flat_labels[start : start + n], labels)
        torch.testing.assert_close(flat_losses[start : start + n], alone, atol=1e-5, rtol=0)
        mask = labels != IGNORE_INDEX
        torch.testing.assert_close(flat_losses[start : start + n][mask].mean(), alone[mask].mean(),
                                   atol=1e-5, rtol=0)
        start += n


@torch.no_grad()
def test_a_document_longer_than_the_window_continues_as_a_new_document(hybrid):
    (document,) = _documents([WINDOW + 12])
    first, second = pack([document], WINDOW)
    assert first["position_ids"].tolist() == list(range(WINDOW))
    assert second["position_ids"][:12].tolist() == list(range(12))
    assert first["labels"][-1] == IGNORE_INDEX  # the cut token's successor is in the next window
    logits = hybrid(input_ids=second["input_ids"][None], position_ids=second["position_ids"][None]).logits
    piece = {key: value[WINDOW:] for key, value in document.items()}
    alone, _ = _alone(hybrid, piece)
    torch.testing.assert_close(_token_losses(logits, second["labels"][None])[0, :12], alone, atol=1e-5, rtol=0)


def test_windows_are_full_and_hold_every_token_in_order():
    documents = _documents([5, 40, 3, 17, 29, 1, 8])
    total = sum(len(d["input_ids"]) for d in documents)
    packed = pack(documents, WINDOW)
    assert len(packed) == -(-total // WINDOW)
    assert all(w["input_ids"].shape == (WINDOW,) for w in packed)
    stream = torch.cat([w["input_ids"] for w in packed])[:total]
    assert stream.tolist() == [t for d in documents for t in d["input_ids"]]
    dropped = pack(documents, WINDOW, drop_remainder=True)
    assert len(dropped) == total // WINDOW
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(dropped, packed))


def test_labels_never_cross_a_document_boundary():
    documents = _documents([5, 40, 3, 17, 29, 1, 8], seed=1)
    for window in pack(documents, WINDOW, pad_id=0):
        ids, positions, labels = window["input_ids"], window["position_ids"], window["labels"]
        assert torch.equal(window["loss_mask"], labels != IGNORE_INDEX)
        assert labels[-1] == IGNORE_INDEX
        for i in torch.nonzero(labels != IGNORE_INDEX).flatten().tolist():
            assert positions[i + 1] == positions[i] + 1 and labels[i] == ids[i + 1]
        last_of_document = torch.nonzero(positions[1:] == 0).flatten()
        assert (labels[last_of_document] == IGNORE_INDEX).all()


def test_padding_is_its_own_untrained_document():
    (window,) = pack(_documents([9, 4]), WINDOW, pad_id=0)
    assert window["position_ids"].tolist() == list(range(9)) + list(range(4)) + list(range(WINDOW - 13))
    assert (window["input_ids"][13:] == 0).all() and not window["loss_mask"][12:].any()


@torch.no_grad()
def test_padding_never_changes_real_token_logits(hybrid):
    (window,) = pack(_documents([9, 4]), WINDOW, pad_id=0)
    padded = hybrid(input_ids=window["input_ids"][None], position_ids=window["position_ids"][None]).logits
    real = hybrid(input_ids=window["input_ids"][None, :13], position_ids=window["position_ids"][None, :13]).logits
    torch.testing.assert_close(padded[0, :13], real[0], atol=1e-5, rtol=0)

    documents = _documents([6, 11, 3], seed=2)
    batch = pad_batch(documents, pad_id=0)
    logits = hybrid(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).logits
    losses = _token_losses(logits, batch["labels"])
    for row, document in enumerate(documents):
        n = len(document["input_ids"])
        alone, labels = _alone(hybrid, document)
        assert torch.equal(batch["labels"][row, :n], labels) and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        torch.testing.assert_close(losses[row, :n], alone, atol=1e-5, rtol=0)


def test_batch_order_is_fixed_by_seed_and_resumes_at_any_step():
    packed = pack(_documents([13] * 40), WINDOW)

    def order(**kwargs):
        return [b["input_ids"][:, 0].tolist() for b in batches(packed, batch_size=3, **kwargs)]

    run = order(seed=7, epochs=3)
    assert run == order(seed=7, epochs=3)
    assert run != order(seed=8, epochs=3)
    assert run[:6] != run[6:12]  # each epoch has its own permutation
    for step in (0, 4, 6, 13):
        assert order(seed=7, epochs=3, start_step=step) == run[step:]
    endless = batches(packed, batch_size=3, seed=7, epochs=None, start_step=13)
    assert [next(endless)["input_ids"][:, 0].tolist() for _ in range(5)] == run[13:18]
    assert sorted(x for b in order(shuffle=False) for x in b) == sorted(w["input_ids"][0].item() for w in packed)
