"""Reward model: a row holding the prompt once and several responses scores each response exactly as
prompt + response alone; save/load keeps the LM's HF names and the head apart; Bradley-Terry trains it."""
import pytest
import torch

from language import Llama, preset
from language.chat_data import RankedExample, Response, reward_attention_mask, reward_row
from language.chat_format import RenderedDialog
from language.checkpoints import save_hf
from language.reward_model import HEAD_FILE, HEAD_NAME, RewardModel, collate_reward_rows
from training.losses import bradley_terry_loss


def _tiny(tie: bool) -> Llama:
    torch.manual_seed(0)
    return Llama(preset("tiny", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                        rope_theta=1000.0, tie_embeddings=tie, max_seq_len=128))


def _example(gen: torch.Generator, prompt_len: int, response_lens: list[int]) -> RankedExample:
    def ids(n):
        return torch.randint(1, 64, (n,), generator=gen).tolist()
    p = ids(prompt_len)
    prompt = RenderedDialog(p, [False] * prompt_len, [False] * prompt_len)
    responses = [Response(ids(n), [True] * n, [True] * (n - 1) + [False]) for n in response_lens]
    return RankedExample(prompt, responses)


@pytest.mark.parametrize("tie", [True, False])
def test_shared_prompt_row_scores_equal_separate_scoring(tie):
    rm = RewardModel(_tiny(tie)).eval()
    gen = torch.Generator().manual_seed(1)
    examples = [_example(gen, 7, [4, 9, 2]), _example(gen, 12, [5, 3]), _example(gen, 3, [6, 6, 1])]
    rows = [reward_row(ex, shuffle_seed=(0, i)) for i, ex in enumerate(examples)]
    assert any(r["rank"].tolist() != sorted(r["rank"].tolist()) for r in rows)  # really shuffled
    batch = collate_reward_rows(rows, pad_id=0)
    with torch.no_grad():
        rewards, valid = rm.score_rows(batch)
        for i, ex in enumerate(examples):
            alone = rm.score_sequences([ex.prompt.ids + r.ids for r in ex.responses])
            k = len(ex.responses)
            assert valid[i].tolist() == [True] * k + [False] * (3 - k)
            torch.testing.assert_close(rewards[i, :k], alone, atol=1e-5, rtol=0)
    # the plain causal mask would let later responses see earlier ones: scores would differ
    with torch.no_grad():
        hidden = rm.hidden_states(batch["tokens"])
        leaky = rm.rewards_at(hidden, batch["end_index"])
    assert not torch.allclose(leaky[0].sort().values, rewards[0].sort().values, atol=1e-4)


def test_padding_never_changes_a_reward():
    rm = RewardModel(_tiny(True)).eval()
    gen = torch.Generator().manual_seed(2)
    short, long = _example(gen, 4, [3, 2]), _example(gen, 20, [10, 9, 8])
    with torch.no_grad():
        alone, _ = rm.score_rows(collate_reward_rows([reward_row(short, shuffle_seed=0)]))
        padded, _ = rm.score_rows(collate_reward_rows([reward_row(short, shuffle_seed=0),
                                                       reward_row(long, shuffle_seed=0)]))
    torch.testing.assert_close(padded[0, :2], alone[0], atol=1e-5, rtol=0)


def test_reward_mask_pads_are_isolated():
    segments = torch.tensor([[0, 0, 1, 1, 2, -1, -1]])
    mask = reward_attention_mask(segments)[0]
    assert mask[4].tolist() == [True, True, False, False, True, False, False]  # response 2: prompt + itself
    assert not mask[:5, 5:].any()  # no real token sees padding


def test_bradley_terry_training_moves_rewards_apart():
    rm = RewardModel(_tiny(False))
    assert not rm.lm.lm_head.weight.requires_grad  # untied output projection: unused, frozen
    gen = torch.Generator().manual_seed(3)
    examples = [_example(gen, 5, [3, 4, 2]) for _ in range(4)]
    batch = collate_reward_rows([reward_row(ex, shuffle_seed=i) for i, ex in enumerate(examples)])
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        rewards, valid = rm.score_rows(batch)
        loss_sum, n_pairs = bradley_terry_loss(rewards, valid)
        assert int(n_pairs) == 4 * 3
        (loss_sum / n_pairs).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss_sum.detach() / n_pairs))
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        rewards, _ = rm.score_rows(batch)
    assert (rewards[:, 0] > rewards[:, 1]).all() and (rewards[:, 1] > rewards[:, 2]).all()


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_keeps_hf_names_and_the_head_apart(tmp_path, tie):
    rm = RewardModel(_tiny(tie)).eval()
    with torch.no_grad():
        rm.score.weight.normal_()
    rm.save_pretrained(tmp_path / "rm")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "rm" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert HEAD_NAME not in names and "model.embed_tokens.weight" in names
    with safe_open(str(tmp_path / "rm" / HEAD_FILE), framework="pt") as f:
        assert set(f.keys()) == {HEAD_NAME}
    lm = Llama.from_pretrained(tmp_path / "rm")  # the folder is a plain language model too
    assert isinstance(lm, Llama)
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    seqs = [[1, 2, 3, 4, 5], [9, 8, 7]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.score_sequences(seqs), rm.score_sequences(seqs), atol=1e-6, rtol=0)


def test_plain_lm_needs_new_head(tmp_path):
    save_hf(_tiny(True), tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match="not a reward model"):
        RewardModel.from_pretrained(tmp_path / "lm")
    rm = RewardModel.from_pretrained(tmp_path / "lm", new_head=True)
    assert rm.score.weight.shape == (1, 32)


def test_bad_head_file_is_named(tmp_path):
    rm = RewardModel(_tiny(True))
    rm.save_pretrained(tmp_path / "rm")
    from safetensors.torch import save_file
    save_file({HEAD_NAME: torch.zeros(1, 7)}, str(tmp_path / "rm" / HEAD_FILE))
    with pytest.raises(ValueError, match=r"reward_head.safetensors: score.weight has shape \(1, 7\)"):
        RewardModel.from_pretrained(tmp_path / "rm")
