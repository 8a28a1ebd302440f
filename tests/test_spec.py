"""ModelSpec: one place, one order — name prefix → Table 5 row → explicit values (issue: one model spec)."""

from __future__ import annotations

import itertools

import pytest
import yaml

from milan.errors import ConfigError, UserError
from milan.model import KD_BASELINE, TABLE5, ModelSpec, build_model
from milan.recipes.pretrain import PretrainConfig
from milan.train.config import load_config, to_dict

PRESET = "vit_shapes_patch8"
PREFIX_DEFAULT = {"milan": TABLE5[8], "mae": TABLE5[1], "kd": KD_BASELINE}
CHOICES = {"target": ("clip", "pixel"), "decoder": ("prompting", "mae", "none"), "masking": ("semantic", "random")}


def _expected(prefix: str, variant: int | None, overrides: dict[str, str]) -> dict[str, str] | None:
    """The rule written out by hand: None where it must be an error."""
    base = TABLE5[variant] if variant is not None else PREFIX_DEFAULT[prefix]
    out = {"target": base.target, "decoder": base.decoder, "masking": base.masking}
    for key, value in overrides.items():
        if variant is not None and value != out[key]:
            return None  # contradicts the row
        out[key] = value
    if out["target"] == "pixel" and out["decoder"] == "none":
        return None  # no model predicts pixels without a decoder
    return out


def _cases():
    for prefix in PREFIX_DEFAULT:
        for variant in (None, *TABLE5):
            for keys in itertools.chain.from_iterable(itertools.combinations(CHOICES, n) for n in range(4)):
                for values in itertools.product(*(CHOICES[k] for k in keys)):
                    yield prefix, variant, dict(zip(keys, values))


def test_every_prefix_variant_and_override_resolves_as_documented() -> None:
    cases = list(_cases())
    assert len(cases) == 3 * 9 * ((1 + 2) * (1 + 3) * (1 + 2))  # every value of every subset of keys
    errors = 0
    for prefix, variant, overrides in cases:
        want = _expected(prefix, variant, overrides)
        name = f"{prefix}_{PRESET}"
        if want is None:
            errors += 1
            with pytest.raises(ConfigError) as info:
                ModelSpec.resolve(name, variant=variant, **overrides)
            message = str(info.value)
            if variant is not None and any(v != getattr(TABLE5[variant], k) for k, v in overrides.items()):
                key = next(k for k, v in overrides.items() if v != getattr(TABLE5[variant], k))
                assert f"model.variant={variant}" in message and f"model.{key}=" in message, message
            continue
        spec = ModelSpec.resolve(name, variant=variant, **overrides)
        assert (spec.target, spec.decoder, spec.masking) == tuple(want.values()), (prefix, variant, overrides)
        assert spec.name == name and spec.preset == PRESET
    assert errors > 0


def test_prefixes_alone() -> None:
    mae = ModelSpec.resolve(f"mae_{PRESET}")
    assert (mae.target, mae.decoder, mae.masking, mae.row) == ("pixel", "mae", "random", 1)
    assert not mae.needs_teacher  # MAE needs no teacher at all
    milan = ModelSpec.resolve(f"milan_{PRESET}")
    assert (milan.target, milan.decoder, milan.masking, milan.row) == ("clip", "prompting", "semantic", 8)
    kd = ModelSpec.resolve(f"kd_{PRESET}")
    assert kd.variant == KD_BASELINE and kd.row is None and kd.decoder_dim is None
    assert ModelSpec.resolve(f"mae_{PRESET}", masking="semantic").needs_teacher  # row #4: attention from the teacher


def test_decoder_shape_resolved_from_the_preset_unless_given() -> None:
    small = ModelSpec.resolve(f"milan_{PRESET}")
    assert (small.decoder_dim, small.decoder_depth, small.decoder_heads) == (128, 2, 4)
    base = ModelSpec.resolve("milan_vit_base_patch16")
    assert (base.decoder_dim, base.decoder_depth, base.decoder_heads) == (512, 8, 16)
    custom = ModelSpec.resolve(f"milan_{PRESET}", decoder_depth=3)
    assert (custom.decoder_dim, custom.decoder_depth, custom.decoder_heads) == (128, 3, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="foo_vit_base_patch16"), r"model\.name='foo_vit_base_patch16' is not a model; choose one of: .*milan_vit_base_patch16"),
        (dict(name="milan_vit_nope"), r"is not a model"),
        (dict(name=f"milan_{PRESET}", variant=9), r"model\.variant=9 is not a Table 5 row; choose 1–8"),
        (dict(name=f"milan_{PRESET}", variant=8, masking="random"),
         r"model\.variant=8 \(Table 5: semantic masking\) and model\.masking=random contradict each other"),
        (dict(name=f"milan_{PRESET}", target="depth"), r"model\.target='depth' is not valid; choose one of: 'clip', 'pixel'"),
        (dict(name=f"kd_{PRESET}", target="pixel"), r"model\.target=pixel needs a decoder"),
        (dict(name=f"milan_{PRESET}", mask_ratio=1.0), r"model\.mask_ratio=1\.0 must be in \(0, 1\)"),
        (dict(name=f"milan_{PRESET}", mask_ratio=0.999), r"leave at least one of the 64 patches visible"),
    ],
)
def test_resolution_errors_name_the_keys(kwargs, message) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ConfigError, match=message) as info:
        ModelSpec.resolve(name, **kwargs)
    assert isinstance(info.value, UserError)


def test_mae_name_trains_mae_in_the_shapes_config() -> None:
    """`--config pretrain_shapes model.name=mae_...` is MAE: pixel target, MAE decoder, random masking."""
    cfg = load_config(PretrainConfig, None, ["model.name=mae_vit_shapes_patch8"])
    assert (cfg.model.target, cfg.model.decoder, cfg.model.masking) == ("pixel", "mae", "random")
    assert not cfg.model.spec().needs_teacher
    from milan.train.config import config_path

    cfg = load_config(PretrainConfig, config_path("pretrain_shapes"), ["model.name=mae_vit_shapes_patch8"])
    assert cfg.model.spec().variant == TABLE5[1]


def test_print_config_shows_resolved_values_never_null(capsys) -> None:
    from milan.tools.cli import main

    main(["pretrain", "--config", "pretrain_shapes", "model.name=mae_vit_shapes_patch8", "--print-config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (model["target"], model["decoder"], model["masking"]) == ("pixel", "mae", "random")
    assert None not in (model["decoder_dim"], model["decoder_depth"], model["decoder_heads"])
    main(["pretrain", "--config", "pretrain_shapes", "model.variant=6", "--print-config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (model["variant"], model["target"], model["decoder"], model["masking"]) == (6, "clip", "mae", "semantic")
    with pytest.raises(ConfigError, match=r"model\.variant=8 .* model\.masking=random"):
        main(["pretrain", "--config", "pretrain_shapes", "model.variant=8", "model.masking=random", "--print-config"])


def test_resolved_config_reads_back_to_the_same_spec() -> None:
    cfg = load_config(PretrainConfig, None, ["model.name=milan_vit_shapes_patch8", "model.variant=3"])
    again = load_config(PretrainConfig, None, [f"model.{k}={v}" for k, v in to_dict(cfg.model).items() if v is not None])
    assert again.model.spec() == cfg.model.spec()


def test_build_model_takes_a_spec_or_a_name() -> None:
    spec = ModelSpec.resolve(f"milan_{PRESET}", variant=6)
    a = build_model(spec, target_dim=16)
    b = build_model(f"milan_{PRESET}", variant=6, target_dim=16)
    assert a.spec == b.spec == spec and a.variant == TABLE5[6]
