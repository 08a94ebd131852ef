#!/usr/bin/env bash
# The main job on the bundled sample data (run it with `make demo`, which also sets up .venv and the data):
# evaluate a randomly initialised tiny FSAE on held-out clips, train FSAE stage 1 on the sample shards,
# evaluate the trained weights, and print PSNR before and after with the paths of everything written.
set -euo pipefail
DATA=${1:-data/sample}
FSVIDEO=${FSVIDEO:-.venv/bin/fsvideo}
PY=${PY:-.venv/bin/python}
STEPS=${DEMO_STEPS:-300}
DATA_ARGS=(--data.init_args.train_shards "$DATA/train-{000000..000003}.tar" --data.init_args.val_shards "$DATA/val-000000.tar")
EVAL=runs/tiny-fsae-eval

echo "== 1/3 held-out reconstruction with random weights"
"$FSVIDEO" validate --config configs/tiny/fsae-eval.yaml "${DATA_ARGS[@]}" --trainer.default_root_dir "$EVAL/random-init"

echo "== 2/3 FSAE stage 1 (tiny) on the sample shards, $STEPS steps"
"$FSVIDEO" fit --config configs/tiny/fsae-stage1.yaml "${DATA_ARGS[@]}" --trainer.max_steps "$STEPS"

echo "== 3/3 held-out reconstruction with the trained (EMA) weights"
"$FSVIDEO" validate --config configs/tiny/fsae-eval.yaml "${DATA_ARGS[@]}" --trainer.default_root_dir "$EVAL/trained" \
  --model.init_args.init_from runs/tiny-fsae-stage1/checkpoints/last.ckpt

"$PY" - "$EVAL" <<'PY'
import json, sys
from pathlib import Path

root = Path(sys.argv[1])
before, after = (json.loads((root / name / "metrics_table.jsonl").read_text().splitlines()[-1]) for name in ("random-init", "trained"))
print(f"\nheld-out PSNR: {before['val/psnr']:.2f} dB (random init) -> {after['val/psnr']:.2f} dB (trained)")
print(f"held-out SSIM: {before['val/ssim']:.3f} -> {after['val/ssim']:.3f}   LPIPS: {before['val/lpips']:.3f} -> {after['val/lpips']:.3f}")
videos = sorted((root / "trained" / "videos").rglob("*.mp4"))
print("side-by-side reconstructions (left: input, right: FSAE):", *videos, sep="\n  ")
print("checkpoints and resolved config: runs/tiny-fsae-stage1/{checkpoints,config.yaml}")
print("wandb run (offline; `wandb sync` uploads it):", *sorted(Path("runs/tiny-fsae-stage1/wandb").glob("offline-run-*"))[-1:])
if after["val/psnr"] <= before["val/psnr"]:
    sys.exit("PSNR did not rise: training did not work")
PY
