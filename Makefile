# featcache: `make sweep` runs the main job, `make test` the test suite. Each builds .venv when needed.
PYTHON ?= python3
PIPELINE ?= pipelines/digits.yaml
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install extract sweep test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

extract: $(STAMP)
	$(BIN)/featcache extract $(PIPELINE) --if-missing

sweep: extract
	$(BIN)/featcache sweep $(PIPELINE)
	$(BIN)/featcache select $(PIPELINE) --quiet
	$(BIN)/featcache report $(PIPELINE)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_extract.py --model resnet18 --images 256
	$(BIN)/python benchmarks/bench_sweep.py

clean:
	rm -rf cache results
