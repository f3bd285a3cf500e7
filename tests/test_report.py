import json

import pytest

from spinlm.errors import DataError
from spinlm.report import iteration_rows, skill_table, write_report


def write_run(run_dir, with_eval=True):
    rows = []
    if with_eval:
        rows.append({"step": 0, "eval/iteration": 0, "eval/accuracy": 0.1, "eval/sft_loss": 1.0,
                     "eval/answer_style": 0.05, "timing/eval_s": 30.0})
    for step in range(1, 5):
        it = (step - 1) // 2
        row = {"step": step, "train/loss": 0.7 - 0.1 * step, "train/acc": 0.25 * step, "train/iteration": it,
               "train/rewards_actual_mean": 0.1 * step, "train/rewards_generated_mean": -0.1 * step,
               "train/reward_margin_mean": 0.2 * step, "train/avg_generated_lengths": 40 - step,
               "timing/train_step_s": 10.0}
        if step in (1, 3):
            row.update({"timing/generation_s": 20.0, "timing/ref_logprobs_s": 5.0})
        rows.append(row)
        if step % 2 == 0 and with_eval:
            rows.append({"step": step, "eval/iteration": step // 2, "eval/accuracy": 0.1 + 0.2 * step,
                         "eval/sft_loss": 1.0 / step, "eval/answer_style": 0.5, "timing/eval_s": 31.0})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "tra')
    return rows


def test_iteration_rows_join_held_out_figures_with_the_iteration_that_produced_them(tmp_path):
    write_run(tmp_path)
    rows = iteration_rows([json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()[:-1]])
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[0]["accuracy"] == 0.1 and rows[0]["train_acc"] is None
    assert rows[1]["accuracy"] == pytest.approx(0.5) and rows[2]["sft_loss"] == pytest.approx(0.25)
    assert rows[1]["train_acc"] == pytest.approx((0.25 + 0.5) / 2)
    assert rows[2]["reward_margin"] == pytest.approx((0.6 + 0.8) / 2)
    assert (rows[1]["generation_s"], rows[1]["ref_logprobs_s"], rows[1]["train_s"]) == (20.0, 5.0, 20.0)
    assert rows[2]["eval_s"] == 31.0


def test_write_report_writes_png_and_markdown_and_returns_the_table(tmp_path):
    write_run(tmp_path)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for n, correct in ((0, [False, False]), (1, [True, False]), (2, [True, True])):
        (eval_dir / f"iter_{n}.jsonl").write_text(
            "".join(json.dumps({"skill": s, "correct": c}) + "\n" for s, c in zip(["add", "sort"], correct)))
    table = write_report(tmp_path)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    lines = table.splitlines()
    assert lines[0].startswith("| iteration | held-out acc | held-out SFT loss")
    assert lines[2].startswith("| 0 | 10.0% | 1.0000 |")
    assert lines[4].startswith("| 2 | 90.0% | 0.2500 |")
    md = (tmp_path / "report.md").read_text()
    assert table in md and "![report](report.png)" in md
    assert "| add | 0/1 | 1/1 | 1/1 |" in md and "| sort | 0/1 | 0/1 | 1/1 |" in md


def test_report_of_a_run_without_held_out_set(tmp_path):
    write_run(tmp_path, with_eval=False)
    table = write_report(tmp_path)
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| 1", "| 2"]
    assert skill_table(tmp_path / "eval") is None


def test_report_without_metrics_names_the_file(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl"):
        write_report(tmp_path)
