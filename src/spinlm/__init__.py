"""spinlm: SPIN (Self-Play Fine-Tuning) for causal language models.

`spinlm.spin(model, tokenizer, train_data, ...)` runs it from Python (see `spinlm.api`);
`spinlm train ...` from the command line.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "spin":  # imported on first use: `import spinlm` stays light (no torch)
        from spinlm.api import spin

        return spin
    raise AttributeError(f"module 'spinlm' has no attribute {name!r}")
