"""Two processes under torchrun (gloo, FSDP2) train, save and resume like one process on the same global batch,
and a state saved by either resumes on the other."""

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_worker import run
from safetensors.torch import load_file

from hybridize.distill.distributed import World, joined_world, shard_batches
from hybridize.errors import UserError

WORKER = Path(__file__).with_name("distributed_worker.py")


def _launch_pair(*args):
    """Start the worker under torchrun on 2 CPU processes, in its own process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # so that a failure can end all of it


@contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _wait(launched):
    try:
        output, _ = launched.communicate(timeout=180)
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
    assert launched.returncode == 0, output[-3000:]


def _assert_same_weights(path, expected):
    gathered = load_file(path)
    assert gathered.keys() == expected.keys()
    assert max((gathered[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5


def test_two_processes_match_one_and_states_move_between_them(tmp_path):
    """On the same global batch of 4 (2 processes x 2 sequences, or 1 process x 2 micro-batches of 2),
    losses, gradient norms and weights agree, including across a stop after 3 steps and a resume
    from the saved state, and a state saved by either resumes on the other."""
    pair = _launch_pair(tmp_path / "two")
    with _single_thread():  # while the pair runs
        single = run(tmp_path / "one", micro_batch_size=2, grad_accum=2)
        run(tmp_path / "one-stopped", micro_batch_size=2, grad_accum=2, stop_after=3)
    _wait(pair)

    pair = _launch_pair(tmp_path / "two-from-one", tmp_path / "one-stopped/state-step3")
    with _single_thread():
        from_two = run(tmp_path / "one-from-two", micro_batch_size=2, grad_accum=2,
                       start_from=tmp_path / "two/state-step3")
    _wait(pair)

    alone = single.student.state_dict()
    for run_dir in ("two", "two-from-one"):
        assert json.loads((tmp_path / run_dir / "losses.json").read_text()) == pytest.approx(single.losses, rel=1e-4)
        _assert_same_weights(tmp_path / run_dir / "student.safetensors", alone)
    _assert_same_weights(tmp_path / "two/state/model.safetensors", alone)
    assert len(single.losses) == 5 and from_two.losses == pytest.approx(single.losses, rel=1e-4)
    assert max((from_two.student.state_dict()[k] - alone[k]).abs().max().item() for k in alone) <= 1e-5
    norms = [[json.loads(line)["grad_norm"] for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
             for run_dir in ("two", "one")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)  # gradients summed over ranks, not averaged


def test_a_state_refuses_a_different_global_batch(tmp_path):
    run(tmp_path, micro_batch_size=2, grad_accum=2, steps=2)
    with pytest.raises(UserError, match="global batches of 2 micro-batches of 2"):
        run(tmp_path / "resumed", micro_batch_size=2, grad_accum=1, steps=2, start_from=tmp_path / "state")


def test_each_rank_reads_its_own_share_of_the_stream():
    items = list(range(7))
    shares = [list(shard_batches(items, World(rank, 2))) for rank in range(2)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5]]


def test_a_single_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with joined_world() as world:
        assert (world.rank, world.size, world.sharded) == (0, 1, False)
        assert not dist.is_initialized()


def test_a_job_leaves_only_a_group_it_joined(tmp_path, monkeypatch):
    """A caller's own process group outlives a job run inside it."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: joined_world must not join or leave
        with joined_world():
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
