# Two commands: `make demo` (run the stack on loopback) and `make test` (every test).
PYTHON ?= python3
VENV := .venv
LS_VENV := .venv-ls
LABEL_STUDIO_VERSION := 1.23.2

.PHONY: install install-label-studio lint test test-fast demo stop bench clean

install: $(VENV)/.installed

# torch first and pinned: anything else lets pip pull a CUDA build of several GB.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# Label Studio pins Django, Jinja2 and its own SDK: it lives in its own virtual environment.
install-label-studio: $(LS_VENV)/.installed

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --upgrade pip
	$(LS_VENV)/bin/pip install --quiet label-studio==$(LABEL_STUDIO_VERSION)
	touch $@

# Style and types first: ruff's lint and format check over the tree, mypy over the packages
# (what they check: [tool.ruff] and [tool.mypy] in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy backends sam segmentation sdk_scripts bench devstack

test: install install-label-studio lint
	$(VENV)/bin/python -m pytest

test-fast: install
	$(VENV)/bin/python -m pytest -m "not e2e"

demo: install install-label-studio
	$(VENV)/bin/python -m devstack.demo start

stop:
	$(VENV)/bin/python -m devstack.demo stop

bench: install
	$(VENV)/bin/python -m bench.rle
	$(VENV)/bin/python -m bench.sam_quality
	$(VENV)/bin/python -m bench.sam_latency
	$(VENV)/bin/python -m bench.answer_path
	$(VENV)/bin/python -m bench.seg_quality
	$(VENV)/bin/python -m bench.seg_throughput
	$(VENV)/bin/python -m bench.load
	$(VENV)/bin/python -m bench.scale

clean:
	rm -rf $(VENV) $(LS_VENV) run
