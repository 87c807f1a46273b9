#!/usr/bin/env bash
# Continue the packaged model's training campaign (issue 15) for MINUTES minutes, then stop, saving `last`.
#   bash training_runs/campaign.sh 120          # run in the background; resumes where the last session stopped
#   bash training_runs/campaign.sh 120 --lr 2e-4 --lr-min 1e-5 --t-max 60   # resume into a new cosine phase
#   bash training_runs/campaign.sh 120 --synth-fine-disp-mm 8 --reg-weight 0.5  # change data or loss balance
#   bash training_runs/campaign.sh 120 --best-metric dice_aligned  # `best` follows the pre-aligned pairs
# The first call starts the run with the recipe below; later calls resume it (same step, learning rate, data);
# options after MINUTES are passed to the resume (see `emorph train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: campaign.sh MINUTES [TRAIN OPTIONS...]}
shift
run=training_runs/brains-2mm
if [[ -f $run/last.json ]]; then
    exec emorph train --out "$run" --resume --max-minutes "$minutes" --workers 1 --no-progress "$@"
fi
exec emorph train --out "$run" --model em-23-hires-s --grid 2mm --synthetic-kind brains \
    --synth-ramp-epochs 20 --one-direction --amp auto --workers 1 --steps-per-epoch 100 --epochs 100000 \
    --val-pairs 8 --lr 2e-4 --lr-min 1e-4 --t-max 100000 --reg-weight 1.0 --ncc-weight 1.0 \
    --dice-weight 1.0 --checkpoint-every 50 --max-minutes "$minutes" --no-progress --no-tensorboard
