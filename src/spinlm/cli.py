"""Command line: `spinlm train key=value ...` (Hydra overrides on conf/gpt_spin.yaml).

    spinlm train pretrained_checkpoint.restore_from_path=MODEL_DIR_OR.gguf \\
        model.data.train_ds.file_path=train.jsonl model.data.validation_ds.file_path=val.jsonl \\
        exp_manager.explicit_log_dir=runs/exp1
    spinlm train --cfg job ...            # print the composed config and exit
    spinlm make-tiny-model DIR            # a tiny random chat model, for a smoke run
    python -m spinlm ...                  # the same

A user error (bad config, bad data, broken checkpoint) prints one line and exits 2; set
SPINLM_DEBUG=1 or pass --debug to see the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from spinlm.errors import SpinlmError

USAGE = __doc__


def _train(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from spinlm.config import load_config

    parser = argparse.ArgumentParser(prog="spinlm train", description="SPIN training (Hydra overrides)")
    parser.add_argument("--config-path", default=None, help="directory of your own config YAML")
    parser.add_argument("--config-name", default="gpt_spin", help="config file name without .yaml")
    parser.add_argument("--cfg", choices=["job"], default=None, help="print the composed config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(_hydra_style(argv))
    cfg = load_config(args.overrides, config_path=args.config_path, config_name=args.config_name)
    if args.cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from spinlm.train import run

    run(cfg)
    return 0


def _hydra_style(argv: list[str]) -> list[str]:
    """Accept Hydra's `--config-path=X` as well as `--config-path X`."""
    out = []
    for a in argv:
        if a.startswith("--") and "=" in a:
            out.extend(a.split("=", 1))
        else:
            out.append(a)
    return out


def _make_tiny_model(argv: list[str]) -> int:
    from spinlm.model.tiny import save_tiny_model

    parser = argparse.ArgumentParser(prog="spinlm make-tiny-model", description="write a tiny random chat model")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", type=int, default=512, help="max_position_embeddings")
    args = parser.parse_args(argv)
    print(save_tiny_model(args.out_dir, seed=args.seed, max_position_embeddings=args.context))
    return 0


COMMANDS = {"train": _train, "make-tiny-model": _make_tiny_model}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("SPINLM_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[argv[0]](argv[1:])
    except SpinlmError as e:
        if debug:
            raise
        print(f"spinlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spinlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
