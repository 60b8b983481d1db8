"""The config schema: every shipped config loads, overrides are typed, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lsa_dist.config import ConfigError, RunConfig, flatten, flatten_tree, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_survives_a_yaml_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert cfg.train.name
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg  # what checkpoints and SLURM jobs read back is the same run


def test_overrides_are_typed_and_win_over_the_file() -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["optim.lr=1e-3", "data.batch_size=8", "engine.compile=true"])
    assert cfg.optim.lr == 1e-3 and cfg.data.batch_size == 8 and cfg.engine.compile is True
    assert cfg.engine.zero_stage == 2  # from the file
    cfg = load_config(None, ["model.options.widths=[16,16]", "model.options.heads=[2,2]", "model.options.depths=[1,1]"])
    assert cfg.train.name == "run" and cfg.model.options["widths"] == [16, 16]
    assert load_config(ROOT / "configs" / "lsa_tiny.yaml").train.name == "lsa_tiny"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=0.1"], "optim.lrr: unknown key (Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'?)"),
        (["data.batch_size=many"], "data.batch_size: Value 'many' of type 'str' could not be converted to Integer"),
        (["optim.lr"], "override 'optim.lr' is not of the form key=value"),
        (["engine.precision=fp8"], "engine.precision: must be one of fp32, bf16, fp16, got 'fp8'"),
        (["engine.zero_stage=4"], "engine.zero_stage: must be a finite number in [0, 3], got 4"),
        (["engine.backend=fairscale", "engine.zero_stage=3"], "engine.zero_stage: 3 needs engine.backend=deepspeed"),
        (["data.batch_size=10", "optim.grad_accum_steps=4"], "data.batch_size: 10 is not divisible by"),
        (["launch.max_restarts=-1"], "launch.max_restarts: must be a finite number in [0, inf), got -1"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last: must be a finite number in [1, inf), got 0"),
        (["optim.ema_decay=0.9", "engine.zero_stage=3"], "optim.ema_decay: EMA needs whole parameters"),
        (["engine.compile=true", "engine.zero_stage=3"], "engine.compile: torch.compile cannot trace ZeRO-3's"),
        (["launch.slurm.env.NCCL-DEBUG=INFO"], "launch.slurm.env: 'NCCL-DEBUG' is not an environment variable name"),
        (["train.resume=/nowhere/step-1"], "train.resume: '/nowhere/step-1' is neither auto, never"),
        (["model.options.heads=[3,3,3]"], "model.options.heads: stage 0: width 64 is not divisible by 3 heads"),
        (
            ["data.image_size=64", "model.options.image_size=32"],
            "data.image_size: 64 but model lsa_cifar_tiny takes 32 px images",
        ),
        (["model.init_from=/nowhere/model.pt"], "model.init_from: /nowhere/model.pt does not exist"),
        (
            ["data.progressive.start=160", "data.progressive.first_epoch=5", "data.progressive.last_epoch=2"],
            "data.progressive.last_epoch: 2 is before first_epoch 5",
        ),
        (
            ["model.init_from=configs", "model.official_checkpoint=x.pth"],
            "model.init_from: set either it or model.official_checkpoint",
        ),
    ],
)
def test_a_bad_config_is_one_line_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "demo.yaml", overrides)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text


def test_missing_or_broken_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .* does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_flatten_gives_one_param_per_leaf_key() -> None:
    flat = flatten(RunConfig())
    assert flat["optim.lr"] == 5e-4 and flat["launch.slurm.partition"] == ""
    assert "engine.compile" in flat and "train.log_every" in flat
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_flatten_tree_flattens_a_saved_config_the_way_flatten_flattens_the_config() -> None:
    import yaml

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert flatten_tree(yaml.safe_load(to_yaml(cfg))) == flatten(cfg)
    assert flatten(RunConfig())["model.options"] == {}  # an empty dict stays a value
    assert flatten_tree({"a": {"b": 1, "c": {}, "d": [1, {"e": 2}]}, "f": None}) == {
        "a.b": 1,
        "a.c": {},
        "a.d": [1, {"e": 2}],
        "f": None,
    }


def test_math_keys_are_the_fields_marked_so_and_every_key_below_a_marked_section() -> None:
    """The marks on the schema's fields answer what the list of keys that alter a run's mathematics
    (sections end with a dot) answered before the marks replaced it."""
    from lsa_dist.config import is_math_key

    math_keys = (
        "model.",
        "optim.",
        "data.augment.",
        "data.progressive.",
        "data.batch_size",
        "data.image_size",
        "data.normalize",
        "data.format",
        "data.train_split",
        "data.shuffle_buffer",
        "engine.backend",
        "engine.zero_stage",
        "engine.precision",
        "engine.offload_optimizer",
        "train.seed",
    )
    keys = list(flatten(RunConfig())) + ["model.options.mlp_ratio", "model.options.widths", "model.options.a.b"]
    answers = {key: is_math_key(key) for key in keys}
    assert answers == {key: key.startswith(math_keys) or key in math_keys for key in keys}
    assert sum(answers.values()) > 40 and not answers["data.num_workers"] and not answers["train.log_every"]


def test_progressive_resizing_follows_its_schedule() -> None:
    """FFCV's ImageNet recipe: 160 px up to epoch 2, then linearly to 192 at epoch 10 in steps of
    32 (evaluation at data.image_size, 224); off by default."""
    cfg = load_config(
        ROOT / "configs" / "lsa_tiny.yaml",
        ["data.progressive.start=160", "data.progressive.end=192"]
        + ["data.progressive.first_epoch=2", "data.progressive.last_epoch=10"],
    )
    sizes = [cfg.data.train_size(epoch) for epoch in range(12)]
    assert sizes == [160, 160, 160, 160, 160, 160, 192, 192, 192, 192, 192, 192]
    cfg.data.progressive.multiple = 8
    assert [cfg.data.train_size(epoch) for epoch in (2, 4, 6, 8, 10)] == [160, 168, 176, 184, 192]
    assert load_config(ROOT / "configs" / "lsa_tiny.yaml").data.train_size(3) == 224


def numeric_keys(section: object = None, prefix: str = "") -> dict[str, tuple[type, str]]:
    """Every int, float and list-of-float key of the schema with the interval its field declares
    ("" when none), found by walking its dataclasses."""
    import dataclasses
    import typing

    from lsa_dist.config import RunConfig

    section = section or RunConfig
    hints, out = typing.get_type_hints(section), {}
    for f in dataclasses.fields(section):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(numeric_keys(kind, f"{prefix}{f.name}."))
        elif kind in (int, float) or kind == list[float]:
            out[f"{prefix}{f.name}"] = (kind, f.metadata.get("interval", ""))
    return out


def test_every_numeric_key_has_a_range_and_bad_values_exit_2_in_one_line(capsys: pytest.CaptureFixture) -> None:
    """Out-of-range and non-finite values for every numeric key: exit 2 with one line naming the
    key, never a traceback (through the training command's own front)."""
    from lsa_dist.config import RunConfig
    from lsa_dist.constraints import walk_fields
    from lsa_dist.train import command

    keys = numeric_keys()
    assert all(interval for _, interval in keys.values()), [k for k, (_, i) in keys.items() if not i]
    with_interval = {key for key, f, _ in walk_fields(RunConfig()) if f.metadata.get("interval")}
    assert with_interval == set(keys), with_interval ^ set(keys)  # intervals only on numeric keys
    tried = 0
    for key, (kind, interval) in keys.items():
        high = interval[1:-1].split(",")[1].strip()
        bad = ["-1", "-0.5"]
        if high != "inf":
            bad.append(str(float(high) * 2 + 1))
        if kind is not int:
            bad += ["nan", "inf", "-inf"]
        for value in bad:
            text = f"[{value},{value}]" if kind == list[float] else value
            code = command(["--config", str(ROOT / "configs" / "demo.yaml"), f"{key}={text}"])
            err = capsys.readouterr().err
            assert code == 2, (key, value, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {key}") and "Traceback" not in err, (
                key,
                value,
                err,
            )
            tried += 1
    assert tried > 150


def test_values_that_crashed_late_are_refused_at_load() -> None:
    cases = {
        "train.eval_every=0": "train.eval_every: must be a finite number in [1, inf), got 0",
        "tracking.log_every=0": "tracking.log_every: must be a finite number in [1, inf), got 0",
        "train.seed=-3": "train.seed: must be a finite number in [0, 9223372036854775807], got -3",
        "optim.lr=0": "optim.lr: must be a finite number in (0, inf), got 0.0",
        "optim.lr=nan": "optim.lr: must be a finite number in (0, inf), got nan",
        "data.augment.crop_pct=0": "data.augment.crop_pct: must be a finite number in (0, 1], got 0.0",
        "model.options.mlp_ratio=nan": "model.options.mlp_ratio: must be a finite number in (0, inf), got nan",
        "model.options.attn_drop=1.5": "model.options.attn_drop: must be a finite number in [0, 1), got 1.5",
        "model.options.proj_drop=-3": "model.options.proj_drop: must be a finite number in [0, 1), got -3.0",
        "model.options.widths=[192,0,192,192]": "model.options.widths: must be a finite number in [1, inf), got "
        "[192, 0, 192, 192]",
        "model.options.depths=[2,4.5,4,4]": "model.options.depths: must be a list of integers, got [2, 4.5, 4, 4]",
        "model.options.mlp_ratio=four": "model.options.mlp_ratio: must be a number, got 'four'",
        "model.options.qkv_bias=maybe": "model.options.qkv_bias: must be true or false, got 'maybe'",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(ROOT / "configs" / "lsa_tiny.yaml", [override])
        assert str(err.value) == message
    with pytest.raises(ConfigError, match=r"^data.batch_size: 33 is odd; mixup/cutmix pair"):
        load_config(ROOT / "configs" / "lsa_tiny.yaml", ["data.batch_size=33"])


def test_every_numeric_model_option_declares_a_range_checked_at_load() -> None:
    """The model's options (LSAConfig's fields) carry their ranges; every numeric one refuses
    values below, above and beside it (nan, inf) with one line naming model.options.<key>."""
    import dataclasses
    import typing

    from lsa_dist.models import LSAConfig

    hints = typing.get_type_hints(LSAConfig)
    numeric = {
        f.name: f.metadata.get("interval", "")
        for f in dataclasses.fields(LSAConfig)
        if hints[f.name] in (int, float, tuple[int, ...])
    }
    assert {"mlp_ratio", "attn_drop", "proj_drop", "widths", "heads", "depths", "patch_kernel"} <= set(numeric)
    assert all(numeric.values()), [name for name, interval in numeric.items() if not interval]
    tried = 0
    for name, interval in numeric.items():
        if name in ("num_classes", "drop_path_rate"):  # model.num_classes and model.drop_path_rate set these
            continue
        kind, high = hints[name], interval[1:-1].split(",")[1].strip()
        bad = ["-1", "nan", "inf"] + ([] if high == "inf" else [str(float(high) * 2 + 1)])
        for value in bad:
            text = value if kind in (int, float) else f"[{value},{value},{value},{value}]"
            with pytest.raises(ConfigError) as err:
                load_config(ROOT / "configs" / "lsa_tiny.yaml", [f"model.options.{name}={text}"])
            message = str(err.value)
            assert message.startswith(f"model.options.{name}: must be ") and "\n" not in message, message
            assert interval in message or "integer" in message, message
            tried += 1
    assert tried >= 30
