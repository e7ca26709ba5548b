"""ViT's API where users reach for it: `add_pooling_layer`, `head_mask`, `attention_mask`, unknown keywords refused,
the mask of the pre-training output and the positions of its predictions, and `_can_compile_fullgraph`."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import make_tiny_mimco_config
from transformers import AutoModel

from modeling_mimco import (
    MimCoBackbone,
    MimCoConfig,
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)


NUM_HEADS = 2


def _config(**overrides) -> MimCoConfig:
    return make_tiny_mimco_config(num_labels=3, out_features=["stage1", "stage2"], **overrides)


def _pixels(batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> MimCoModel:
    torch.manual_seed(0)
    return MimCoModel(_config()).eval()


# --- add_pooling_layer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_add_pooling_layer_false_returns_no_pooled_output(pooling, tmp_path):
    torch.manual_seed(0)
    pooled = MimCoModel(_config(pooling=pooling)).eval()
    pooled.save_pretrained(tmp_path)
    unpooled = AutoModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    assert isinstance(unpooled, MimCoModel) and not unpooled.add_pooling_layer
    assert unpooled.pooler_norm is None  # with mean pooling, its LayerNorm is not built (as ViT's pooler)
    pixel_values = _pixels()
    with torch.no_grad():
        expected, outputs = pooled(pixel_values), unpooled(pixel_values)
    assert outputs.pooler_output is None
    torch.testing.assert_close(outputs.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    assert "add_pooling_layer" in inspect.signature(MimCoModel.__init__).parameters


# --- head_mask ---------------------------------------------------------------------------------------------------


def _without_value_head(model: MimCoModel, head: int) -> MimCoModel:
    """A copy whose value projection of `head` is zero in every layer: what switching the head off computes."""
    copy = MimCoModel(model.config).eval()
    copy.load_state_dict(model.state_dict())
    width, head_dim = model.config.hidden_size, model.config.hidden_size // NUM_HEADS
    rows = slice(2 * width + head * head_dim, 2 * width + (head + 1) * head_dim)
    with torch.no_grad():
        for layer in copy.layers:
            layer.attention.qkv.weight[rows] = 0
            layer.attention.qkv.bias[rows] = 0
    return copy


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_head_mask_switches_a_head_off(model, attn_implementation):
    model.set_attn_implementation(attn_implementation)
    pixel_values = _pixels()
    head_mask = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        plain = model(pixel_values).last_hidden_state
        masked = model(pixel_values, head_mask=head_mask).last_hidden_state
        expected = _without_value_head(model, head=0)(pixel_values).last_hidden_state
        all_heads = model(pixel_values, head_mask=torch.ones(2, NUM_HEADS)).last_hidden_state
    assert (masked - plain).abs().max() > 1e-2  # it is not swallowed
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_heads, plain, rtol=0, atol=0)
    model.set_attn_implementation("eager")


def test_head_mask_multiplies_the_returned_attention_probabilities(model):
    pixel_values = _pixels()
    # per layer: head 1 off in the first layer only
    head_mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    with torch.no_grad():
        plain = model(pixel_values, output_attentions=True).attentions
        masked = model(pixel_values, head_mask=head_mask, output_attentions=True).attentions
    assert masked[0][:, 1].abs().max() == 0
    torch.testing.assert_close(masked[0][:, 0], plain[0][:, 0])
    assert masked[1][:, 1].abs().max() > 0


@pytest.mark.parametrize("model_class", [MimCoForImageClassification, MimCoBackbone, MimCoForPreTraining])
def test_head_mask_reaches_every_forward(model_class):
    torch.manual_seed(0)
    model = model_class(_config()).eval()
    pixel_values, kwargs = _pixels(), {}
    if model_class is MimCoForPreTraining:
        kwargs["bool_masked_pos"] = model.mask_generator.batch(2)

    def first_output(**extra):
        with torch.no_grad():
            return model(pixel_values, **kwargs, **extra, return_dict=False)[0]

    first = first_output()
    first = first[0] if isinstance(first, tuple) else first
    masked = first_output(head_mask=torch.tensor([1.0, 0.0]))
    masked = masked[0] if isinstance(masked, tuple) else masked
    assert (first - masked).abs().max() > 1e-4


def test_head_mask_of_another_shape_is_refused(model):
    with pytest.raises(ValueError, match="head_mask"):
        model(_pixels(), head_mask=torch.ones(3))


# --- attention_mask ----------------------------------------------------------------------------------------------


def test_attention_mask_hides_tokens_from_the_others(model):
    pixel_values = _pixels()
    attention_mask = torch.ones(2, 1 + 64, dtype=torch.long)
    attention_mask[:, 1:17] = 0  # the first two rows of patches
    changed = pixel_values.clone()
    changed[:, :, :8] = torch.randn(2, 3, 8, 32)  # only those patches' pixels
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = (
                model(pixel_values, attention_mask=attention_mask).last_hidden_state,
                model(changed, attention_mask=attention_mask).last_hidden_state,
                model(pixel_values).last_hidden_state,
            )
    model.set_attn_implementation("eager")
    masked, masked_changed, plain = outputs["eager"]
    torch.testing.assert_close(outputs["sdpa"][0], masked, rtol=1e-5, atol=1e-5)
    kept = [0, *range(17, 65)]  # CLS and the patches the others still see
    assert (masked[:, kept] - plain[:, kept]).abs().max() > 1e-3
    torch.testing.assert_close(masked_changed[:, kept], masked[:, kept], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask"):
        model(pixel_values, attention_mask=torch.ones(2, 64))

    # mean pooling averages the patches that the mask keeps
    torch.manual_seed(0)
    mean_pooled = MimCoModel(_config(pooling="mean")).eval()
    with torch.no_grad():
        pooled = mean_pooled(pixel_values, attention_mask=attention_mask).pooler_output
        pooled_changed = mean_pooled(changed, attention_mask=attention_mask).pooler_output
    torch.testing.assert_close(pooled_changed, pooled, rtol=1e-5, atol=1e-5)


# --- unknown keywords --------------------------------------------------------------------------------------------


def _every_forward():
    config = _config()
    contrastive = MimCoContrastiveConfig(
        backbone_config=_config(position_embedding_type="sincos"), projector_hidden_size=32, projection_size=16
    )
    pixel_values = _pixels(4)
    return [
        (MimCoModel(config), {"pixel_values": pixel_values}),
        (MimCoForImageClassification(config), {"pixel_values": pixel_values}),
        (MimCoBackbone(config), {"pixel_values": pixel_values}),
        (MimCoForPreTraining(config), {"pixel_values": pixel_values}),
        (
            MimCoForContrastivePreTraining(contrastive),
            {"pixel_values_1": pixel_values, "pixel_values_2": pixel_values},
        ),
    ]


@pytest.mark.parametrize("keyword", ["head_masks", "num_items_in_batch", "input_ids"])
def test_unknown_keywords_are_refused_naming_them(keyword):
    for model, inputs in _every_forward():
        with pytest.raises(TypeError, match=keyword):
            model.eval()(**inputs, **{keyword: None})
        # what transformers' generic callers pass still works
        model(**inputs, return_dict=False)
        # no `**kwargs`: the Trainer passes no loss keywords (`num_items_in_batch`) that nothing would read
        parameters = inspect.signature(type(model).forward).parameters.values()
        assert not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)


def test_backbone_takes_what_decoders_pass():
    torch.manual_seed(0)
    backbone = MimCoBackbone(_config()).eval()
    pixel_values = _pixels()
    with torch.no_grad():
        expected = backbone(pixel_values).feature_maps
        outputs = backbone.forward_with_filtered_kwargs(
            pixel_values, output_hidden_states=False, output_attentions=False, interpolate_pos_encoding=True
        )
    for feature_map, reference in zip(outputs.feature_maps, expected):
        torch.testing.assert_close(feature_map, reference, rtol=0, atol=0)


# --- the pre-training output -------------------------------------------------------------------------------------


def test_pretraining_output_returns_the_mask_and_the_positions_of_its_predictions():
    torch.manual_seed(0)
    model = MimCoForPreTraining(_config()).eval()
    pixel_values = _pixels(3)
    with torch.no_grad():
        drawn = model(pixel_values)
        given_mask = model.mask_generator.batch(3)
        given = model(pixel_values, bool_masked_pos=given_mask)
    assert drawn.bool_masked_pos.shape == (3, 64) and drawn.bool_masked_pos.dtype == torch.bool
    assert torch.equal(given.bool_masked_pos, given_mask)

    for outputs in (drawn, given):
        positions = outputs.masked_positions
        num_masked = model.mask_generator.num_masked
        assert positions.shape == (3, num_masked)
        assert torch.equal(outputs.bool_masked_pos.nonzero()[:, 1].view(3, num_masked), positions)
        predictions = outputs.patch_predictions.unflatten(0, positions.shape)
        with torch.no_grad():
            for image in range(3):
                tokens = outputs.last_hidden_state[image, 1 + positions[image]]
                torch.testing.assert_close(predictions[image], model.patch_head(tokens))

    # masks of varying counts: no `masked_positions`; the rows follow `bool_masked_pos.nonzero()`
    varying = torch.zeros(2, 64, dtype=torch.bool)
    varying[0, [1, 5, 9]] = True
    varying[1, [0, 63]] = True
    with torch.no_grad():
        outputs = model(pixel_values[:2], bool_masked_pos=varying)
    assert outputs.masked_positions is None and torch.equal(outputs.bool_masked_pos, varying)
    rows = varying.nonzero()
    with torch.no_grad():
        expected = model.patch_head(outputs.last_hidden_state[rows[:, 0], 1 + rows[:, 1]])
    torch.testing.assert_close(outputs.patch_predictions, expected)

    # the tuple form keeps its earlier positions; the new fields come last
    as_tuple = model(pixel_values, bool_masked_pos=given_mask, return_dict=False)
    assert torch.equal(as_tuple[-2], given_mask) and torch.equal(as_tuple[-1], given.masked_positions)


# --- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [MimCoModel, MimCoForImageClassification, MimCoBackbone, MimCoForPreTraining])
def test_can_compile_fullgraph_holds(model_class):
    assert model_class._can_compile_fullgraph
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = model_class(_config()).train()
    inputs = {"pixel_values": _pixels()}
    if model_class is MimCoForImageClassification:
        inputs["labels"] = torch.tensor([0, 2])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    outputs = compiled(**inputs, head_mask=torch.tensor([1.0, 0.5]))
    first = outputs[0]
    (first[0] if isinstance(first, tuple) else first).sum().backward()
