"""`herd average`: weighted means of real checkpoints, loadable afterwards."""
import torch

from experiments.cli import main
from language import Llama, preset
from language.checkpoints import save_hf


def _saved(tmp_path, name, seed):
    torch.manual_seed(seed)
    model = Llama(preset("tiny", vocab_size=64))
    save_hf(model, tmp_path / name)
    return model


def test_weighted_average_of_hf_folders_loads(tmp_path, capsys):
    a, b = _saved(tmp_path, "a", 0), _saved(tmp_path, "b", 1)
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "3", "1",
                 "--out", str(tmp_path / "avg")]) == 0
    merged = Llama.from_pretrained(tmp_path / "avg")
    expected = 0.75 * a.model.norm.weight.detach() + 0.25 * b.model.norm.weight.detach()
    torch.testing.assert_close(merged.model.norm.weight, expected)
    w = merged.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(w, 0.75 * a.model.layers[0].mlp.up_proj.weight + 0.25 * b.model.layers[0].mlp.up_proj.weight)


def test_incompatible_or_wrong_inputs_are_one_line(tmp_path, capsys):
    _saved(tmp_path, "a", 0)
    torch.manual_seed(0)
    save_hf(Llama(preset("tiny", vocab_size=80)), tmp_path / "c")
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "x")]) == 2
    assert "has shape" in capsys.readouterr().err
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "a"), "--weights", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--weights: 1 weights for 2" in capsys.readouterr().err
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a .safetensors file" in capsys.readouterr().err
