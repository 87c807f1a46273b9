#!/usr/bin/env bash
# Continue the packaged model's training campaign (issue 15) for MINUTES minutes, then stop, saving `last`.
#   bash training_runs/campaign.sh 120          # run in the background; resumes where the last session stopped
#   bash training_runs/campaign.sh 120 --lr 2e-4 --lr-min 1e-5 --t-max 60   # resume into a new cosine phase
#   bash training_runs/campaign.sh 120 --synth-fine-disp-mm 8 --reg-weight 0.5  # change data or loss balance
# The campaign is `brains-2mm-same` since 2026-12-07 (night): the whole em-23-hires-s-frw fine-tuned from
# step 5,895 of `brains-2mm-frw` with near-identical (--synth-same-subject 0.25) and random-shapes
# (--synth-shapes 0.3) pairs; its step 2,852 is the packaged model. Resumed on 2026-12-07 (late) into a
# phase with --synth-shapes 0.5 and lr 5e-5 -> 5e-6 over 40 epochs, saved at 5,836 (flat; not packaged): a
# plain call continues that phase. Its predecessor `brains-2mm-frw` is
# em-23-hires-s-frw (em-23-hires-s + a full-resolution flow stage that sees
# the moving image warped by the half-resolution flow), warm-started from step 49,600 of `brains-2mm`
# (em-23-hires-s, iterations 0-49,797), with only the new stage training (--train-only full_res.); its
# history is in training_runs/README.md. A call resumes the run (same step, learning rate, data); options
# after MINUTES are passed to the resume (see `emorph train --help`). Without saved state the recipe below
# starts the run again; its original start, step 5,895 of brains-2mm-frw, is in git history only
# (emorph_deploy/weights/default.* before this run was packaged), so a restart takes that run's `best`.
# CAMPAIGN_RUN=training_runs/brains-2mm-cascade2 (since 2026-12-08: em-23-hires-s-frwc, a cascade stage
# learning on the frozen packaged network; not yet better, see training_runs/README.md) resumes that run,
# CAMPAIGN_RUN=training_runs/brains-2mm-frw (the stage alone on the frozen backbone, packaged until the
# night of 2026-12-07; resume it with --ncc-weight 1),
# CAMPAIGN_RUN=training_runs/brains-2mm-fr (the stage on the pair, no longer packaged),
# CAMPAIGN_RUN=training_runs/brains-2mm (the backbone) or CAMPAIGN_RUN=training_runs/brains-2mm-sup (the
# whole network with the endpoint loss on known-flow pairs, not packaged) resumes an earlier run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: campaign.sh MINUTES [TRAIN OPTIONS...]}
shift
run=${CAMPAIGN_RUN:-training_runs/brains-2mm-same}
if [[ -f $run/last.json ]]; then
    exec emorph train --out "$run" --resume --max-minutes "$minutes" --workers 1 --no-progress "$@"
fi
exec emorph train --out "$run" --model em-23-hires-s-frw --drop-path 0 \
    --init-from training_runs/brains-2mm-frw/best.json \
    --grid 2mm --synthetic-kind brains --synth-ramp-epochs 0 --synth-fine-disp-mm 12 --synth-affine-fraction 0.25 \
    --synth-same-subject 0.25 --synth-shapes 0.3 \
    --one-direction --amp auto --workers 1 --steps-per-epoch 100 --epochs 100000 --val-pairs 8 \
    --lr 1e-4 --lr-min 1e-5 --t-max 30 --reg-weight 0.1 --ncc-weight 1.0 --dice-weight 1.0 \
    --checkpoint-every 50 --best-metric dice_aligned --seed 5 --max-minutes "$minutes" --no-progress \
    --no-tensorboard
