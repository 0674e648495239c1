#!/usr/bin/env bash
# sdxs-emoji v2 on a GPU in one command (issue 16): the v2 recipe of scripts/train-emoji.sh (V2=1) with GPU
# settings, then the strict eval, everything written under OUT (default $OUT, else runs/gpu-v2) to bring back.
#
#   scripts/gpu-v2.sh                                  # on an H100/H200: ~8 min (budget below)
#   SMOKE=1 OUT=/tmp/gpu-v2-smoke DATA=/tmp/smoke/train EVAL_DATA=data/emoji scripts/gpu-v2.sh   # CPU check
#
# Smoke-tested on the 2-core CPU (2026-12-01): 39 training images (every 80th, symlinked), 4 UNet steps, the strict
# eval at 2 emoji per kind: init 13 s, prepare 19 s, UNet 22 s, export 15 s, eval 22 s; 104 s in all.
# On the device machine (no network): carry data/emoji (39 MB) with the working tree.
#
# Needs: data/emoji (from `sdxs data emoji data/emoji`; 39 MB, carry it to a machine without network), the
# project installed (`make setup`), the v1 model at the repo root (BASE). The UNet run resumes when rerun.
# Budget on an H200 (estimates from the CPU figures in docs/benchmarks.md, not yet measured): prepare ~1 min,
# UNet ~5 min (UNET_STEPS x batch 256 in bf16), export + strict eval ~1.5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-v2}
DATA=${DATA:-data/emoji/train}
EVAL_DATA=${EVAL_DATA:-$(dirname "$DATA")}
mkdir -p "$OUT"
if [[ "${SMOKE:-0}" != 0 ]]; then
  STEPS=${UNET_STEPS:-4} BATCH=${BATCH:-8} MP=${MP:-no} PER_KIND=${PER_KIND:-2}
  EVAL_ARGS="--no-refine --no-image-prompts --held-out 2 --steps 4"
else
  STEPS=${UNET_STEPS:-6000} BATCH=${BATCH:-256} MP=${MP:-bf16} PER_KIND=${PER_KIND:-40}
  EVAL_ARGS=""
fi
# uniform noise levels (stage B of docs/experiments-log.md): stage A's logit-normal sigmas at shift 1 starved the
# high-noise band where a prompt picks the emoji; on the CPU, 800 uniform steps after it took bare-name top-5 29% -> 40%
SIGMAS=${SIGMAS:-flow.timestep_sampling=uniform}
python -c "import sdxs" 2>/dev/null || make setup
start=$(date +%s)
V2=1 RUN="$OUT/run" DATA="$DATA" OUT="$OUT/export" UNET_STEPS="$STEPS" \
  UNET_ARGS="run.mixed_precision=$MP data.batch_size=$BATCH run.checkpoint_every=1000 $SIGMAS ${UNET_ARGS:-}" \
  bash scripts/train-emoji.sh 2>&1 | tee "$OUT/train.log"
# shellcheck disable=SC2086  # word splitting of EVAL_ARGS is intended
python scripts/strict_eval.py --model "$OUT/export" --data "$EVAL_DATA" --per-kind "$PER_KIND" \
  --json "$OUT/strict.json" --grid "$OUT/bare-names.png" $EVAL_ARGS 2>&1 | tee "$OUT/strict.md"
echo "wall time: $(($(date +%s) - start)) s; results in $OUT (export/, strict.md, strict.json, bare-names.png)"
