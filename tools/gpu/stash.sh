#!/usr/bin/env bash
# Copy whatever part of .gpu/ this call carried into ~/stash (kept while the machine stays warm).
set -uo pipefail
mkdir -p ~/stash/whl
for d in .gpu/whl*; do if [ -d "$d" ]; then cp "$d"/*.whl ~/stash/whl/ || true; fi; done
for f in .gpu/gguf.part* .gpu/austen.json.gz; do if [ -f "$f" ]; then cp "$f" ~/stash/; fi; done
# asset wheels for the tests (big ones as NAME.whl.partNN; test.sh joins them)
if [ -d .gpu/assets ]; then mkdir -p ~/stash/assets; cp .gpu/assets/*.whl* ~/stash/assets/ 2>/dev/null || true; fi
ls -la ~/stash; du -sh ~/stash
