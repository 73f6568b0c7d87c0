"""The one model folder: save + load gives the same model; adapters trained in separate runs on one base LM
compose into one folder that equals each part; a different base LM, a missing base LM, weights that do not fit
the config, and a failed save are each one clear error, with nothing half-written."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import ImageInputs, ModelFolderError, MultimodalConfig, MultimodalModel, compose, load_model, save_model
from adapters.image_tokens import ImageTextCollator
from adapters.model_folder import CONFIG_FILE, WEIGHTS_FILE, language_digest
from adapters.multimodal_config import ImageModality, SpeechModality
from adapters.speech_adapter import preset as adapter_preset
from adapters.speech_inputs import audio_span
from experiments.cli import main as herd
from language.checkpoints import save_hf
from language.config import preset as llama_preset
from language.model import Llama
from language.tokenizer import train_bpe
from speech.conformer import ConformerConfig
from vision.config import preset as vision_preset
from vision.tiling import TiledImage, TilingConfig, aspect_ratio_id

TEXT = "describe the picture and repeat after me: four seven one two, open the door " * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    (folder / "text.txt").write_text(TEXT)
    return train_bpe([folder / "text.txt"], 300, folder)


@pytest.fixture(scope="module")
def base_lm(tmp_path_factory, tokenizer):
    """A saved base LM (an HF folder), as a text run leaves it."""
    torch.manual_seed(0)
    lm = Llama(llama_preset("tiny", vocab_size=tokenizer.vocab_size, n_layers=4, max_seq_len=128))
    path = tmp_path_factory.mktemp("lm") / "base"
    save_hf(lm, path)
    return path


def modality(kind, lm_config):
    if kind == "image":
        return ImageModality(vision=vision_preset("tiny", n_layers=2, n_global_layers=1, intermediate_layers=[0, 1]),
                             cross_attention_every=2)
    return SpeechModality(encoder=ConformerConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64),
                          adapter=adapter_preset("tiny", encoder_dim=32, lm_dim=lm_config.dim))


def trained(base_lm, kind, seed):
    """A model with one modality whose adapters 'trained' (random non-zero weights and gates)."""
    lm = Llama.from_pretrained(base_lm)
    config = MultimodalConfig(language=lm.config, **{kind: modality(kind, lm.config)})
    torch.manual_seed(seed)
    model = MultimodalModel(config, language_model=lm)
    with torch.no_grad():
        for name, p in model.non_language_state().items():
            if p.is_floating_point() and not name.startswith("speech_frontend."):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def image_batch(model):
    rows, cols = 1, 2
    tiles = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    image = TiledImage(tiles, (rows, cols), aspect_ratio_id((rows, cols), 4), (28, 56), (28, 56))
    collate = ImageTextCollator(image_token_id=model.tokens.image, tiling=TilingConfig(tile_size=28, max_tiles=4))
    return collate([{"tokens": [1, model.tokens.image, 5, 6, 7], "images": [image]}])


def speech_batch(model):
    wave = torch.randn(1, 12000, generator=torch.Generator().manual_seed(6)) * 0.1
    speech = model.speech_features(wave)
    span = audio_span(model.placeholder_count(int(speech.lengths[0])), model.tokens.audio_tokens)
    return torch.tensor([[1, 2] + span + [8, 9]]), speech


@torch.no_grad()
def test_save_and_load_give_the_same_model(tmp_path, base_lm, tokenizer):
    model = trained(base_lm, "image", seed=1)
    folder = save_model(model, tmp_path / "image", tokenizer=tokenizer, language_path=str(base_lm),
                        settings={"image": {"prompt": "x"}})
    assert sorted(p.name for p in folder.iterdir()) == ["adapters.safetensors", "config.json", "tokenizer"]
    weights = load_file(str(folder / WEIGHTS_FILE))
    assert not any(k.startswith("language_model.") for k in weights)  # the LM is referenced, not copied
    loaded = load_model(tmp_path / "image")
    batch = image_batch(model)
    assert torch.equal(loaded.model(batch["tokens"], images=ImageInputs.from_batch(batch)),
                       model(batch["tokens"], images=ImageInputs.from_batch(batch)))
    assert loaded.settings == {"image": {"prompt": "x"}}
    assert loaded.tokenizer.encode("open the door") == tokenizer.encode("open the door")
    assert not any(p.requires_grad for p in loaded.model.parameters())


@torch.no_grad()
def test_a_folder_holding_its_own_lm(tmp_path, base_lm, tokenizer):
    model = trained(base_lm, "speech", seed=2)
    save_model(model, tmp_path / "speech", tokenizer=tokenizer)  # no checkpoint to name: the LM goes inside
    loaded = load_model(tmp_path / "speech")
    tokens, speech = speech_batch(model)
    assert torch.equal(loaded.model(tokens, speech=speech), model(tokens, speech=speech))


@torch.no_grad()
def test_compose_joins_adapters_trained_on_one_base_lm(tmp_path, base_lm, tokenizer):
    image = trained(base_lm, "image", seed=3)
    speech = trained(base_lm, "speech", seed=4)
    save_model(image, tmp_path / "image", tokenizer=tokenizer, language_path=str(base_lm), settings={"image": {"a": 1}})
    save_model(speech, tmp_path / "speech", tokenizer=tokenizer, language_path=str(base_lm),
               settings={"speech": {"task": "asr"}})
    assert herd(["compose", str(tmp_path / "both"), str(tmp_path / "image"), str(tmp_path / "speech")]) == 0
    both = load_model(tmp_path / "both")
    assert both.model.config.modalities == ["image", "speech"]
    assert both.settings == {"image": {"a": 1}, "speech": {"task": "asr"}}
    batch = image_batch(image)
    assert torch.equal(both.model(batch["tokens"], images=ImageInputs.from_batch(batch)),
                       image(batch["tokens"], images=ImageInputs.from_batch(batch)))
    tokens, sp = speech_batch(speech)
    assert torch.equal(both.model(tokens, speech=sp), speech(tokens, speech=sp))


def test_compose_refuses_different_base_lms_in_one_line(tmp_path, base_lm, tokenizer, capsys):
    save_model(trained(base_lm, "image", seed=3), tmp_path / "image", tokenizer=tokenizer, language_path=str(base_lm))
    other = tmp_path / "other_lm"
    torch.manual_seed(9)
    save_hf(Llama(Llama.from_pretrained(base_lm).config), other)
    lm = Llama.from_pretrained(other)
    model = MultimodalModel(MultimodalConfig(language=lm.config, speech=modality("speech", lm.config)),
                            language_model=lm)
    save_model(model, tmp_path / "speech", tokenizer=tokenizer, language_path=str(other))
    assert herd(["compose", str(tmp_path / "both"), str(tmp_path / "image"), str(tmp_path / "speech")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different base LMs" in err
    assert str(base_lm.resolve()) in err and str(other.resolve()) in err
    assert not (tmp_path / "both").exists()


def test_a_missing_or_changed_base_lm_is_a_clear_error(tmp_path, base_lm, tokenizer):
    lm_copy = tmp_path / "lm"
    save_hf(Llama.from_pretrained(base_lm), lm_copy)
    save_model(trained(base_lm, "image", seed=1), tmp_path / "m", tokenizer=tokenizer, language_path=str(lm_copy))
    changed = Llama.from_pretrained(lm_copy)
    with torch.no_grad():
        changed.model.norm.weight.add_(1e-3)
    save_hf(changed, lm_copy)
    with pytest.raises(ModelFolderError, match="is not the one its adapters were trained on"):
        load_model(tmp_path / "m")
    import shutil
    shutil.rmtree(lm_copy)
    with pytest.raises(ModelFolderError, match="base language model .* is missing"):
        load_model(tmp_path / "m")


def test_weights_that_do_not_match_the_config_are_a_clear_error(tmp_path, base_lm, tokenizer):
    folder = save_model(trained(base_lm, "image", seed=1), tmp_path / "m", tokenizer=tokenizer,
                        language_path=str(base_lm))
    meta = json.loads((folder / CONFIG_FILE).read_text())
    original = (folder / CONFIG_FILE).read_text()
    meta["model"]["image"]["cross_attention_every"] = 1  # 4 blocks in the config, 2 in the file
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError, match="does not match config.json: missing .*cross_attention_layers.2"):
        load_model(folder)
    (folder / CONFIG_FILE).write_text(original)
    weights = load_file(str(folder / WEIGHTS_FILE))
    del weights["multi_modal_projector.bias"]
    save_file(weights, str(folder / WEIGHTS_FILE))
    with pytest.raises(ModelFolderError, match="multi_modal_projector.bias"):
        load_model(folder)


def test_a_failed_save_leaves_nothing_and_keeps_the_old_folder(tmp_path, base_lm, tokenizer):
    model = trained(base_lm, "image", seed=1)
    folder = save_model(model, tmp_path / "m", tokenizer=tokenizer, language_path=str(base_lm))
    before = (folder / WEIGHTS_FILE).read_bytes()

    class Unsaveable:
        pass
    with pytest.raises(ModelFolderError, match="tokenizer cannot be saved"):
        save_model(trained(base_lm, "image", seed=2), folder, tokenizer=Unsaveable(), language_path=str(base_lm))
    assert (folder / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind


def test_language_digest_sees_every_tensor(base_lm):
    lm = Llama.from_pretrained(base_lm)
    digest = language_digest(lm)
    assert digest == language_digest(Llama.from_pretrained(base_lm))
    with torch.no_grad():
        lm.model.layers[3].mlp.down_proj.weight[0, 0] += 1e-6
    assert language_digest(lm) != digest
