#!/usr/bin/env bash
# A learning-rate × seed grid of one config: a thin wrapper over `prolora sweep`.
#   scripts/sweep.sh configs/superni.toml "1e-4 2e-4 5e-4" "1 2 3" [more prolora sweep arguments…]
# The sweep lands in $RUNS/<config name> (RUNS defaults to runs); rerunning the same command
# skips finished points and resumes interrupted ones. Add `--backend slurm --slurm-args "…"` to
# submit it as a job array, `--evaluate mmlu,gsm --eval-data-dir DIR` to evaluate each finished
# point. Then: prolora collect $RUNS/<name>
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG \"LRS\" \"SEEDS\" [prolora sweep arguments…]" >&2
    exit 2
fi
config=$1 lrs=$2 seeds=$3
shift 3
exec "${PROLORA:-prolora}" sweep --config "$config" --grid "optim.lr=${lrs// /,}" \
    --grid "seed=${seeds// /,}" --out "${RUNS:-runs}/$(basename "$config" .toml)" "$@"
