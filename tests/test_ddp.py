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


TRAIN = ["model.backbone=resnet18", "model.channels=8", "model.image_size=64", "optim.batch_size=1", "optim.epochs=2",
         "train.workers=0", "train.threads=1", "train.amp=fp32", "train.checkpoint_every=1", "train.negatives=0.5",
         "data.augment=true", "eval.batch_size=4", "eval.max_clips=2"]


def torchrun_train(shards: Path, runs: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "avstrain", "train", "--shards", str(shards), "--runs", str(runs), "--name", "run",
               *[arg for setting in TRAIN for arg in ("--set", setting)], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: SIGKILL reaches every rank


def test_sigkill_mid_epoch_and_resume_gives_the_same_steps_on_every_rank(shards, tmp_path):
    """Negative audio and augmentation on, two ranks: a run killed mid-epoch and resumed logs the same steps.jsonl
    (rank 0 logs the loss averaged over the ranks, so rank 1's RNGs and data show in it) as one never stopped."""
    import signal
    import time

    whole = torchrun_train(shards, tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]
    expected = (tmp_path / "whole" / "run" / "steps.jsonl").read_text().splitlines()
    per_epoch = len(expected) // 2
    killed = torchrun_train(shards, tmp_path / "killed")
    steps = tmp_path / "killed" / "run" / "steps.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        if steps.exists() and len(steps.read_text().splitlines()) >= per_epoch + per_epoch // 2:
            break  # in the middle of the second epoch
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert len(steps.read_text().splitlines()) < len(expected), "the run ended before it was killed"
    resumed = torchrun_train(shards, tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert steps.read_text().splitlines() == expected
