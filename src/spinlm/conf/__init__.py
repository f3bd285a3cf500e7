"""The packaged Hydra config (gpt_spin.yaml)."""
