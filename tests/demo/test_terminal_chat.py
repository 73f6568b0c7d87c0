"""The terminal chat with the real SmolLM2-135M-Instruct weights: one-shot answer, interactive loop
with history and /reset, streaming of multi-byte characters."""
import pytest

from demo import terminal_chat
from demo.terminal_chat import TextStream, chat_main
from language import Llama
from language.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def gguf(smollm2_gguf):
    return str(smollm2_gguf)


@pytest.fixture(scope="module")
def loaded():
    """What chat_main loaded the first time (the real loaders run once per module: seconds each)."""
    return {}


@pytest.fixture
def loaded_once(loaded, monkeypatch):
    """chat_main loads model and tokenizer through the real loaders the first time, then reuses them."""
    real_from_pretrained = Llama.from_pretrained

    def load_model(path, **kwargs):
        if "model" not in loaded:
            loaded["model"] = real_from_pretrained(path, **kwargs)
        return loaded["model"]

    def load_tok(path):
        if "tokenizer" not in loaded:
            loaded["tokenizer"] = load_tokenizer(path)
        return loaded["tokenizer"]
    monkeypatch.setattr(Llama, "from_pretrained", staticmethod(load_model))
    monkeypatch.setattr(terminal_chat, "load_tokenizer", load_tok)


@pytest.fixture
def tokenizer(loaded, gguf):
    return loaded.get("tokenizer") or load_tokenizer(gguf)


def test_one_prompt_answers_paris(loaded_once, gguf, capsys):
    assert chat_main(gguf, prompt="What is the capital of France?", max_new_tokens=32) == 0
    answer = capsys.readouterr().out
    assert "Paris" in answer
    assert "<|im_end|>" not in answer and answer.endswith("\n")


def test_interactive_loop_keeps_history_and_resets(loaded_once, gguf, monkeypatch, capsys):
    lines = iter(["What is the capital of France?", "", "Say it again.", "/reset", "Hi", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    prompts = []  # the rendered dialog each reply starts from
    real_generate = terminal_chat.generate

    def spy(model, batch, **kwargs):
        prompts.append(batch[0])
        return real_generate(model, batch, **kwargs)
    monkeypatch.setattr(terminal_chat, "generate", spy)

    assert chat_main(gguf, max_new_tokens=12) == 0
    assert len(prompts) == 3  # the empty line and the commands generate nothing
    assert prompts[1][:len(prompts[0])] == prompts[0]  # the second turn extends the first dialog
    assert len(prompts[2]) < len(prompts[0])  # after /reset the history is gone
    assert "Paris" in capsys.readouterr().out
    assert next(lines) == "never read"  # /exit stopped the loop


def test_ctrl_d_exits(loaded_once, gguf, monkeypatch):
    def eof(_prompt=""):
        raise EOFError
    monkeypatch.setattr("builtins.input", eof)
    assert chat_main(gguf) == 0


def test_stream_prints_multibyte_characters_whole(tokenizer):
    text = "Café ☕ 日本語 🦙!"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # some characters do span several tokens
    written = []
    stream = TextStream(tokenizer.decode, written.append)
    for i in ids:
        stream.push(i)
    stream.finish()
    assert "".join(written) == text
    assert not any("\ufffd" in w for w in written)


def test_a_composed_model_folder_chats_as_its_language_model(gguf, tmp_path, capsys):
    """`herd chat --model FOLDER`: a model folder over SmolLM2 with a fresh image modality (closed gates) answers
    a text prompt as SmolLM2 itself does."""
    import torch

    from adapters import MultimodalConfig, MultimodalModel, save_model
    from adapters.multimodal_config import ImageModality
    from experiments.cli import main as herd
    from vision.config import preset as vision_preset
    lm = Llama.from_pretrained(gguf)
    torch.manual_seed(0)
    model = MultimodalModel(MultimodalConfig(language=lm.config, image=ImageModality(
        vision=vision_preset("tiny", n_layers=1, n_global_layers=0, intermediate_layers=[0]))), language_model=lm)
    save_model(model, tmp_path / "final", tokenizer=load_tokenizer(gguf), language_path=gguf)
    assert herd(["chat", "--model", str(tmp_path), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out
