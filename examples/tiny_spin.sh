#!/usr/bin/env bash
# A small SPIN run that needs no download: a tiny random chat model and the bundled NeMo
# sample chats (long multi-turn conversations, so the length policy is exercised).
# 2 iterations x 2 epochs; about a minute on 2 CPU cores. Extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
[ -f runs/tiny-model/config.json ] || spinlm make-tiny-model runs/tiny-model
spinlm train \
  pretrained_checkpoint.restore_from_path=runs/tiny-model \
  model.data.train_ds.file_path=examples/data/nemo_dummy_sft.jsonl \
  model.data.validation_ds.file_path=examples/data/nemo_dummy_sft.jsonl \
  trainer.spin.max_iterations=2 trainer.spin.max_epochs=2 \
  model.spin.ref_policy_kl_penalty=0.1 model.data.chat=True \
  model.global_batch_size=8 model.micro_batch_size=4 \
  model.spin.length_params.max_length=64 \
  exp_manager.explicit_log_dir=runs/tiny-spin "$@"
echo "done: runs/tiny-spin (metrics.jsonl, checkpoints/, final/, tensorboard/)"
