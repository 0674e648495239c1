#!/usr/bin/env bash
# Reproduce sdxs-emoji, the model at the repository root, from nothing: every stage that made it, in order, with the
# step counts as they were run (docs/training-emoji.md says what each stage does, why, and what it cost).
#
#   scripts/train-emoji.sh                         # into runs/emoji; ~47 h on 2 CPU cores, resumable (rerun it)
#   GPU=1 scripts/train-emoji.sh                   # the same stages with bf16 autocast on a CUDA GPU
#   SMOKE=1 RUN=/tmp/smoke scripts/train-emoji.sh  # 2 steps a stage: the whole chain end to end in minutes
#   DATA=data/emoji scripts/train-emoji.sh         # an existing `sdxs data emoji` folder (no download)
#
# Stages (one project command each; a finished stage leaves RUN/.done-NAME and is skipped on a rerun; a training
# stage that was interrupted continues from its latest checkpoint):                                      steps x batch
#   data      sdxs data emoji                  Fluent Emoji 3D renders + names + keywords (npm, MIT)
#   te        sdxs train text-encoder          tokenizer + Qwen3.5 VLM (hidden 256, 4 layers) on the captions  1,100 x 32
#   vae       sdxs train vae                   asymmetric VAE, 64 px -> 128 px                                1,500 x 16
#   decoder   sdxs train vae                   its decoder alone (encoder and latent space frozen)            4,500 x 16
#   prepare   sdxs prepare --image-embeds      latents + caption and image embeddings; per-kind draw weights
#   unet-v1   sdxs train unet (unet.toml)      flow matching from scratch, then a warm restart       1,600 + 3,200 x 64
#   unet-e    sdxs train unet (unet-v2e.toml)  shift 1, uniform sigmas, weights by kind, image prompts    3,600 x 64
#   unet-f    the same recipe, fresh optimiser from E's EMA                                               2,000 x 64
#   unet-g    the same recipe, fresh optimiser from F's EMA                                              11,239 x 64
#   unet-h    G resumed with a linear cool-down 3e-4 -> 3e-5                                              2,000 x 64
#   unet-i    H resumed at the floor LR 3e-5                                                                851 x 64
#   refine    sdxs train text-encoder (text_encoder-refine.toml): the last layer, for refine_prompts 2,400 + 1,600 x 32
#   align     sdxs train text-align (text-align.toml): a lower-casing tokenizer and rewritten captions learnt
#             by the text encoder through the frozen UNet's cross-attention (v2.4 at step 2,000)      2,528 x 96
#             resumed with keyword lists and head-first names, bf16, a cool-down over the last 1,200 (v2.5) to 6,000
#             back at 2e-4 to 7,005, then filler words join the rewrites, a cool-down over the last 1,200 (v2.6) to 10,500
#             back at 2e-4 once more, a cool-down over the last 1,200 (v2.7) to 15,000
#   decoder-styles  sdxs data emoji --styles 3d,twemoji,noto, then sdxs train vae (vae-decoder-styles.toml): the
#             decoder on Fluent 3D, Twemoji (CC-BY 4.0) and Noto (Apache-2.0), 3d drawn twice as often (v2.8)  4,000 x 16
#   refine-2  the refine stage again, over the align stage's text encoder (whose lower layers it reads) (v2.9)
#                                                                                                 2,400 + 1,600 x 32
#   unet-styles  sdxs prepare DATA3/train, then sdxs train unet (unet-styles.toml): the UNet on the three styles,
#             each caption ending in its style's tag, the 3d renders weighed 1.5, to 7,000 (the last 2,400 cooling
#             down), back at 2e-4 to 8,400 and cooling down to 11,400; from its EMA a fork with the 3d renders weighed 2,
#             6,000 steps (the last 2,400 cooling down) and 1,600 at the floor, then weighed 3, back at 1e-4 cooling
#             down to 10,000 and once more to 11,600; the model declares the styles (v3.0)        11,400 + 11,600 x 64
#   export    sdxs init --base RUN/model --dtype fp16: the hub folder of the model at the root (v3.0)
# Runs F and G restarted from the previous run's EMA with a fresh optimiser, H and I resumed G's run: the sittings that
# made them lost or kept their machines, and the script reproduces them as they happened.
# Environment: RUN (runs/emoji), DATA (RUN/data), DATA3 (RUN/data3: three styles), OUT (RUN/export), ALIGN_*_STEPS
# (below), DEFAULT_STEPS.
set -euo pipefail
set -f # overrides like sample.prompts=[] must not be globbed

cd "$(dirname "$0")/.."
RUN=${RUN:-runs/emoji}
DATA=${DATA:-$RUN/data}
DATA3=${DATA3:-$RUN/data3}
OUT=${OUT:-$RUN/export}
# the text-align run of v2.7 (docs/experiments-log.md, "v3, sixteenth" to "nineteenth sitting"): ALIGN_STEPS with
# text-align.toml, then on to ALIGN_FORMS_STEPS with the two extra caption forms, the last ALIGN_DECAY_STEPS cooling down;
# back at the full LR to ALIGN_RESTART_STEPS, then on to ALIGN_FILLER_STEPS with filler words, cooling down again;
# from there once more at the full LR to ALIGN_FINAL_STEPS, cooling down again (v2.7)
ALIGN_STEPS=${ALIGN_STEPS:-2528}
ALIGN_FORMS_STEPS=${ALIGN_FORMS_STEPS:-6000}
ALIGN_RESTART_STEPS=${ALIGN_RESTART_STEPS:-7005}
ALIGN_FILLER_STEPS=${ALIGN_FILLER_STEPS:-10500}
ALIGN_FINAL_STEPS=${ALIGN_FINAL_STEPS:-15000}
ALIGN_DECAY_STEPS=${ALIGN_DECAY_STEPS:-1200}
DEFAULT_STEPS=${DEFAULT_STEPS:-8}  # from bench/bench_steps.py (docs/benchmarks.md, "Steps")
SMOKE=${SMOKE:-0}
# overrides every training stage gets (smoke: small batches, no periodic checkpoints; GPU: bf16 autocast)
EXTRA=()
if [[ "$SMOKE" != 0 ]]; then EXTRA=(run.checkpoint_every=0 run.log_every=1 run.progress_bar=false data.batch_size=4); fi
if [[ "${GPU:-0}" != 0 ]]; then EXTRA+=(run.mixed_precision=bf16); fi
mkdir -p "$RUN"

log() { printf '\n== %s  %s\n' "$(date +%H:%M:%S)" "$*"; }
mark() { date -Iseconds >"$RUN/.done-$1"; }
# leg NAME COMMAND...: one leg of a stage run in several, skipped once RUN/.done-NAME says it finished
leg() {
  local name=$1
  shift
  if [[ -f "$RUN/.done-$name" ]]; then return 0; fi
  "$@"
  mark "$name"
}
# stage NAME DESCRIPTION: true (and logged) when the stage still has to run
stage() {
  if [[ -f "$RUN/.done-$1" ]]; then return 1; fi
  log "$1: $2"
}
# steps N [K]: N, or 2 K in smoke mode (K: how many smoke stages this total spans)
steps() { if [[ "$SMOKE" != 0 ]]; then echo $((2 * ${2:-1})); else echo "$1"; fi; }

# the UNet's draw weights by kind (scripts/kind_weights.py): the prepare stage's, and the styles stage's times a style
KIND_WEIGHTS=(--weight objects=2 --weight flags=1.5 --weight smileys=1.5 --weight symbols=1.5 --weight toned=0.7
  --power 0.5)

# train KIND CONFIG DIR [overrides...]: resume from the latest complete checkpoint when there is one
train() {
  local kind=$1 config=$2 dir=$3
  shift 3
  local resume=() extra=(${EXTRA[@]+"${EXTRA[@]}"})
  if compgen -G "$dir/checkpoints/step-*/state.json" >/dev/null; then resume=(--resume latest); fi
  if [[ "$SMOKE" != 0 && $kind == unet ]]; then extra+=(sample.prompts=[]); fi
  if [[ "$SMOKE" != 0 && $kind == vae ]]; then extra+=(loss.stats_batches=1); fi
  sdxs train "$kind" --config "$config" ${resume[@]+"${resume[@]}"} run.output_dir="$dir" run.export_at_end=false \
    "$@" ${extra[@]+"${extra[@]}"}
}

if stage data "the dataset"; then
  [[ -f "$DATA/splits.jsonl" ]] || sdxs data emoji "$DATA"
  mark data
fi
TRAIN_DATA="$DATA/train"

if stage te "text encoder + tokenizer on the captions"; then
  train text-encoder configs/emoji/text_encoder.toml "$RUN/text_encoder" data.path="$TRAIN_DATA" \
    run.max_steps="$(steps 1100)"
  sdxs init "$RUN/model" --preset emoji --text-encoder "$RUN/text_encoder"
  mark te
fi

if stage vae "VAE (64 px -> 128 px)"; then
  train vae configs/emoji/vae.toml "$RUN/vae" data.path="$TRAIN_DATA" run.max_steps="$(steps 1500)"
  sdxs init "$RUN/model" --base "$RUN/model" --vae "$RUN/vae"
  mark vae
fi

if stage decoder "VAE decoder fine-tune (encoder frozen)"; then
  train vae configs/emoji/vae-decoder.toml "$RUN/vae-decoder" model.pretrained="$RUN/model" \
    data.path="$TRAIN_DATA" run.max_steps="$(steps 4500)"
  sdxs init "$RUN/model" --base "$RUN/model" --vae "$RUN/vae-decoder"
  mark decoder
fi

if stage prepare "latent cache with caption and image embeddings, draw weights by kind"; then
  sdxs prepare "$TRAIN_DATA" "$RUN/cache" --model "$RUN/model" --image-embeds --no-progress
  python scripts/kind_weights.py "$DATA" "$RUN/kind-weights.csv" "${KIND_WEIGHTS[@]}"
  mark prepare
fi

if stage unet-v1 "UNet v1: flow matching from scratch (1,600 steps, then a warm restart to 4,800)"; then
  train unet configs/emoji/unet.toml "$RUN/unet-v1" model.pretrained="$RUN/model" data.path="$RUN/cache" \
    run.max_steps="$(steps 1600)"
  train unet configs/emoji/unet.toml "$RUN/unet-v1" model.pretrained="$RUN/model" data.path="$RUN/cache" \
    run.max_steps="$(steps 4800 2)"
  sdxs init "$RUN/model" --base "$RUN/model" --unet "$RUN/unet-v1" --shift 1 # v2 onwards: noise shift 1
  mark unet-v1
fi

# v2 runs: a model folder per run (its starting UNet), the same cache, draws weighted by kind
v2() { echo model.pretrained="$RUN/model-$1" data.path="$RUN/cache" data.sample_weights="$RUN/kind-weights.csv"; }
# restart NAME FROM STEPS: recipe E from run FROM's EMA UNet with a fresh optimiser (what a new machine forced)
restart() {
  sdxs init "$RUN/model-$1" --base "$RUN/model" --unet "$RUN/unet-$2"
  # shellcheck disable=SC2046  # v2's words are separate overrides
  train unet configs/emoji/unet-v2e.toml "$RUN/unet-$1" $(v2 "$1") run.max_steps="$3"
}
if stage unet-e "UNet v2, recipe E (3,600 steps from v1)"; then
  sdxs init "$RUN/model-e" --base "$RUN/model"
  # shellcheck disable=SC2046
  train unet configs/emoji/unet-v2e.toml "$RUN/unet-e" $(v2 e) run.max_steps="$(steps 3600)"
  mark unet-e
fi
if stage unet-f "run F: recipe E from E's EMA, fresh optimiser (2,000 steps)"; then
  restart f e "$(steps 2000)"
  mark unet-f
fi
if stage unet-g "run G: recipe E from F's EMA, fresh optimiser (11,239 steps)"; then
  restart g f "$(steps 11239)"
  mark unet-g
fi
H=$(($(steps 11239) + $(steps 2000)))
if stage unet-h "run H: G resumed with a 2,000-step linear cool-down to 3e-5"; then
  # shellcheck disable=SC2046
  train unet configs/emoji/unet-v2e.toml "$RUN/unet-g" $(v2 g) run.max_steps="$H" optim.decay_steps="$(steps 2000)"
  mark unet-h
fi
if stage unet-i "run I: H resumed at the floor LR 3e-5 (851 steps)"; then
  # shellcheck disable=SC2046
  train unet configs/emoji/unet-v2e.toml "$RUN/unet-g" $(v2 g) run.max_steps="$((H + $(steps 851)))" \
    optim.lr=3e-5 optim.decay_steps=0
  sdxs init "$RUN/model" --base "$RUN/model" --unet "$RUN/unet-g"
  mark unet-i
fi

if stage refine "refine_prompts: the text encoder's last layer on name -> caption pairs (2,400, then to 4,000)"; then
  train text-encoder configs/emoji/text_encoder-refine.toml "$RUN/refine" model.pretrained="$RUN/model" \
    data.path="$TRAIN_DATA" run.max_steps="$(steps 2400)"
  train text-encoder configs/emoji/text_encoder-refine.toml "$RUN/refine" model.pretrained="$RUN/model" \
    data.path="$TRAIN_DATA" run.max_steps="$(steps 4000 2)" optim.extend=replan
  sdxs init "$RUN/model" --base "$RUN/model" --text-encoder "$RUN/refine"
  mark refine
fi

if stage align "the text encoder learns a lower-casing tokenizer and rewritten captions ($ALIGN_FINAL_STEPS steps)"; then
  sdxs init "$RUN/model-lower" --base "$RUN/model" --text-normalization nfkc,lowercase
  sdxs prepare "$TRAIN_DATA" "$RUN/cache-align" --model "$RUN/model" --image-embeds --no-progress
  align=(model.pretrained="$RUN/model" model.tokenizer="$RUN/model-lower/tokenizer" data.path="$RUN/cache-align"
    data.sample_weights="$RUN/kind-weights.csv")
  run_align=(train text-align configs/emoji/text-align.toml "$RUN/align" "${align[@]}")
  # leg 1, as v2.4's run went (v2.4 is its step 2,000)
  leg align-1 "${run_align[@]}" run.max_steps="$(steps "$ALIGN_STEPS")"
  # leg 2: keyword lists ("coffee, caffeine, drink") and head-first names ("apple (red)") join the rewrites (v2.5)
  run_align+=(captions.keywords_form=0.1 captions.head_first=0.08 run.mixed_precision=bf16)
  leg align-2 "${run_align[@]}" run.max_steps="$(steps "$ALIGN_FORMS_STEPS" 2)" \
    optim.decay_steps="$(steps "$ALIGN_DECAY_STEPS")"
  # leg 3: back at the full LR without a cool-down (that run was stopped at 7,005 to start leg 4)
  leg align-3 "${run_align[@]}" run.max_steps="$(steps "$ALIGN_RESTART_STEPS" 3)" optim.decay_steps=0
  # leg 4: 1-2 common words the captions never use around the subject ("wonder red apple"; DATA/words.txt) (v2.6)
  run_align+=(captions.filler=0.3 captions.filler_words="$DATA/words.txt")
  leg align-4 "${run_align[@]}" run.max_steps="$(steps "$ALIGN_FILLER_STEPS" 4)" \
    optim.decay_steps="$(steps "$ALIGN_DECAY_STEPS")"
  # leg 5: a warm restart of leg 4's end at the full LR, cooling down over its last ALIGN_DECAY_STEPS (v2.7)
  "${run_align[@]}" run.max_steps="$(steps "$ALIGN_FINAL_STEPS" 5)" optim.decay_steps="$(steps "$ALIGN_DECAY_STEPS")"
  sdxs init "$RUN/model" --base "$RUN/model" --text-encoder "$RUN/align"
  mark align
fi

if stage decoder-styles "the VAE decoder on three styles, 3d drawn twice as often (encoder frozen)"; then
  [[ -f "$DATA3/splits.jsonl" ]] || sdxs data emoji "$DATA3" --styles 3d,twemoji,noto
  python scripts/kind_weights.py "$DATA3" "$RUN/vae-style-weights.csv" --style-weight 3d=2 --balance "" --power 0
  train vae configs/emoji/vae-decoder-styles.toml "$RUN/vae-styles" model.pretrained="$RUN/model" \
    data.path="$DATA3/train" data.sample_weights="$RUN/vae-style-weights.csv" run.max_steps="$(steps 4000)"
  sdxs init "$RUN/model" --base "$RUN/model" --vae "$RUN/vae-styles"
  mark decoder-styles
fi

if stage refine-2 "refine_prompts again over the align stage's text encoder (2,400, then to 4,000)"; then
  train text-encoder configs/emoji/text_encoder-refine.toml "$RUN/refine-2" model.pretrained="$RUN/model" \
    data.path="$TRAIN_DATA" run.max_steps="$(steps 2400)"
  train text-encoder configs/emoji/text_encoder-refine.toml "$RUN/refine-2" model.pretrained="$RUN/model" \
    data.path="$TRAIN_DATA" run.max_steps="$(steps 4000 2)" optim.extend=replan
  sdxs init "$RUN/model" --base "$RUN/model" --text-encoder "$RUN/refine-2"
  mark refine-2
fi

if stage unet-styles "the UNet on three styles (11,400 steps), then a fork with the 3d renders weighed up (11,600)"; then
  [[ -f "$DATA3/splits.jsonl" ]] || sdxs data emoji "$DATA3" --styles 3d,twemoji,noto
  sdxs prepare "$DATA3/train" "$RUN/cache3" --model "$RUN/model" --image-embeds --no-progress
  # draw weights by kind as in the 3d stages, times 1.5, 2 and 3 for the 3d renders in the parts below
  for w in 1.5 2 3; do
    python scripts/kind_weights.py "$DATA3" "$RUN/style-weights-$w.csv" "${KIND_WEIGHTS[@]}" --style-weight 3d="$w"
  done
  styles=(train unet configs/emoji/unet-styles.toml "$RUN/unet-styles" model.pretrained="$RUN/model"
    data.path="$RUN/cache3" data.sample_weights="$RUN/style-weights-1.5.csv")
  # legs 1-2: 7,000 steps, the last 2,400 cooling down; back at 2e-4 to 8,400, cooling down to 11,400
  leg unet-styles-1 "${styles[@]}" run.max_steps="$(steps 7000)" optim.decay_steps="$(steps 2400)"
  leg unet-styles-2 "${styles[@]}" run.max_steps="$(steps 11400 2)" optim.decay_steps="$(steps 3000)"
  # the fork from leg 2's EMA (a fresh optimiser), 3d weighed 2: 6,000 steps, the last 2,400 cooling down, then
  # 1,600 at the floor 2e-5; then 3d weighed 3 (the data replanned), back at 1e-4 cooling down to 10,000 and once
  # more to 11,600. Until 10,000 the run read the dataset as it was before the 3d renders stopped being held out as
  # pairs (141 images of 63 emoji, docs/experiments-log.md); this script reads today's throughout.
  sdxs init "$RUN/model-styles" --base "$RUN/model" --unet "$RUN/unet-styles"
  fork=(train unet configs/emoji/unet-styles.toml "$RUN/unet-styles-3d" model.pretrained="$RUN/model-styles"
    data.path="$RUN/cache3")
  leg unet-styles-3 "${fork[@]}" data.sample_weights="$RUN/style-weights-2.csv" run.max_steps="$(steps 6000)" \
    optim.decay_steps="$(steps 2400)"
  leg unet-styles-4 "${fork[@]}" data.sample_weights="$RUN/style-weights-2.csv" run.max_steps="$(steps 7600 2)" \
    optim.lr=2e-5 optim.decay_steps=0
  fork+=(data.sample_weights="$RUN/style-weights-3.csv" run.replan_data=true optim.lr=1e-4)
  leg unet-styles-5 "${fork[@]}" run.max_steps="$(steps 10000 3)" optim.decay_steps="$(steps 2400)"
  "${fork[@]}" run.max_steps="$(steps 11600 4)" optim.decay_steps="$(steps 1600)"
  sdxs init "$RUN/model" --base "$RUN/model" --unet "$RUN/unet-styles-3d" \
    --style 3d="3d render" --style twemoji=flat --style noto=cartoon
  mark unet-styles
fi

if stage export "fp16 hub folder in $OUT (the model at the root)"; then
  sdxs init "$OUT" --base "$RUN/model" --dtype fp16 --default-steps "$DEFAULT_STEPS"
  mark export
fi
log "done: $OUT"
