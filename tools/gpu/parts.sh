#!/usr/bin/env bash
# Run a notebook's full preset part by part, one process (and one tarball in $OUT) per part, as many as fit in this call:
#   bash tools/gpu/parts.sh 60_yardstick 570 kv-ppl-1 kv-ppl-2 models      (EXTRA="k=v ..." adds parameters-cell knobs)
# A part starts only while the longest part seen so far still fits in the LIMIT seconds left; one that does not is listed as not
# started, so a call stopped at its limit loses at most the part in flight. Needs ~/stash filled as for full.sh.
set -uo pipefail
nb=$1; limit=$2; shift 2; t0=$SECONDS; longest=0; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for p in "$@"; do
  left=$((limit - (SECONDS - t0)))
  if [ "$longest" -ge "$left" ]; then echo "parts.sh: $p not started (longest part so far ${longest}s, ${left}s left)" | tee -a "$OUT/parts.log"; continue; fi
  t=$SECONDS
  PARAMS="part=$p${EXTRA:+ $EXTRA}" timeout "$left" bash tools/gpu/full.sh "$nb"; rc=$?
  d=$((SECONDS - t)); [ "$d" -gt "$longest" ] && longest=$d
  echo "parts.sh: $p took ${d}s (exit $rc)" | tee -a "$OUT/parts.log"
done
