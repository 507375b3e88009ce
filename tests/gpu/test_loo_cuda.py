"""Importance scoring on CUDA: batches built on the CPU reach the model's device."""

import pytest
import torch

from hybridize.importance.loo import leave_one_out

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_leave_one_out_on_cuda_scores_cpu_batches_like_the_cpu():
    from distributed_worker import tiny_batches, tiny_models

    student, _ = tiny_models()
    batches = tiny_batches(2)
    on_cpu = leave_one_out(student, batches)
    on_cuda = leave_one_out(student.cuda(), batches)
    for layer, score in on_cpu["scores"].items():
        assert on_cuda["scores"][layer] == pytest.approx(score, rel=1e-3, abs=1e-6)
