"""`torchrun --nproc_per_node 2`: DistributedDataParallel on CPU (gloo): disjoint clips, identical weights."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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


CHECKPOINT_EVERY = 5  # 4 steps an epoch: last.pt of step 5, mid-epoch, without 138 MB written every step
TRAIN = ["model.backbone=resnet18", "model.channels=8", "model.image_size=64", "optim.batch_size=2", "optim.epochs=2",
         "train.workers=0", "train.threads=1", "train.amp=fp32", f"train.checkpoint_every={CHECKPOINT_EVERY}",
         "train.negatives=0.5", "data.augment=true", "eval.batch_size=4", "eval.max_clips=2"]


def torchrun_train(shards: Path, runs: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "avstrain", "train", "--shards", str(shards), "--runs", str(runs), "--name", "run",
               *[arg for setting in TRAIN for arg in ("--set", setting)], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: killing it leaves pytest alone


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, ...
        except (OSError, IndexError):  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def all_ended(pids: list[int], timeout: float = 10) -> bool:
    """Whether the processes end (gone, or zombies waiting to be reaped) within `timeout` seconds."""
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + timeout
    while any(map(running, pids)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_every_rank(torchrun: subprocess.Popen) -> list[int]:
    """SIGKILL torchrun and its ranks; returns the ranks' pids. torchrun starts each rank in a session of its own,
    so a signal to torchrun's process group alone leaves the ranks running: they finish the run on their own, and
    a "resume" then finds a finished last.pt and trains nothing (the test could not fail)."""
    ranks = children(torchrun.pid)
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    if torchrun.poll() is None:
        os.killpg(torchrun.pid, signal.SIGKILL)
    torchrun.wait()
    return ranks


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` has `count` lines, or the process ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)


def negative_streams(run: Path) -> list[torch.Tensor]:
    """Each rank's negative-audio generator and global torch RNG states in the run's last.pt, concatenated (mmap:
    the weights are not read)."""
    return [torch.cat([rng["negatives"], rng["torch"]])
            for rng in torch.load(run / "last.pt", weights_only=True, mmap=True)["rank_rngs"]]


def test_sigkill_mid_epoch_and_resume_gives_the_same_steps_on_every_rank(shards, tmp_path):
    """Negative audio and augmentation on, two ranks: a run killed mid-epoch and resumed logs the same steps.jsonl
    (rank 0 logs the loss averaged over the ranks, so rank 1's RNGs and data show in it) as one never stopped.

    The kill reaches every rank and lands after the first checkpoint of the second epoch (step 5), so the resumed
    run starts mid-epoch. With train.seed = 0, rank 1's own negative draws after step 5 differ from rank 0's: a rank
    that restored another rank's stream changes the loss of every step redone (6-8). Each rank's negative stream
    must also end where the uninterrupted run's does, whatever the draws happen to be."""
    processes: list[subprocess.Popen] = []
    try:
        whole = torchrun_train(shards, tmp_path / "whole")
        processes.append(whole)
        assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]
        expected = (tmp_path / "whole" / "run" / "steps.jsonl").read_text().splitlines()
        per_epoch = len(expected) // 2
        resume_from = (per_epoch // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY  # first checkpoint of epoch 2
        assert per_epoch < resume_from < len(expected) - 1, "no mid-epoch checkpoint to resume from"
        killed = torchrun_train(shards, tmp_path / "killed")
        processes.append(killed)
        run = tmp_path / "killed" / "run"
        wait_for_lines(run / "steps.jsonl", resume_from + 1, killed)  # a step logged after step-<n>.pt, last.pt
        ranks = kill_every_rank(killed)
        assert len(ranks) == 2 and all_ended(ranks), "the kill did not reach both ranks"
        assert len((run / "steps.jsonl").read_text().splitlines()) < len(expected), "the run ended before the kill"
        checkpoints = [int(path.stem.removeprefix("step-")) for path in run.glob("step-*.pt")]
        assert max(checkpoints) == resume_from, "killed before or after the mid-epoch checkpoint"
        resumed = torchrun_train(shards, tmp_path / "killed", "--resume")
        processes.append(resumed)
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                kill_every_rank(process)
    assert (run / "steps.jsonl").read_text().splitlines() == expected
    assert all(map(torch.equal, negative_streams(run), negative_streams(tmp_path / "whole" / "run")))


def test_negatives_that_wait_for_hearing_start_on_every_rank_at_once(tmp_path_factory, tmp_path):
    """train.negatives_start = "hears": rank 0 alone validates and decides, then broadcasts; both ranks draw negative
    audio from the next epoch on (a rank that did not would train on other targets), weights stay identical."""
    shards = synth_shards(tmp_path_factory.mktemp("ddp-other"), frames_per_clip=2, clips=20, num_classes=5)
    probe = Path(__file__).with_name("ddp_probe.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(probe), str(shards), str(tmp_path), "hears"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["negatives_in_epochs"] == ranks[1]["negatives_in_epochs"] == [1]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["heard_epoch"] for m in metrics] == [1, 1]
