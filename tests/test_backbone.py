"""`MimCoBackbone`: the encoder of any MimCo folder as a transformers backbone, its feature maps and pyramid, and the
UperNet segmentation model built on it. transformers' own backbone tests run in `test_transformers_common.py`."""

import json

import pytest
import torch
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from modeling_mimco import (
    MimCoBackbone,
    MimCoConfig,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)


pytestmark = pytest.mark.usefixtures("one_thread")

# 32 px, patch 4: an 8x8 patch grid, four blocks of width 32
TINY = dict(
    image_size=32,
    patch_size=4,
    mask_patch_size=8,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    head_hidden_size=16,
)
FOUR_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def encoder_of(model) -> MimCoModel:
    """The `MimCoModel` inside any MimCo class."""
    return model if isinstance(model, MimCoModel) else model.mimco


def save_folder(kind: str, folder, **config_fields) -> dict[str, torch.Tensor]:
    """Saves a seeded MimCo model of `kind` to `folder`; returns its encoder's weights."""
    torch.manual_seed(0)
    config = MimCoConfig(**TINY, **config_fields)
    model = {
        "model": MimCoModel,
        "classifier": MimCoForImageClassification,
        "pretraining": MimCoForPreTraining,
    }[kind](config)
    model.save_pretrained(folder)
    return {name: tensor.clone() for name, tensor in encoder_of(model).state_dict().items()}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("kind", ["model", "classifier", "pretraining"])
def test_loads_the_encoder_of_every_mimco_folder(tmp_path, kind, pooling):
    fields = {"num_labels": 3} if kind == "classifier" else {}
    encoder_weights = save_folder(kind, tmp_path, pooling=pooling, **fields)

    backbone, info = MimCoBackbone.from_pretrained(tmp_path, output_loading_info=True)
    # a pre-training folder's teacher and heads and a classifier's head are skipped without a word
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = backbone.mimco.state_dict()
    assert state.keys() == encoder_weights.keys()
    for name, tensor in encoder_weights.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)

    # with the pyramid, its layers are the only weights that the folder lacks
    pyramid, info = MimCoBackbone.from_pretrained(
        tmp_path, output_loading_info=True, out_features=FOUR_STAGES, use_feature_pyramid=True
    )
    assert info["missing_keys"] == {name for name in pyramid.state_dict() if name.startswith("pyramid.")}
    assert info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(pyramid.mimco.state_dict(), backbone.mimco.state_dict(), rtol=0, atol=0)


def test_auto_backbone_builds_mimco_and_the_class_loads_its_folders(tmp_path):
    """`AutoBackbone.from_config` builds a `MimCoBackbone`; a local folder loads with `MimCoBackbone.from_pretrained`
    (transformers 5.25's `AutoBackbone.from_pretrained` looks every path up on the Hub first, so it loads Hub
    repositories but no local folder, of any model)."""
    encoder_weights = save_folder("pretraining", tmp_path)
    backbone = MimCoBackbone.from_pretrained(tmp_path, out_indices=[2, -1])
    assert backbone.out_features == ["stage2", "stage4"] and backbone.channels == [32, 32]
    torch.testing.assert_close(
        backbone.mimco.embeddings.cls_token, encoder_weights["embeddings.cls_token"], rtol=0, atol=0
    )
    assert type(AutoBackbone.from_config(MimCoConfig(**TINY))) is MimCoBackbone


def test_feature_maps_are_the_encoders_patch_tokens():
    """At `image_size` the last stage is `MimCoModel`'s output without the CLS token, as a map; at another size,
    its output with resampled position embeddings."""
    torch.manual_seed(0)
    backbone = MimCoBackbone(MimCoConfig(**TINY, out_features=["stem", "stage4"])).eval()
    encoder = backbone.mimco
    for height, width in [(32, 32), (48, 64)]:
        pixel_values = torch.randn(2, 3, height, width)
        with torch.no_grad():
            outputs = backbone(pixel_values, output_hidden_states=True)
            tokens = encoder(pixel_values, interpolate_pos_encoding=True).last_hidden_state
        grid = (height // 4, width // 4)
        assert [tuple(f.shape) for f in outputs.feature_maps] == [(2, 32, *grid)] * 2
        expected = tokens[:, 1:].transpose(1, 2).reshape(2, 32, *grid)
        torch.testing.assert_close(outputs.feature_maps[1], expected)
        # the stem: the normalised embeddings, patch (i, j) at [:, :, i, j]
        stem = encoder.layernorm(outputs.hidden_states[0])
        torch.testing.assert_close(outputs.feature_maps[0][:, :, 1, 2], stem[:, 1 + 1 * grid[1] + 2])
        assert len(outputs.hidden_states) == 5 and outputs.attentions is None


def test_feature_pyramid_is_4x_2x_1x_half_of_the_patch_grid():
    torch.manual_seed(0)
    backbone = MimCoBackbone(MimCoConfig(**TINY, out_features=FOUR_STAGES, use_feature_pyramid=True)).eval()
    plain = MimCoBackbone(MimCoConfig(**TINY, out_features=FOUR_STAGES)).eval()
    plain.mimco.load_state_dict(backbone.mimco.state_dict())
    assert backbone.channels == [32] * 4
    pixel_values = torch.randn(2, 3, 32, 64)  # an 8x16 patch grid
    with torch.no_grad():
        feature_maps = backbone(pixel_values).feature_maps
        plain_maps = plain(pixel_values).feature_maps
    assert [tuple(f.shape) for f in feature_maps] == [(2, 32, 32, 64), (2, 32, 16, 32), (2, 32, 8, 16), (2, 32, 4, 8)]
    assert [tuple(f.shape) for f in plain_maps] == [(2, 32, 8, 16)] * 4
    torch.testing.assert_close(feature_maps[2], plain_maps[2], rtol=0, atol=0)  # the 1x level is the stage itself
    torch.testing.assert_close(feature_maps[3], torch.nn.functional.max_pool2d(plain_maps[3], 2), rtol=0, atol=0)


@pytest.mark.parametrize("out_features", [None, ["stage4"], ["stage2", "stage3", "stage4"]])
def test_feature_pyramid_needs_exactly_four_stages(out_features):
    with pytest.raises(ValueError, match=r"`use_feature_pyramid` needs exactly 4 `out_features`"):
        MimCoConfig(**TINY, out_features=out_features, use_feature_pyramid=True)
    # also when the stages change after the config was checked
    config = MimCoConfig(**TINY, out_features=FOUR_STAGES, use_feature_pyramid=True)
    config.out_features = out_features
    with pytest.raises(ValueError, match=r"exactly 4 `out_features`"):
        MimCoBackbone(config)
    with pytest.raises(ValueError, match="reshape_hidden_states"):
        MimCoConfig(**TINY, out_features=FOUR_STAGES, use_feature_pyramid=True, reshape_hidden_states=False)


def test_backbone_fields_round_trip(tmp_path):
    config = MimCoConfig(
        **TINY, out_indices=[0, 2, 3, -1], use_feature_pyramid=True, apply_layernorm=False, reshape_hidden_states=True
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["out_features"] == ["stem", "stage2", "stage3", "stage4"] and saved["out_indices"] == [0, 2, 3, -1]
    loaded = MimCoConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert (loaded.out_features, loaded.out_indices) == (config.out_features, config.out_indices)
    assert (loaded.use_feature_pyramid, loaded.apply_layernorm, loaded.reshape_hidden_states) == (True, False, True)
    assert loaded.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    # a folder written before the backbone fields existed: the last stage, no pyramid
    legacy = {k: v for k, v in saved.items() if k not in ("out_features", "out_indices", "stage_names")}
    legacy.pop("use_feature_pyramid")
    assert MimCoConfig.from_dict(legacy).out_features == ["stage4"]


def test_frozen_parameters_are_those_the_forward_never_uses():
    """A backbone never masks, pools or (without `apply_layernorm`) normalises: those weights do not train, so DDP
    without `find_unused_parameters` does not wait for their gradients."""
    backbone = MimCoBackbone(MimCoConfig(**TINY, pooling="mean", apply_layernorm=False)).train()
    backbone(torch.randn(2, 3, 32, 32)).feature_maps[0].sum().backward()
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    without_grad = {name for name, p in backbone.named_parameters() if p.requires_grad and p.grad is None}
    assert not without_grad
    assert "mimco.embeddings.mask_token" not in trainable and "mimco.layernorm.weight" not in trainable
    assert "mimco.pooler_norm.weight" not in trainable


def test_upernet_segments_with_a_mimco_pyramid(tmp_path):
    """The colleague's use: `UperNetConfig(backbone_config=MimCoConfig(..., use_feature_pyramid=True))`."""
    backbone_config = MimCoConfig(
        **{**TINY, "num_hidden_layers": 12},
        out_features=["stage3", "stage6", "stage9", "stage12"],
        use_feature_pyramid=True,
    )
    config = UperNetConfig(
        backbone_config=backbone_config, hidden_size=16, auxiliary_channels=8, num_labels=5, use_auxiliary_head=True
    )
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config)
    assert type(model.backbone) is MimCoBackbone and model.backbone.channels == [32] * 4
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    outputs = model(pixel_values, labels=labels)  # 64 px: not the backbone's 32, positions resampled
    assert outputs.logits.shape == (2, 5, 64, 64) and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.backbone.pyramid.upsample_4x[0].weight.grad is not None

    model.eval().save_pretrained(tmp_path)
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.backbone_config.use_feature_pyramid
    assert reloaded.config.backbone_config.out_features == ["stage3", "stage6", "stage9", "stage12"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits)
