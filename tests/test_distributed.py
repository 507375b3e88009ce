"""Two processes under torchrun (gloo, FSDP2) train, save and resume like one process on the same global batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import run
from safetensors.torch import load_file

from hybridize.distill.distributed import World, shard_batches

WORKER = Path(__file__).with_name("distributed_worker.py")


def test_two_process_gloo_matches_one_process(tmp_path):
    """The pair is also stopped after 3 steps and resumed from its gathered state."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path / "two")]
    launched = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group, so a failure can end all of it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the same global batch of 4, as 2 micro-batches of 2 in one process, while the pair runs
        single = run(tmp_path / "one", micro_batch_size=2, grad_accum=2)
        output, _ = launched.communicate(timeout=120)
    finally:
        torch.set_num_threads(threads)
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
    assert launched.returncode == 0, output[-3000:]

    two = json.loads((tmp_path / "two/losses.json").read_text())
    assert len(two) == 5
    assert two == pytest.approx(single.losses, rel=1e-4)
    norms = [[json.loads(line)["grad_norm"] for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
             for run_dir in ("two", "one")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)  # gradients summed over ranks, not averaged
    alone = single.student.state_dict()
    for name in ("student.safetensors", "state/model.safetensors"):
        gathered = load_file(tmp_path / "two" / name)
        assert gathered.keys() == alone.keys()
        assert max((gathered[k] - alone[k]).abs().max().item() for k in alone) <= 1e-5


def test_each_rank_reads_its_own_share_of_the_stream():
    items = list(range(7))
    shares = [list(shard_batches(items, World(rank, 2))) for rank in range(2)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5]]
