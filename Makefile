# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/css-small
RUN ?= runs/demo

.PHONY: install demo test lint clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision are taken from the local wheel cache where the machine has one
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m shards.css --small --overwrite --out $(DATA)
	$(PY) -m shards.verify $(DATA)
	rm -rf $(RUN)  # a fresh run (the same command on an existing run dir would resume it)
	$(PY) pipeline/train.py --config configs/css_tirg.yaml --data $(DATA) --out $(RUN) --set demo=true

clean-demo:
	rm -rf $(DATA) $(RUN)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
