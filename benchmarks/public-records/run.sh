#!/usr/bin/env bash
# The records tool on real public logs: a clone of KellerJordan/modded-nanogpt beside this repository
# (PUBLIC=../modded-nanogpt), or the files of it named below. Writes output.txt and the figures here.
# Usage, from the repository root: bash benchmarks/public-records/run.sh
set -uo pipefail
PUBLIC=${PUBLIC:-../modded-nanogpt}
HERE=benchmarks/public-records
R=$PUBLIC/records
run() { echo "\$ python -m tools.records $*"; python -m tools.records "$@" 2>&1; echo "(exit $?)"; echo; }
{
  echo "# $(date -u +%F) · $(git rev-parse --short HEAD) · the logs under $PUBLIC that this run read:"
  (cd "$PUBLIC" && find records -type f | sort | while read -r f; do echo "#   $f ($(wc -c < "$f") bytes)"; done)
  echo
  run summarize "$R/track_1_short/2026-03-31_LeakyReLUSquared"
  run compare "$R/track_1_short/2026-03-31_LeakyReLUSquared/baseline" "$R/track_1_short/2026-03-31_LeakyReLUSquared/this_pr"
  run significance "$R/track_2_medium/2025-12-31_BulkSmallTrackTransfer"
  run significance "$R/track_3_optimization/results"
  run significance "$R/track_3_optimization/results" --pool
  run summarize "$R/011825_GPT2Medium"
  run plot "$R/track_1_short/2026-03-31_LeakyReLUSquared" -o "$HERE/leaky-relu-squared.png"
  run plot "$R/track_2_medium" "$R/track_3_optimization/results" -o "$HERE/medium-and-optimization.png"
  run reproduce "$R/track_2_medium/2025-12-31_BulkSmallTrackTransfer" --dry-run
  run reproduce "$R/track_2_medium/2025-12-31_BulkSmallTrackTransfer"
} | sed -E 's#/tmp/reproduce-[a-z0-9_]+#/tmp/reproduce-XXXXXXXX#g' > "$HERE/output.txt"
cat "$HERE/output.txt"
