#!/usr/bin/env bash
# Runs a learning-rate × seed grid of one config, one run after another.
#   scripts/sweep.sh configs/superni.toml "1e-4 2e-4 5e-4" "1 2 3" [--set key=value …]
# Runs land in $RUNS/<config name>/lr<lr>-s<seed> (RUNS defaults to runs). A finished run is
# skipped; an interrupted one (it has a checkpoint) is resumed. Then: scripts/collect.sh $RUNS/<name>
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG \"LRS\" \"SEEDS\" [extra prolora train arguments…]" >&2
    exit 2
fi
config=$1 lrs=$2 seeds=$3
shift 3
prolora=${PROLORA:-prolora}
runs=${RUNS:-runs}
name=$(basename "$config" .toml)
for lr in $lrs; do
    for seed in $seeds; do
        dir="$runs/$name/lr$lr-s$seed"
        if [ -f "$dir/adapter_model.safetensors" ]; then
            echo "== $dir: finished, skipped"
        elif compgen -G "$dir/checkpoints/step-*" > /dev/null; then
            echo "== $dir: resuming"
            "$prolora" train --resume "$dir" --set optim.lr="$lr" --set seed="$seed" "$@"
        else
            echo "== $dir"
            "$prolora" train --config "$config" --set optim.lr="$lr" --set seed="$seed" \
                --set output_dir="$dir" "$@"
        fi
    done
done
