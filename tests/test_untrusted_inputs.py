"""Someone else's run directory, checkpoint or model: `spinlm train` (resume), `evaluate` and `report`
refuse what would run foreign code or reach outside the run directory, with one line and exit code 2,
no traceback, no code run (a payload would write a marker file) and nothing written."""

import json
import logging
import os
import shutil

import pytest
from untrusted import poisoned_pt, remote_code_dir, rewrite_manifest, swap_in

from spinlm import cli

ARGS = ["trainer.precision=32", "trainer.spin.max_epochs=1",
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.encoder_seq_length=128",
        "model.spin.length_params.max_length=8", "model.spin.rollout_micro_batch_size=8",
        "model.optim.sched.name=Constant", "model.cpu_linear_kernel=default"]


def _args(model, files, run, iterations=1):
    """A run of `iterations` x 2 steps; a resume asks for more iterations than the finished run had."""
    return [f"pretrained_checkpoint.restore_from_path={model}", f"model.data.train_ds.file_path={files[0]}",
            f"model.data.validation_ds.file_path={files[1]}", f"exp_manager.explicit_log_dir={run}",
            f"trainer.spin.max_iterations={iterations}", *ARGS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A finished 2-step run (checkpoint step_000002), copied by each test before it is tampered with."""
    from conftest import write_chat_jsonl

    base = tmp_path_factory.mktemp("trained")
    files = write_chat_jsonl(base / "train.jsonl", 16, seed=0), write_chat_jsonl(base / "val.jsonl", 8, seed=1)
    assert cli.main(["train", *_args(tiny_model_dir, files, base / "run")]) == 0
    return base / "run", files


@pytest.fixture
def run_copy(trained, tmp_path):
    run, files = trained
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run", files


def snapshot(directory):
    """Every entry under `directory` with its kind, size and modification time (links not followed)."""
    out = {}
    for folder, dirs, files in os.walk(directory):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), directory)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def refused(argv, capsys, monkeypatch):
    """Run the CLI; return its single error line (asserting exit 2 and no traceback)."""
    monkeypatch.delenv("SPINLM_DEBUG", raising=False)
    logging.getLogger().handlers.clear()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("spinlm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize("state", ["optimizer", "scheduler", "rng"])
def test_resume_refuses_a_state_file_that_would_run_code(run_copy, tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                        state):
    run, files = run_copy
    marker = tmp_path / "marker"
    step = run / "checkpoints" / "step_000002"
    swap_in(step, f"{state}.state.safetensors", f"{state}.pt", poisoned_pt(tmp_path / "payload", marker))
    before = snapshot(run)
    line = refused(["train", *_args(tiny_model_dir, files, run, iterations=2)], capsys, monkeypatch)
    assert f"{step / state}.pt: refused: it holds pickled Python objects (needs builtins.exec)" in line
    assert not marker.exists()
    assert snapshot(run) == before


def test_resume_refuses_a_manifest_entry_outside_the_checkpoint(run_copy, tiny_model_dir, tmp_path, capsys,
                                                                monkeypatch):
    run, files = run_copy
    marker = tmp_path / "marker"
    step = run / "checkpoints" / "step_000002"
    poisoned_pt(run / "checkpoints" / "evil.pt", marker)
    rewrite_manifest(step, **{"../evil.pt": run / "checkpoints" / "evil.pt"})
    before = snapshot(run)
    line = refused(["train", *_args(tiny_model_dir, files, run, iterations=2)], capsys, monkeypatch)
    assert "manifest.json: refused: entry '../evil.pt' is not a file of the checkpoint" in line
    assert not marker.exists() and snapshot(run) == before
    line = refused(["evaluate", str(step), str(files[1])], capsys, monkeypatch)
    assert "entry '../evil.pt'" in line


@pytest.mark.parametrize("entry", ["checkpoints", "rollouts", "metrics.jsonl"])
def test_train_refuses_a_link_out_of_the_run_directory(run_copy, tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                       entry):
    run, files = run_copy
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / entry, elsewhere)
    (run / entry).symlink_to(elsewhere)
    before, outside = snapshot(run), snapshot(tmp_path)
    line = refused(["train", *_args(tiny_model_dir, files, run, iterations=2)], capsys, monkeypatch)
    assert f"exp_manager.explicit_log_dir: {run / entry} is a symbolic link to {elsewhere}, outside the run" in line
    assert snapshot(run) == before and snapshot(tmp_path) == outside


def test_evaluate_and_report_refuse_links_out_of_the_run_directory(run_copy, tmp_path, capsys, monkeypatch):
    run, files = run_copy
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run / "report.md").unlink()
    (run / "report.md").symlink_to(victim)
    line = refused(["report", str(run)], capsys, monkeypatch)
    assert f"report: {run / 'report.md'} is a symbolic link" in line
    line = refused(["evaluate", str(run / "checkpoints" / "step_000002"), str(files[1])], capsys, monkeypatch)
    assert f"evaluate: {run / 'report.md'} is a symbolic link" in line
    assert victim.read_text() == "keep me"


def test_evaluate_never_takes_remote_code_permission_from_a_run_config(run_copy, tiny_model_dir, tmp_path, capsys,
                                                                       monkeypatch):
    """A shared run's config.yaml may name any model and say trust_remote_code: true; evaluate runs a model's
    code only with its own --trust-remote-code flag."""
    run, files = run_copy
    model_dir, marker = remote_code_dir(tiny_model_dir, tmp_path)
    config = (run / "config.yaml").read_text()
    config = config.replace(f"restore_from_path: {tiny_model_dir}", f"restore_from_path: {model_dir}")
    (run / "config.yaml").write_text(config.replace("trust_remote_code: false", "trust_remote_code: true"))
    line = refused(["evaluate", str(run / "checkpoints" / "step_000002"), str(files[1])], capsys, monkeypatch)
    assert "pretrained_checkpoint.trust_remote_code" in line and "--trust-remote-code" in line
    assert not marker.exists()


def test_evaluate_reads_no_interpolation_from_a_run_config(run_copy, tiny_model_dir, capsys, monkeypatch):
    run, files = run_copy
    monkeypatch.setenv("SPINLM_TEST_SECRET", "s3cret")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(f"restore_from_path: {tiny_model_dir}",
                                                    "restore_from_path: ${oc.env:SPINLM_TEST_SECRET}"))
    line = refused(["evaluate", str(run / "checkpoints" / "step_000002"), str(files[1])], capsys, monkeypatch)
    assert "must be a plain path" in line and "s3cret" not in line


def test_rollouts_that_do_not_fit_the_run_are_generated_again(run_copy, tiny_model_dir, capsys, monkeypatch, caplog):
    """A tampered rollouts file (ids out of the vocabulary, wrong rows) is not trained on: the set is made again."""
    run, files = run_copy
    path = run / "rollouts" / "iter_0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["generated_ids"] = [10**9]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(run / "checkpoints")  # start again: iteration 0's rollouts are read from disk
    with caplog.at_level(logging.WARNING, logger="spinlm.algorithms.rollouts"):
        assert cli.main(["train", *_args(tiny_model_dir, files, run)]) == 0
    assert "iter_0.jsonl" in caplog.text and "generating this set again" in caplog.text
    assert all(max(json.loads(line)["generated_ids"], default=0) < 10**9 for line in path.read_text().splitlines())
