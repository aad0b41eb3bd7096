#!/usr/bin/env bash
# Copy whatever part of .gpu/ this call carried into ~/stash (kept while the machine stays warm).
set -euo pipefail
mkdir -p ~/stash/whl
[ -d .gpu/whl ] && cp -n .gpu/whl/*.whl ~/stash/whl/ 2>/dev/null || true
for f in .gpu/gguf.part* .gpu/austen.json.gz; do [ -f "$f" ] && cp "$f" ~/stash/; done
ls -la ~/stash; du -sh ~/stash
