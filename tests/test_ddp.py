"""`torchrun --nproc_per_node 2`: DistributedDataParallel on CPU (gloo): disjoint clips, identical weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import synth_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synth_shards(tmp_path_factory.mktemp("ddp"), frames_per_clip=2, clips=20, num_classes=5, other_masks=False)


def test_two_ranks_see_disjoint_clips_and_hold_identical_weights(shards, tmp_path):
    probe = Path(__file__).with_name("ddp_probe.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(probe), str(shards), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    seen = [set(r["seen"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank its own clips
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"])  # equal blocks: equal steps, no rank waits forever
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged: the replicas agree
    steps = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    assert len(steps) == ranks[0]["steps"]  # rank 0 alone writes the run folder
