"""Run under torchrun by tests/test_ddp.py: a few DDP training steps; each rank writes the clips it trained on
and a digest of its weights."""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import avstrain.train as training
from avstrain.config import load_config

shards, out = Path(sys.argv[1]), Path(sys.argv[2])
seen: list[str] = []
apply_negatives = training.NegativeAudio.apply


def recording_apply(self, batch):  # every training batch passes through here first
    seen.extend(batch["name"])
    return apply_negatives(self, batch)


training.NegativeAudio.apply = recording_apply
config = load_config(None, ["model.backbone=resnet18", "model.channels=16", "model.image_size=64",
                            "optim.batch_size=2", "optim.epochs=1", "train.workers=0", "train.threads=1",
                            "eval.batch_size=4"])
result = training.train(config, shards, out / "run")
weights = torch.cat([p.detach().flatten() for p in result["model"].parameters()]).numpy()
rank = int(os.environ["RANK"])
(out / f"rank{rank}.json").write_text(json.dumps({
    "seen": seen, "steps": result["steps"], "weights": hashlib.sha256(weights.tobytes()).hexdigest()}))
