import os

import pytest
import torch

# Tests never touch the user's cache; the built-in teacher is converted once per machine into this folder.
os.environ.setdefault("HYBRIDIZE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in teacher's chat tokenizer (the teacher is converted into the test cache on first use)."""
    from hybridize.convert.teacher import load_teacher

    return load_teacher("smollm2-135m")[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
