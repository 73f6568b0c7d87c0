"""Conformer encoder: presets, parity with torchaudio's Conformer layer, padding, rotary, checkpointing."""
import pytest
import torch
import torchaudio

from speech.conformer import (ConformerBlock, ConformerEncoder, MaskedBatchNorm1d, block_state_from_torchaudio,
                              preset)
from speech.features import valid_mask
from speech.rotary import apply_rotary, rotary_cos_sin


def test_presets_and_the_1b_parameter_count():
    config = preset("conformer-1b")
    assert (config.n_layers, config.dim, config.ffn_dim, config.n_heads, config.conv_kernel) == (24, 1536, 4096, 24, 7)
    with torch.device("meta"):
        encoder = ConformerEncoder(config)
        reference = torchaudio.models.Conformer(input_dim=1536, num_heads=24, ffn_dim=4096, num_layers=24,
                                                depthwise_conv_kernel_size=7)
    stacker = 4 * 80 * 1536 + 1536
    assert encoder.num_parameters() == 1_002_100_224
    assert encoder.num_parameters() == sum(p.numel() for p in reference.parameters()) + stacker
    assert preset("tiny", dim=32, n_heads=2).dim == 32
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        preset("tiny2")
    with pytest.raises(ValueError, match="conv_kernel must be odd"):
        preset("tiny", conv_kernel=6)


def _torchaudio_layer_and_block(conv_norm="batchnorm"):
    torch.manual_seed(0)
    layer = torchaudio.models.Conformer(input_dim=64, num_heads=4, ffn_dim=128, num_layers=1,
                                        depthwise_conv_kernel_size=7).conformer_layers[0]
    # give BatchNorm non-trivial affine parameters and running statistics
    bn = layer.conv_module.sequential[3]
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn_like(t) * 0.3 + (1.0 if t is bn.weight else 0.0))
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    block = ConformerBlock(preset("tiny", rotary=False, conv_norm=conv_norm))
    block.load_state_dict(block_state_from_torchaudio(layer.state_dict()))
    return layer, block


@pytest.mark.parametrize("training", [False, True])
def test_block_equals_torchaudio_layer_without_padding(training):
    layer, block = _torchaudio_layer_and_block()
    layer.train(training), block.train(training)
    x = torch.randn(3, 21, 64)
    expected = layer(x.transpose(0, 1), None).transpose(0, 1)
    actual = block(x, torch.ones(3, 21, dtype=torch.bool))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    if training:  # running statistics moved exactly like torch's BatchNorm1d
        torch.testing.assert_close(block.conv.norm.running_mean, layer.conv_module.sequential[3].running_mean)
        torch.testing.assert_close(block.conv.norm.running_var, layer.conv_module.sequential[3].running_var)


def test_block_on_a_padded_batch_equals_torchaudio_on_each_utterance_alone():
    layer, block = _torchaudio_layer_and_block()
    layer.eval(), block.eval()
    lengths = torch.tensor([19, 7, 12])
    x = torch.randn(3, 19, 64)
    out = block(x, valid_mask(lengths, 19))
    for i, n in enumerate(lengths.tolist()):
        alone = layer(x[i:i + 1, :n].transpose(0, 1), None).transpose(0, 1)
        torch.testing.assert_close(out[i:i + 1, :n], alone, atol=1e-5, rtol=1e-5)
    # torchaudio's own padded batch lets padding leak through its convolution: ours does not
    leaky = layer(x.transpose(0, 1), ~valid_mask(lengths, 19)).transpose(0, 1)
    assert (leaky[1, :7] - out[1, :7]).abs().max() > 1e-3


def test_masked_batchnorm_uses_only_valid_frames():
    torch.manual_seed(0)
    ours, reference = MaskedBatchNorm1d(8), torch.nn.BatchNorm1d(8)
    x = torch.randn(2, 8, 10)
    x[1, :, 6:] = 100.0  # padding
    valid = valid_mask(torch.tensor([10, 6]), 10)
    out = ours(x, valid)
    packed = torch.cat([x[0], x[1, :, :6]], dim=1)[None]  # the 16 valid frames as one sequence
    expected = reference(packed)[0]
    torch.testing.assert_close(torch.cat([out[0], out[1, :, :6]], dim=1), expected)
    torch.testing.assert_close(ours.running_var, reference.running_var)


@pytest.mark.parametrize("conv_norm", ["batchnorm", "layernorm"])
def test_encoder_shapes_and_padding_never_reaches_valid_frames(conv_norm):
    torch.manual_seed(0)
    encoder = ConformerEncoder(preset("tiny", conv_norm=conv_norm))
    lengths = torch.tensor([50, 23, 9])
    features = torch.randn(3, 50, 80)
    encoder.train()  # batch statistics from valid frames only: garbage padding changes nothing
    out, out_lengths = encoder(features, lengths)
    assert out.shape == (3, 13, 64) and out_lengths.tolist() == [13, 6, 3]
    assert out[1, 6:].abs().sum() == 0 and out[2, 3:].abs().sum() == 0
    garbage = features.clone()
    garbage[~valid_mask(lengths, 50)] = 1e3
    torch.manual_seed(1)
    again, _ = encoder(garbage, lengths)
    torch.testing.assert_close(again, out, atol=1e-5, rtol=1e-5)
    encoder.eval()  # inference: a padded batch equals each utterance alone
    out, _ = encoder(garbage, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone, alone_len = encoder(features[i:i + 1, :n], lengths[i:i + 1])
        # other shapes, other summation orders: the chain of matmuls sums K ~ 1.7e3 terms in all (stacker 320; per
        # layer FFNs 2 x (64 + 128), attention 64 + 16 + T + 64, conv 64 + 7 + 64): <= K*u = 1e-4 relative; padding
        # (1e3) that leaked would be off by O(1)
        torch.testing.assert_close(out[i:i + 1, :alone_len[0]], alone, atol=2e-4, rtol=2e-4)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rotary_cos_sin(40, 16, 10000.0)

    def score(m, n):
        rq = apply_rotary(q, cos[:, :, m:m + 1], sin[:, :, m:m + 1])
        rk = apply_rotary(k, cos[:, :, n:n + 1], sin[:, :, n:n + 1])
        return (rq * rk).sum()

    torch.testing.assert_close(score(3, 10), score(20, 27), atol=1e-5, rtol=1e-5)
    assert (score(3, 10) - score(3, 11)).abs() > 1e-4
    # and the encoder uses it: rotary on/off give different outputs from the same weights
    encoder = ConformerEncoder(preset("tiny")).eval()
    plain = ConformerEncoder(preset("tiny", rotary=False)).eval()
    plain.load_state_dict(encoder.state_dict())
    features, lengths = torch.randn(1, 40, 80), torch.tensor([40])
    assert (encoder(features, lengths)[0] - plain(features, lengths)[0]).abs().max() > 1e-3


def test_gradient_checkpointing_same_result_and_running_stats_once():
    torch.manual_seed(0)
    plain = ConformerEncoder(preset("tiny", dropout=0.1)).train()
    checkpointed = ConformerEncoder(preset("tiny", dropout=0.1)).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable()
    features, lengths = torch.randn(2, 30, 80), torch.tensor([30, 17])
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        out, _ = model(features, lengths)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    bn_plain, bn_ckpt = plain.layers[0].conv.norm, checkpointed.layers[0].conv.norm
    assert int(bn_ckpt.num_batches_tracked) == 1
    torch.testing.assert_close(bn_ckpt.running_mean, bn_plain.running_mean)


def test_encoder_rejects_bad_inputs():
    encoder = ConformerEncoder(preset("tiny"))
    with pytest.raises(ValueError, match=r"features \(B, T, 80\)"):
        encoder(torch.randn(2, 10, 40), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="utterance 1 .* length 0"):
        encoder(torch.randn(2, 10, 80), torch.tensor([10, 0]))
