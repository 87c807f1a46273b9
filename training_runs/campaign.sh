#!/usr/bin/env bash
# Continue the packaged model's training campaign (issue 15) for MINUTES minutes, then stop, saving `last`.
#   bash training_runs/campaign.sh 120          # run in the background; resumes where the last session stopped
#   bash training_runs/campaign.sh 120 --lr 2e-4 --lr-min 1e-5 --t-max 60   # resume into a new cosine phase
#   bash training_runs/campaign.sh 120 --synth-fine-disp-mm 8 --reg-weight 0.5  # change data or loss balance
# The campaign is `brains-2mm-frw`: em-23-hires-s-frw (em-23-hires-s + a full-resolution flow stage that sees
# the moving image warped by the half-resolution flow), warm-started from step 49,600 of `brains-2mm`
# (em-23-hires-s, iterations 0-49,797), with only the new stage training (--train-only full_res.). The first
# call starts it with the recipe below; later calls resume it (same step, learning rate, data); options after
# MINUTES are passed to the resume (see `emorph train --help`). Its history (a new cosine phase at 1,515 and
# at 3,725, fine-scale deformations of 12 mm from 3,725, NCC weight 2 from 5,895 to 8,280: not better; NCC
# weight 1 again from 8,280, so resume with --ncc-weight 1) is in training_runs/README.md.
# CAMPAIGN_RUN=training_runs/brains-2mm-fr (the stage on the pair, no longer packaged),
# CAMPAIGN_RUN=training_runs/brains-2mm (the backbone) or CAMPAIGN_RUN=training_runs/brains-2mm-sup (the
# whole network with the endpoint loss on known-flow pairs, not packaged) resumes an earlier run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: campaign.sh MINUTES [TRAIN OPTIONS...]}
shift
run=${CAMPAIGN_RUN:-training_runs/brains-2mm-frw}
if [[ -f $run/last.json ]]; then
    exec emorph train --out "$run" --resume --max-minutes "$minutes" --workers 1 --no-progress "$@"
fi
exec emorph train --out "$run" --model em-23-hires-s-frw --drop-path 0 \
    --init-from training_runs/brains-2mm/best.json --train-only full_res. \
    --grid 2mm --synthetic-kind brains --synth-ramp-epochs 0 --synth-fine-disp-mm 8 --synth-affine-fraction 0.25 \
    --one-direction --amp auto --workers 1 --steps-per-epoch 100 --epochs 100000 --val-pairs 8 \
    --lr 1e-3 --lr-min 5e-5 --t-max 50 --reg-weight 0.1 --ncc-weight 1.0 --dice-weight 1.0 \
    --checkpoint-every 50 --best-metric dice_aligned --seed 1 --max-minutes "$minutes" --no-progress \
    --no-tensorboard
