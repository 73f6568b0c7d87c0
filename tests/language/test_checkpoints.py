"""Checkpoint conversion: HF safetensors (sharded, tied, saved by us), GGUF and Meta layouts built here
from random tiny HF models, and the errors a bad checkpoint must give."""
from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

from language import Llama, RopeScaling
from language.checkpoints import CheckpointError, save_hf
from language.checkpoints.gguf import _scaling_from_rope_freqs
from language.checkpoints.hf import config_from_hf
from language.checkpoints.meta import meta_ffn_dim


def random_hf_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Tiny HF Llama with every weight random (norms too)."""
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(HFLlamaConfig(**{**kwargs, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model.eval()


TOKENS = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(1))


def assert_same_logits(ours: torch.nn.Module, ref: LlamaForCausalLM, atol: float = 1e-4) -> None:
    with torch.no_grad():
        diff = (ours(TOKENS) - ref(TOKENS).logits).abs().max().item()
    assert diff <= atol, f"max abs logit difference {diff:.2e}"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A sharded HF checkpoint written by transformers, and its model."""
    folder = tmp_path_factory.mktemp("hf")
    ref = random_hf_model()
    ref.save_pretrained(folder, max_shard_size="40KB")
    return folder, ref


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------ Hugging Face

def test_sharded_hf_checkpoint_loads(hf_dir):
    folder, ref = hf_dir
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*"))) > 2
    ours = Llama.from_pretrained(folder)  # an HF folder, picked from its contents
    assert_same_logits(ours, ref)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad and p.device.type == "cpu"
               for p in ours.parameters())
    assert not ours.model.inv_freq.is_meta


def test_save_hf_round_trip(hf_dir, tmp_path):
    ours = Llama.from_pretrained(hf_dir[0])
    save_hf(ours, tmp_path, max_shard_size="50KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    back = Llama.from_pretrained(tmp_path)
    assert back.config == ours.config
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    save_hf(ours, tmp_path)  # one file now: the stale shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert Llama.from_pretrained(tmp_path).config == ours.config


def test_tied_checkpoint_without_lm_head(tmp_path):
    ref = random_hf_model(tie_word_embeddings=True)
    ref.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    ours = Llama.from_pretrained(tmp_path, dtype=torch.float64)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.lm_head.weight.dtype == torch.float64 and ours.model.inv_freq.dtype == torch.float32
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())
    assert_same_logits(ours.float(), ref)


def test_rope_config_spellings_agree():
    v4 = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
    v5 = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
          "rope_parameters": {**v4["rope_scaling"], "rope_theta": 500000.0}}
    a, b = config_from_hf(v4, "v4"), config_from_hf(v5, "v5")
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    plain = config_from_hf({"hidden_size": 64, "num_attention_heads": 4}, "defaults")
    assert plain.rope_theta == 10000.0 and plain.rope_scaling is None and plain.n_kv_heads == 4


def test_shape_mismatch_names_tensor_file_and_shapes(hf_dir, tmp_path):
    folder = copy_dir(hf_dir[0], tmp_path / "ckpt")
    edit_config(folder, intermediate_size=200)
    with pytest.raises(CheckpointError) as err:
        Llama.from_pretrained(folder)
    msg = str(err.value)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and ".safetensors" in msg
    assert "[192, 64]" in msg and "[200, 64]" in msg


def test_missing_and_unexpected_tensors(tmp_path):
    random_hf_model().save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight; "
                                              r"1 unexpected tensor\(s\): model\.layers\.0\.self_attn\.q_proj\.bias"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.002])  # cut in the data, or in the header
def test_truncated_safetensors_names_the_file(hf_dir, tmp_path, keep):
    folder = copy_dir(hf_dir[0], tmp_path / "ckpt")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:max(int(len(data) * keep), 4)])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*truncated or corrupt"):
        Llama.from_pretrained(folder)


@pytest.mark.parametrize("change,words", [
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "RoPE type 'yarn'"),
])
def test_unsupported_hf_configs(hf_dir, tmp_path, change, words):
    folder = copy_dir(hf_dir[0], tmp_path / "ckpt")
    edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=words):
        Llama.from_pretrained(folder)


def test_unknown_format(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Llama.from_pretrained(tmp_path / "absent")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError) as err:
        Llama.from_pretrained(tmp_path)
    assert all(w in str(err.value) for w in ("config.json", "params.json", ".gguf", "weights.bin"))
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        Llama.from_pretrained(tmp_path / "weights.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor .*weights.bin"):
        Llama.from_pretrained(tmp_path)


# ------------------------------------------------------------------ GGUF (written here, llama.cpp style)

def hf_to_gguf_qk(w: torch.Tensor, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation: half-split rows -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(w.shape).numpy()


def llama_cpp_rope_freqs(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """The `rope_freqs.weight` divisors llama.cpp writes for Llama 3.1 scaling."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, ref: LlamaForCausalLM, *, qtype=None, raw: dict | None = None) -> None:
    """Write `ref` as a llama.cpp GGUF file; `qtype` quantizes the 2-D weights; `raw` maps GGUF names to
    (array, raw dtype) written as given, replacing or adding tensors."""
    raw = dict(raw or {})
    c = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, g in layer_names.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    state = ref.state_dict()
    if c.tie_word_embeddings:
        del state["lm_head.weight"]
    for name, t in state.items():
        data = t.detach().float()
        if name.endswith("q_proj.weight"):
            data = hf_to_gguf_qk(data, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = hf_to_gguf_qk(data, c.num_key_value_heads)
        else:
            data = data.numpy()
        if names[name] in raw:
            continue
        if qtype is not None and data.ndim == 2:
            w.add_tensor(names[name], gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(names[name], np.ascontiguousarray(data))
    for name, (data, raw_dtype) in raw.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"num_key_value_heads": 1}])
def test_gguf_matches_transformers_model(tmp_path, overrides):
    ref = random_hf_model(**overrides)
    write_gguf(tmp_path / "tiny.gguf", ref)
    ours = Llama.from_pretrained(tmp_path / "tiny.gguf")  # a GGUF file
    assert ours.config.tie_embeddings == ref.config.tie_word_embeddings
    assert ours.config.n_kv_heads == ref.config.num_key_value_heads and ours.config.vocab_size == 128
    assert_same_logits(ours, ref)


def test_gguf_llama31_rope_freqs(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    ref = random_hf_model(num_attention_heads=2, num_key_value_heads=1, rope_parameters=rope)
    freqs = llama_cpp_rope_freqs(32, 10000.0, rope)
    write_gguf(tmp_path / "scaled.gguf", ref, raw={"rope_freqs.weight": (freqs, None)})
    ours = Llama.from_pretrained(tmp_path / "scaled.gguf")
    assert ours.config.rope_scaling == RopeScaling(4.0, 1.0, 4.0, 64)
    assert_same_logits(ours, ref)


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 and 3.3 / Llama 3.2 1B and 3B
def test_rope_freqs_of_released_models_give_their_scaling(factor):
    rope = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    divisors = llama_cpp_rope_freqs(128, 500000.0, rope)
    assert _scaling_from_rope_freqs(divisors, 128, 500000.0, "x.gguf") == RopeScaling(factor, 1.0, 4.0, 8192)
    with pytest.raises(CheckpointError, match="x.gguf: rope_freqs.weight does not follow"):
        _scaling_from_rope_freqs(divisors[::-1].copy(), 128, 500000.0, "x.gguf")


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1])
def test_gguf_quantized_weights_land_in_the_right_rows(tmp_path, qtype):
    ref = random_hf_model(vocab_size=128)
    write_gguf(tmp_path / "q.gguf", ref, qtype=qtype)
    ours = Llama.from_pretrained(tmp_path / "q.gguf")
    tolerance = 0.02 if qtype == gguf.GGMLQuantizationType.Q8_0 else 0.15  # of max |w| per 32-block
    for name, theirs in ref.state_dict().items():
        mine = ours.state_dict()[name]
        assert (mine - theirs).abs().max() <= tolerance * theirs.abs().max(), name


def test_gguf_unsupported_quant_type_names_tensor_and_type(tmp_path):
    q8_1 = gguf.GGMLQuantizationType.Q8_1  # the gguf package cannot dequantize it
    block, type_size = gguf.GGML_QUANT_SIZES[q8_1]
    raw = np.zeros((64, 192 // block * type_size), dtype=np.uint8)
    write_gguf(tmp_path / "q.gguf", random_hf_model(), raw={"blk.1.ffn_down.weight": (raw, q8_1)})
    with pytest.raises(CheckpointError, match="'blk.1.ffn_down.weight' is stored as Q8_1"):
        Llama.from_pretrained(tmp_path / "q.gguf")


def test_gguf_unexpected_tensor(tmp_path):
    extra = {"blk.0.attn_q.bias": (np.zeros(64, dtype=np.float32), None)}
    write_gguf(tmp_path / "q.gguf", random_hf_model(), raw=extra)
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): blk.0.attn_q.bias"):
        Llama.from_pretrained(tmp_path / "q.gguf")


def test_gguf_other_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="general.architecture is 'qwen2'"):
        Llama.from_pretrained(tmp_path / "q.gguf")


# ------------------------------------------------------------------ Meta (params.json + consolidated.NN.pth)

def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of transformers' convert_llama_weights_to_hf permute: half-split rows -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def write_meta(folder, ref: LlamaForCausalLM, n_ranks: int, params: dict, vocab_split_dim: int = 0) -> None:
    """Write `ref` in Meta's layout split over `n_ranks` model-parallel ranks (fairscale's split dims)."""
    c = ref.config
    s = {k: v.detach() for k, v in ref.state_dict().items()}
    meta = {"tok_embeddings.weight": (s["model.embed_tokens.weight"], vocab_split_dim),
            "norm.weight": (s["model.norm.weight"], None), "output.weight": (s["lm_head.weight"], 0)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": (hf_to_meta_qk(s[p + "self_attn.q_proj.weight"], c.num_attention_heads), 0),
            f"layers.{i}.attention.wk.weight": (hf_to_meta_qk(s[p + "self_attn.k_proj.weight"], c.num_key_value_heads), 0),
            f"layers.{i}.attention.wv.weight": (s[p + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (s[p + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (s[p + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w3.weight": (s[p + "mlp.up_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (s[p + "mlp.down_proj.weight"], 1),
            f"layers.{i}.attention_norm.weight": (s[p + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (s[p + "post_attention_layernorm.weight"], None)})
    for rank in range(n_ranks):
        shard = {name: (t if dim is None else t.chunk(n_ranks, dim=dim)[rank]).clone() for name, (t, dim) in meta.items()}
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))


def meta_params(ref, **extra) -> dict:
    c = ref.config
    return {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
            "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "multiple_of": 32,
            "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"], **extra}


@pytest.mark.parametrize("vocab_split_dim,vocab_size", [(0, 128), (1, -1)])  # Llama 3 / Llama 2 embedding split
def test_meta_two_ranks_match_transformers(tmp_path, vocab_split_dim, vocab_size):
    ref = random_hf_model()  # intermediate 192 = meta_ffn_dim(64, multiple_of=32)
    write_meta(tmp_path, ref, 2, meta_params(ref, vocab_size=vocab_size), vocab_split_dim)
    ours = Llama.from_pretrained(tmp_path)  # a Meta folder
    assert ours.config.ffn_dim == 192 and ours.config.vocab_size == 128 and not ours.config.tie_embeddings
    assert_same_logits(ours, ref)


def test_meta_scaled_rope_and_ffn_multiplier(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    ref = random_hf_model(intermediate_size=256, rope_parameters=rope, max_position_embeddings=131072)
    write_meta(tmp_path, ref, 1, meta_params(ref, ffn_dim_multiplier=1.5, use_scaled_rope=True))
    ours = Llama.from_pretrained(tmp_path)
    assert ours.config.ffn_dim == 256 and ours.config.max_seq_len == 131072
    assert ours.config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert_same_logits(ours, ref)


def test_meta_ffn_dim_of_the_released_models():
    assert meta_ffn_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert meta_ffn_dim(8192, 4096, 1.3) == 28672  # 70B
    assert meta_ffn_dim(16384, 4096, 1.2) == 53248  # 405B
    assert meta_ffn_dim(2048, 256, 1.5) == 8192  # Llama 3.2 1B
    assert meta_ffn_dim(4096, 256, None) == 11008  # Llama 2 7B


def test_meta_rank_mismatch(tmp_path):
    ref = random_hf_model()
    write_meta(tmp_path, ref, 2, meta_params(ref))
    shard = torch.load(tmp_path / "consolidated.01.pth")
    del shard["layers.1.feed_forward.w2.weight"]
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth.*layers.1.feed_forward.w2.weight"):
        Llama.from_pretrained(tmp_path)
