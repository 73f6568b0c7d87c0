"""Numerical parity with transformers' MllamaForConditionalGeneration (fp32, tiny random config), loaded
through `adapters.load_mllama` from a folder written by `save_pretrained`.

The batch: a sample with text before its first image and 2 images, a text-only sample and a sample whose
image comes first. transformers lets rows that see no image attend to all image tokens (see
adapters/cross_attention.py); our default gives those rows exactly zero, as Meta's reference does. So:
- `transformers_empty_rows=True` equals stock transformers everywhere;
- the default equals transformers patched with Meta's row masking everywhere, and stock transformers on
  the sample whose image comes first; it deliberately differs on the other two.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama import modeling_mllama

from adapters.cross_attention import default_positions
from adapters.freezing import parameter_counts
from adapters.image_tokens import ImageTextCollator
from adapters.mllama_checkpoint import config_from_mllama, load_mllama
from adapters.multimodal import ImageInputs, MultimodalModel
from language.checkpoints import CheckpointError
from language.config import preset as llama_preset
from vision.tiling import TiledImage, TilingConfig, aspect_ratio_id

IMG = 128  # image_token_index: one past the text vocabulary


def hf_config(cross_attention_layers=(1, 3)):
    return MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4, image_size=28,
                           patch_size=14, max_num_tiles=4, intermediate_layers_indices=[0, 1], vision_output_dim=96,
                           intermediate_size=64),
        text_config=dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128,
                         cross_attention_layers=list(cross_attention_layers), max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        image_token_index=IMG)


def saved_hf(folder, cross_attention_layers=(1, 3), **save_kw):
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(hf_config(cross_attention_layers)).eval()
    with torch.no_grad():  # every gate open (transformers initialises them to 0), so every path counts
        for name, p in model.named_parameters():
            if "gate" in name.rsplit(".", 1)[-1]:
                p.uniform_(-1.5, 1.5)
    model.save_pretrained(folder, **save_kw)
    return model


def tiled(layout, seed):
    rows, cols = layout
    tiles = torch.randn(rows * cols, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    return TiledImage(tiles, layout, aspect_ratio_id(layout, 4), (28 * rows, 28 * cols), (28 * rows, 28 * cols))


def batch(policy="most_recent"):
    samples = [
        {"tokens": [1, 5, 6, IMG, 7, 8, IMG, 9, 10, 11], "images": [tiled((1, 2), 1), tiled((2, 2), 2)]},
        {"tokens": [1, 20, 21, 22, 23]},
        {"tokens": [IMG, 1, 30, 31, 32, 33, 34], "images": [tiled((1, 1), 3)]},
    ]
    return ImageTextCollator(image_token_id=IMG, tiling=TilingConfig(tile_size=28, max_tiles=4, max_images=2),
                             policy=policy)(samples)


def hf_logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["tokens"], attention_mask=b["attention_mask"].long(), pixel_values=b["pixel_values"],
                     aspect_ratio_ids=b["aspect_ratio_ids"], aspect_ratio_mask=b["aspect_ratio_mask"],
                     cross_attention_mask=b["cross_attention_mask"]).logits


def our_logits(model, b):
    with torch.no_grad():
        return model(b["tokens"], images=ImageInputs.from_batch(b))


def diff_per_sample(a, b, valid):
    return [float((a[i] - b[i]).abs()[valid[i]].max()) for i in range(a.shape[0])]


def meta_row_masking(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                     full_text_row_masked_out_mask, past_key_values=None, **kwargs):
    """MllamaCrossAttentionDecoderLayer.forward with the attention output masked too, as Meta's reference."""
    row = full_text_row_masked_out_mask[:, 0]
    attn, _ = self.cross_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=cross_attention_mask,
                              cross_attention_states=cross_attention_states, past_key_values=past_key_values)
    hidden_states = hidden_states + self.cross_attn_attn_gate.tanh() * (row * attn)
    mlp = self.mlp(self.post_attention_layernorm(hidden_states))
    return hidden_states + self.cross_attn_mlp_gate.tanh() * (row * mlp)


@pytest.mark.parametrize("cross_attention_layers", [(1, 3), (0, 2)])
@pytest.mark.parametrize("policy", ["most_recent", "all_previous"])
def test_logits_match_transformers(tmp_path, monkeypatch, cross_attention_layers, policy):
    hf = saved_hf(tmp_path, cross_attention_layers)
    b = batch(policy)
    valid = b["attention_mask"]
    ours = load_mllama(tmp_path)
    assert ours.config.image.positions(4) == [c - j for j, c in enumerate(cross_attention_layers)]
    compat = load_mllama(tmp_path, transformers_empty_rows=True)
    stock = hf_logits(hf, b)
    assert max(diff_per_sample(our_logits(compat, b), stock, valid)) <= 1e-4

    default = our_logits(ours, b)
    leak = diff_per_sample(default, stock, valid)
    assert leak[2] <= 1e-4  # the image comes first: every row sees it, no difference
    assert leak[0] > 1e-3 and leak[1] > 1e-3  # text before the image / text-only sample: transformers leaks
    monkeypatch.setattr(modeling_mllama.MllamaCrossAttentionDecoderLayer, "forward", meta_row_masking)
    assert max(diff_per_sample(default, hf_logits(hf, b), valid)) <= 1e-4


def test_generation_matches_transformers(tmp_path):
    hf = saved_hf(tmp_path)
    ours = load_mllama(tmp_path)
    b = batch()
    prompt = b["tokens"][2:3]
    keep = {k: b[k][2:3] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")}
    with torch.no_grad():
        ref = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **keep, max_new_tokens=6,
                          min_new_tokens=6, do_sample=False, pad_token_id=0)
    new = ours.generate([prompt[0].tolist()], images=[[tiled((1, 1), 3)]], max_new_tokens=6)
    assert new[0] == ref[0, prompt.shape[1]:].tolist()


def test_sharded_checkpoints_and_both_name_spellings_load_the_same(tmp_path):
    single, sharded, renamed = tmp_path / "single", tmp_path / "sharded", tmp_path / "renamed"
    saved_hf(single)
    saved_hf(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    # save_pretrained writes the Hub spelling (language_model.model.*); transformers 5 names the modules
    # model.language_model.*: a file in that spelling loads too
    renamed.mkdir()
    (renamed / "config.json").write_text((single / "config.json").read_text())
    renames = (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
               ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."))
    tensors = load_file(single / "model.safetensors")
    assert "language_model.model.embed_tokens.weight" in tensors
    tensors = {next((n + k.removeprefix(o) for o, n in renames if k.startswith(o)), k): t for k, t in tensors.items()}
    assert "model.language_model.embed_tokens.weight" in tensors and "lm_head.weight" in tensors
    save_file(tensors, renamed / "model.safetensors")
    b = batch()
    reference = our_logits(load_mllama(single), b)
    for folder in (sharded, renamed):
        assert torch.equal(our_logits(load_mllama(folder), b), reference)


def test_checkpoint_errors_name_what_is_wrong(tmp_path):
    saved_hf(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())

    missing = dict(tensors)
    missing.pop("language_model.model.layers.1.cross_attn.k_norm.weight")
    missing["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): language_model\.model\.layers\.1\.cross_attn"
                                              r"\.k_norm\.weight; 1 unexpected tensor\(s\): "
                                              r"language_model\.model\.layers\.9"):
        load_mllama(tmp_path)

    save_file(tensors, tmp_path / "model.safetensors")
    config["text_config"]["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'language_model\.model\.layers\.0\.mlp\.gate_proj\.weight' .* has "
                                              r"shape \[128, 64\], but the config expects \[96, 64\]"):
        load_mllama(tmp_path)

    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not 'mllama'"):
        load_mllama(tmp_path)


def test_llama32_11b_vision_config_maps_onto_the_paper_layout():
    """The released config.json of Llama-3.2-11B-Vision (Hub spelling), built on the meta device."""
    raw = {"model_type": "mllama", "image_token_index": 128256,
           "text_config": {"cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "hidden_size": 4096,
                           "intermediate_size": 14336, "max_position_embeddings": 131072, "num_attention_heads": 32,
                           "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                           "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                           "rope_theta": 500000.0, "vocab_size": 128256, "tie_word_embeddings": False},
           "vision_config": {"attention_heads": 16, "hidden_size": 1280, "image_size": 560,
                             "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120,
                             "max_num_tiles": 4, "num_global_layers": 8, "num_hidden_layers": 32, "patch_size": 14,
                             "vision_output_dim": 7680}}
    config = config_from_mllama(raw, "config.json")
    expected = llama_preset("llama3-8b", max_seq_len=131072)
    assert config.language == expected  # the Llama 3.1 8B text model, as is
    assert config.image.positions(32) == default_positions(32, 4)
    assert config.image.vision.output_dim == 7680 and config.image.token_policy == "most_recent"
    assert config.special_tokens.image == 128256 and config.n_extra_tokens == 8
    with torch.device("meta"):
        model = MultimodalModel(config)
    counts = parameter_counts(model)
    total = sum(c["total"] for c in counts.values())
    assert 10.6e9 < total < 10.7e9  # "11B" (10.67B in the Hub's safetensors metadata)
    assert counts["language_model"]["trainable"] == 0
