#!/usr/bin/env bash
# Copy whatever part of .gpu/ this call carried into ~/stash (kept while the machine stays warm), then say what is still missing.
#   bash tools/gpu/stash.sh                 copy, then list what of .gpu/MANIFEST ~/stash still lacks (exit 0)
#   bash tools/gpu/stash.sh --check full    exit 1, naming them, unless ~/stash holds all that full.sh needs (whl, GGUF, corpus)
#   bash tools/gpu/stash.sh --check test    the same for test.sh (also whl-test, whl-big, assets)
# .gpu/MANIFEST (written by `make gpu-bundle`) must travel in one of the calls: without it nothing can be checked.
set -uo pipefail
S=~/stash
# where a manifest entry lands in ~/stash: every wheel folder -> whl/, assets -> assets/, the rest -> top level
stash_path() { case $1 in whl/*|whl-test/*|whl-big/*) echo "$S/whl/${1#*/}";; assets/*) echo "$S/$1";; *) echo "$S/$1";; esac; }
missing() {   # $1: full | test | all
  [ -f $S/MANIFEST ] || { echo "MANIFEST (carry .gpu/MANIFEST in one stash call)"; return; }
  while read -r f; do
    case $1:$f in full:whl-test/*|full:whl-big/*|full:assets/*) continue;; esac
    [ -f "$(stash_path "$f")" ] || echo "$f"
  done < $S/MANIFEST
}
if [ "${1:-}" = --check ]; then
  m=$(missing "${2:-all}"); [ -z "$m" ] && exit 0
  echo "stash.sh: ~/stash lacks what ${2:-all} needs (carry these from .gpu/ in stash.sh calls first):"; echo "$m" | sed 's/^/  /'; exit 1
fi
mkdir -p $S/whl $S/assets
for d in .gpu/whl*; do if [ -d "$d" ]; then cp "$d"/*.whl $S/whl/ 2>/dev/null || true; fi; done
for f in .gpu/gguf.part* .gpu/austen.json.gz .gpu/MANIFEST; do if [ -f "$f" ]; then cp "$f" $S/; fi; done
# asset wheels for the tests (big ones as NAME.whl.partNN; test.sh joins them)
if [ -d .gpu/assets ]; then cp .gpu/assets/*.whl* $S/assets/ 2>/dev/null || true; fi
du -sh $S
m=$(missing all); if [ -z "$m" ]; then echo "stash.sh: ~/stash is complete"; else echo "stash.sh: still missing $(echo "$m" | wc -l):"; echo "$m" | sed 's/^/  /'; fi
