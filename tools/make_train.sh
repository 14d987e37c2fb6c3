#!/usr/bin/env bash
# `make train`: synthetic data -> shards -> training -> audio-reliance evaluation on the test split -> pictures and
# runs/<name>/report.html.
# Steps whose output exists are reused (synth, crops); training resumes from runs/<name>/last.pt if present.
set -euo pipefail
CONFIG=${CONFIG:-configs/synth-cpu.toml}
NAME=${NAME:-$(basename "$CONFIG" .toml)}
DATA=${DATA:-data/synth}
SHARDS=${SHARDS:-data/synth-shards-64}
CLIPS=${CLIPS:-600}

if [ ! -f "$DATA/meta.csv" ]; then
  avsprep synth --out "$DATA" --clips "$CLIPS" --size 224 --workers 2
fi
# Shards at the CPU config's 64 px: the model would otherwise resize every batch.
avsprep crops --voc "$DATA/labels" --images "$DATA/visual_frames" --masks "$DATA/gt_masks" \
  --other-masks "$DATA/other_masks" --audio "$DATA/audio_wav" --meta "$DATA/meta.csv" \
  --out "$SHARDS" --size 64 --crop-size 64 --workers 2
avsprep inspect "$SHARDS" --verify
avstrain train --config "$CONFIG" --shards "$SHARDS" --name "$NAME" --resume
avstrain eval --checkpoint "runs/$NAME/best.pt" --shards "$SHARDS" --split test --suite reliance
# Pictures of the run (CPU time about 1 min): curves, t-SNE of the test crops, overlay grids, one HTML page.
avstrain plot "runs/$NAME"
avsprep tsne --shards "$SHARDS" --checkpoint "runs/$NAME/best.pt" --split test --out "runs/$NAME/tsne.png"
avstrain predict --checkpoint "runs/$NAME/best.pt" --shards "$SHARDS" --split test --out "runs/$NAME/predictions" \
  --overlays 4
avstrain report "runs/$NAME"
