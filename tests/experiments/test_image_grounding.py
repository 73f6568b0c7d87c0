"""Attention grounding (experiments/image/grounding.py): the recomputed attention equals the block's own,
targets cover the named objects' patches, and the loss moves attention onto them."""
import random

import pytest
import torch
from torch import nn

from adapters.cross_attention import GatedCrossAttentionBlock
from adapters.image_tokens import IGNORE_INDEX
from experiments.image.data import PromptFormat, PromptSection, SceneSamples, ScenesSection
from experiments.image.grounding import (AttentionGrounding, GroundingSection, answer_positions,
                                                 attention_probs, grounding_targets, patch_targets)
from language.tokenizer import train_bpe
from vision.tiling import TilingConfig


def block_and_inputs(seed=0, b=2, t=5, s=7, dim=16):
    torch.manual_seed(seed)
    block = GatedCrossAttentionBlock(dim, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=32)
    block.reset_parameters(std=0.5)
    x, states = torch.randn(b, t, dim), torch.randn(b, s, dim)
    allowed = torch.rand(b, 1, t, s) < 0.7
    allowed[..., 0] = True  # every row sees some image token
    return block, x, states, allowed


def test_recomputed_probabilities_are_the_blocks_attention():
    block, x, states, allowed = block_and_inputs()
    attn = block.cross_attn
    kv = attn.project_kv(states)
    out = attn(x, kv, allowed)  # SDPA
    rows, positions = torch.tensor([0, 1, 1]), torch.tensor([4, 0, 3])
    seen = allowed[rows, 0, positions]  # (3, S)
    probs = attention_probs(attn, x[rows, positions], kv.keys[rows], seen)  # (3, H, S)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4))
    assert (probs * ~seen[:, None]).abs().max() == 0  # nothing on masked image tokens
    values = kv.values[rows].repeat_interleave(2, 1)  # (3, H, S, hd)
    mixed = torch.einsum("nhs,nhsd->nhd", probs, values).flatten(1)
    assert torch.allclose(attn.o_proj(mixed), out[rows, positions], atol=1e-5)


def test_patch_targets_and_answer_positions():
    # 84 px scene on an 84 px tile of 6 x 6 patches of 14 px (+ the class token first)
    inside = patch_targets([(21.0, 21.0, 6.0)], 84, 84, 14, 37)
    assert inside.nonzero().flatten().tolist() == [1 + 1 * 6 + 1]
    corner = patch_targets([(28.0, 28.0, 3.0)], 84, 84, 14, 37)
    assert corner.nonzero().flatten().tolist() == [1 + 7, 1 + 8, 1 + 13, 1 + 14]
    # a 42 px scene resized onto the same tile: coordinates and radius scale by 2; padding tokens stay False
    assert torch.equal(patch_targets([(14.0, 14.0, 1.5)], 42, 84, 14, 40)[:37], corner)
    assert not inside[0]  # never the class token
    ignore = IGNORE_INDEX
    assert answer_positions([ignore, ignore, 5, 6, ignore, 7, ignore]) == [1, 4]


def test_scene_samples_carry_their_objects_into_the_targets(tmp_path):
    (tmp_path / "t.txt").write_text("What color is the star? red green blue How many circles are there? 0 1 2 " * 50)
    tok = train_bpe([tmp_path / "t.txt"], 300, tmp_path)
    scenes = ScenesSection(image_size=28, max_objects=2, p_word=0.0, p_digit=0.0, qa_types=["color", "count"])
    tiling = TilingConfig(tile_size=28, max_tiles=1, max_images=1)
    fmt = PromptFormat(tok, tok.vocab_size, PromptSection(), 512)
    source = SceneSamples(scenes, tiling, need_qa=True)
    samples = [fmt.training_sample(source[i], "vqa", 2, random.Random(i)) for i in range(8)]
    section = GroundingSection(weight=1.0, question_types=["color"])
    targets = grounding_targets(samples, section, 28, 14, 5)
    expected = [(b, q) for b, s in enumerate(samples) for q in s["qa"] if q.type == "color"]
    assert expected and targets["rows"].tolist() == [b for b, _ in expected]
    for k, (b, question) in enumerate(expected):
        sample = samples[b]
        position = int(targets["positions"][k])
        # the position predicts the first answer token of that question
        answer_ids = fmt.tokenizer.encode(" " + question.answer)
        assert sample["tokens"][position + 1:position + 1 + len(answer_ids)] == answer_ids
        assert targets["targets"][k].any() and not targets["targets"][k, 0]
    assert grounding_targets(samples, GroundingSection(weight=1.0, question_types=["shape"]), 28, 14, 5) is None
    with pytest.raises(ValueError, match="question_types"):
        GroundingSection(question_types=["text"])


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(block_and_inputs(seed=k)[0] for k in range(2))

    def forward(self, h, states, allowed):
        for block in self.blocks:
            h = block.cross_attn(block.input_layernorm(h), block.project_kv(states), allowed)
        return h


def test_grounding_loss_moves_attention_onto_the_target():
    model = TwoBlocks()
    _, x, states, allowed = block_and_inputs(seed=3)
    allowed[:] = True
    grounding = AttentionGrounding(model)
    target = torch.zeros(2, 7, dtype=torch.bool)
    target[0, 2], target[1, 5] = True, True
    batch = {"rows": torch.tensor([0, 1]), "positions": torch.tensor([4, 2]), "targets": target}
    model(x, states, allowed)
    assert grounding.inputs == []  # nothing is kept unless recording
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    history = []
    for _ in range(40):
        grounding.recording = True
        model(x, states, allowed)
        loss = grounding.loss(batch)
        assert grounding.inputs == []  # consumed
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    # 2 questions: loss = sum of the blocks' mean -log(mass); uniform attention over 7 tokens gives 2 * log(7)
    assert history[0] > 2.0 and history[-1] < 0.2 * history[0], history[::8]
    grounding.remove()
    grounding.recording = True
    model(x, states, allowed)
    assert grounding.inputs == []
