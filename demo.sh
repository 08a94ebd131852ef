#!/usr/bin/env bash
# The whole recipe, tiny, on a CPU (run it with `make demo`, which also sets up .venv and the sample data):
# FSAE stage 1 -> latent cache -> base DiT pretraining -> generate a video from a held-out image ->
# latent upsampler -> refiner -> generate with the two-stage chain at twice the size, and a contact sheet ->
# refiner distillation to 8 steps -> video reward finetuning -> ReFL of the base DiT -> GRPO of the distilled refiner.
# Each step is a real `fsvideo` command with its own config; checkpoints are chained by config.
# Outputs go below the current folder (runs/, data/); DEMO_AE_STEPS / DEMO_DIT_STEPS set the training lengths.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIGS="$ROOT/configs"
DATA=${1:-data/sample}
FSVIDEO=${FSVIDEO:-$ROOT/.venv/bin/fsvideo}
PY=${PY:-$ROOT/.venv/bin/python}
AE_STEPS=${DEMO_AE_STEPS:-300}
DIT_STEPS=${DEMO_DIT_STEPS:-200}
UPSAMPLER_STEPS=${DEMO_UPSAMPLER_STEPS:-50}
REFINER_STEPS=${DEMO_REFINER_STEPS:-30}
DISTILL_STEPS=${DEMO_DISTILL_STEPS:-10}
REWARD_STEPS=${DEMO_REWARD_STEPS:-8}
REFL_STEPS=${DEMO_REFL_STEPS:-10}
GRPO_STEPS=${DEMO_GRPO_STEPS:-2}
ENCODERS=data/tiny-encoders
LATENTS=data/latents/tiny
EVAL=runs/tiny-fsae-eval
SHARDS=(--data.init_args.train_shards "$DATA/train-{000000..000003}.tar" --data.init_args.val_shards "$DATA/val-000000.tar")
CACHE_ARGS=(--text-encoder "$ENCODERS/text" --image-encoder "$ENCODERS/image" --size 128 --num-frames 17 --text-len 32)

echo "== 1/14 tiny random text/image encoders (stand-ins for UMT5 and CLIP; nothing is downloaded)"
[ -d "$ENCODERS/text" ] || "$FSVIDEO" data tiny-encoders --out "$ENCODERS"

echo "== 2/14 FSAE: held-out reconstruction with random weights"
"$FSVIDEO" validate --config "$CONFIGS"/tiny/fsae-eval.yaml "${SHARDS[@]}" --trainer.default_root_dir "$EVAL/random-init"

echo "== 3/14 FSAE stage 1 (L1 + 0.1 LPIPS) on the sample shards, $AE_STEPS steps"
"$FSVIDEO" fit --config "$CONFIGS"/tiny/fsae-stage1.yaml "${SHARDS[@]}" --trainer.max_steps "$AE_STEPS"

echo "== 4/14 FSAE: held-out reconstruction with the trained (EMA) weights"
"$FSVIDEO" validate --config "$CONFIGS"/tiny/fsae-eval.yaml "${SHARDS[@]}" --trainer.default_root_dir "$EVAL/trained" \
  --model.init_args.init_from runs/tiny-fsae-stage1/checkpoints/last.ckpt

echo "== 5/14 latent cache of the sample shards with the trained FSAE"
rm -rf "$LATENTS"
FSAE=runs/tiny-fsae-stage1/export/autoencoder  # the saved-model folder the fit exported (fsvideo export does it too)
"$FSVIDEO" data encode --config "$FSAE" --shards "$DATA/train-{000000..000003}.tar" --out "$LATENTS/train" "${CACHE_ARGS[@]}"
"$FSVIDEO" data encode --config "$FSAE" --shards "$DATA/val-000000.tar" --out "$LATENTS/val" --validation "${CACHE_ARGS[@]}"

echo "== 6/14 base DiT video pretraining (flow matching, Layer Memory) on the cache, $DIT_STEPS steps"
"$FSVIDEO" fit --config "$CONFIGS"/tiny/dit-pretrain-video.yaml --model.init_args.init_from null \
  --trainer.max_steps "$DIT_STEPS" --data.init_args.train_cache "$LATENTS/train" --data.init_args.val_cache "$LATENTS/val"

echo "== 7/14 image-to-video from a held-out first frame"
"$PY" - "$DATA/val-000000.tar" runs/demo/first-frame.png <<'PY'
import io, sys, tarfile
from pathlib import Path

import av

shard, out = sys.argv[1:]
with tarfile.open(shard) as tar:
    member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
    with av.open(io.BytesIO(tar.extractfile(member).read())) as container:
        frame = next(container.decode(video=0))
Path(out).parent.mkdir(parents=True, exist_ok=True)
frame.to_image().save(out)
print(f"first frame of {member.name} -> {out}")
PY
"$FSVIDEO" generate --config "$CONFIGS"/pipeline/tiny-demo.yaml --image runs/demo/first-frame.png \
  --prompt "the camera pans slowly to the left" --out runs/demo/generated.mp4

echo "== 8/14 latent upsampler ×2 (eq. 9) on the sample shards, $UPSAMPLER_STEPS steps"
"$FSVIDEO" fit --config "$CONFIGS"/tiny/upsampler.yaml "${SHARDS[@]}" --trainer.max_steps "$UPSAMPLER_STEPS"

echo "== 9/14 refiner (masked video-to-video from the upsampled drafts), $REFINER_STEPS steps"
"$FSVIDEO" fit --config "$CONFIGS"/tiny/refiner-pretrain.yaml "${SHARDS[@]}" --trainer.max_steps "$REFINER_STEPS" \
  --data.init_args.latent_stats "$LATENTS/train/stats.json"

echo "== 10/14 the two-stage chain: base DiT at 128² -> upsampler -> refiner at 256², and a contact sheet"
"$FSVIDEO" generate --config "$CONFIGS"/pipeline/tiny-demo-2x.yaml --image runs/demo/first-frame.png \
  --prompt "the camera pans slowly to the left" --out runs/demo/generated-2x.mp4
"$FSVIDEO" report contact-sheet --image runs/demo/first-frame.png --video "base stage (128x128)=runs/demo/generated.mp4" \
  --video "after upsampler + refiner (256x256)=runs/demo/generated-2x.mp4" --out runs/demo/contact-sheet.png

echo "== 11/14 refiner distillation (§2.4.3): CFG -> progressive (64 -> 32 steps) -> SiDA (8 steps), $DISTILL_STEPS steps each"
for stage in cfg progressive sida; do
  "$FSVIDEO" fit --config "$CONFIGS"/tiny/refiner-distill-$stage.yaml "${SHARDS[@]}" --trainer.max_steps "$DISTILL_STEPS" \
    --data.init_args.latent_stats "$LATENTS/train/stats.json"
done
"$FSVIDEO" generate --config "$CONFIGS"/pipeline/tiny-demo-distilled.yaml --image runs/demo/first-frame.png \
  --prompt "the camera pans slowly to the left" --out runs/demo/generated-2x-distilled.mp4

echo "== 12/14 video reward finetuning: a tiny random Qwen2-VL reward on synthetic pairs (brighter preferred), $REWARD_STEPS steps"
[ -d data/tiny-rewards/qwen2_vl ] || "$FSVIDEO" rewards tiny-models --out data/tiny-rewards
[ -f data/tiny-pairs/train/pairs.jsonl ] || "$FSVIDEO" rewards tiny-pairs --out data/tiny-pairs
"$FSVIDEO" fit --config "$CONFIGS"/tiny/rewards-finetune.yaml --trainer.max_steps "$REWARD_STEPS"

echo "== 13/14 ReFL of the base DiT against that reward and a tiny CLIP frame reward, $REFL_STEPS steps"
"$FSVIDEO" fit --config "$CONFIGS"/tiny/dit-refl.yaml --trainer.max_steps "$REFL_STEPS" \
  --data.init_args.train_cache "$LATENTS/train" --data.init_args.val_cache "$LATENTS/val"

echo "== 14/14 GRPO of the distilled refiner (§2.4.3) against the same reward, MixGRPO window, $GRPO_STEPS steps"
"$FSVIDEO" fit --config "$CONFIGS"/tiny/refiner-grpo.yaml "${SHARDS[@]}" --trainer.max_steps "$GRPO_STEPS" \
  --data.init_args.batches_per_epoch "$GRPO_STEPS" --data.init_args.latent_stats "$LATENTS/train/stats.json" \
  --trainer.limit_val_batches 0 --model.init_args.watch.every_n_steps 0  # time: no validation, no held-out watch

"$PY" - "$EVAL" <<'PY'
import json, sys
from pathlib import Path

from callbacks.loss_history import read_loss_history

root = Path(sys.argv[1])
before, after = (json.loads((root / name / "metrics_table.jsonl").read_text().splitlines()[-1]) for name in ("random-init", "trained"))
steps, losses = read_loss_history("runs/tiny-dit-pretrain-video")
head, tail = losses[: max(1, len(losses) // 5)].mean(), losses[-max(1, len(losses) // 5) :].mean()
print("\n== what the demo shows")
print(f"FSAE held-out PSNR: {before['val/psnr']:.2f} dB (random init) -> {after['val/psnr']:.2f} dB (trained)")
print(f"DiT training loss: {head:.4f} (first fifth of {len(losses)} steps) -> {tail:.4f} (last fifth)")
print("generated video:             runs/demo/generated.mp4 (+ runs/demo/generated.json, the settings)")
print("two-stage video (2× size):   runs/demo/generated-2x.mp4 (+ .json with both stages' times and NFE)")
print("contact sheet (look at it):  runs/demo/contact-sheet.png  (input | base frames | final frames)")
print("distilled refiner (8 NFE):   runs/demo/generated-2x-distilled.mp4 (+ .json: NFE per stage)")
print("reconstructions (input|FSAE):", *sorted((root / "trained" / "videos").rglob("*.mp4")), sep="\n  ")
print("checkpoints + resolved configs: runs/tiny-fsae-stage1/, runs/tiny-dit-pretrain-video/, runs/tiny-upsampler/,")
print("  runs/tiny-refiner-pretrain/, runs/tiny-rewards-finetune/, runs/tiny-dit-refl/ (reward curves: train/reward_*, watch/*),")
print("  runs/tiny-refiner-grpo/ (train/reward_mean, train/ratio_*, train/clip_fraction, train/window_position)")
print("saved-model folders (what the pipeline loaded): runs/tiny-fsae-stage1/export/, runs/tiny-dit-pretrain-video/export/")
for run in ("tiny-fsae-stage1", "tiny-dit-pretrain-video"):
    print(f"wandb run (offline; `wandb sync` uploads it):", *sorted(Path(f"runs/{run}/wandb").glob("offline-run-*"))[-1:])
if after["val/psnr"] <= before["val/psnr"] or tail >= head:
    sys.exit("a stage did not learn: its metric did not improve")
PY
