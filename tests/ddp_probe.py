"""Run under torchrun by tests/test_ddp.py: a few DDP training steps; each rank writes the clips it trained on,
the epochs in which it drew negative audio and a digest of its weights.

With a third argument "hears": two epochs with train.negatives_start = "hears" and a hearing check that says yes at
the first validation (rank 0 alone runs it); every rank must then draw negatives in epoch 2, and only then."""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import avstrain.evaluate as evaluation
import avstrain.train as training
from avstrain.config import load_config

shards, out = Path(sys.argv[1]), Path(sys.argv[2])
hears = len(sys.argv) > 3 and sys.argv[3] == "hears"
seen: list[str] = []
negatives_in_epochs: set[int] = set()
current_epoch = [0]
apply_negatives = training.NegativeAudio.apply
set_epoch = training.ShardDataset.set_epoch


def recording_set_epoch(self, epoch, *args, **kwargs):
    current_epoch[0] = epoch
    return set_epoch(self, epoch, *args, **kwargs)


def recording_apply(self, batch, share=1.0):  # every training batch passes through here (while negatives are on)
    seen.extend(batch["name"])
    negatives_in_epochs.add(current_epoch[0])
    return apply_negatives(self, batch, share)


training.NegativeAudio.apply = recording_apply
training.ShardDataset.set_epoch = recording_set_epoch
overrides = ["model.backbone=resnet18", "model.channels=16", "model.image_size=64", "optim.batch_size=2",
             "optim.epochs=1", "train.workers=0", "train.threads=1", "eval.batch_size=4"]
if hears:
    overrides += ["optim.epochs=2", "train.negatives=0.5", "train.negatives_start=hears", "eval.max_clips=2"]
    evaluation.hearing = lambda *args, **kwargs: {"gap": 1.0, "miou_true": 1.0, "miou_swap": 0.0, "clips": 2}
config = load_config(None, overrides)
result = training.train(config, shards, out / "run")
weights = torch.cat([p.detach().flatten() for p in result["model"].parameters()]).numpy()
rank = int(os.environ["RANK"])
(out / f"rank{rank}.json").write_text(json.dumps({
    "seen": seen, "steps": result["steps"], "weights": hashlib.sha256(weights.tobytes()).hexdigest(),
    "negatives_in_epochs": sorted(negatives_in_epochs)}))
