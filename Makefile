# Two entry points: `make run` (the embedded default workflow) and `make test` (the whole suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned and installed first so that pip never resolves a multi-GB CUDA build
# on a CPU machine; on a GPU box set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[workflow,test]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/snakemake --cores 4 --resources gpu=1

test: setup
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf results/* .snakemake
