"""Checks the GPU tests share: relative error against a reference, and NaN-poisoned free memory."""

import torch


def rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite values (unwritten output?)"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def poison(elements: int):
    """Fill `elements` floats of the caching allocator's free memory with NaN so unwritten outputs show up."""
    junk = torch.full((elements,), float("nan"), device="cuda")
    del junk
