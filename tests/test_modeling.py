"""Backbone and model-class tests: numerical parity with timm, attention kernels, gradient checkpointing,
save/load round trips and the Auto classes."""

import math

import pytest
import timm
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from modeling_mimco import (
    MimCoConfig,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)
from modeling_mimco.convert import mimco_to_timm_state_dict, timm_to_mimco_state_dict


def tiny_config(**overrides) -> MimCoConfig:
    values = dict(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        head_hidden_size=32,
    )
    values.update(overrides)
    return MimCoConfig(**values)


def tiny_timm_vit(global_pool: str = "token") -> torch.nn.Module:
    return timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=0,
        global_pool=global_pool,
        dynamic_img_size=True,
    ).eval()


def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Replaces every parameter by noise, so that no zero bias or unit norm can hide a mismatch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- parity with timm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_last_hidden_state_matches_timm(pixel_values, attn_implementation):
    timm_model = tiny_timm_vit()
    randomise_(timm_model)
    model = MimCoModel(tiny_config(intermediate_size=128, attn_implementation=attn_implementation)).eval()
    missing, unexpected = model.load_state_dict(timm_to_mimco_state_dict(timm_model.state_dict()), strict=False)
    assert missing == ["embeddings.mask_token"] and unexpected == []

    with torch.no_grad():
        expected = timm_model.forward_features(pixel_values)
        actual = model(pixel_values).last_hidden_state
        assert (actual - expected).abs().max() <= 1e-5

        # another resolution, which resamples the position embeddings on both sides
        larger = torch.randn(2, 3, 48, 40)
        expected = timm_model.forward_features(larger)
        actual = model(larger, interpolate_pos_encoding=True).last_hidden_state
        assert actual.shape == (2, 1 + 12 * 10, 64)
        assert (actual - expected).abs().max() <= 1e-5


def test_mean_pooling_matches_timm_avg_pool(pixel_values):
    timm_model = tiny_timm_vit(global_pool="avg")
    randomise_(timm_model)
    model = MimCoModel(tiny_config(pooling="mean")).eval()
    state_dict = timm_to_mimco_state_dict(timm_model.state_dict())
    # timm's average-pooled ViT has no final norm on the tokens; ours keeps one for the token outputs
    model.load_state_dict(state_dict, strict=False)
    with torch.no_grad():
        expected = timm_model(pixel_values)
        actual = model(pixel_values).pooler_output
    assert (actual - expected).abs().max() <= 1e-5


def test_timm_round_trip_is_exact():
    model = MimCoModel(tiny_config())
    randomise_(model)
    timm_state_dict = mimco_to_timm_state_dict(model.state_dict())
    timm_model = tiny_timm_vit()
    timm_model.load_state_dict(timm_state_dict, strict=True)
    back = timm_to_mimco_state_dict(timm_state_dict)
    for name, tensor in model.state_dict().items():
        if name != "embeddings.mask_token":
            assert torch.equal(back[name], tensor), name


def test_sincos_position_embeddings_are_fixed_and_match_timm_layout():
    model = MimCoModel(tiny_config(position_embedding_type="sincos"))
    positions = model.embeddings.position_embeddings
    assert not positions.requires_grad
    assert torch.equal(positions[0, 0], torch.zeros(64))
    # every patch position is distinct and bounded like sines and cosines
    assert positions[0, 1:].abs().max() <= 1.0
    assert torch.unique(positions[0, 1:], dim=0).shape[0] == 64
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert "embeddings.position_embeddings" not in trainable


# --- attention kernels and checkpointing -------------------------------------------------------------------------


def test_eager_and_sdpa_agree(pixel_values):
    torch.manual_seed(0)
    eager = MimCoModel(tiny_config(attn_implementation="eager")).eval()
    sdpa = MimCoModel(tiny_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        difference = eager(pixel_values).last_hidden_state - sdpa(pixel_values).last_hidden_state
    assert difference.abs().max() <= 1e-5


def test_output_attentions_and_hidden_states(pixel_values):
    model = MimCoModel(tiny_config()).eval()
    outputs = model(pixel_values, output_attentions=True, output_hidden_states=True)
    assert len(outputs.hidden_states) == 3
    assert len(outputs.attentions) == 2
    assert outputs.attentions[0].shape == (2, 4, 65, 65)
    assert torch.allclose(outputs.attentions[0].sum(-1), torch.ones(2, 4, 65), atol=1e-5)
    # the last hidden state is the final layer's output after the final norm
    assert torch.allclose(model.layernorm(outputs.hidden_states[-1]), outputs.last_hidden_state, atol=1e-6)
    as_tuple = model(pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.allclose(as_tuple[0], outputs.last_hidden_state, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(pixel_values):
    torch.manual_seed(0)
    config = tiny_config()
    plain = MimCoForPreTraining(config)
    checkpointed = MimCoForPreTraining(config)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.mimco.layers[0].gradient_checkpointing
    bool_masked_pos = plain.mask_generator.batch(2)

    for model in (plain, checkpointed):
        model.train()
        model(pixel_values, bool_masked_pos=bool_masked_pos).loss.backward()
    plain_grads = dict(plain.named_parameters())
    for name, parameter in checkpointed.named_parameters():
        if parameter.grad is None:
            assert plain_grads[name].grad is None, name
            continue
        assert torch.allclose(parameter.grad, plain_grads[name].grad, atol=1e-6), name


def test_masked_positions_see_the_mask_token(pixel_values):
    model = MimCoModel(tiny_config()).eval()
    bool_masked_pos = torch.zeros(2, 64, dtype=torch.bool)
    bool_masked_pos[:, :10] = True
    embeddings = model.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
    expected = model.embeddings.mask_token[0, 0] + model.embeddings.position_embeddings[0, 1:11]
    assert torch.allclose(embeddings[0, 1:11], expected)
    # masking changes the output; another image with the same visible patches gives the same masked-token input
    other = pixel_values.clone()
    other[:, :, :4, :] = 0.0  # rows of the first 8 patches, all masked
    assert torch.allclose(
        model.embeddings(other, bool_masked_pos=bool_masked_pos)[:, 1:9],
        embeddings[:, 1:9],
    )
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(pixel_values, bool_masked_pos=torch.zeros(2, 10, dtype=torch.bool))


def test_drop_path_is_active_only_in_training(pixel_values):
    model = MimCoModel(tiny_config(drop_path_rate=0.5))
    assert model.layers[0].drop_path.drop_prob == 0.0 and model.layers[-1].drop_path.drop_prob == 0.5
    model.eval()
    with torch.no_grad():
        first, second = model(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state
    assert torch.equal(first, second)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = [model(pixel_values).last_hidden_state for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


# --- save / load --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_class, config_overrides",
    [
        (MimCoModel, {}),
        (MimCoModel, {"pooling": "mean", "position_embedding_type": "sincos"}),
        (MimCoForPreTraining, {}),
        (MimCoForPreTraining, {"head_hidden_size": 0, "image_loss_weight": 0.0}),
        (MimCoForImageClassification, {"num_labels": 5}),
    ],
)
def test_save_load_round_trip(tmp_path, pixel_values, model_class, config_overrides):
    torch.manual_seed(0)
    model = model_class(tiny_config(**config_overrides)).eval()
    randomise_(model)  # weights that no initialisation could reproduce
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = model_class.from_pretrained(tmp_path).eval()

    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    inputs = {"pixel_values": pixel_values}
    if model_class is MimCoForPreTraining:
        inputs["bool_masked_pos"] = model.mask_generator.batch(2)
    with torch.no_grad():
        expected, actual = model(**inputs), loaded(**inputs)
    for key in expected.keys():
        if isinstance(expected[key], torch.Tensor):
            assert torch.equal(expected[key], actual[key]), key


def test_pretraining_checkpoint_loads_student_weights_only(tmp_path, caplog):
    torch.manual_seed(0)
    pretraining = MimCoForPreTraining(tiny_config())
    randomise_(pretraining)
    pretraining.save_pretrained(tmp_path)
    student = {name: tensor for name, tensor in pretraining.mimco.state_dict().items()}

    backbone = MimCoModel.from_pretrained(tmp_path)
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, student[name]), name

    classifier = MimCoForImageClassification.from_pretrained(tmp_path, num_labels=3)
    for name, tensor in classifier.mimco.state_dict().items():
        assert torch.equal(tensor, student[name]), name
    assert classifier.classifier.out_features == 3

    # the teacher and the heads are skipped without a warning about unexpected weights
    with caplog.at_level("WARNING"):
        MimCoModel.from_pretrained(tmp_path)
    assert "teacher" not in caplog.text and "UNEXPECTED" not in caplog.text.upper()


def test_image_classification_loss_follows_problem_type(pixel_values):
    model = MimCoForImageClassification(tiny_config(num_labels=3))
    outputs = model(pixel_values, labels=torch.tensor([0, 2]))
    expected = torch.nn.functional.cross_entropy(outputs.logits, torch.tensor([0, 2]))
    assert torch.allclose(outputs.loss, expected)

    multi_label = MimCoForImageClassification(tiny_config(num_labels=3, problem_type="multi_label_classification"))
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    outputs = multi_label(pixel_values, labels=targets)
    assert torch.allclose(outputs.loss, torch.nn.functional.binary_cross_entropy_with_logits(outputs.logits, targets))


def test_auto_classes_resolve_mimco(tmp_path):
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("mimco", hidden_size=32, num_attention_heads=2), MimCoConfig)
    assert type(AutoModel.from_config(config)) is MimCoModel
    assert type(AutoModelForPreTraining.from_config(config)) is MimCoForPreTraining
    assert type(AutoModelForImageClassification.from_config(config)) is MimCoForImageClassification

    MimCoForPreTraining(config).save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is MimCoModel
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path)) is MimCoForImageClassification


def test_sincos_table_follows_the_moco_v3_layout():
    """Channel k < D/4 holds sin(row * w_k), then cos(row * w_k), then sin/cos of the column (MoCo v3's order)."""
    hidden_size, grid_size = 16, 3
    config = tiny_config(
        hidden_size=hidden_size,
        num_attention_heads=2,
        image_size=12,
        mask_patch_size=4,
        position_embedding_type="sincos",
    )
    model = MimCoModel(config)
    table = model.embeddings.position_embeddings[0]
    quarter = hidden_size // 4
    for row in range(grid_size):
        for col in range(grid_size):
            token = 1 + row * grid_size + col
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                expected = [
                    math.sin(row * omega),
                    math.cos(row * omega),
                    math.sin(col * omega),
                    math.cos(col * omega),
                ]
                actual = [table[token, part * quarter + k].item() for part in range(4)]
                assert actual == pytest.approx(expected, abs=1e-6), (row, col, k)


def test_untrained_parameters_stay_frozen_after_from_pretrained(tmp_path):
    from modeling_mimco import MimCoContrastiveConfig, MimCoForContrastivePreTraining

    config = MimCoContrastiveConfig(
        backbone_config=tiny_config(position_embedding_type="sincos"),
        projector_hidden_size=32,
        projection_size=8,
        freeze_patch_embeddings=True,
    )
    MimCoForContrastivePreTraining(config).save_pretrained(tmp_path / "stage1")
    loaded = MimCoForContrastivePreTraining.from_pretrained(tmp_path / "stage1")
    trainable = {name for name, parameter in loaded.named_parameters() if parameter.requires_grad}
    assert trainable, "the base branch must stay trainable"
    assert not any(name.startswith(("momentum_encoder.", "momentum_projector.")) for name in trainable)
    assert "base_encoder.embeddings.position_embeddings" not in trainable
    assert "base_encoder.embeddings.patch_embeddings.projection.weight" not in trainable
    assert "base_encoder.layers.0.attention.qkv.weight" in trainable

    MimCoModel(tiny_config(position_embedding_type="sincos")).save_pretrained(tmp_path / "backbone")
    for model_class in (MimCoModel, MimCoForImageClassification):
        loaded = model_class.from_pretrained(tmp_path / "backbone")
        positions = [p for name, p in loaded.named_parameters() if name.endswith("position_embeddings")]
        assert len(positions) == 1 and not positions[0].requires_grad


@pytest.mark.slow
def test_attention_implementation_can_be_switched_and_flex_agrees(pixel_values):
    """Switching kernels on a built model goes through transformers' attention interface; flex attention (forward
    only on CPUs) gives the eager result."""
    model = MimCoModel(tiny_config(attn_implementation="eager")).eval()
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state
        model.set_attn_implementation("flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        actual = model(pixel_values).last_hidden_state
    assert (actual - expected).abs().max() <= 1e-5
