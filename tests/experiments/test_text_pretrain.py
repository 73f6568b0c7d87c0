"""`herd run` with the text pre-training recipe on a tiny generated corpus: runs, resumes exactly, and
every bad input is one clear line with a non-zero exit and nothing half-written."""
import json
import random
from pathlib import Path

import pytest
import yaml

from experiments.cli import main
from language import Llama

WORDS = ("the king queen sword crown castle night day love war speak hear thou thee my lord lady "
         "sweet fair foul heaven earth sea fire come go stay rise fall").split()


def _corpus(folder: Path) -> Path:
    """Text from a Markov chain over WORDS (two possible successors per word): learnable structure."""
    rng = random.Random(0)
    successors = {w: rng.sample(WORDS, 2) for w in WORDS}
    folder.mkdir(parents=True)
    for split, n in (("train", 24), ("val", 6)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                words = [rng.choice(WORDS)]
                for _ in range(299):
                    words.append(rng.choice(successors[words[-1]]))
                text = " ".join(words)
                f.write(json.dumps({"id": f"{split}/{i}", "source": "gen", "text": text}) + "\n")
    return folder


@pytest.fixture
def experiment(tmp_path):
    cfg = {
        "experiment": "tiny", "recipe": "text_pretrain", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "model": {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                  "tie_embeddings": True},
        "tokenizer": {"vocab_size": 300},
        "data": {"corpus_dir": str(_corpus(tmp_path / "corpus")), "niah_fraction": 0.0, "val_batches": 2},
        "batch_tokens": 256, "stages": [{"seq_len": 64, "tokens": 7168}],
        "anneal": {"tokens": 512, "average_checkpoints": 2},
        "optim": {"lr": 1e-2}, "schedule": {"warmup_steps": 2}, "eval_every": 3, "checkpoint_every": 2,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _runs(path: Path) -> list[Path]:
    root = yaml.safe_load(path.read_text())["output_dir"]
    return _runs_under(Path(root))


def _runs_under(root: Path) -> list[Path]:
    return sorted(p for p in (root / "tiny").glob("*") if not p.is_symlink())


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_run_writes_everything_and_learns(experiment, capsys):
    assert main(["run", str(experiment)]) == 0
    (run,) = _runs(experiment)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss_curve.png", "final/config.json"):
        assert (run / name).is_file(), name
    assert (run.parent / "latest").resolve() == run.resolve()  # later stages name runs/<exp>/latest/final
    final = Llama.from_pretrained(run / "final")  # the saved final model (the Polyak average), tied weights included
    assert final.lm_head.weight is final.model.embed_tokens.weight
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["averaged_snapshots"] == 2
    assert summary["val_ppl_final"] < summary["unigram_ppl"]  # the chain's bigram structure was learned
    losses = _losses(run)
    assert losses[-1] < losses[0]
    assert "val_ppl_final" in capsys.readouterr().out


def test_stop_and_resume_equals_an_uninterrupted_run(experiment, tmp_path):
    assert main(["run", str(experiment)]) == 0
    full = _losses(_runs(experiment)[0])
    other = tmp_path / "b.yaml"
    cfg = yaml.safe_load(experiment.read_text())
    cfg["output_dir"] = str(tmp_path / "runs_b")
    other.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(other), "stop_after_steps=3"]) == 0
    assert main(["run", str(other), "resume=true"]) == 0
    (run,) = _runs(other)
    assert (run / "config.resumed.yaml").is_file()
    assert _losses(run) == pytest.approx(full, abs=1e-6)


def test_print_config_resolves_overrides(experiment, capsys):
    assert main(["run", str(experiment), "optim.lr=0.5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["engine"]["backend"] == "torch"
    assert not _runs(experiment)


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("batch_tokens=many", "key 'batch_tokens': expected int, got 'many'"),
    ("data.corpus_dir=/nowhere data.archive_dirs=[/nowhere]", "key 'corpus_dir': '/nowhere' holds no train.jsonl"),
    ("model.preset=llama9", "unknown model preset 'llama9'"),
    ("tokenizer.path=/nowhere/tok.json", "key 'tokenizer.path': path '/nowhere/tok.json' does not exist"),
])
def test_bad_inputs_are_one_clear_line(experiment, capsys, override, message):
    assert main(["run", str(experiment), *override.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error:") and message in err and len(err.splitlines()) == 1
    if "preset" not in override:  # config errors stop before a run folder exists
        assert not _runs(experiment)


def test_yaml_that_is_not_a_mapping(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    assert main(["run", str(bad)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err


def test_resume_refuses_other_model_and_truncated_checkpoint(experiment, capsys):
    assert main(["run", str(experiment), "stop_after_steps=2"]) == 0
    capsys.readouterr()
    assert main(["run", str(experiment), "resume=true", "model.dim=64"]) == 2
    assert "model.dim: 32 (checkpoint) vs 64 (now)" in capsys.readouterr().err
    (run,) = _runs(experiment)
    weights = next((run / "checkpoints").glob("step_*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["run", str(experiment), "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "herd: error:" in err


@pytest.mark.parametrize("threshold,tries,passed", [(1.0, 2, False), (0.0, 1, True)])
def test_niah_gate_retries_at_a_held_lr_then_records(experiment, threshold, tries, passed):
    gate = f"{{threshold: {threshold}, depths: [0.5], per_cell: 1, retry_tokens: 512, max_retries: 1}}"
    stages = f"stages=[{{seq_len: 64, tokens: 512}}, {{seq_len: 256, tokens: 512, niah: {gate}}}]"
    assert main(["run", str(experiment), stages, "data.niah_fraction=0.2", "anneal.tokens=0", "batch_tokens=512"]) == 0
    (run,) = _runs(experiment)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["niah_stages"]["1"]["tries"] == tries and summary["niah_stages"]["1"]["passed"] is passed
    assert (summary["niah_gates"] == "passed") if passed else summary["niah_gates"].startswith(
        "FAILED, continued (on_fail: continue): stage 1 (seq 256): 0.")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    retry_lrs = [r["lr"] for r in records if r.get("retry")]
    assert len(retry_lrs) == (1 if not passed else 0)  # retry_tokens 512 = one step of 2 rows of 256
    assert len(set(retry_lrs)) <= 1  # the schedule is held during retries
    assert (run / "niah_stage1_256.png").is_file()


def test_niah_gate_can_stop_the_run(experiment, capsys):
    gate = "{threshold: 1.0, depths: [0.5], per_cell: 1, on_fail: stop}"
    stages = f"stages=[{{seq_len: 256, tokens: 1536, niah: {gate}}}]"
    assert main(["run", str(experiment), stages, "data.niah_fraction=0.2", "anneal.tokens=0", "batch_tokens=512"]) == 2
    assert "NIAH accuracy" in capsys.readouterr().err
    assert main(["run", str(experiment), "schedule.warmup_steps=100"]) == 2  # checked before any run folder
    assert "exceed the 30 steps" in capsys.readouterr().err
    assert len(_runs(experiment)) == 1


def test_eval_niah_writes_accuracy_grid_and_heatmap(experiment, capsys):
    assert main(["run", str(experiment)]) == 0
    (run,) = _runs(experiment)
    args = ["eval", "niah", "--model", str(run), "--lengths", "160", "200", "--depths", "0", "1", "--per-cell", "2"]
    assert main(args) == 0
    result = json.loads((run / "niah.json").read_text())
    assert result["lengths"] == [160, 200] and len(result["accuracy"]) == 2
    assert 0.0 <= result["mean_accuracy"] <= 1.0 and (run / "niah_heatmap.png").is_file()


def test_herd_run_under_the_deepspeed_launcher(experiment, tmp_path, herd_two_ranks):
    """2 CPU ranks, ZeRO-2: one shared run folder, the same losses as a 1-process torch run on the same data."""
    herd_two_ranks("run", str(experiment), "engine.backend=deepspeed", "engine.zero_stage=2", "anneal.tokens=0",
                   "stages=[{seq_len: 64, tokens: 2048}]", cwd=tmp_path)
    (run,) = _runs(experiment)
    assert (run / "final" / "config.json").is_file() and (run / "summary.json").is_file()
    ds_losses = _losses(run)
    assert main(["run", str(experiment), "output_dir=" + str(tmp_path / "single"), "anneal.tokens=0",
                 "stages=[{seq_len: 64, tokens: 2048}]"]) == 0
    (single,) = _runs_under(tmp_path / "single")
    # a step's loss is a float32 sum over 256 tokens of ~log(300) = 5.7 (2 ranks: 2 x 128, all-reduced): the order
    # alone moves it by <= 256 * u * 5.7 = 9e-5, then 8 steps of drift; ranks that train on the wrong rows: >= 1e-2
    assert ds_losses == pytest.approx(_losses(single), abs=2e-4)
