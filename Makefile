VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nodulab generate size-confound --out demo/size-confound --force
	$(VENV)/bin/nodulab validate demo/size-confound
	$(VENV)/bin/nodulab gallery demo/size-confound --out demo/size-confound-gallery.png

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_render.py
	$(PY) benchmarks/bench_generate_memory.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_cli_startup.py
	$(PY) benchmarks/bench_explain.py

clean:
	rm -rf $(VENV) demo
