"""A run directory as untrusted input: no link may lead out of it; its config.yaml is read as plain data."""

import pytest

from spinlm.errors import ConfigError
from spinlm.utils.rundir import lookup, read_run_config, refuse_links_out


@pytest.mark.parametrize("entry", ["checkpoints", "rollouts", "final", "report.md", "checkpoints/step_000002",
                                   "metrics.jsonl", "mlruns"])
def test_a_link_leading_out_of_the_run_directory_is_refused(tmp_path, entry):
    run = tmp_path / "run"
    run.mkdir()
    if "/" in entry:
        (run / "checkpoints").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / entry).symlink_to(elsewhere / "target")  # dangling: writing through it would create the target
    with pytest.raises(ConfigError, match=f"exp_manager.explicit_log_dir: {run / entry} is a symbolic link to "):
        refuse_links_out(run)


def test_links_that_stay_inside_and_a_linked_run_directory_are_fine(tmp_path):
    real = tmp_path / "disk" / "run"
    (real / "checkpoints" / "step_000001").mkdir(parents=True)
    (real / "wandb" / "offline-run-1" / "logs").mkdir(parents=True)  # W&B links its debug log to ~/.cache
    (real / "wandb" / "offline-run-1" / "logs" / "debug-core.log").symlink_to(tmp_path / "cache.log")
    (real / "latest").symlink_to("checkpoints/step_000001")
    (real / "checkpoints" / "up").symlink_to("..")
    (tmp_path / "run").symlink_to(real)  # explicit_log_dir may itself be a link
    refuse_links_out(tmp_path / "run")
    refuse_links_out(tmp_path / "missing")


def test_run_config_is_data_interpolations_stay_strings(tmp_path, monkeypatch):
    monkeypatch.setenv("SPINLM_TEST_SECRET", "s3cret")
    (tmp_path / "config.yaml").write_text(
        "pretrained_checkpoint:\n  restore_from_path: ${oc.env:SPINLM_TEST_SECRET}\nmodel:\n  seed: 3\n")
    cfg = read_run_config(tmp_path)
    assert lookup(cfg, "pretrained_checkpoint.restore_from_path") == "${oc.env:SPINLM_TEST_SECRET}"
    assert lookup(cfg, "model.seed") == 3 and lookup(cfg, "model.nope", "?") == "?"


def test_run_config_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "config.yaml").write_text(f"a: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="config.yaml: unreadable run config"):
        read_run_config(tmp_path)
    assert not marker.exists()
