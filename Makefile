# Two commands do all the set-up on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test zoo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m slimtorch demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check src tests $(wildcard benchmarks)
	$(PY) -m pytest -n 2 --durations=25

# every model of the zoo matrices (Ultralytics, torchvision detection/segmentation/video/flow, timm): long
zoo: $(STAMP)
	$(PY) -m pytest -n 2 --zoo tests/test_zoo_ultralytics.py tests/test_zoo_torchvision.py tests/test_zoo_timm.py

lint: $(STAMP)
	$(PY) -m ruff check src tests $(wildcard benchmarks)

clean:
	rm -rf $(VENV) runs
