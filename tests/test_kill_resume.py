"""Kill -9 at random moments (and in the middle of checkpoint writes), resume, and end with the same
weights, bitwise, as an uninterrupted run; metrics.jsonl then holds every step exactly once. The
killed-and-resumed processes run while other processes keep every core busy (as on a shared CI
machine): nothing they compute may depend on the load.

The training process is a forked child running the CLI entry point (fast: no interpreter start);
SPINLM_TEST_SAVE_DELAY holds a checkpoint write open so a kill can land inside it. One real
`python -m spinlm` subprocess checks SIGTERM's exit code and message."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from busy import busy_cores
from safetensors.torch import load_file

from spinlm.config import load_config
from spinlm.train import run


def train_args(model_dir, files, run_dir):
    train, val = files
    return [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.train_ds.file_path={train}", f"model.data.validation_ds.file_path={val}",
        f"exp_manager.explicit_log_dir={run_dir}", "trainer.precision=32",
        "trainer.spin.max_iterations=3", "trainer.spin.max_epochs=2", "trainer.spin.limit_train_batches=2",
        "trainer.spin.val_check_interval=2", "trainer.spin.save_interval=3",  # 12 steps; saves at 3, 6, 9, 12
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.encoder_seq_length=128",
        "model.spin.length_params.max_length=24", "model.spin.rollout_micro_batch_size=8",
        "model.spin.ref_policy_kl_penalty=0.1", "model.optim.lr=1e-3",
        "model.optim.sched.warmup_steps=2", "model.optim.sched.constant_steps=0",
    ]


# a training process that imports everything, then waits for a line on stdin: the next trial's
# interpreter starts while the current one trains, so the test pays the start-up cost about once
WORKER = ("import sys; from spinlm import cli; import spinlm.train; sys.stdin.readline(); "
          "sys.exit(cli.main(['train', *sys.argv[1:]]))")


class Worker:
    def __init__(self, args, log_path, save_delay=""):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPINLM_TEST_SAVE_DELAY": save_delay}
        env.pop("SPINLM_DEBUG", None)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        return self.wait()

    def wait(self):
        code = self.proc.wait(timeout=300)
        self.log.close()
        return code


def _wait_for(predicate, timeout=300.0, alive=lambda: True):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if not alive():
            return False
        time.sleep(0.005)
    raise AssertionError("timed out")


def _train_rows(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and "train/loss" in line]


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, chat_files):
    with busy_cores():
        _kill_and_resume(tmp_path, tiny_model_dir, chat_files)


def _kill_and_resume(tmp_path, tiny_model_dir, chat_files):
    run_dir = tmp_path / "killed"
    args = train_args(tiny_model_dir, chat_files, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    # kill inside the first save (no checkpoint exists yet), at random moments of training, and
    # inside a later save; then run to the end
    trials = [("during save", "0.4"), ("random", "0.05"), ("random", "0.05"), ("during save", "0.4"), ("to the end", "")]
    workers = [Worker(args, tmp_path / "trial0.log", trials[0][1])]
    full = run(load_config(train_args(tiny_model_dir, chat_files, tmp_path / "full")))  # while trial 0 starts up
    full_losses = [r["train/loss"] for r in _train_rows(tmp_path / "full")]

    rng = random.Random(20261202)
    history = []
    for i, (kind, _) in enumerate(trials):
        worker = workers[i]
        worker.go()
        if i + 1 < len(trials):
            workers.append(Worker(args, tmp_path / f"trial{i + 1}.log", trials[i + 1][1]))
        if kind == "to the end":
            assert worker.wait() == 0, (tmp_path / f"trial{i}.log").read_text()[-3000:]
            break
        log = tmp_path / f"trial{i}.log"
        stale = set(ckpt_dir.glob(".tmp_step_*"))  # left by the previous kill
        if kind == "during save":
            hit = _wait_for(lambda: bool(set(ckpt_dir.glob(".tmp_step_*")) - stale), alive=worker.alive)
        else:  # a random moment after this process started training
            hit = _wait_for(lambda: "Training steps" in log.read_text(errors="replace"), alive=worker.alive)
            time.sleep(rng.uniform(0.0, 0.6))
        code = worker.kill()
        history.append((kind, len(_train_rows(run_dir)), sorted(p.name for p in ckpt_dir.glob("*"))))
        assert hit and code == -signal.SIGKILL, (history, log.read_text()[-3000:])
        assert not (run_dir / "final").exists(), f"the run finished before the kill: {history}"
        if kind == "during save":
            assert set(ckpt_dir.glob(".tmp_step_*")) - stale, history  # a partial checkpoint is on disk

    final = load_file(str(run_dir / "final" / "model.safetensors"))
    expected = {k: v for k, v in full.policy.state_dict().items() if k in final}
    assert final.keys() == expected.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, expected[name]), f"{name} differs after kill/resume ({history})"
    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13)), history  # every step once, none duplicated
    assert [r["train/loss"] for r in rows] == full_losses
    assert not list(ckpt_dir.glob(".tmp_step_*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_exits_zero_with_a_message_and_resumes(tmp_path, tiny_model_dir, chat_files, sig):
    run_dir = tmp_path / "run"
    args = train_args(tiny_model_dir, chat_files, run_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPINLM_TEST_SAVE_DELAY": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "spinlm", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(_train_rows(run_dir)) >= 1 or proc.poll() is not None)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    rows = _train_rows(run_dir)
    step = rows[-1]["step"]
    assert step < 12, "the run ended before the signal"
    assert f"{sig.name} at step {step}: saved; run the same command again to resume" in err
    assert (run_dir / "checkpoints" / f"step_{step:06d}").is_dir()
    assert "Traceback" not in err
