#!/usr/bin/env bash
# Train sdxs-emoji from scratch with the project's own commands (issue 5, item 1). See docs/training-emoji.md.
#
#   scripts/train-emoji.sh                      # the full recipe (configs/emoji/*.toml) into runs/emoji
#   SMOKE=1 RUN=runs/emoji-smoke scripts/train-emoji.sh           # 30 steps per stage: checks the chain works
#   TE_STEPS=200 VAE_STEPS=200 UNET_STEPS=500 scripts/train-emoji.sh   # any stage length
#   V2=1 scripts/train-emoji.sh                 # sdxs-emoji v2: the shipped v1 fine-tuned (issue 16), see below
#
# Stages (each one project command; a finished stage leaves RUN/.done-STAGE and is skipped on a rerun):
#   1 te        sdxs train text-encoder   tokenizer + Qwen3.5 VLM on the captions (refine + image->caption pairs)
#   2 model     sdxs init                 model folder: trained text encoder + fresh emoji VAE, UNet, scheduler
#   3 vae       sdxs train vae            64 px -> 128 px asymmetric VAE; then `sdxs init --base` swaps it in
#   3b decoder  sdxs train vae            the same VAE's decoder fine-tuned alone (encoder frozen); swapped in too
#   4 prepare   sdxs prepare              latent cache with caption and encode_image embeddings
#   5 unet      sdxs train unet           flow matching, 20% image prompts
#   6 export    sdxs export               fp16 hub folder in OUT (< 60 MB), loaded back with plain diffusers
# Resumable: an interrupted training stage continues from its latest checkpoint (--resume latest), prepare skips
# finished shards, init/export are rewritten whole. Delete RUN/.done-STAGE to redo a stage (and the ones after it).
#
# V2=1 (issue 16): instead of stages 1-5 from scratch, start from the model in BASE (default: the repo root, which
# is v2 itself since 2026-12-02; BASE=a v1 folder from `git archive 0bed702 ...` reproduces the shipped v2):
#   2v2 model   sdxs init RUN/model-v2 --base BASE --shift 1     the v1 model with the v2 noise shift
#   4v2 prepare sdxs prepare DATA RUN/cache-v2 (the v2 dataset: bare-name caption lines) --image-embeds
#   4v2 weights python scripts/kind_weights.py DATA/.. RUN/kind-weights.csv   objects 2x, flags/smileys/symbols 1.5x,
#               toned people 0.7x (recipe E of docs/training-emoji.md)
#   5v2 unet    sdxs train unet --config configs/emoji/unet-v2e.toml (shift 1, uniform sigmas, tones balanced,
#               weighted by kind, image prompts at sigma >= 0.5, constant lr + EMA)
#   6v2 export  sdxs export RUN/unet-v2 OUT --dtype fp16
# UNET_STEPS sets how far the v2 run goes (default 3,600: the shipped v2; more resumes the same run).
#
# Environment: RUN (runs/emoji), DATA (data/emoji/train), OUT (RUN/export); TE_STEPS, VAE_STEPS, DECODER_STEPS,
# UNET_STEPS (default: the recipes'); TE_ARGS, VAE_ARGS (both VAE stages), UNET_ARGS, PREPARE_ARGS: extra overrides or
# flags, split on spaces (e.g. UNET_ARGS="run.mixed_precision=bf16 data.batch_size=128"); SMOKE=1: 30 steps per
# stage, no sample grids, batch sizes as in the recipes.
set -euo pipefail
set -f # overrides like sample.prompts=[] must not be globbed

cd "$(dirname "$0")/.."
RUN=${RUN:-runs/emoji}
DATA=${DATA:-data/emoji/train}
OUT=${OUT:-$RUN/export}
if [[ "${SMOKE:-0}" != 0 ]]; then
  TE_STEPS=${TE_STEPS:-30} VAE_STEPS=${VAE_STEPS:-30} DECODER_STEPS=${DECODER_STEPS:-30} UNET_STEPS=${UNET_STEPS:-30}
  UNET_ARGS="sample.prompts=[] ${UNET_ARGS:-}"
fi
TE_ARGS=${TE_ARGS:-} VAE_ARGS=${VAE_ARGS:-} UNET_ARGS=${UNET_ARGS:-} PREPARE_ARGS=${PREPARE_ARGS:-}
mkdir -p "$RUN"

log() { printf '\n== %s  %s\n' "$(date +%H:%M:%S)" "$*"; }
done_stage() { [[ -f "$RUN/.done-$1" ]]; }
mark() { date -Iseconds >"$RUN/.done-$1"; }
steps() { [[ -n "$1" ]] && echo "run.max_steps=$1" || true; }

# sdxs train KIND CONFIG DIR [overrides...]: resume from the latest complete checkpoint when there is one
train() {
  local kind=$1 config=$2 dir=$3
  shift 3
  local resume=()
  if compgen -G "$dir/checkpoints/step-*/state.json" >/dev/null; then
    resume=(--resume latest)
    log "resuming $kind from $(ls -d "$dir"/checkpoints/step-* | tail -1)"
  fi
  sdxs train "$kind" --config "$config" "${resume[@]}" run.output_dir="$dir" "$@"
}

if [[ "${V2:-0}" != 0 ]]; then
  BASE=${BASE:-.}
  if ! done_stage model-v2; then
    log "2/4 (v2) model folder: $BASE with scheduler shift 1"
    sdxs init "$RUN/model-v2" --base "$BASE" --shift 1
    mark model-v2
  fi
  if ! done_stage prepare-v2; then
    log "3/4 (v2) latent cache (three caption lines per image + encode_image embeddings)"
    # shellcheck disable=SC2086
    sdxs prepare "$DATA" "$RUN/cache-v2" --model "$RUN/model-v2" --image-embeds $PREPARE_ARGS
    mark prepare-v2
  fi
  weights=()
  if [[ -f "$(dirname "$DATA")/splits.jsonl" ]]; then  # an `sdxs data emoji` folder: weight the draws by kind
    if ! done_stage weights-v2; then
      log "3b/4 (v2) sampling weights by kind"
      python scripts/kind_weights.py "$(dirname "$DATA")" "$RUN/kind-weights.csv" --split "$(basename "$DATA")" \
        --weight objects=2 --weight flags=1.5 --weight smileys=1.5 --weight symbols=1.5 --weight toned=0.7 --power 0.5
      mark weights-v2
    fi
    weights=(data.sample_weights="$RUN/kind-weights.csv")
  else
    log "no $(dirname "$DATA")/splits.jsonl (not an \`sdxs data emoji\` folder): no weights by kind"
  fi
  if ! done_stage unet-v2; then
    log "4/4 (v2) UNet fine-tune"
    # shellcheck disable=SC2086
    train unet configs/emoji/unet-v2e.toml "$RUN/unet-v2" model.pretrained="$RUN/model-v2" data.path="$RUN/cache-v2" \
      "${weights[@]}" $(steps "${UNET_STEPS:-3600}") $UNET_ARGS
    mark unet-v2
  fi
  if ! done_stage export-v2; then
    log "export (fp16) to $OUT"
    sdxs export "$RUN/unet-v2" "$OUT" --dtype fp16
    mark export-v2
  fi
  log "done: $OUT"
  exit 0
fi

if ! done_stage te; then
  log "1/6 text encoder + tokenizer"
  # shellcheck disable=SC2086  # word splitting of the extra overrides is intended
  train text-encoder configs/emoji/text_encoder.toml "$RUN/text_encoder" data.path="$DATA" $(steps "${TE_STEPS:-}") $TE_ARGS
  mark te
fi

if ! done_stage model; then
  log "2/6 model folder: trained text encoder + fresh emoji VAE/UNet/scheduler"
  sdxs init "$RUN/model" --preset emoji --text-encoder "$RUN/text_encoder"
  mark model
fi

if ! done_stage vae; then
  log "3/6 VAE (64 px -> 128 px)"
  # shellcheck disable=SC2086
  train vae configs/emoji/vae.toml "$RUN/vae" data.path="$DATA" $(steps "${VAE_STEPS:-}") $VAE_ARGS
  sdxs init "$RUN/model" --base "$RUN/model" --vae "$RUN/vae"
  mark vae
fi

if ! done_stage decoder; then
  log "3b/6 VAE decoder fine-tune (encoder, latent space and scaling factor unchanged)"
  # shellcheck disable=SC2086
  train vae configs/emoji/vae-decoder.toml "$RUN/vae-decoder" model.pretrained="$RUN/model" data.path="$DATA" \
    $(steps "${DECODER_STEPS:-}") $VAE_ARGS
  sdxs init "$RUN/model" --base "$RUN/model" --vae "$RUN/vae-decoder"
  mark decoder
fi

if ! done_stage prepare; then
  log "4/6 latent cache (captions + encode_image embeddings)"
  # shellcheck disable=SC2086
  sdxs prepare "$DATA" "$RUN/cache" --model "$RUN/model" --image-embeds $PREPARE_ARGS
  mark prepare
fi

if ! done_stage unet; then
  log "5/6 UNet (flow matching, image prompts)"
  # shellcheck disable=SC2086
  train unet configs/emoji/unet.toml "$RUN/unet" model.pretrained="$RUN/model" data.path="$RUN/cache" \
    $(steps "${UNET_STEPS:-}") $UNET_ARGS
  mark unet
fi

if ! done_stage export; then
  log "6/6 export (fp16) to $OUT"
  sdxs export "$RUN/unet" "$OUT" --dtype fp16
  mark export
fi

set +f
size=$(du -cb "$OUT"/{unet,vae,text_encoder,tokenizer,scheduler,vision_processor} "$OUT"/*.json "$OUT"/pipeline.py 2>/dev/null | tail -1 | cut -f1)
log "done: $OUT ($((size / 1000000)) MB; limit for the repo root: 60 MB)"
if ((size > 60000000)); then
  echo "warning: $OUT is over 60 MB" >&2
fi
