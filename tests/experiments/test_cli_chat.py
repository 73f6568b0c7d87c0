"""`herd chat --model GGUF --prompt ...` through the command line, with the real SmolLM2-135M-Instruct."""
import pytest

from experiments.cli import main


def test_herd_chat_answers_paris(capsys, smollm2_gguf):
    assert main(["chat", "--model", str(smollm2_gguf), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_herd_chat_missing_model_is_one_line(capsys, tmp_path):
    assert main(["chat", "--model", str(tmp_path / "none.gguf"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("herd: error: --model:")
