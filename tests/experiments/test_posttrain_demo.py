"""The post-training demo (issue 4, item 7) end to end: base -> SFT -> annotate -> reward model -> rejection
sampling -> DPO through `herd run experiments/text/posttrain_demo.yaml` (the documented demo itself, 2-4 minutes
of CPU; a smaller CI-only size was tried and dropped: whether its tiny model learns to copy in time depended on
the thread count, so its comparisons were a coin toss); the summary holds the four comparisons with standard
errors, each beyond 2 of them. Also the generator's flawed SFT demonstrations the demo relies on."""
import json
from pathlib import Path

import pytest

from experiments.cli import main
from language.reward_model import HEAD_FILE
from language.synthetic_tasks import TaskConfig, flawed_answer, is_correct, make_problems, write_task_files

ROOT = Path(__file__).resolve().parents[2]
DEMO_YAML = ROOT / "experiments" / "text" / "posttrain_demo.yaml"
COMPARISONS = ("sft_vs_base_accuracy", "rm_pairwise_accuracy_vs_chance",
               "rejection_sampled_vs_plain_sample_accuracy", "dpo_vs_sft_accuracy")


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def test_flawed_demonstrations_make_the_systematic_mistake(tmp_path):
    kinds = ["add", "reverse", "upper", "wrap"]
    clean = write_task_files(TaskConfig(kinds=kinds, n_sft=400, n_preference=8, n_prompts=8, n_eval=20,
                                        n_pretrain_docs=0), tmp_path / "clean")
    flawed = write_task_files(TaskConfig(kinds=kinds, n_sft=400, n_preference=8, n_prompts=8, n_eval=20,
                                         n_pretrain_docs=0, sft_flawed=0.5), tmp_path / "flawed")
    for name in ("sft_eval", "ranked_eval", "prompts_train", "prompts_annotate", "ranked_train"):
        assert Path(clean[name]).read_text() == Path(flawed[name]).read_text(), name  # only SFT data changes
    problems = make_problems(TaskConfig(kinds=kinds), "train", 400, stream="sft")
    rows_clean, rows_flawed = _lines(clean["sft_train"]), _lines(flawed["sft_train"])
    assert not any(r.get("flawed") for r in rows_clean)
    assert all(is_correct(p.answer, r["messages"][-1]["content"]) for p, r in zip(problems, rows_clean))
    n_flawed = 0
    for p, r in zip(problems, rows_flawed):
        answer = r["messages"][-1]["content"]
        if r.get("flawed"):
            n_flawed += 1
            assert answer == flawed_answer(p) and not is_correct(p.answer, answer)
        else:
            assert answer == p.answer
    assert 150 < n_flawed < 250
    by_kind = {p.kind: p for p in problems}
    word = by_kind["reverse"].key.split(":")[1]
    assert flawed_answer(by_kind["reverse"]) in (word, by_kind["reverse"].near)
    assert flawed_answer(by_kind["upper"]) == by_kind["upper"].key.split(":")[1].capitalize()
    word = by_kind["wrap"].key.split(":")[2]
    assert flawed_answer(by_kind["wrap"])[1:-1] == word and flawed_answer(by_kind["wrap"]) != by_kind["wrap"].answer


@pytest.mark.timeout(1500)  # ~2.5 min on an idle 2-core machine; 10+ min when another training shares the cores
def test_posttrain_demo_runs_end_to_end_and_reports_four_improvements(tmp_path):
    assert main(["run", str(DEMO_YAML), f"output_dir={tmp_path}"]) == 0
    (run,) = [p for p in (tmp_path / "posttrain_demo").iterdir() if not p.is_symlink()]
    summary = json.loads((run / "posttrain_summary.json").read_text())
    assert (run / "posttrain_demo.png").is_file()
    comps = summary["comparisons"]
    assert set(comps) == set(COMPARISONS)
    for name in COMPARISONS:
        c = comps[name]
        assert {"before", "after", "improvement", "std_error", "passed"} <= set(c), name
        assert c["std_error"] > 0 and c["improvement"] == pytest.approx(c["after"] - c["before"], abs=1e-9), name
        assert c["improvement"] > 0, (name, c)  # every stage moves in the right direction
        assert c["passed"] == (c["improvement"] > summary["z"] * c["std_error"]), name
    # each beyond noise (z = 2). Measured with 2 threads: 0->0.32, 0.73, 0.23->0.29, 0.32->0.63;
    # with 1 thread: 0->0.31, 0.76, 0.27->0.48, 0.31->0.96
    for name in COMPARISONS:
        assert comps[name]["passed"], (name, comps[name])
    assert comps["rm_pairwise_accuracy_vs_chance"]["before"] == 0.5
    # each stage left the files the next one (or a user) needs
    assert (run / "rm" / "final" / HEAD_FILE).is_file()
    rs = run / "rejection_sampling"
    assert (rs / "scores.png").is_file() and _lines(rs / "best.jsonl")
    stats = json.loads((rs / "stage_summary.json").read_text())["scores_all"]
    assert stats["n"] > 0 and stats["min"] <= stats["median"] <= stats["max"]  # score distribution logged
    assert summary["dpo_pairs"] > 0 and (run / "dpo" / "final" / "config.json").is_file()
    # a rerun with resume=true finds every stage finished and rebuilds the same summary
    assert main(["run", str(DEMO_YAML), f"output_dir={tmp_path}", "resume=true"]) == 0
    again = json.loads((run / "posttrain_summary.json").read_text())
    assert again["comparisons"] == comps
