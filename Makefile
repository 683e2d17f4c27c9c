# Two commands for a fresh machine: `make main` (set up, train + evaluate brain_tumor_cls, print metrics)
# and `make test` (set up, run the tests). Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Install torch before the rest: on these machines `torch==2.13.0` is a local CPU wheel, and a bare
# `pip install monai` would otherwise pull a several-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
MEDPIPE_DATA ?= $(abspath ../shared/data)
export MEDPIPE_DATA

.PHONY: setup main test lint bench clean viewer

$(BIN)/medpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,ray]"
	touch $@

setup: $(BIN)/medpipe

main: setup
	$(BIN)/medpipe demo

# two xdist workers of one thread each, a test module whole on one worker (tests/conftest.py says why)
test: setup
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder --durations=15

lint: setup
	$(BIN)/ruff check medpipe tests benchmarks

# Keras runs in its own venv: TensorFlow beside torch slows every import and gains nothing
bench: setup
	test -x .venv-bench/bin/python || ($(PYTHON) -m venv .venv-bench && .venv-bench/bin/pip install -q tensorflow-cpu)
	$(BIN)/python benchmarks/bench_train_speed.py --keras-python .venv-bench/bin/python

# OHIF for `medpipe viewer` (docs/viewer.md): the pinned @ohif/app release, fetched with npm into
# $(MEDPIPE_OHIF_DIR) or ~/.cache/medpipe/ohif; needs Debian's npm (and orthanc orthanc-dicomweb chromium to run)
viewer: setup
	$(BIN)/medpipe viewer install

clean:
	rm -rf $(VENV) .venv-bench bundles/*/models bundles/*/eval bundles/*/inference
