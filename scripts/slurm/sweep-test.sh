#!/usr/bin/env bash
# `prolora sweep --backend slurm` on a real single-node Slurm cluster (scripts/slurm/cluster.sh):
# a 2 × 2 sweep of the tiny demo as a job array, one task requeued while it trains (SIGTERM:
# it checkpoints; its rerun resumes). Every point must finish with the adapter of the same
# point run with --backend local, and `collect` must print the same table for both.
# Fails, never skips, when the cluster cannot start. .ci/run runs it after `cargo test`.
#   scripts/slurm/sweep-test.sh [path/to/prolora]   (default target/debug/prolora)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:-target/debug/prolora}")
work=$(mktemp -d)
started=$(date +%s)
cleanup() {
    scripts/slurm/cluster.sh stop "$work/cluster"
    rm -rf "$work"
}
trap cleanup EXIT
say() { echo "slurm test [$(( $(date +%s) - started )) s]: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

env_line=$(scripts/slurm/cluster.sh start "$work/cluster") || die "the Slurm cluster did not start"
eval "$env_line"
say "cluster up in $(( $(date +%s) - started )) s"

grid=(--config configs/demo.toml --grid optim.lr=1e-3,2e-3 --grid seed=1,2
      --set train.steps=24 --set train.eval_every=0 --set train.batch_size=4)
job=$("$bin" sweep "${grid[@]}" --out "$work/slurm" --backend slurm)
say "submitted job $job"

# Requeue point 0 once it has trained a few steps (and is still training).
metrics="$work/slurm/runs/optim.lr=1e-3,seed=1/metrics.jsonl"
for _ in $(seq 600); do
    n=$(grep -c '"loss"' "$metrics" 2>/dev/null || true)
    [ "${n:-0}" -ge 3 ] && break
    sleep 0.2
done
[ "${n:-0}" -ge 3 ] || die "point 0 never started training: $(squeue 2>&1)"
[ -f "$work/slurm/runs/optim.lr=1e-3,seed=1/adapter_model.safetensors" ] \
    && die "point 0 finished before it could be requeued; lengthen the run"
scontrol requeue "${job}_0"
say "requeued ${job}_0 at step $n"
# A requeued task waits ~2 minutes (BeginTime) unless its start time is reset, which only
# takes once it is pending again (not while its first run is still stopping). now+1, not now:
# slurmd revoked the task's credential in the second of the requeue and refuses a relaunch
# signed in that same second ("Job credential revoked"), failing the task for good.
pending=0
for _ in $(seq 300); do
    state=$(squeue -h -j "${job}_0" -o "%T %r" 2>/dev/null || true)
    case "$state" in
        "PENDING BeginTime") scontrol update jobid="${job}_0" starttime=now+1; pending=1 ;;
        PENDING*) pending=1 ;;
        RUNNING*|"") [ "$pending" = 1 ] && break ;;
    esac
    sleep 0.2
done
say "point 0 requeued and running again"

for _ in $(seq 900); do
    [ -z "$(squeue -h -r -j "$job" 2>/dev/null)" ] && break
    sleep 0.2
done
[ -z "$(squeue -h -r -j "$job")" ] || die "the array did not finish within 3 minutes: $(squeue)"
say "array finished"

table=$("$bin" sweep status "$work/slurm")
echo "$table" >&2
grep -q "^4 points: 4 finished" <<<"$table" || die "not every point finished"
out0=$(cat "$work/slurm/slurm/${job}_0.out")
grep -q "stopped by SIGTERM" <<<"$out0" || die "point 0 was not stopped by SIGTERM: $out0"
grep -q "resuming from" <<<"$out0" || die "point 0 did not resume: $out0"
grep -q "^step [0-9]*/[0-9]* loss .* eta " <<<"$out0" || die "point 0 logged no progress lines: $out0"

"$bin" sweep "${grid[@]}" --out "$work/local" --backend local --jobs 2 2>/dev/null
say "local sweep finished"
for run in "$work"/local/runs/*/; do
    point=$(basename "$run")
    cmp "$run/adapter_model.safetensors" "$work/slurm/runs/$point/adapter_model.safetensors" \
        || die "$point: the Slurm adapter differs from the local one"
done
diff <("$bin" collect "$work/slurm") <("$bin" collect "$work/local") \
    || die "collect prints different tables"
say "passed in $(( $(date +%s) - started )) s: 4 points finished, the requeued one bit-identical"
