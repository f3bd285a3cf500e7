"""spinlm: SPIN (Self-Play Fine-Tuning) for causal language models."""

__version__ = "0.1.0"
