"""Packing tokenised examples into fixed windows, batching them reproducibly, and padding.

Packing concatenates documents into windows of exactly `window` tokens, so no compute is spent
on padding. Document boundaries reach the model only through ``position_ids``: each document
starts again at position 0, and the hybrid model neither attends across a position-0 boundary
nor carries its recurrent state over one.

Label alignment (the convention of ``hybridize.distill.losses``): ``labels[i]`` is the target
of the logits at position i, i.e. token i+1 when it belongs to the same document and is a
training target, else -100; ``loss_mask[i]`` is ``labels[i] != -100``. The last token of every
document predicts nothing. Labels are already shifted: do not hand them to a transformers
model's ``labels=`` argument, which shifts again.

Padding policy: only the last window can be short; it is filled with `pad_id` tokens that form
a document of their own (positions 0, 1, ... from the first pad), with no targets. Being a
separate document *after* every real token, padding can change no real token's logits (causal
attention and a causal scan never look forward, and the boundary keeps pads from being read as
a continuation of the last document).
"""

from __future__ import annotations

import random
from itertools import count
from typing import Iterator

import torch

IGNORE_INDEX = -100


def _check(example, number: int) -> tuple[list[int], list[bool]]:
    ids, mask = example.get("input_ids"), example.get("loss_mask")
    if not ids or mask is None or len(ids) != len(mask):
        raise ValueError(f"example {number} needs non-empty 'input_ids' and a 'loss_mask' of the same length")
    return list(ids), [bool(m) for m in mask]


def _labels(ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token labels that never cross a document start (position 0) or a non-target token."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    keep = (positions[1:] != 0) & targets[1:]
    labels[:-1] = torch.where(keep, ids[1:], IGNORE_INDEX)
    return labels


def _window(ids: list[int], positions: list[int], targets: list[bool]) -> dict:
    ids_t = torch.tensor(ids, dtype=torch.long)
    positions_t = torch.tensor(positions, dtype=torch.long)
    labels = _labels(ids_t, positions_t, torch.tensor(targets, dtype=torch.bool))
    return {"input_ids": ids_t, "position_ids": positions_t, "labels": labels, "loss_mask": labels != IGNORE_INDEX}


def pack(examples, window: int, drop_remainder: bool = False, pad_id: int = 0) -> list[dict]:
    """Examples (``input_ids``, ``loss_mask`` as from chat.tokenize_rows) packed into windows.

    Documents are laid end to end in the order given and the stream is cut every `window`
    tokens, so every window is full except possibly the last, which is padded (see the module
    docstring) or, with `drop_remainder`, left out. A document cut by a window edge, including
    one longer than a window, continues in the next window as a new document starting at
    position 0: the continuation does not see the context before the cut, and the token at
    the cut has no label. Each window is a dict of 1-D tensors of length `window`:
    ``input_ids``, ``position_ids``, ``labels``, ``loss_mask``.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    windows = []
    ids, positions, targets = [], [], []
    for number, example in enumerate(examples, start=1):
        doc_ids, doc_targets = _check(example, number)
        start = 0
        while start < len(doc_ids):
            take = min(window - len(ids), len(doc_ids) - start)
            ids += doc_ids[start : start + take]
            targets += doc_targets[start : start + take]
            positions += range(take)
            start += take
            if len(ids) == window:
                windows.append(_window(ids, positions, targets))
                ids, positions, targets = [], [], []
    if ids and not drop_remainder:
        pads = window - len(ids)
        windows.append(_window(ids + [pad_id] * pads, positions + list(range(pads)), targets + [False] * pads))
    return windows


def batches(packed: list[dict], batch_size: int, shuffle: bool = True, seed: int = 0, start_step: int = 0,
            epochs: int | None = 1) -> Iterator[dict]:
    """Batches of packed windows, stacked to [batch, window] tensors, in an order fixed by `seed`.

    Each epoch visits every window once, in a permutation drawn from (seed, epoch) alone, so
    the batch at a given step is the same in every run; the last batch of an epoch may be
    smaller. `start_step` skips that many batches without building them, which is how a
    resumed run continues with the batches an uninterrupted one would have seen.
    `epochs=None` repeats forever (for step-budgeted training).
    """
    if not packed:
        raise ValueError("no packed windows to batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    per_epoch = -(-len(packed) // batch_size)
    step = 0
    for epoch in count() if epochs is None else range(epochs):
        if step + per_epoch <= start_step:
            step += per_epoch
            continue
        order = list(range(len(packed)))
        if shuffle:
            random.Random(f"{seed}/{epoch}").shuffle(order)
        for first in range(0, len(order), batch_size):
            if step >= start_step:
                chosen = [packed[i] for i in order[first : first + batch_size]]
                yield {key: torch.stack([w[key] for w in chosen]) for key in chosen[0]}
            step += 1


def pad_batch(examples, pad_id: int = 0) -> dict:
    """Unpacked examples right-padded into one batch, for evaluation-style use.

    Returns [batch, longest] tensors ``input_ids``, ``attention_mask`` (1 on real tokens: here
    pads are masked out rather than made documents of their own), ``position_ids`` (0, 1, ...
    in every row), and ``labels`` and ``loss_mask`` aligned as in packing (pads and each
    example's last token predict nothing); the keys of a packed batch plus the mask, so the
    trainer takes either.
    """
    checked = [_check(example, number) for number, example in enumerate(examples, start=1)]
    if not checked:
        raise ValueError("no examples to batch")
    longest = max(len(ids) for ids, _ in checked)
    rows = []
    for ids, targets in checked:
        pads = longest - len(ids)
        ids_t = torch.tensor(ids + [pad_id] * pads, dtype=torch.long)
        labels = _labels(ids_t, torch.arange(longest), torch.tensor(targets + [False] * pads, dtype=torch.bool))
        rows.append((ids_t, (torch.arange(longest) < len(ids)).long(), labels))
    ids, attention, labels = (torch.stack(column) for column in zip(*rows))
    return {"input_ids": ids, "attention_mask": attention, "position_ids": torch.arange(longest).expand_as(ids),
            "labels": labels, "loss_mask": labels != IGNORE_INDEX}
