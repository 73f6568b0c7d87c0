"""Parity with transformers' LlamaForCausalLM: the same weights give the same fp32 logits (max abs diff
<= 1e-4), on random tiny configs and on the real SmolLM2-135M-Instruct GGUF."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig as HFLlamaConfig, LlamaForCausalLM

from language import Llama, preset
from language.checkpoints import save_hf

ATOL = 1e-4
SCALED_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
SEQ_LEN = 96  # longer than original_max_position_embeddings, so the 3.1 scaling matters
CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "wide-heads": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "llama31-rope": dict(num_attention_heads=2, num_key_value_heads=1, rope_parameters=SCALED_ROPE),
}


def random_hf_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Tiny HF Llama with every weight random (norms too) and large enough for O(1) logits."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="eager")
    model = LlamaForCausalLM(HFLlamaConfig(**{**kwargs, **overrides}))
    randomize_(model)
    return model.eval()


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)


def tokens(vocab_size: int = 128, length: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(1))


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert theirs.std() > 0.3, "logits too small for the comparison to mean much"
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff:.2e} > {ATOL}"


@pytest.mark.parametrize("name", CONFIGS)
def test_load_hf_matches_transformers(name, tmp_path):
    ref = random_hf_model(**CONFIGS[name])
    ref.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    x = tokens()
    with torch.no_grad():
        assert_same_logits(ours(x), ref(x).logits)


def test_llama31_rope_scaling_changes_logits(tmp_path):
    ref = random_hf_model(**CONFIGS["llama31-rope"])
    ref.save_pretrained(tmp_path)
    scaled = Llama.from_pretrained(tmp_path)
    assert scaled.config.rope_scaling is not None and SEQ_LEN > scaled.config.rope_scaling.original_max_position
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = Llama.from_pretrained(tmp_path)
    assert plain.config.rope_scaling is None
    x = tokens()
    with torch.no_grad():
        assert (scaled(x) - plain(x)).abs().max() > 0.05


@pytest.mark.parametrize("name,overrides", [("tiny", {}), ("tiny", {"tie_embeddings": True}), ("tiny-scaled", {})])
def test_save_hf_loads_in_transformers(name, overrides, tmp_path):
    torch.manual_seed(0)
    ours = Llama(preset(name, **overrides)).eval()
    randomize_(ours)
    save_hf(ours, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ref.config.tie_word_embeddings == ours.config.tie_embeddings
    x = tokens(ours.config.vocab_size, length=100)
    with torch.no_grad():
        assert_same_logits(ours(x), ref(x).logits)


# ------------------------------------------------------------------ the real SmolLM2-135M-Instruct

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def transformers_from_gguf(folder: str, name: str) -> LlamaForCausalLM:
    """transformers' own GGUF loading. `from_pretrained(gguf_file=...)` insists on `accelerate`; without it
    this runs the steps from_pretrained runs: config from the GGUF metadata, tensors through
    `load_gguf_checkpoint` (transformers' dequantization and Q/K reverse permutation)."""
    if importlib.util.find_spec("accelerate") is not None:
        return LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = HFLlamaConfig.from_pretrained(folder, gguf_file=name)
    with no_init_weights():
        model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(os.path.join(folder, name), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model.float().eval()


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    assert smollm2_gguf.name == SMOLLM2_FILE
    folder = str(smollm2_gguf.parent)
    ours = Llama.from_pretrained(smollm2_gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    return ours, folder, tokenizer, prompt["input_ids"]


def test_smollm2_config_is_the_preset(smollm2):
    ours = smollm2[0]
    assert ours.config == preset("smollm2-135m")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert 134_000_000 < ours.num_parameters() < 135_000_000


def test_smollm2_gguf_matches_transformers(smollm2):
    ours, folder, _, ids = smollm2
    ref = transformers_from_gguf(folder, SMOLLM2_FILE)
    with torch.no_grad():
        assert_same_logits(ours(ids), ref(ids).logits)


def test_smollm2_answers_paris(smollm2):
    ours, _, tokenizer, ids = smollm2
    cache = ours.new_cache(1, ids.shape[1] + 8)
    answer = []
    with torch.no_grad():
        logits = ours(ids, cache=cache)
        for _ in range(8):  # greedy decoding
            answer.append(logits[:, -1:].argmax(-1))
            logits = ours(answer[-1], cache=cache)
    assert "Paris" in tokenizer.decode(torch.cat(answer, dim=1)[0])
