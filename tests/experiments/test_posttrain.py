"""The post-training recipes through `herd run` in CI size: SFT (exact resume, bad rows counted and skipped
with file:line warnings, a mostly-bad file stops), reward model, rejection sampling (resume, outputs that the
next stage loads), DPO (reference log-probs, masks, loss log 2 at the first step)."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from experiments.cli import main
from language import Llama, preset
from language.chat_data import DataWarning, load_chat_jsonl, load_preference_jsonl
from language.chat_format import chat_format_for
from language.checkpoints import save_hf
from language.packing import IGNORE_INDEX
from language.reward_model import HEAD_FILE, RewardModel
from language.synthetic_tasks import TaskConfig, write_task_files
from language.tokenizer import load_tokenizer, train_bpe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Byte-level tokenizer with the Llama 3 specials, a tiny random base model, the generated task files."""
    root = tmp_path_factory.mktemp("posttrain")
    alphabet = root / "alphabet.txt"
    alphabet.write_text("".join(chr(i) for i in range(32, 127)))
    tokenizer = train_bpe([alphabet], 272, root / "tok")
    torch.manual_seed(0)
    base = Llama(preset("tiny", vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=64, rope_theta=1000.0, max_seq_len=128, tie_embeddings=True))
    save_hf(base, root / "base")
    tokenizer.save(root / "base")
    rm = RewardModel(base)
    rm.save_pretrained(root / "rm")
    tokenizer.save(root / "rm")
    files = write_task_files(TaskConfig(kinds=["reverse", "upper"], min_word=3, max_word=4, n_sft=120,
                                        n_preference=48, n_prompts=10, n_eval=12, n_pretrain_docs=0), root / "task")
    return {"root": root, "base": root / "base", "rm": root / "rm", **files}


def _yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _common(tmp_path, name, recipe, assets) -> dict:
    return {"experiment": name, "recipe": recipe, "seed": 0, "output_dir": str(tmp_path / "runs"),
            "model": {"init_from": str(assets["base"])}}


def _train_common(steps: int) -> dict:
    return {"optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 1}, "eval_every": 2, "checkpoint_every": 2,
            "train": {"steps": steps, "batch_size": 4}}


def _run_dir(tmp_path, name, output="runs") -> Path:
    (run,) = [p for p in (tmp_path / output / name).iterdir() if not p.is_symlink()]
    return run


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _sft_cfg(tmp_path, assets, **extra) -> dict:
    cfg = {**_common(tmp_path, "sft", "sft", assets), **_train_common(6),
           "data": {"train": str(assets["sft_train"]), "seq_len": 128},
           "eval": {"path": str(assets["sft_eval"]), "max_examples": 6, "max_new_tokens": 6},
           "average": {"snapshots": 2, "every": 2}}
    cfg.update(extra)
    return cfg


def test_sft_learns_saves_and_resumes_exactly(tmp_path, assets):
    path = _yaml(tmp_path / "sft.yaml", _sft_cfg(tmp_path, assets))
    assert main(["run", str(path)]) == 0
    run = _run_dir(tmp_path, "sft")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["averaged_snapshots"] == 2
    assert {"accuracy_initial", "accuracy_final", "accuracy_final_std_error"} <= set(summary)
    assert summary["improvement"]["n"] == 6
    losses = [r["loss"] for r in _metrics(run)]
    assert losses[-1] < losses[0]
    final = Llama.from_pretrained(run / "final")  # the next stage's model.init_from
    assert final.config.vocab_size == 272 and (run / "final" / "tokenizer.json").is_file()
    assert (run / "eval_initial.json").is_file() and (run / "loss_curve.png").is_file()

    other = _yaml(tmp_path / "b.yaml", _sft_cfg(tmp_path, assets, output_dir=str(tmp_path / "runs_b")))
    assert main(["run", str(other), "stop_after_steps=3"]) == 0
    assert main(["run", str(other), "resume=true"]) == 0
    resumed = _run_dir(tmp_path, "sft", "runs_b")
    assert [r["loss"] for r in _metrics(resumed)] == pytest.approx(losses, abs=1e-6)
    again = Llama.from_pretrained(resumed / "final")
    for (name, a), b in zip(final.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


BAD_CHAT_ROWS = {
    '{"messages": [': "invalid_json",
    json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}): "empty_assistant",
    json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "ok"}]}): "unknown_role",
    json.dumps({"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]}): "too_long",
}


def test_sft_counts_and_skips_bad_rows_with_file_line_warnings(tmp_path, assets):
    good = Path(assets["sft_train"]).read_text().splitlines()[:40]
    rows = good[:10] + list(BAD_CHAT_ROWS) + good[10:]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = _sft_cfg(tmp_path, assets, train={"steps": 2, "batch_size": 2}, average={"snapshots": 1, "every": 1})
    cfg["data"]["train"] = str(data)
    cfg["eval"]["max_examples"] = 2
    with pytest.warns(DataWarning) as caught:
        assert main(["run", str(_yaml(tmp_path / "sft.yaml", cfg))]) == 0
    messages = [str(w.message) for w in caught if str(data) in str(w.message)]
    assert len(messages) == len(BAD_CHAT_ROWS)
    for line, reason in enumerate(BAD_CHAT_ROWS.values(), 11):
        assert any(m.startswith(f"{data}:{line}: skipped ({reason})") for m in messages), (line, reason, messages)
    summary = json.loads((_run_dir(tmp_path, "sft") / "summary.json").read_text())
    assert summary["data"]["kept"] == 40 and summary["data"]["rows"] == 44
    assert summary["data"]["skipped"] == {reason: 1 for reason in BAD_CHAT_ROWS.values()}


def test_a_file_of_mostly_bad_rows_stops_with_one_clear_line(tmp_path, assets, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(list(BAD_CHAT_ROWS) * 2 + Path(assets["sft_train"]).read_text().splitlines()[:3]) + "\n")
    cfg = _sft_cfg(tmp_path, assets)
    cfg["data"]["train"] = str(data)
    with pytest.warns(DataWarning):
        assert main(["run", str(_yaml(tmp_path / "sft.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error:") and f"{data}: 8 of 11 rows are bad" in err and len(err.splitlines()) == 1


def test_reward_model_recipe(tmp_path, assets):
    rows = Path(assets["ranked_train"]).read_text().splitlines()
    dup = json.loads(rows[0])
    dup["responses"] = [dup["responses"][0], dup["responses"][0]]  # chosen == rejected
    data = tmp_path / "ranked.jsonl"
    data.write_text("\n".join(rows[:5] + [json.dumps(dup)] + rows[5:]) + "\n")
    cfg = {**_common(tmp_path, "rm", "reward_model", assets), **_train_common(4),
           "data": {"train": str(data), "eval": str(assets["ranked_eval"]), "max_len": 128},
           "average": {"snapshots": 2, "every": 1}}
    with pytest.warns(DataWarning, match=rf"{data}:6: skipped \(duplicate_responses\)"):
        assert main(["run", str(_yaml(tmp_path / "rm.yaml", cfg))]) == 0
    run = _run_dir(tmp_path, "rm")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["skipped"] == {"duplicate_responses": 1}
    assert summary["train_examples"] == 48 and summary["examples"] == 12 and 0 <= summary["pairwise_accuracy"] <= 1
    assert summary["pairs"] > summary["examples"] and summary["std_error"] > 0
    assert all("pair_accuracy" in r for r in _metrics(run))
    assert (run / "final" / HEAD_FILE).is_file()
    rm = RewardModel.from_pretrained(run / "final")  # what rejection sampling loads
    assert isinstance(Llama.from_pretrained(run / "final"), Llama)
    assert rm.score.weight.abs().sum() > 0


def _rs_cfg(tmp_path, assets, output="runs") -> dict:
    return {**_common(tmp_path, "rs", "rejection_sampling", assets), "output_dir": str(tmp_path / output),
            "reward_model": str(assets["rm"]), "data": {"prompts": str(assets["prompts_train"])},
            "sampling": {"k": 3, "max_new_tokens": 6, "prompts_per_batch": 4, "score_batch_size": 3},
            "checkpoint_every": 1}


def test_rejection_sampling_keeps_the_best_and_resumes(tmp_path, assets):
    assert main(["run", str(_yaml(tmp_path / "rs.yaml", _rs_cfg(tmp_path, assets)))]) == 0
    run = _run_dir(tmp_path, "rs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["prompts"] == 10 and summary["samples"] == 30 and summary["k"] == 3
    assert summary["scores_all"]["n"] >= summary["scores_best"]["n"] == summary["kept"]
    assert {"accuracy_best_of_k", "accuracy_plain_sample", "best_vs_plain"} <= set(summary)
    assert (run / "scores.png").is_file()
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for r in records:
        if r["best"] is not None:
            valid = [s for s, stopped in zip(r["scores"], r["stopped"]) if s is not None and stopped]
            assert r["best_score"] == max(valid)
    fmt = chat_format_for(load_tokenizer(assets["base"]))
    if summary["kept"]:
        dialogs, report = load_chat_jsonl(run / "best.jsonl", fmt, max_len=128)  # new SFT data
        assert report.kept == summary["kept"]
    # stop after one batch and resume: the same files as the uninterrupted run
    other = _yaml(tmp_path / "rs_b.yaml", _rs_cfg(tmp_path, assets, "runs_b"))
    assert main(["run", str(other), "stop_after_batches=1"]) == 0
    assert main(["run", str(other), "resume=true"]) == 0
    resumed = _run_dir(tmp_path, "rs", "runs_b")
    for name in ("samples.jsonl", "best.jsonl", "pairs.jsonl"):
        assert (resumed / name).read_text() == (run / name).read_text(), name


def test_rejection_sampling_needs_a_reward_model(tmp_path, assets, capsys):
    cfg = _rs_cfg(tmp_path, assets)
    cfg["reward_model"] = str(assets["base"])  # a plain LM: no reward head
    assert main(["run", str(_yaml(tmp_path / "rs.yaml", cfg))]) == 2
    assert "not a reward model" in capsys.readouterr().err


def test_dpo_recipe_starts_at_log2_and_masks_headers(tmp_path, assets):
    rows = Path(assets["preference_train"]).read_text().splitlines()
    empty = json.loads(rows[0])
    empty["chosen"]["content"] = ""
    data = tmp_path / "pref.jsonl"
    data.write_text("\n".join(rows[:3] + [json.dumps(empty)] + rows[3:]) + "\n")
    cfg = {**_common(tmp_path, "dpo", "dpo", assets), **_train_common(3),
           "data": {"train": str(data), "max_len": 128},
           "eval": {"path": str(assets["sft_eval"]), "max_examples": 4, "max_new_tokens": 6}}
    with pytest.warns(DataWarning, match=rf"{data}:4: skipped \(empty_assistant\)"):
        assert main(["run", str(_yaml(tmp_path / "dpo.yaml", cfg))]) == 0
    run = _run_dir(tmp_path, "dpo")
    first = _metrics(run)[0]
    # policy == reference before the first step, but the reference pass pads to other lengths: each sequence log-prob
    # (<= 8 content tokens, |sum| < 50; logits are 32-term float32 dot products < 5: <= 32*u*5 = 1e-5 each) may round
    # by <= 2e-4, so beta * (4 of them) <= 8e-5; a reference that is not the starting policy moves both by >= 1e-2
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert torch.load(run / "reference_logprobs.pt").shape == (48, 2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["beta"] == 0.1 and summary["nll_coef"] == 0.2 and summary["data"]["skipped"] == {"empty_assistant": 1}
    assert isinstance(Llama.from_pretrained(run / "final"), Llama)


def test_dpo_batch_masks_header_and_end_of_turn(assets):
    from experiments.recipes.dpo import collate_pairs
    tokenizer = load_tokenizer(assets["base"])
    fmt = chat_format_for(tokenizer)
    examples, _ = load_preference_jsonl(assets["preference_train"], fmt, max_len=128)
    batch = collate_pairs(examples[:2], pad_id=0)
    for row, ex, k in ((0, examples[0], 0), (2, examples[0], 1)):
        tokens, labels, mask = batch["tokens"][row], batch["labels"][row], batch["dpo_mask"][row]
        response = ex.responses[k]
        content = tokenizer.decode([int(t) for t in labels[mask]])
        assert content == tokenizer.decode([i for i, c in zip(response.ids, response.content_mask) if c])
        trained = [int(t) for t in labels[labels != IGNORE_INDEX]]
        assert tokenizer.decode(trained[-1:]) == "<|eot_id|>" and not mask[labels == trained[-1]].any()
        assert not mask[labels == IGNORE_INDEX].any()
        n = len(ex.prompt.ids)
        assert (labels[:n - 1] == IGNORE_INDEX).all()  # no loss on the prompt or the assistant header


def test_two_ranks_train_on_halves_of_each_step(tmp_path, assets, herd_two_ranks):
    """Post-training under 2 ranks (DeepSpeed, gloo): each rank trains on its half of a step's examples, so the
    losses equal one process with 2 micro-batches of the same halves (rank r's rows = micro-batch r). Were both
    ranks given the same rows, the step's loss would be the mean over one half only. fp32 sums in another order:
    rounding ~1e-7 of losses ~1, so 1e-5 leaves a wide margin and still sees any half swapped."""
    cfg = {**_common(tmp_path, "dpo", "dpo", assets), **_train_common(3),
           "data": {"train": str(assets["preference_train"]), "max_len": 128}, "eval_every": 100}
    path = _yaml(tmp_path / "dpo.yaml", cfg)
    herd_two_ranks("run", str(path), "engine.backend=deepspeed", "engine.zero_stage=1", cwd=tmp_path)
    assert main(["run", str(path), f"output_dir={tmp_path / 'one'}", "engine.grad_accum_steps=2"]) == 0
    two, one = _metrics(_run_dir(tmp_path, "dpo")), _metrics(_run_dir(tmp_path, "dpo", "one"))
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
