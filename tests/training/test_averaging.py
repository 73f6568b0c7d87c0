"""Model averaging of safetensors snapshots."""
import pytest
import torch

from training.averaging import average_state_dicts, save_snapshot


def test_uniform_and_weighted_average(tmp_path):
    a = save_snapshot({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}, tmp_path, 1)
    b = save_snapshot({"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}, tmp_path, 2)
    avg = average_state_dicts([a, b])
    torch.testing.assert_close(avg["w"], torch.tensor([2.0, 4.0]))
    weighted = average_state_dicts([a, b], weights=[3, 1])
    torch.testing.assert_close(weighted["b"], torch.tensor([1.0]))
    assert not list(tmp_path.glob("*.tmp-*"))


def test_bf16_is_accumulated_in_fp32(tmp_path):
    paths = [save_snapshot({"w": torch.full((4,), 1.0 + i / 256, dtype=torch.bfloat16)}, tmp_path, i) for i in range(4)]
    avg = average_state_dicts(paths)
    assert avg["w"].dtype == torch.bfloat16
    torch.testing.assert_close(avg["w"].float(), torch.full((4,), 1.0 + 1.5 / 256), atol=4e-3, rtol=0)


def test_incompatible_checkpoints_are_named(tmp_path):
    a = save_snapshot({"w": torch.zeros(2)}, tmp_path, 1)
    b = save_snapshot({"w": torch.zeros(3)}, tmp_path, 2)
    c = save_snapshot({"v": torch.zeros(2)}, tmp_path, 3)
    with pytest.raises(ValueError, match="tensor w has shape"):
        average_state_dicts([a, b])
    with pytest.raises(ValueError, match="tensor names differ"):
        average_state_dicts([a, c])
    with pytest.raises(ValueError, match="weights"):
        average_state_dicts([a, a], weights=[1])
