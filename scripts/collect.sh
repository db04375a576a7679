#!/usr/bin/env bash
# The table of a sweep: final/best eval loss per run and mean ± std over seeds, as markdown,
# then the same per-run rows as CSV.
#   scripts/collect.sh runs/superni
set -euo pipefail
prolora=${PROLORA:-prolora}
"$prolora" collect "${1:-runs}"
echo
"$prolora" collect --csv "${1:-runs}"
