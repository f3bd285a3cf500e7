"""Config loading (Hydra compose of the packaged gpt_spin.yaml), type/key checks and validate()."""

import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import spinlm
from spinlm.config import (
    check_num_nodes,
    kl_penalty_for_iteration,
    load_config,
    parse_max_time,
    register_resolvers,
    resolve_interval,
    resolve_limit,
    validate,
)
from spinlm.errors import ConfigError


@pytest.fixture(scope="module")
def defaults():
    return load_config()


@pytest.fixture(scope="module")
def valid_overrides(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    train, val, model = d / "train.jsonl", d / "val.jsonl", d / "model"
    train.write_text("", encoding="utf-8")
    val.write_text("", encoding="utf-8")
    model.mkdir()
    return [
        f"model.data.train_ds.file_path={train}",
        f"model.data.validation_ds.file_path={val}",
        f"pretrained_checkpoint.restore_from_path={model}",
    ]


@pytest.fixture(scope="module")
def _valid_cfg(valid_overrides):
    cfg = load_config(valid_overrides)
    validate(cfg)  # the baseline must pass, or every negative case below proves nothing
    return cfg


@pytest.fixture
def valid_cfg(_valid_cfg):
    return copy.deepcopy(_valid_cfg)


# ---------------------------------------------------------------- defaults and overrides


def test_reference_defaults(defaults):
    c = defaults
    assert c.trainer.spin.max_iterations == 3
    assert c.trainer.spin.max_epochs == 1
    assert c.trainer.spin.max_steps == -1
    assert c.trainer.spin.val_check_interval == 0.1
    assert isinstance(c.trainer.spin.val_check_interval, float)
    assert c.trainer.spin.save_interval == 100
    assert c.trainer.spin.limit_train_batches == 1.0
    assert c.trainer.spin.limit_val_batches == 1.0
    assert c.trainer.spin.gradient_clip_val == 1.0
    assert c.trainer.max_time is None
    assert c.trainer.precision == "bf16-mixed"
    assert c.model.micro_batch_size == 1
    assert c.model.global_batch_size == 64
    assert c.model.seed == 1234
    assert c.model.optim.lr == pytest.approx(9e-6)
    assert isinstance(c.model.optim.lr, float)  # YAML "9e-6" must not load as a string
    assert c.model.optim.weight_decay == pytest.approx(0.1)
    assert list(c.model.optim.betas) == [0.9, 0.98]
    assert c.model.optim.sched.name == "CosineAnnealing"
    # NeMo's warmup_steps 10 / constant_steps 1000 do not fit short runs: a warmup ratio and no hold instead
    assert c.model.optim.sched.warmup_steps is None
    assert c.model.optim.sched.warmup_ratio == pytest.approx(0.1)
    assert c.model.optim.sched.constant_steps == 0
    assert c.model.optim.sched.min_lr == pytest.approx(9e-7)
    assert isinstance(c.model.optim.sched.min_lr, float)
    sp = c.model.spin
    assert sp.ref_policy_kl_penalty == pytest.approx(0.2)
    assert sp.log_prob_forward_micro_batch_size == 1
    assert sp.rollout_micro_batch_size == 32
    assert sp.loss_type == "sigmoid"
    assert sp.sampling_params.use_greedy is False
    assert sp.sampling_params.temperature == 1.0
    assert sp.sampling_params.top_k == 0
    assert sp.sampling_params.top_p == 1.0
    assert sp.sampling_params.repetition_penalty == 1.0
    assert list(sp.sampling_params.end_strings) == ["<|endoftext|>", "<extra_id_1>"]
    assert sp.length_params.min_length == 1
    assert c.model.data.chat is True
    assert OmegaConf.is_missing(c.model.data.train_ds, "file_path")
    assert OmegaConf.is_missing(c.model.data.validation_ds, "file_path")
    assert c.pretrained_checkpoint.restore_from_path is None
    ck = c.exp_manager.checkpoint_callback_params
    assert (ck.monitor, ck.save_top_k, ck.mode) == ("val_loss", 3, "min")
    assert c.exp_manager.resume_if_exists is True
    assert c.exp_manager.create_wandb_logger is False


def test_overrides_apply():
    c = load_config([
        "trainer.spin.max_iterations=5",
        "model.optim.lr=5e-7",
        "model.global_batch_size=8",
        "model.spin.loss_type=ipo",
        "model.optim.betas=[0.8,0.9]",
        "trainer.max_time=00:01:00:00",
    ])
    assert c.trainer.spin.max_iterations == 5
    assert c.model.optim.lr == pytest.approx(5e-7)
    assert c.model.global_batch_size == 8
    assert c.model.spin.loss_type == "ipo"
    assert list(c.model.optim.betas) == [0.8, 0.9]
    assert c.trainer.max_time == "00:01:00:00"
    # the interpolation follows the override
    assert c.exp_manager.max_time_per_run == "00:01:00:00"
    # untouched keys keep their defaults
    assert c.model.micro_batch_size == 1


def test_resolvers_registered_and_length_from_seq_length():
    c = load_config(["model.encoder_seq_length=1001"])
    for name in ("multiply", "int_div", "subtract"):
        assert OmegaConf.has_resolver(name)
    OmegaConf.resolve(c)
    assert c.model.spin.length_params.max_length == 500  # int_div floors
    assert c.model.data.train_ds.max_seq_length == 1001
    assert c.model.data.validation_ds.max_seq_length == 1001


def test_resolver_arithmetic():
    register_resolvers()
    register_resolvers()  # idempotent
    c = OmegaConf.create({"a": 7, "m": "${multiply:${a},3}", "d": "${int_div:${a},2}", "s": "${subtract:${a},10}"})
    assert (c.m, c.d, c.s) == (21, 3, -3)


# ---------------------------------------------------------------- unknown keys and types


@pytest.mark.parametrize(
    "override,key",
    [
        ("foo=1", "foo"),
        ("model.foo=1", "model.foo"),
        ("+foo=1", "foo"),
        ("+model.spin.not_a_key=1", "model.spin.not_a_key"),
    ],
)
def test_unknown_key_is_an_error(override, key):
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config([override])
    assert f"'{key}'" in str(e.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.global_batch_size=abc", "model.global_batch_size"),  # string for int
        ("model.global_batch_size=true", "model.global_batch_size"),  # bool for int
        ("model.optim.lr=true", "model.optim.lr"),  # bool for float
        ("model.optim.betas=0.9", "model.optim.betas"),  # scalar for list
        ("model.data.chat=1", "model.data.chat"),  # int for bool
        ("model.spin.ref_policy_kl_penalty=abc", "model.spin.ref_policy_kl_penalty"),
        ("trainer.max_time=5", "trainer.max_time"),  # int for a "DD:HH:MM:SS" string
    ],
)
def test_wrong_type_is_an_error(override, key):
    with pytest.raises(ConfigError) as e:
        load_config([override])
    assert f"'{key}'" in str(e.value)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.optim.lr=1", 1),  # int accepted for a float default
        ("trainer.precision=32", 32),  # union type
        ("trainer.spin.val_check_interval=5", 5),  # int = steps
    ],
)
def test_accepted_alternative_types(override, expected):
    key = override.split("=")[0]
    assert OmegaConf.select(load_config([override]), key) == expected


def test_list_kl_penalty_accepted():
    c = load_config(["model.spin.ref_policy_kl_penalty=[0.1,0.2,0.3]"])
    assert list(c.model.spin.ref_policy_kl_penalty) == [0.1, 0.2, 0.3]
    assert kl_penalty_for_iteration(c.model.spin.ref_policy_kl_penalty, 2) == pytest.approx(0.3)


def test_user_config_dir(tmp_path):
    packaged = Path(spinlm.__file__).parent / "conf" / "gpt_spin.yaml"
    text = packaged.read_text(encoding="utf-8")
    (tmp_path / "mine.yaml").write_text(text.replace("global_batch_size: 64", "global_batch_size: 16"), encoding="utf-8")
    c = load_config(["model.micro_batch_size=2"], config_path=str(tmp_path), config_name="mine")
    assert c.model.global_batch_size == 16
    assert c.model.micro_batch_size == 2
    (tmp_path / "typo.yaml").write_text(text + "\nnot_a_section:\n  x: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'not_a_section'"):
        load_config([], config_path=str(tmp_path), config_name="typo")


# ---------------------------------------------------------------- helpers


def test_kl_penalty_for_iteration():
    assert kl_penalty_for_iteration(0.2, 0) == 0.2
    assert kl_penalty_for_iteration(0.2, 7) == 0.2
    assert kl_penalty_for_iteration(1, 3) == 1.0
    assert isinstance(kl_penalty_for_iteration(1, 3), float)
    assert [kl_penalty_for_iteration([0.1, 0.5, 0.9], i) for i in range(3)] == [0.1, 0.5, 0.9]
    assert kl_penalty_for_iteration(OmegaConf.create([0.1, 0.5]), 1) == 0.5
    with pytest.raises(ConfigError, match="ref_policy_kl_penalty"):
        kl_penalty_for_iteration([0.1, 0.5], 2)


@pytest.mark.parametrize(
    "text,seconds",
    [
        (None, None),
        ("00:01:00:00", 3600.0),
        ("00:00:00:30", 30.0),
        ("01:00:00:00", 86400.0),
        ("2:03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        (" 00:00:01:00 ", 60.0),
    ],
)
def test_parse_max_time(text, seconds):
    assert parse_max_time(text) == seconds


@pytest.mark.parametrize("text", ["1:00:00", "01:00", "abc", "", "00:01:00:00:00", "00:-1:00:00", "1h", "00:01:00:0x"])
def test_parse_max_time_bad_formats(text):
    with pytest.raises(ConfigError, match="max_time"):
        parse_max_time(text)


@pytest.mark.parametrize(
    "limit,total,expected",
    [
        (0.5, 10, 5),
        (0.25, 10, 2),  # floor
        (0.0, 10, 0),
        (1.0, 10, 10),
        (-1, 10, 10),
        (None, 10, 10),
        (3, 10, 3),
        (0, 10, 0),
        (50, 10, 10),  # a count above the total is capped
    ],
)
def test_resolve_limit(limit, total, expected):
    assert resolve_limit(limit, total, "trainer.spin.limit_train_batches") == expected


@pytest.mark.parametrize("limit", [1.5, -0.5, -2])
def test_resolve_limit_out_of_range(limit):
    with pytest.raises(ConfigError, match="trainer.spin.limit_val_batches"):
        resolve_limit(limit, 10, "trainer.spin.limit_val_batches")


@pytest.mark.parametrize(
    "interval,steps_per_epoch,expected",
    [
        (0.1, 100, 10),
        (0.25, 10, 2),
        (1.0, 37, 37),
        (0.1, 5, 1),  # fraction rounding to 0 -> at least 1
        (3, 100, 3),  # int = steps
        (250, 100, 250),
        (1, 100, 1),
    ],
)
def test_resolve_interval(interval, steps_per_epoch, expected):
    assert resolve_interval(interval, steps_per_epoch, "trainer.spin.val_check_interval") == expected


@pytest.mark.parametrize("interval", [0.0, 1.5, -0.1, 0, -3])
def test_resolve_interval_bad(interval):
    with pytest.raises(ConfigError, match="trainer.spin.val_check_interval"):
        resolve_interval(interval, 10, "trainer.spin.val_check_interval")


# ---------------------------------------------------------------- validate()


def test_validate_accepts_valid_config(valid_cfg):
    validate(valid_cfg)
    validate(valid_cfg, world_size=4)  # 64 % (1 x 4) == 0


def test_validate_needs_train_file(valid_overrides):
    cfg = load_config([o for o in valid_overrides if "train_ds" not in o])
    with pytest.raises(ConfigError, match=r"model\.data\.train_ds\.file_path"):
        validate(cfg)


def test_validate_needs_validation_file(valid_overrides):
    cfg = load_config([o for o in valid_overrides if "validation_ds" not in o])
    with pytest.raises(ConfigError, match=r"model\.data\.validation_ds\.file_path"):
        validate(cfg)


def test_validate_needs_restore_path(valid_overrides):
    cfg = load_config([o for o in valid_overrides if "restore_from_path" not in o])
    with pytest.raises(ConfigError, match=r"pretrained_checkpoint\.restore_from_path"):
        validate(cfg)


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.optim.lr=-1e-5", "model.optim.lr"),
        ("model.spin.loss_type=dpo", "model.spin.loss_type"),
        ("model.spin.ref_policy_kl_penalty=[0.1,0.2]", "model.spin.ref_policy_kl_penalty"),  # 2 < 3 iterations
        ("trainer.precision=bf16-true", "trainer.precision"),
        ("model.data.chat=false", "model.data.chat"),
        ("trainer.max_time=1:00:00", "trainer.max_time"),
        ("model.global_batch_size=63", "model.global_batch_size"),  # with micro_batch_size=2 below
        ("trainer.strategy=deepspeed", "trainer.strategy"),
        ("model.cpu_linear_kernel=mkl", "model.cpu_linear_kernel"),
    ],
)
def test_validate_rejects_via_overrides(valid_overrides, override, key):
    extra = ["model.micro_batch_size=2"] if key == "model.global_batch_size" else []
    cfg = load_config(valid_overrides + extra + [override])  # loads: the type is right, the value is not
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value)


def test_validate_global_batch_vs_world_size(valid_cfg):
    valid_cfg.model.global_batch_size = 6
    valid_cfg.model.micro_batch_size = 2
    validate(valid_cfg, world_size=3)  # 6 % (2 x 3) == 0
    with pytest.raises(ConfigError, match=r"model\.global_batch_size"):
        validate(valid_cfg, world_size=2)  # 6 % (2 x 2) != 0
    valid_cfg.model.global_batch_size = 0
    with pytest.raises(ConfigError, match=r"model\.global_batch_size"):
        validate(valid_cfg)


def test_launch_checks_devices_and_nodes(valid_cfg):
    valid_cfg.trainer.devices = 4
    valid_cfg.trainer.num_nodes = 2
    validate(valid_cfg, world_size=8)
    with pytest.raises(ConfigError, match=r"trainer\.devices .* must equal the processes launched \(2 processes\)"):
        validate(valid_cfg, world_size=2)
    check_num_nodes(valid_cfg, 2)
    with pytest.raises(ConfigError, match=r"trainer\.num_nodes \(2\) must equal the nodes launched \(1"):
        check_num_nodes(valid_cfg, 1)


def test_validate_kl_list_long_enough_is_fine(valid_cfg):
    valid_cfg.model.spin.ref_policy_kl_penalty = [0.1, 0.2, 0.3]
    validate(valid_cfg)
    valid_cfg.trainer.spin.max_iterations = 4
    with pytest.raises(ConfigError, match="ref_policy_kl_penalty"):
        validate(valid_cfg)


@pytest.mark.parametrize(
    "key,value",
    [
        ("trainer.spin.max_iterations", 0),
        ("model.optim.lr", 0.0),
        ("model.spin.ref_policy_kl_penalty", ["a", "b", "c"]),  # not numbers
        ("trainer.precision", 64),
        ("trainer.spin.max_epochs", 0),
        ("trainer.spin.save_interval", 0),
        ("model.micro_batch_size", 0),
        ("model.optim.weight_decay", -0.1),
        ("model.optim.name", "sgd"),
        ("model.optim.sched.name", "Linear"),
        ("model.optim.sched.min_lr", -1e-7),
        ("model.data.length_policy", "pad"),
        ("model.data.train_ds.drop_last", False),
        ("model.tensor_model_parallel_size", 2),
        ("exp_manager.checkpoint_callback_params.mode", "avg"),
        ("model.spin.sampling_params.temperature", 0.0),
        ("model.spin.sampling_params.top_p", 0.0),
        ("model.spin.sampling_params.top_p", 1.5),
        ("model.spin.sampling_params.top_k", -1),
        ("model.data.train_ds.file_path", None),
        ("trainer.max_time", "soon"),
    ],
)
def test_validate_rejects_each_check(valid_cfg, key, value):
    OmegaConf.update(valid_cfg, key, value, merge=False)
    with pytest.raises(ConfigError) as e:
        validate(valid_cfg)
    assert key in str(e.value)


def test_validate_accepts_edge_values(valid_cfg):
    valid_cfg.model.optim.name = "AdamW"  # case-insensitive
    valid_cfg.model.optim.sched.name = "Constant"
    valid_cfg.model.optim.sched.min_lr = 0.0
    valid_cfg.model.spin.loss_type = "hinge"
    valid_cfg.trainer.precision = "32"
    valid_cfg.trainer.max_time = "00:00:10:00"
    valid_cfg.model.spin.sampling_params.top_p = 1.0
    validate(valid_cfg)


def test_user_yaml_need_only_hold_the_keys_it_changes(tmp_path):
    (tmp_path / "mine.yaml").write_text("trainer:\n  spin:\n    max_iterations: 5\nmodel:\n  optim:\n    lr: 1.0e-5\n")
    cfg = load_config(["model.global_batch_size=8"], config_path=str(tmp_path), config_name="mine")
    assert cfg.trainer.spin.max_iterations == 5
    assert cfg.model.optim.lr == 1e-5
    assert cfg.model.global_batch_size == 8
    assert cfg.trainer.spin.max_epochs == 1  # packaged default
    (tmp_path / "bad.yaml").write_text("trainer:\n  spin:\n    max_iteratons: 5\n")
    with pytest.raises(ConfigError, match="max_iteratons"):
        load_config([], config_path=str(tmp_path), config_name="bad")


def test_max_time_per_run_is_validated():
    cfg = load_config(["model.data.train_ds.file_path=a", "model.data.validation_ds.file_path=b",
                       "pretrained_checkpoint.restore_from_path=m", "exp_manager.max_time_per_run=soon"])
    with pytest.raises(ConfigError, match="exp_manager.max_time_per_run"):
        validate(cfg)


def test_devices_must_match_the_launched_processes():
    cfg = load_config(["model.data.train_ds.file_path=a", "model.data.validation_ds.file_path=b",
                       "pretrained_checkpoint.restore_from_path=m", "trainer.devices=8"])
    with pytest.raises(ConfigError, match="trainer.devices"):
        validate(cfg)
    validate(cfg, world_size=8)
    cfg.trainer.devices = None
    validate(cfg)
