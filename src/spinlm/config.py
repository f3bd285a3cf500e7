"""Loading and checking the Hydra config `conf/gpt_spin.yaml`.

The YAML is the single source of defaults. Overrides use Hydra's syntax (`a.b=1`); every
key and type is checked against the YAML so a typo is an error, not a silently ignored key.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spinlm.errors import ConfigError
from spinlm.megatron import KNOBS, check_megatron_knobs

CONFIG_MODULE = "spinlm.conf"
CONFIG_NAME = "gpt_spin"

# Keys whose values legitimately take several types (the YAML default shows only one).
_UNION_TYPES: dict[str, tuple[type, ...]] = {
    "trainer.devices": (int, str),
    "trainer.precision": (str, int),
    "trainer.max_time": (str,),
    "trainer.spin.val_check_interval": (int, float),
    "trainer.spin.limit_train_batches": (int, float),
    "trainer.spin.limit_val_batches": (int, float),
    "trainer.spin.gradient_clip_val": (int, float),
    "model.spin.ref_policy_kl_penalty": (int, float, list),
    "model.encoder_seq_length": (int,),
    "model.optim.sched.warmup_steps": (int,),
    "model.data.chat_prompt_tokens": (dict,),
    "model.sft.early_stopping_patience": (int,),
    "pretrained_checkpoint.restore_from_path": (str,),
    "exp_manager.exp_dir": (str,),
    **{f"exp_manager.wandb_logger_kwargs.{k}": (str,)
       for k in ("project", "name", "id", "save_dir", "entity", "group", "notes", "job_type")},
    "exp_manager.wandb_logger_kwargs.tags": (list,),
    **{f"exp_manager.mlflow_logger_kwargs.{k}": (str,)
       for k in ("experiment_name", "run_name", "tracking_uri", "save_dir", "artifact_location", "run_id")},
    "exp_manager.mlflow_logger_kwargs.tags": (dict,),
    **{key: knob.types for key, knob in KNOBS.items()},  # Megatron-only knobs
    "model.spin.vllm.enforce_eager": (bool,),
    "model.spin.vllm.kv_cache_gb": (int, float),
    "model.data.tokenizer_workers": (int,),
    **{f"model.data.{ds}.{key}": (str,) for ds in ("train_ds", "validation_ds", "test_ds")
       for key in ("split", "conversation_column")},
    "model.peft.lora_tuning.alpha": (int, float),
    "model.peft.lora_tuning.target_modules": (list, str),  # a single name is a list of one
    "model.activations_checkpoint_granularity": (str,),
    "model.activations_checkpoint_method": (str,),
    "model.activations_checkpoint_num_layers": (int,),
}


def register_resolvers() -> None:
    """The arithmetic resolvers NeMo configs use, and spinlm_cache (a prepared model's path); idempotent."""
    for name, fn in {
        "multiply": lambda x, y: x * y,
        "int_div": lambda x, y: x // y,
        "subtract": lambda x, y: x - y,
        "spinlm_cache": _cached_model,  # ${spinlm_cache:NAME}: a model `spinlm prepare-model` made
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def cache_dir() -> Path:
    """Where `spinlm prepare-model` keeps prepared models: $SPINLM_CACHE, else ~/.cache/spinlm."""
    return Path(os.environ.get("SPINLM_CACHE") or Path.home() / ".cache" / "spinlm").expanduser()


SMOLLM2_NAME = "SmolLM2-135M-Instruct"  # the demo model `spinlm prepare-model` makes


def cached_model_path(name: str = SMOLLM2_NAME) -> Path:
    """A prepared model's directory (the ${spinlm_cache:NAME} resolver's value)."""
    return cache_dir() / name


def _cached_model(name: str) -> str:
    return str(cached_model_path(name))


def load_config(
    overrides: Sequence[str] = (), config_path: str | None = None, config_name: str = CONFIG_NAME
) -> DictConfig:
    """Compose the config with command-line overrides and check it against the packaged defaults.

    `config_path`/`config_name` select a user's own YAML (as Hydra's --config-path/--config-name);
    its keys must be ones the packaged gpt_spin.yaml defines, and keys it leaves out keep the
    packaged defaults.
    """
    register_resolvers()
    defaults = _compose(None, CONFIG_NAME, ())
    if not config_path:
        cfg = _compose(None, CONFIG_NAME, overrides, defaults)
        check_against_defaults(cfg, defaults)
        return cfg
    # a user's YAML need only hold the keys it changes: merge it onto the defaults, then override
    user = _compose(config_path, config_name, ())
    check_against_defaults(user, defaults)
    with tempfile.TemporaryDirectory() as merged_dir:
        (Path(merged_dir) / f"{CONFIG_NAME}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.merge(defaults, user)))
        cfg = _compose(merged_dir, CONFIG_NAME, overrides, defaults)
    check_against_defaults(cfg, defaults)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: Mapping[str, Any]) -> None:
    """Set config keys to Python values (the Python API's overrides), as strictly as the command line
    checks its own: an unknown key or a value of the wrong type is a `ConfigError`.

    Keys are dotted (`"model.optim.lr"`), or nested mappings that are flattened down to the keys
    the YAML defines (a mapping given for a key whose default is not a section is its value)."""
    defaults = _compose(None, CONFIG_NAME, ())
    sections = OmegaConf.to_container(defaults, resolve=False)  # plain dicts: interpolations stay unresolved
    for key, value in _flatten(overrides, sections).items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=False)
    check_against_defaults(cfg, defaults)


def _flatten(overrides: Mapping[str, Any], sections: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in overrides.items():
        key = f"{prefix}{name}"
        node: Any = sections
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"config: unknown key '{key}' (see spinlm/conf/gpt_spin.yaml)")
            node = node[part]
        if isinstance(value, Mapping) and isinstance(node, dict):
            nested = _flatten(value, sections, prefix=f"{key}.")
        else:
            nested = {key: OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value}
        for k, v in nested.items():
            if k in flat:
                raise ConfigError(f"config: key '{k}' is given twice")
            flat[k] = v
    return flat


def refuse_repeated_overrides(overrides: Sequence[str]) -> None:
    """`a=1 ... a=2` would silently keep the last value; a repeated key is more likely a mistake."""
    seen: set[str] = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in seen:
            raise ConfigError(f"config: key '{key}' is given twice on the command line")
        seen.add(key)


def _compose(
    config_path: str | None, config_name: str, overrides: Sequence[str], defaults: DictConfig | None = None
) -> DictConfig:
    from hydra import compose, initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        if config_path:
            init = initialize_config_dir(config_dir=str(Path(config_path).resolve()), version_base=None)
        else:
            init = initialize_config_module(config_module=CONFIG_MODULE, version_base=None)
        with init:
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_first_line(e, defaults)) from e
    except yaml.MarkedYAMLError as e:  # e.g. a key given twice in a user's YAML
        mark = e.problem_mark
        where = f"{mark.name}:{mark.line + 1}" if mark is not None else f"{config_path}/{config_name}.yaml"
        raise ConfigError(f"config: {where}: {e.problem}") from e
    finally:
        GlobalHydra.instance().clear()


def _first_line(e: Exception, defaults: DictConfig | None) -> str:
    text = str(e)
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown and "not in struct" in f"{text} {e.__cause__}":
        path = unknown.group(1)
        parent = defaults
        if defaults is not None and "." in path:
            parent = OmegaConf.select(defaults, path.rpartition(".")[0])
        return unknown_key(path, list(parent.keys()) if isinstance(parent, DictConfig) else [])
    lines = text.strip().splitlines()
    return f"config: {lines[0] if lines else type(e).__name__}"


def unknown_key(path: str, siblings: Sequence[str]) -> str:
    """The one-line error for a key the YAML does not define, with the closest key beside it if one is close."""
    parent, _, name = path.rpartition(".")
    close = difflib.get_close_matches(name, siblings, n=1)
    hint = f"did you mean '{parent + '.' if parent else ''}{close[0]}'? " if close else ""
    return f"config: unknown key '{path}' ({hint}see spinlm/conf/gpt_spin.yaml)"


def _type_ok(value: Any, default: Any, key: str) -> bool:
    if value is None:
        return True
    allowed = _UNION_TYPES.get(key)
    if allowed is None:
        if default is None:
            return True
        allowed = (type(default),)
        if isinstance(default, float):
            allowed = (int, float)
    if bool in (type(value),) and bool not in allowed:
        return False  # True is an int in Python; do not accept it for a number
    return isinstance(value, allowed)


def check_against_defaults(cfg: DictConfig, defaults: DictConfig, prefix: str = "") -> None:
    """Refuse keys the YAML does not define and values whose type differs from the default."""
    known = set(defaults.keys())
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(unknown_key(path, list(known)))
        if OmegaConf.is_missing(cfg, key) or OmegaConf.is_interpolation(cfg, key):
            continue
        default = _plain_default(defaults, key)
        value = cfg[key]
        if isinstance(value, DictConfig) and isinstance(default, DictConfig):
            check_against_defaults(value, default, prefix=f"{path}.")
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        if isinstance(default, (DictConfig, ListConfig)):
            default = OmegaConf.to_container(default)
        if not _type_ok(value, default, path):
            raise ConfigError(f"config: '{path}' must be {_type_name(default, path)}, got {value!r}")


def _plain_default(defaults: DictConfig, key: str) -> Any:
    """The YAML's default, or None when it is mandatory (???) or computed (${...})."""
    if OmegaConf.is_missing(defaults, key) or OmegaConf.is_interpolation(defaults, key):
        return None
    return defaults[key]


def _type_name(default: Any, key: str) -> str:
    types = _UNION_TYPES.get(key) or (type(default),)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a mapping"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def parse_max_time(value: str | None, key: str = "trainer.max_time") -> float | None:
    """'DD:HH:MM:SS' (Lightning's format) -> seconds; None means no limit."""
    if value is None:
        return None
    m = re.fullmatch(r"(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2})", str(value).strip())
    if not m:
        raise ConfigError(f"config: {key} must be 'DD:HH:MM:SS', got {value!r}")
    d, h, mi, s = (int(x) for x in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


def resolve_limit(limit: int | float | None, total: int, key: str) -> int:
    """NeMo's limit_*_batches: float = fraction of `total`, int = count, -1 (or 1.0) = all."""
    if limit is None or limit == -1:
        return total
    if isinstance(limit, float):
        if not 0.0 <= limit <= 1.0:
            raise ConfigError(f"config: {key} as a fraction must be in [0, 1], got {limit}")
        return int(total * limit)
    if limit < 0:
        raise ConfigError(f"config: {key} must be >= 0 or -1, got {limit}")
    return min(int(limit), total)


def resolve_interval(interval: int | float, steps_per_epoch: int, key: str) -> int:
    """val_check_interval: float = fraction of an epoch, int = steps; at least 1."""
    if isinstance(interval, float):
        if not 0.0 < interval <= 1.0:
            raise ConfigError(f"config: {key} as a fraction must be in (0, 1], got {interval}")
        return max(1, int(steps_per_epoch * interval))
    if interval <= 0:
        raise ConfigError(f"config: {key} must be a positive number of steps, got {interval}")
    return int(interval)


def kl_penalty_for_iteration(penalty: float | Sequence[float], iteration: int) -> float:
    """beta for an iteration: a scalar applies to all, a list gives one value per iteration."""
    if isinstance(penalty, (int, float)):
        return float(penalty)
    values = list(penalty)
    if iteration >= len(values):
        raise ConfigError(
            f"config: model.spin.ref_policy_kl_penalty has {len(values)} values but iteration "
            f"{iteration} needs one (give one per iteration, trainer.spin.max_iterations)"
        )
    return float(values[iteration])


LOSS_TYPES = ("sigmoid", "hinge", "ipo")
STRATEGIES = ("auto", "ddp", "fsdp")
CPU_LINEAR_KERNELS = ("auto", "onednn", "default")  # model.cpu_linear_kernel
PRECISIONS = ("bf16-mixed", "bf16", "32", "32-true", "16-mixed")  # trainer.precision (spinlm.model.precision)
CHECKPOINT_GRANULARITIES = ("full", "selective")  # model.activations_checkpoint_granularity (or null)
CHECKPOINT_METHODS = ("uniform", "block")  # model.activations_checkpoint_method (or null)
LENGTH_POLICIES = ("truncate", "drop", "error")  # model.data.length_policy
OPPONENT_KEY = "model.spin.first_opponent_from_data"  # iteration 0's opponent answers from the data
SCHEDULERS = ("CosineAnnealing", "Constant")
# exp_manager.checkpoint_callback_params.monitor -> the mode that keeps the best checkpoint
MONITORS = {"val_loss": "min", "eval_sft_loss": "min", "eval_accuracy": "max", "eval_answer_style": "max"}
GENERATION_BACKENDS = ("auto", "spinlm", "hf", "vllm")  # model.spin.generation_backend
SFT_LOSS_TURNS = ("final", "all")  # model.sft.loss_turns
PEFT_SCHEMES = ("none", "lora")  # model.peft.peft_scheme


def check_num_nodes(cfg: DictConfig, launched_nodes: int) -> None:
    """trainer.num_nodes against the nodes torchrun launched (WORLD_SIZE / LOCAL_WORLD_SIZE)."""
    if cfg.trainer.num_nodes != launched_nodes:
        raise ConfigError(
            f"config: trainer.num_nodes ({cfg.trainer.num_nodes}) must equal the nodes launched ({launched_nodes}, "
            "torchrun --nnodes); set trainer.num_nodes to match"
        )


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Impossible values, caught before any model loads. Raises ConfigError naming the key."""
    from spinlm.utils.trackers import check_trackers

    spin, model, optim = cfg.trainer.spin, cfg.model, cfg.model.optim

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"config: {key} {why}")

    for key in ("train_ds", "validation_ds"):
        if OmegaConf.is_missing(model.data[key], "file_path") or model.data[key].file_path is None:
            raise ConfigError(f"config: model.data.{key}.file_path is required (a chat data file, a dataset "
                              "directory or a hub dataset id)")
    need(cfg.pretrained_checkpoint.restore_from_path is not None, "pretrained_checkpoint.restore_from_path",
         "is required (a Hugging Face model directory or a .gguf file)")
    need(bool(model.data.chat), "model.data.chat", "must be true: SPIN trains on chat data")
    need(spin.max_iterations >= 1, "trainer.spin.max_iterations", f"must be >= 1, got {spin.max_iterations}")
    need(spin.max_epochs >= 1, "trainer.spin.max_epochs", f"must be >= 1, got {spin.max_epochs}")
    need(spin.save_interval >= 1, "trainer.spin.save_interval", f"must be >= 1, got {spin.save_interval}")
    need(model.micro_batch_size >= 1, "model.micro_batch_size", f"must be >= 1, got {model.micro_batch_size}")
    per_step = model.micro_batch_size * world_size
    need(model.global_batch_size >= 1 and model.global_batch_size % per_step == 0, "model.global_batch_size",
         f"({model.global_batch_size}) must be a positive multiple of micro_batch_size x world size "
         f"({model.micro_batch_size} x {world_size})")
    need(optim.lr > 0, "model.optim.lr", f"must be > 0, got {optim.lr}")
    need(optim.weight_decay >= 0, "model.optim.weight_decay", f"must be >= 0, got {optim.weight_decay}")
    need(optim.sched.name in SCHEDULERS, "model.optim.sched.name", f"must be one of {SCHEDULERS}")
    need(optim.sched.min_lr >= 0, "model.optim.sched.min_lr", "must be >= 0")
    need(model.spin.loss_type in LOSS_TYPES, "model.spin.loss_type", f"must be one of {LOSS_TYPES}")
    validate_memory_keys(cfg)
    need(model.data.length_policy in LENGTH_POLICIES, "model.data.length_policy",
         f"must be {', '.join(LENGTH_POLICIES[:-1])} or {LENGTH_POLICIES[-1]}, got {model.data.length_policy!r}")
    need(bool(model.data.train_ds.drop_last), "model.data.train_ds.drop_last", "must be true (as in NeMo)")
    need(cfg.exp_manager.checkpoint_callback_params.mode in ("min", "max"),
         "exp_manager.checkpoint_callback_params.mode", "must be min or max")
    top_k = cfg.exp_manager.checkpoint_callback_params.save_top_k
    need(top_k >= -1, "exp_manager.checkpoint_callback_params.save_top_k", f"must be >= -1 (-1 keeps all), got {top_k}")
    beta = model.spin.ref_policy_kl_penalty
    if isinstance(beta, ListConfig):
        need(len(beta) > 0, "model.spin.ref_policy_kl_penalty", "is an empty list: give a number or one per iteration")
        need(all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in beta),
             "model.spin.ref_policy_kl_penalty", f"must be a number or a list of numbers, got {list(beta)}")
        need(len(beta) >= spin.max_iterations, "model.spin.ref_policy_kl_penalty",
             f"has {len(beta)} values but trainer.spin.max_iterations is {spin.max_iterations}")
    sp = model.spin.sampling_params
    need(sp.temperature > 0, "model.spin.sampling_params.temperature", "must be > 0")
    need(0 < sp.top_p <= 1, "model.spin.sampling_params.top_p", "must be in (0, 1]")
    need(sp.top_k >= 0, "model.spin.sampling_params.top_k", "must be >= 0")
    need(model.cpu_linear_kernel in CPU_LINEAR_KERNELS, "model.cpu_linear_kernel",
         f"must be one of {CPU_LINEAR_KERNELS}, got {model.cpu_linear_kernel!r}")
    need(cfg.trainer.strategy in STRATEGIES, "trainer.strategy",
         f"must be one of {STRATEGIES}, got {cfg.trainer.strategy!r}")
    devices = cfg.trainer.devices
    if isinstance(devices, int):
        launched = f"{world_size} process{'es' if world_size > 1 else ''}"
        need(devices * cfg.trainer.num_nodes == world_size, "trainer.devices",
             f"x trainer.num_nodes ({devices} x {cfg.trainer.num_nodes}) must equal the processes launched "
             f"({launched}); start more with torchrun, or set trainer.devices=null")
    parse_max_time(cfg.trainer.max_time)
    parse_max_time(cfg.exp_manager.max_time_per_run, "exp_manager.max_time_per_run")
    check_megatron_knobs(cfg)
    check_trackers(cfg)
    _validate_silent_traps(cfg)
    validate_generation(cfg.model.spin, world_size)
    validate_pair_sets(cfg)
    validate_sft(cfg)
    validate_data(cfg)
    validate_peft(cfg)


def validate_sft(cfg: DictConfig) -> None:
    """The keys of `spinlm sft` (`spinlm.algorithms.sft`)."""
    sft = cfg.model.sft
    if sft.loss_turns not in SFT_LOSS_TURNS:
        raise ConfigError(f"config: model.sft.loss_turns must be one of {SFT_LOSS_TURNS}, got {sft.loss_turns!r}")
    if sft.early_stopping_patience is not None and sft.early_stopping_patience < 1:
        raise ConfigError(f"config: model.sft.early_stopping_patience must be >= 1 or null, got {sft.early_stopping_patience}")


def _validate_silent_traps(cfg: DictConfig) -> None:
    """Settings that would otherwise be silently ignored or cancel each other (gpt_spin.yaml says why)."""
    data, exp = cfg.model.data, cfg.exp_manager
    if data.validation_ds.shuffle:
        raise ConfigError("config: model.data.validation_ds.shuffle must be false: validation runs on the same "
                          "batches every time, so that val/loss is comparable between validations")
    monitor, mode = exp.checkpoint_callback_params.monitor, exp.checkpoint_callback_params.mode
    if monitor not in MONITORS:
        raise ConfigError(f"config: exp_manager.checkpoint_callback_params.monitor must be one of "
                          f"{', '.join(MONITORS)}, got {monitor!r}")
    if monitor.startswith("eval_") and data.test_ds.file_path is None:
        raise ConfigError(f"config: exp_manager.checkpoint_callback_params.monitor={monitor} needs the held-out "
                          "evaluation: set model.data.test_ds.file_path")
    if mode != MONITORS[monitor]:
        raise ConfigError(f"config: exp_manager.checkpoint_callback_params.mode must be {MONITORS[monitor]} for "
                          f"monitor={monitor} (mode={mode} would keep the worst checkpoint)")
    overridden = not OmegaConf.is_interpolation(exp, "max_time_per_run")
    if overridden and cfg.trainer.max_time is not None and exp.max_time_per_run != cfg.trainer.max_time:
        raise ConfigError(f"config: trainer.max_time ({cfg.trainer.max_time}) and exp_manager.max_time_per_run "
                          f"({exp.max_time_per_run}) disagree; set one of them (max_time_per_run follows max_time)")
    if str(cfg.trainer.precision) == "16-mixed" and cfg.trainer.strategy == "fsdp":
        raise ConfigError("config: trainer.precision=16-mixed is not supported with trainer.strategy=fsdp "
                          "(no sharded gradient scaler); use bf16-mixed")


def validate_generation(spin: DictConfig, world_size: int = 1) -> None:
    """model.spin.generation_backend and the engine options of model.spin.vllm."""
    backend, engine = spin.generation_backend, spin.vllm
    if backend not in GENERATION_BACKENDS:
        raise ConfigError(f"config: model.spin.generation_backend must be one of {GENERATION_BACKENDS}, got {backend!r}")
    checks = [
        (0 < engine.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]"),
        (engine.tensor_parallel_size >= 1 and world_size % engine.tensor_parallel_size == 0, "tensor_parallel_size",
         f"({engine.tensor_parallel_size}) must be >= 1 and divide the number of processes ({world_size}): "
         "each group of that many torchrun ranks runs one engine"),
        (engine.max_num_seqs >= 1, "max_num_seqs", "must be >= 1"),
        (engine.kv_cache_gb is None or engine.kv_cache_gb > 0, "kv_cache_gb", "must be > 0 or null"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"config: model.spin.vllm.{key} {why}")


def validate_pair_sets(cfg: DictConfig) -> None:
    """The keys of `spinlm.algorithms.pairs`: data mixing and the opponent mixture."""
    spin = cfg.model.spin
    if spin.mix_iterations < 1:
        raise ConfigError(f"config: model.spin.mix_iterations must be >= 1 (1 = no mixing), got {spin.mix_iterations}")
    if not 0.0 <= spin.opponent_mix_prob <= 1.0:
        raise ConfigError(f"config: model.spin.opponent_mix_prob must be in [0, 1], got {spin.opponent_mix_prob}")
    if spin.opponent_history < 1:
        raise ConfigError(f"config: model.spin.opponent_history must be >= 1, got {spin.opponent_history}")
    if spin.regenerate_each_epoch and (spin.mix_iterations > 1 or spin.opponent_mix_prob > 0):
        raise ConfigError("config: model.spin.mix_iterations > 1 and opponent_mix_prob > 0 reuse each iteration's "
                          "answers; they need model.spin.regenerate_each_epoch=false")
def validate_data(cfg: DictConfig) -> None:
    """The data-reading keys (sources, tokenizer workers, opponent answers from the data)."""
    workers = cfg.model.data.tokenizer_workers
    if workers is not None and workers < 1:
        raise ConfigError(f"config: model.data.tokenizer_workers must be >= 1 or null (automatic), got {workers}")
    for key in ("train_ds", "validation_ds", "test_ds"):
        for name in ("split", "conversation_column"):
            value = cfg.model.data[key][name]
            if value is not None and not str(value).strip():
                raise ConfigError(f"config: model.data.{key}.{name} is empty; set a name or null")


def lora_targets(lora_tuning: DictConfig) -> list[str]:
    """model.peft.lora_tuning.target_modules as a list (a single name on the command line is a list of one)."""
    targets = lora_tuning.target_modules
    return [targets] if isinstance(targets, str) else list(targets)


def validate_peft(cfg: DictConfig) -> None:
    """model.peft.*: the scheme, and under lora the adapter's rank, scaling, dropout and targets (whether the
    targets exist in the model is checked once its config is read: `spinlm.model.lora.resolve_targets`)."""
    peft = cfg.model.peft
    if peft.peft_scheme not in PEFT_SCHEMES:
        raise ConfigError(f"config: model.peft.peft_scheme must be one of {PEFT_SCHEMES}, got {peft.peft_scheme!r}")
    if peft.peft_scheme != "lora":
        return
    lora = peft.lora_tuning
    key = "model.peft.lora_tuning"
    if not lora.adapter_dim >= 1:
        raise ConfigError(f"config: {key}.adapter_dim (the LoRA rank) must be >= 1, got {lora.adapter_dim}")
    if not lora.alpha > 0:
        raise ConfigError(f"config: {key}.alpha must be > 0, got {lora.alpha}")
    if not 0.0 <= lora.adapter_dropout < 1.0:
        raise ConfigError(f"config: {key}.adapter_dropout must be in [0, 1), got {lora.adapter_dropout}")
    targets = lora_targets(lora)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"config: {key}.target_modules must name at least one module, got {targets}")


def validate_memory_keys(cfg: DictConfig) -> None:
    """trainer.precision and the activation checkpointing keys (model.activations_checkpoint_*)."""
    model = cfg.model
    if str(cfg.trainer.precision) not in PRECISIONS:
        raise ConfigError(f"config: trainer.precision must be one of {PRECISIONS}, got {cfg.trainer.precision!r}")
    granularity, method, layers = (model.activations_checkpoint_granularity, model.activations_checkpoint_method,
                                   model.activations_checkpoint_num_layers)
    if granularity is not None and granularity not in CHECKPOINT_GRANULARITIES:
        raise ConfigError(f"config: model.activations_checkpoint_granularity must be null, full or selective, "
                          f"got {granularity!r}")
    if method is not None and method not in CHECKPOINT_METHODS:
        raise ConfigError(f"config: model.activations_checkpoint_method must be null, uniform or block, got {method!r}")
    if layers is not None and layers < 1:
        raise ConfigError(f"config: model.activations_checkpoint_num_layers must be >= 1 or null, got {layers}")
    if granularity != "full" and (method is not None or layers is not None):  # would be silently ignored
        key = "method" if method is not None else "num_layers"
        raise ConfigError(f"config: model.activations_checkpoint_{key} applies to "
                          f"activations_checkpoint_granularity=full only (it is {granularity}); set it to null")
    if method == "block" and layers is None:
        raise ConfigError("config: model.activations_checkpoint_num_layers is required with "
                          "activations_checkpoint_method=block (how many layers recompute)")
    if method != "block" and layers not in (None, 1):
        raise ConfigError(f"config: model.activations_checkpoint_num_layers={layers} with method uniform: only 1 is "
                          "supported (each decoder layer recomputes alone); use activations_checkpoint_method=block "
                          "to recompute fewer layers")
