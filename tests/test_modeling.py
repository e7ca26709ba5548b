"""Backbone and model-class tests: numerical parity with timm, attention kernels, gradient checkpointing,
save/load round trips and the Auto classes."""

import json
import math

import pytest
import timm
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    PreTrainedModel,
)

from modeling_mimco import (
    MimCoConfig,
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)
from modeling_mimco.interop.vit_checkpoints import mimco_to_timm_state_dict, timm_to_mimco_state_dict


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


def test_output_hidden_states_may_select_layers_by_index(pixel_values):
    # as transformers 5 models: indices into the `num_hidden_layers + 1` hidden states, the others `None`
    model = MimCoForImageClassification(tiny_config(num_labels=2)).eval()
    with torch.no_grad():
        everything = model(pixel_values, output_hidden_states=True).hidden_states
        selected = model(pixel_values, output_hidden_states=[0, -1]).hidden_states
        single = model(pixel_values, output_hidden_states=1).hidden_states
    assert len(everything) == len(selected) == len(single) == 3
    assert selected[1] is None and torch.equal(selected[0], everything[0]) and torch.equal(selected[2], everything[2])
    assert single[0] is None and single[2] is None and torch.equal(single[1], everything[1])


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


# --- defects that transformers' common model tests found (tests/test_transformers_common.py) ---------------------


def _contrastive_config(attn_implementation: str | None = None, **backbone_overrides) -> MimCoContrastiveConfig:
    backbone = tiny_config(position_embedding_type="sincos", **backbone_overrides)
    return MimCoContrastiveConfig(
        backbone_config=backbone,
        projector_hidden_size=32,
        projection_size=16,
        attn_implementation=attn_implementation,
    )


def test_from_pretrained_with_output_loading_info_returns_the_model_and_the_info(tmp_path):
    MimCoForPreTraining(tiny_config(position_embedding_type="sincos")).save_pretrained(tmp_path)
    model, loading_info = MimCoForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, MimCoForPreTraining)
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    # what is never trained is frozen again after loading, as without `output_loading_info`
    assert not any(parameter.requires_grad for parameter in model.teacher.parameters())
    assert not model.mimco.embeddings.position_embeddings.requires_grad
    assert isinstance(MimCoForPreTraining.from_pretrained(tmp_path), MimCoForPreTraining)


@pytest.mark.parametrize("empty_weights", ["torch.device", "init_empty_weights"])
@pytest.mark.parametrize(
    "model_class", [MimCoModel, MimCoForPreTraining, MimCoForImageClassification, MimCoForContrastivePreTraining]
)
def test_models_can_be_built_on_the_meta_device(model_class, empty_weights):
    import accelerate

    if model_class is MimCoForContrastivePreTraining:
        config = _contrastive_config(drop_path_rate=0.3, num_hidden_layers=3)
    else:
        config = tiny_config(drop_path_rate=0.3, num_hidden_layers=3)
    # torch caches its set of factory functions the first time a device context is used; when that happens inside
    # `from_pretrained`, which swaps `torch.linspace` for a CPU-only wrapper meanwhile, the cache keeps the wrapper
    # and later `torch.device("meta")` contexts let `torch.linspace` through. Clear it so that this test sees what
    # a fresh process sees, whatever ran before.
    torch.utils._device._device_constructors.cache_clear()
    if empty_weights == "torch.device":
        context = torch.device("meta")
    else:
        context = accelerate.init_empty_weights(include_buffers=True)
    with context:
        model = model_class(config)
    assert all(tensor.is_meta for tensor in model.state_dict().values())
    # the stochastic depth rates still rise linearly from 0 to `drop_path_rate`
    assert [layer.drop_path.drop_prob for layer in model.base_model.layers] == pytest.approx([0.0, 0.15, 0.3])


def test_default_teacher_accepts_image_sizes_that_32_does_not_divide(pixel_values):
    # 24 px = 6 patches of 4 px in 8-px mask blocks; the 32-px default blocks of a fresh config would not fit
    model = MimCoForPreTraining(tiny_config(image_size=24, mask_patch_size=8)).eval()
    assert model.teacher.config.mask_patch_size == 8
    with torch.no_grad():
        outputs = model(pixel_values[:, :, :24, :24], bool_masked_pos=model.mask_generator.batch(2))
    assert torch.isfinite(outputs.loss)


def _attention_implementations(model: torch.nn.Module) -> set[str]:
    return {module.config._attn_implementation for module in model.modules() if isinstance(module, PreTrainedModel)}


@pytest.mark.parametrize("teacher", ["default", "vit"])
def test_attention_implementation_reaches_the_teacher(tmp_path, tiny_vit_teacher_config, teacher):
    teacher_config = tiny_vit_teacher_config() if teacher == "vit" else None
    model = MimCoForPreTraining(tiny_config(attn_implementation="eager", teacher_config=teacher_config))
    # the teacher's config is the sub-config, so what is set on the config reaches the teacher
    assert model.teacher.config is model.config.teacher_config
    assert _attention_implementations(model) == {"eager"}
    model.set_attn_implementation("sdpa")
    assert _attention_implementations(model) == {"sdpa"}

    model.save_pretrained(tmp_path)
    for implementation in ("eager", "sdpa"):
        loaded = MimCoForPreTraining.from_pretrained(tmp_path, attn_implementation=implementation)
        assert _attention_implementations(loaded) == {implementation}

    # a checkpoint saved before the default teacher was stored in the config
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    if teacher == "default":
        config_file.write_text(json.dumps({**saved, "teacher_config": None}))
        loaded = MimCoForPreTraining.from_pretrained(tmp_path, attn_implementation="eager")
        assert _attention_implementations(loaded) == {"eager"}
        assert loaded.teacher.config is loaded.config.teacher_config


def _trainable_without_gradient(model: torch.nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None]


def test_every_trainable_parameter_gets_a_gradient(tmp_path, pixel_values):
    # a trainable parameter without a gradient stalls DDP without `find_unused_parameters`
    classifier = MimCoForImageClassification(tiny_config(num_labels=3))
    assert not classifier.mimco.embeddings.mask_token.requires_grad  # a classifier never masks
    classifier(pixel_values, labels=torch.tensor([0, 2])).loss.backward()
    assert _trainable_without_gradient(classifier) == []
    classifier.save_pretrained(tmp_path)
    assert not MimCoForImageClassification.from_pretrained(tmp_path).mimco.embeddings.mask_token.requires_grad

    pretraining = MimCoForPreTraining(tiny_config())  # the student masks: its mask token learns
    assert pretraining.mimco.embeddings.mask_token.requires_grad
    pretraining(pixel_values, bool_masked_pos=pretraining.mask_generator.batch(2)).loss.backward()
    assert _trainable_without_gradient(pretraining) == []

    contrastive = MimCoForContrastivePreTraining(_contrastive_config())
    contrastive.train()(pixel_values, pixel_values.flip(-1), momentum=0.99).loss.backward()
    assert _trainable_without_gradient(contrastive) == []


def test_pretraining_checkpoint_loads_into_the_classifier_quietly(tmp_path, caplog):
    torch.manual_seed(0)
    pretraining = MimCoForPreTraining(tiny_config())
    randomise_(pretraining)
    pretraining.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        classifier, info = MimCoForImageClassification.from_pretrained(
            tmp_path, num_labels=3, output_loading_info=True
        )
    assert not info["unexpected_keys"]
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert "mask_token" not in caplog.text and "UNEXPECTED" not in caplog.text.upper()
    student = pretraining.mimco.state_dict()
    assert set(classifier.mimco.state_dict()) == set(student)
    for name, tensor in classifier.mimco.state_dict().items():
        assert torch.equal(tensor, student[name]), name


def test_contrastive_output_behaves_as_a_model_output():
    torch.manual_seed(0)
    model = MimCoForContrastivePreTraining(_contrastive_config()).eval()
    views = (torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        outputs = model(*views)
        as_tuple = model(*views, return_dict=False)
    assert list(outputs.keys()) == ["loss", "queries", "momentum_keys"]
    assert torch.equal(outputs[0], outputs.loss)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    assert torch.equal(as_tuple[0], outputs.loss)
    assert torch.equal(as_tuple[2][1], outputs.momentum_keys[1])
    assert torch.equal(outputs.to_tuple()[1][0], outputs.queries[0])

    exported = torch.export.export(model, views)
    assert torch.allclose(exported.module()(*views).loss, outputs.loss, atol=1e-6)


def test_attention_implementation_and_dtype_reach_the_contrastive_backbone(tmp_path):
    model = MimCoForContrastivePreTraining(_contrastive_config(attn_implementation="eager"))
    assert _attention_implementations(model) == {"eager"}
    model.save_pretrained(tmp_path)
    loaded = MimCoForContrastivePreTraining.from_pretrained(tmp_path, attn_implementation="sdpa", dtype=torch.bfloat16)
    assert _attention_implementations(loaded) == {"sdpa"}
    assert loaded.config.backbone_config.dtype == torch.bfloat16
    assert loaded.base_encoder.config is loaded.config.backbone_config


def test_a_backbone_checkpoint_starts_stage_1_with_equal_branches(tmp_path):
    torch.manual_seed(0)
    backbone = MimCoModel(tiny_config(position_embedding_type="sincos"))
    randomise_(backbone)
    backbone.save_pretrained(tmp_path)

    model, info = MimCoForContrastivePreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert model.config.backbone_config.hidden_size == 64
    assert any(name.startswith("predictor.") for name in info["missing_keys"])  # the heads are new
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(model.base_encoder.state_dict()[name], tensor), name
        assert torch.equal(model.momentum_encoder.state_dict()[name], tensor), name  # MoCo starts from a copy
    for base, momentum in zip(model.base_projector.parameters(), model.momentum_projector.parameters()):
        assert torch.equal(base, momentum)
    assert not any(parameter.requires_grad for parameter in model.momentum_encoder.parameters())


def test_the_whole_pretraining_model_compiles_and_trains(pixel_values):
    torch.manual_seed(0)
    model = MimCoForPreTraining(tiny_config(num_hidden_layers=1)).train()
    bool_masked_pos = model.mask_generator.batch(2)
    expected = model(pixel_values, bool_masked_pos=bool_masked_pos).loss
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # "aot_eager" runs AOTAutograd, where the teacher's inference tensors used to fail; inductor would only add a
    # C++ build (about 45 s here) on top
    compiled = torch.compile(model, backend="aot_eager")
    try:
        loss = compiled(pixel_values, bool_masked_pos=bool_masked_pos).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
    assert torch.allclose(loss, expected, atol=1e-6)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-6), name
    # the teacher stays frozen and outside the autograd graph
    assert not any(name.startswith("teacher.") for name in grads)
    image_features, patch_tokens = model.teacher_features(pixel_values)
    assert image_features.grad_fn is None and patch_tokens.grad_fn is None


def test_teacher_autocast_runs_the_teacher_in_bf16_and_keeps_its_weights(tiny_mimco_config):
    torch.manual_seed(0)
    model = MimCoForPreTraining(tiny_mimco_config(head_hidden_size=0)).eval()
    autocast_model = MimCoForPreTraining(tiny_mimco_config(head_hidden_size=0, teacher_autocast="bf16")).eval()
    autocast_model.load_state_dict(model.state_dict())
    dtypes = []  # of the teachers' first linear layer (the final LayerNorm gives float32 under CPU autocast anyway)
    for teacher in (model.teacher, autocast_model.teacher):
        linear = next(module for module in teacher.modules() if isinstance(module, torch.nn.Linear))
        linear.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = model.mask_generator.batch(4)
    with torch.no_grad():
        loss = model(pixel_values, bool_masked_pos=mask).loss
        autocast_loss = autocast_model(pixel_values, bool_masked_pos=mask).loss
    assert dtypes == [torch.float32, torch.bfloat16]
    assert autocast_loss.dtype == torch.float32 and autocast_loss != loss  # the targets really came from bf16
    assert abs(autocast_loss - loss) / abs(loss) < 1e-2
    assert all(parameter.dtype == torch.float32 for parameter in autocast_model.teacher.parameters())
    # without the option, an autocast around the whole step still reaches the teacher
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(pixel_values, bool_masked_pos=mask)
    assert dtypes[-1] == torch.bfloat16
    with pytest.raises(ValueError, match="teacher_autocast"):
        tiny_mimco_config(teacher_autocast="fp8")
