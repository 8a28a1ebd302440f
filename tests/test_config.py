"""Typed configs: YAML + overrides merge, validation messages, resolved config round trip."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from milan.recipes.pretrain import PretrainConfig
from milan.train.config import (
    CONFIG_DIR,
    ConfigError,
    config_recipe,
    from_dict,
    load_config,
    shipped_configs,
    to_dict,
)


def test_defaults_follow_the_paper() -> None:
    cfg = PretrainConfig()
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.base_lr == 1.5e-4
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.epochs == 400 and cfg.optim.warmup_epochs == 40
    assert cfg.model.mask_ratio == 0.75 and cfg.model.masking == "semantic"
    assert cfg.data.crop_scale == (0.2, 1.0)


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  epochs: 10\n  betas: [0.8, 0.9]\nmodel:\n  masking: random\n")
    cfg = load_config(PretrainConfig, path, ["optim.epochs=3", "optim.lr=1e-3", "teacher.weights=null"])
    assert cfg.optim.epochs == 3 and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.masking == "random" and cfg.teacher.weights is None
    assert cfg.optim.warmup_epochs == 40  # untouched keys keep their defaults


def test_base_inheritance_and_round_trip() -> None:
    large = load_config(PretrainConfig, CONFIG_DIR / "pretrain_vit_large.yaml")
    assert large.model.name == "milan_vit_large_patch16" and large.teacher.spec == "openclip:ViT-L-14"
    assert large.optim.epochs == 400  # inherited from pretrain_vit_base.yaml
    assert large.optim.batch_size * large.optim.accum_steps * 8 == 4096
    assert from_dict(PretrainConfig, to_dict(large)) == large


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_loads(name: str) -> None:
    schema = importlib.import_module(f"milan.recipes.{config_recipe(name)}").CONFIG
    load_config(schema, CONFIG_DIR / f"{name}.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown config key optim\.lrr in section 'optim' — valid keys: .*base_lr"),
        ("modle.name=x", r"unknown config key modle — valid keys: data, debug, model, monitor, optim, recover, run, teacher"),
        ("optim.epochs=1.5", r"optim\.epochs=1\.5 should be an integer"),
        ("optim.betas=[0.9]", r"optim\.betas needs 2 values, got 1"),
        ("run.precision=fp8", r"run\.precision='fp8' is not valid; choose one of: 'auto', 'bf16', 'fp16', 'fp32'"),
        ("run.compile=maybe", r"run\.compile='maybe' should be true or false"),
        ("optim", r"should look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, [override])


@pytest.mark.parametrize("row", range(1, 9))
def test_ablation_configs_select_table5_rows(row: int) -> None:
    from milan.model import TABLE5

    cfg = load_config(PretrainConfig, CONFIG_DIR / f"ablation_vit_base_row{row}.yaml")
    model = cfg.model  # resolved when the config is read
    assert (model.target, model.decoder, model.masking) == (
        TABLE5[row].target, TABLE5[row].decoder, TABLE5[row].masking)
    assert cfg.optim.epochs == 400 and cfg.model.name == "milan_vit_base_patch16"


def test_yaml_errors_are_one_line_config_errors(tmp_path: Path) -> None:
    """A YAML constructor or syntax error (file or override) is a ConfigError naming the file/override
    and what to do, not a yaml traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: !!python/object:os.system\n    a: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line 2: not a plain YAML config .*no !!python tags"):
        load_config(PretrainConfig, bad)
    with pytest.raises(ConfigError, match=r"override 'optim.lr=\[1'.*not valid YAML.*close its brackets"):
        load_config(PretrainConfig, None, ["optim.lr=[1"])


def test_a_list_of_paths_takes_one_path_and_shows_a_path_example() -> None:
    from milan.recipes.evaluate import EvalConfig

    assert load_config(EvalConfig, None, ["data.paths=/x"]).data.paths == ["/x"]
    with pytest.raises(ConfigError, match=r"data\.paths=3 should be a list, e.g\. data\.paths=\[/data/a,/data/b\]"):
        load_config(EvalConfig, None, ["data.paths=3"])
    with pytest.raises(ConfigError, match=r"data\.crop_scale=.* should be a list, e.g\. data\.crop_scale=\[0\.2,1\.0\]"):
        load_config(PretrainConfig, None, ["data.crop_scale=0.5"])


def test_own_images_under_shapes_kind_name_the_fix(tmp_path: Path) -> None:
    from milan.data import build_dataset
    from milan.errors import DataNotFound

    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataNotFound, match="not a shapes dataset.*data.kind=imagefolder"):
        build_dataset("shapes", tmp_path)


def test_ablation_config_row9_is_row8_with_a_slip_teacher() -> None:
    from milan.model import TABLE5

    cfg = load_config(PretrainConfig, CONFIG_DIR / "ablation_vit_base_row9.yaml")
    assert (cfg.model.target, cfg.model.decoder, cfg.model.masking) == (
        TABLE5[8].target, TABLE5[8].decoder, TABLE5[8].masking)
    assert cfg.teacher.spec == "slip:SLIP_VITB16" and cfg.optim.epochs == 400
