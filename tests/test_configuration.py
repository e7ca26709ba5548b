"""MimCoConfig validation, serialisation with a teacher sub-config, and MimCoModel's input checks."""

import json

import pytest
import torch
from conftest import make_tiny_vit_teacher_config
from transformers import BertConfig, Dinov2Config, ResNetConfig

from modeling_mimco import MimCoConfig, MimCoContrastiveConfig, MimCoModel


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
        ({"patch_size": 5}, "patch_size"),
        ({"image_size": 30}, "image_size"),
        ({"mask_ratio": 0}, "mask_ratio"),
        ({"mask_ratio": 1}, "mask_ratio"),
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"mask_ratio": -0.1}, "mask_ratio"),
        ({"mask_patch_size": 6}, "mask_patch_size"),
        ({"mask_patch_size": 12}, "mask_patch_size"),
        ({"mask_strategy": "grid"}, "mask_strategy"),
        ({"patch_loss_type": "l2"}, "patch_loss_type"),
        ({"image_loss_type": "mse"}, "image_loss_type"),
        ({"patch_negatives": "queue"}, "patch_negatives"),
        ({"pooling": "max"}, "pooling"),
        ({"position_embedding_type": "rope"}, "position_embedding_type"),
        ({"patch_loss_weight": -1.0}, "patch_loss_weight"),
        ({"image_loss_weight": -0.5}, "image_loss_weight"),
        ({"patch_loss_weight": 0.0, "image_loss_weight": 0.0}, "patch_loss_weight"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.5, 0.5, 0.5]}, "image_std"),
        ({"teacher_image_mean": [0.5]}, "teacher_image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
        ({"patch_temperature": 0.0}, "patch_temperature"),
        ({"head_hidden_size": -1}, "head_hidden_size"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(tiny_mimco_config, overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_mimco_config(**overrides)


def test_both_loss_weights_zero_names_both(tiny_mimco_config):
    with pytest.raises(ValueError, match="patch_loss_weight.*image_loss_weight"):
        tiny_mimco_config(patch_loss_weight=0, image_loss_weight=0)
    # a single zero weight is an ablation, not an error
    assert tiny_mimco_config(patch_loss_weight=0).image_loss_weight == 1.0
    assert tiny_mimco_config(image_loss_weight=0).patch_loss_weight == 1.0


@pytest.mark.parametrize(
    "teacher_config, field",
    [
        (BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64), "patch_size"),
        (ResNetConfig(), "hidden_size"),
    ],
)
def test_teacher_config_must_be_vit_like(tiny_mimco_config, teacher_config, field):
    with pytest.raises(ValueError, match=f"teacher_config.*`{field}`"):
        tiny_mimco_config(teacher_config=teacher_config)


def test_validate_after_assignment_raises_value_error(tiny_mimco_config):
    config = tiny_mimco_config()
    config.patch_negatives = "everything"
    with pytest.raises(ValueError, match="patch_negatives"):
        config.validate()


def test_defaults_follow_the_student(tiny_mimco_config):
    config = tiny_mimco_config(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    assert config.teacher_image_mean == [0.1, 0.2, 0.3]
    assert config.teacher_image_std == [0.4, 0.5, 0.6]
    teacher = config.get_teacher_config()
    assert isinstance(teacher, MimCoConfig)
    for name in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(teacher, name) == getattr(config, name)


def _teacher_configs():
    return {
        "mimco": MimCoConfig(
            image_size=32,
            patch_size=4,
            mask_patch_size=8,
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=3,
            intermediate_size=96,
            position_embedding_type="sincos",
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.25, 0.25, 0.25],
        ),
        "vit": make_tiny_vit_teacher_config(),
        "dinov2": Dinov2Config(
            image_size=16, patch_size=2, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2
        ),
    }


def _without_version(values: dict) -> dict:
    return {key: value for key, value in values.items() if key != "transformers_version"}


def _assert_same_teacher(loaded, original):
    assert type(loaded) is type(original)
    assert _without_version(loaded.to_dict()) == _without_version(original.to_dict())
    for name in ("hidden_size", "patch_size", "image_size", "num_hidden_layers"):
        assert getattr(loaded, name) == getattr(original, name)


@pytest.mark.parametrize("teacher_kind", ["mimco", "vit", "dinov2"])
def test_dict_round_trip_with_teacher_config(tiny_mimco_config, teacher_kind):
    teacher = _teacher_configs()[teacher_kind]
    config = tiny_mimco_config(teacher_config=teacher, teacher_image_mean=[0.5, 0.4, 0.3], mask_ratio=0.45)
    as_dict = config.to_dict()
    assert isinstance(as_dict["teacher_config"], dict)
    assert as_dict["teacher_config"]["model_type"] == teacher.model_type
    json.dumps(as_dict)  # serialisable

    loaded = MimCoConfig.from_dict(as_dict)
    _assert_same_teacher(loaded.teacher_config, teacher)
    assert loaded.teacher_image_mean == [0.5, 0.4, 0.3]
    assert loaded.mask_ratio == 0.45
    assert loaded.to_dict() == as_dict


@pytest.mark.parametrize("teacher_kind", ["mimco", "vit", "dinov2"])
def test_save_pretrained_round_trip_with_teacher_config(tmp_path, tiny_mimco_config, teacher_kind):
    teacher = _teacher_configs()[teacher_kind]
    config = tiny_mimco_config(
        teacher_config=teacher, teacher_image_std=[0.2, 0.3, 0.4], patch_negatives="batch", head_hidden_size=0
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["teacher_config"]["model_type"] == teacher.model_type

    loaded = MimCoConfig.from_pretrained(tmp_path)
    _assert_same_teacher(loaded.teacher_config, teacher)
    assert loaded.get_teacher_config() is loaded.teacher_config
    original, reloaded = config.to_dict(), loaded.to_dict()
    for key in original:
        if key not in ("transformers_version", "auto_map", "teacher_config"):
            assert reloaded[key] == original[key], key


def test_teacher_config_without_model_type_is_a_mimco_config(tiny_mimco_config):
    teacher = _teacher_configs()["mimco"].to_dict()
    del teacher["model_type"]
    config = tiny_mimco_config(teacher_config=teacher)
    assert isinstance(config.teacher_config, MimCoConfig)
    assert config.teacher_config.hidden_size == 48


def test_unknown_teacher_model_type_raises(tiny_mimco_config):
    with pytest.raises(ValueError, match="teacher_config"):
        tiny_mimco_config(teacher_config={"model_type": "no-such-backbone", "hidden_size": 8, "patch_size": 4})


def test_model_rejects_wrong_channel_count(tiny_mimco_config):
    model = MimCoModel(tiny_mimco_config()).eval()
    with pytest.raises(ValueError, match="1 channels.*`num_channels` = 3"):
        model(torch.randn(1, 1, 32, 32))


def test_model_rejects_wrong_image_size_without_interpolation(tiny_mimco_config):
    model = MimCoModel(tiny_mimco_config()).eval()
    with pytest.raises(ValueError, match=r"\(48x48\).*`image_size` \(32x32\).*interpolate_pos_encoding=True"):
        model(torch.randn(1, 3, 48, 48))
    # the same input is accepted when asked to interpolate, with one token per patch
    output = model(torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True)
    assert output.last_hidden_state.shape == (1, 1 + 12 * 12, 32)
    with pytest.raises(ValueError, match="divisible by `patch_size`"):
        model(torch.randn(1, 3, 30, 30), interpolate_pos_encoding=True)


@pytest.mark.parametrize("field", ["image_mean", "image_std", "teacher_image_mean", "teacher_image_std"])
@pytest.mark.parametrize("value", ["0.5", [0.5, "0.5", 0.5], {"red": 0.5}, [True, 0.5, 0.5], True])
def test_pixel_statistics_that_are_not_numbers_raise_value_error_naming_the_field(tiny_mimco_config, field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_mimco_config(**{field: value})
    # also when assigned after construction, where `validate()` is the only check
    config = tiny_mimco_config()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"`{field}`"):
        config.validate()


def test_a_single_pixel_statistic_stands_for_every_channel(tiny_mimco_config):
    # as in transformers' image processors (`image_std: float | list[float]`)
    config = tiny_mimco_config(image_mean=0.5, image_std=0.25)
    assert config.image_mean == [0.5, 0.5, 0.5] and config.image_std == [0.25, 0.25, 0.25]
    assert config.teacher_image_std == [0.25, 0.25, 0.25]
    assert tiny_mimco_config(num_channels=1, image_mean=0, image_std=2).image_std == [2.0]
    with pytest.raises(ValueError, match="`image_std` must be positive"):
        tiny_mimco_config(image_std=0.0)
    # a number assigned later (as transformers' tests do to every `*_std` field) saves and loads
    config.image_std = 1e-10
    config.validate()
    assert MimCoConfig.from_dict(config.to_dict()).image_std == [1e-10] * 3


def test_teacher_and_backbone_are_declared_sub_configs(tiny_mimco_config):
    vit = make_tiny_vit_teacher_config()
    config = tiny_mimco_config(teacher_config=vit)
    assert set(MimCoConfig.sub_configs) == {"teacher_config"}
    config._attn_implementation = "eager"
    assert vit._attn_implementation == "eager"

    contrastive = MimCoContrastiveConfig(backbone_config=tiny_mimco_config())
    assert MimCoContrastiveConfig.sub_configs == {"backbone_config": MimCoConfig}
    contrastive._attn_implementation = "eager"
    assert contrastive.backbone_config._attn_implementation == "eager"
    contrastive._attn_implementation = {"": "sdpa", "backbone_config": "flex_attention"}
    assert contrastive.backbone_config._attn_implementation == "flex_attention"


def test_default_teacher_config_carries_the_students_masking_fields(tiny_mimco_config):
    config = tiny_mimco_config(image_size=24, mask_patch_size=8, mask_ratio=0.4, mask_strategy="block")
    teacher = config.get_teacher_config()
    assert (teacher.image_size, teacher.mask_patch_size, teacher.mask_ratio) == (24, 8, 0.4)
    assert teacher.mask_strategy == "block"


def test_a_backbone_config_becomes_the_backbone_of_a_stage_1_config(tmp_path, tiny_mimco_config):
    tiny_mimco_config(hidden_size=48, num_attention_heads=3).save_pretrained(tmp_path)
    config = MimCoContrastiveConfig.from_pretrained(tmp_path, projection_size=8)
    assert config.backbone_config.hidden_size == 48 and config.projection_size == 8
