#!/usr/bin/env bash
# `make train`: synthetic data -> shards -> (trainer, once it lands) -> evaluation. Re-running reuses what exists.
set -euo pipefail
DATA=${DATA:-data/synth}
SHARDS=${SHARDS:-data/synth-shards}
CLIPS=${CLIPS:-600}
SIZE=${SIZE:-224}

if [ ! -f "$DATA/meta.csv" ]; then
  avsprep synth --out "$DATA" --clips "$CLIPS" --size "$SIZE" --workers 2
fi
avsprep crops --voc "$DATA/labels" --images "$DATA/visual_frames" --masks "$DATA/gt_masks" \
  --other-masks "$DATA/other_masks" --audio "$DATA/audio_wav" --meta "$DATA/meta.csv" \
  --out "$SHARDS" --workers 2
avsprep inspect "$SHARDS" --verify
if python -c "import avstrain.train" 2>/dev/null; then
  avstrain train --config configs/synth-cpu.toml --shards "$SHARDS"
  avstrain eval --checkpoint runs/synth-cpu/best.pt --shards "$SHARDS" --split test --suite reliance
else
  echo "make train: the trainer (avstrain train) is not built yet; shards are ready in $SHARDS"
fi
