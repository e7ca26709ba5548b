"""MimCoForPreTraining: teachers of several families, pixel re-normalisation, grid matching, a frozen teacher,
loss ablations and variants, a learning sanity check, and `from_teacher`."""

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from modeling_mimco import MimCoForPreTraining, MimCoModel
from modeling_mimco.teacher import TeacherInputAdapter


def _pixel_values(batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _mask(batch_size: int = 2, seed: int = 0, ratio: float = 0.5) -> torch.Tensor:
    """A fixed mask with a different number of masked patches per image (all images have some)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch_size, 64, generator=generator) < ratio
    mask[:, 0] = True
    return mask


def _dinov2_config(**overrides) -> Dinov2Config:
    values = dict(image_size=32, patch_size=2, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2)
    values.update(overrides)
    return Dinov2Config(**values)


def _teacher_config(kind: str, tiny_vit_teacher_config):
    if kind == "vit_patch4":
        return tiny_vit_teacher_config()
    if kind == "vit_patch2":  # teacher input 16 px, configured for 32: needs `interpolate_pos_encoding`
        return tiny_vit_teacher_config(patch_size=2)
    if kind == "dinov2_patch2":  # configured for 32 px, always interpolates
        return _dinov2_config()
    if kind == "dinov2_registers":
        return Dinov2WithRegistersConfig(
            image_size=16,
            patch_size=2,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            mlp_ratio=2,
            num_register_tokens=2,
        )
    assert kind == "mimco"
    return None


# ----------------------------------------------------------------------------------------------------------------
# teachers


@pytest.mark.parametrize(
    "kind, teacher_patch, num_prefix",
    [("mimco", 4, 1), ("vit_patch4", 4, 1), ("vit_patch2", 2, 1), ("dinov2_patch2", 2, 1), ("dinov2_registers", 2, 3)],
)
def test_teachers_train_and_see_the_student_grid(
    tiny_mimco_config, tiny_vit_teacher_config, kind, teacher_patch, num_prefix
):
    torch.manual_seed(0)
    config = tiny_mimco_config(teacher_config=_teacher_config(kind, tiny_vit_teacher_config))
    model = MimCoForPreTraining(config).train()
    teacher_width = config.get_teacher_config().hidden_size
    pixel_values = _pixel_values(3)
    mask = _mask(3)

    output = model(pixel_values, bool_masked_pos=mask)
    for loss in (output.loss, output.patch_loss, output.image_loss):
        assert loss.shape == () and torch.isfinite(loss)
    assert output.patch_predictions.shape == (int(mask.sum()), teacher_width)
    assert output.image_predictions.shape == (3, teacher_width)
    output.loss.backward()
    assert model.mimco.embeddings.patch_embeddings.projection.weight.grad is not None

    teacher_inputs = model.teacher_adapter.teacher_inputs(pixel_values)
    assert teacher_inputs["pixel_values"].shape == (3, 3, 8 * teacher_patch, 8 * teacher_patch)
    cls_feature, patch_tokens = model.teacher_features(pixel_values)
    assert cls_feature.shape == (3, teacher_width)
    assert patch_tokens.shape == (3, 64, teacher_width)

    # the targets are the teacher's own tokens: CLS first, then (after any register tokens) the patch grid
    with torch.no_grad():
        hidden = model.teacher(**teacher_inputs).last_hidden_state
    assert hidden.shape[1] == num_prefix + 64
    torch.testing.assert_close(cls_feature, hidden[:, 0])
    torch.testing.assert_close(patch_tokens, hidden[:, num_prefix:])


def test_teacher_sees_renormalised_pixels(tiny_mimco_config, tiny_vit_teacher_config):
    student_mean, student_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    teacher_mean, teacher_std = [0.5, 0.25, 0.1], [0.5, 0.2, 0.3]
    config = tiny_mimco_config(
        image_mean=student_mean,
        image_std=student_std,
        teacher_config=tiny_vit_teacher_config(),
        teacher_image_mean=teacher_mean,
        teacher_image_std=teacher_std,
    )
    model = MimCoForPreTraining(config).eval()
    pixel_values = _pixel_values(2)

    expected = torch.empty_like(pixel_values)
    for channel in range(3):
        raw = pixel_values[:, channel] * student_std[channel] + student_mean[channel]  # back to [0, 1] pixels
        expected[:, channel] = (raw - teacher_mean[channel]) / teacher_std[channel]
    teacher_pixels = model.teacher_adapter.teacher_inputs(pixel_values)["pixel_values"]
    torch.testing.assert_close(teacher_pixels, expected, atol=1e-5, rtol=1e-5)

    # and those are the pixels that give the teacher's targets
    cls_feature, _ = model.teacher_features(pixel_values)
    with torch.no_grad():
        direct = model.teacher(pixel_values=expected).last_hidden_state[:, 0]
    torch.testing.assert_close(cls_feature, direct, atol=1e-5, rtol=1e-4)


def test_same_normalisation_passes_pixels_through(tiny_mimco_config, tiny_vit_teacher_config):
    model = MimCoForPreTraining(tiny_mimco_config(teacher_config=tiny_vit_teacher_config()))
    pixel_values = _pixel_values(2)
    assert torch.equal(model.teacher_adapter.teacher_inputs(pixel_values)["pixel_values"], pixel_values)


class _FixedSizeTeacher(nn.Module):
    """A teacher whose forward has no `interpolate_pos_encoding` argument."""

    def forward(self, pixel_values):
        raise AssertionError("never called")


def _adapter(teacher, teacher_config, grid: int = 8) -> TeacherInputAdapter:
    stats = [0.5, 0.5, 0.5]
    return TeacherInputAdapter(teacher, teacher_config, grid, stats, stats, stats, stats)


def test_grid_mismatch_without_interpolation_raises():
    # configured for 64 px at patch 4 (a 16x16 grid); the student's grid is 8x8 and this forward cannot resize
    teacher_config = ViTConfig(image_size=64, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"16x16.*cannot be matched.*8x8.*_FixedSizeTeacher"):
        _adapter(_FixedSizeTeacher(), teacher_config)
    # the same teacher at the student's grid is fine
    matching = ViTConfig(image_size=32, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    assert _adapter(_FixedSizeTeacher(), matching).teacher_input_size == 32


def test_teacher_without_patch_size_raises(tiny_mimco_config):
    bert = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    with pytest.raises(ValueError, match="patch_size"):
        _adapter(_FixedSizeTeacher(), bert)
    with pytest.raises(ValueError, match="teacher_config.*patch_size"):
        MimCoForPreTraining(tiny_mimco_config(teacher_config=bert))


def test_split_tokens_rejects_a_wrong_token_count(tiny_mimco_config, tiny_vit_teacher_config):
    model = MimCoForPreTraining(tiny_mimco_config(teacher_config=tiny_vit_teacher_config()))
    with pytest.raises(ValueError, match="65 tokens.*grids do not match"):
        model.teacher_adapter.split_tokens(torch.randn(1, 1 + 16, 24))


# ----------------------------------------------------------------------------------------------------------------
# the frozen teacher


@pytest.mark.parametrize("teacher_kind", ["mimco", "vit_patch4"])
def test_gradients_reach_the_student_and_heads_only(tiny_mimco_config, tiny_vit_teacher_config, teacher_kind):
    torch.manual_seed(0)
    model = MimCoForPreTraining(
        tiny_mimco_config(teacher_config=_teacher_config(teacher_kind, tiny_vit_teacher_config))
    )
    model.train()
    model(_pixel_values(2), bool_masked_pos=_mask(2)).loss.backward()

    trainable = 0
    for name, parameter in model.named_parameters():
        if name.startswith("teacher."):
            assert not parameter.requires_grad, name
            assert parameter.grad is None, name
        elif parameter.requires_grad:
            assert parameter.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(parameter.grad).all(), name
            trainable += 1
    assert trainable > 0
    assert any(name.startswith("patch_head.") and p.grad is not None for name, p in model.named_parameters())
    assert any(name.startswith("image_head.") and p.grad is not None for name, p in model.named_parameters())


def test_optimizer_steps_leave_the_teacher_bit_identical(tiny_mimco_config, tiny_vit_teacher_config):
    torch.manual_seed(0)
    model = MimCoForPreTraining(tiny_mimco_config(teacher_config=tiny_vit_teacher_config())).train()
    teacher_before = {name: value.clone() for name, value in model.teacher.state_dict().items()}
    student_before = {name: value.clone() for name, value in model.mimco.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for step in range(3):
        optimizer.zero_grad()
        model(_pixel_values(2, seed=step), bool_masked_pos=_mask(2, seed=step)).loss.backward()
        optimizer.step()

    teacher_after = model.teacher.state_dict()
    assert teacher_after.keys() == teacher_before.keys()
    for name, value in teacher_before.items():
        assert torch.equal(teacher_after[name], value), f"teacher tensor {name} changed"
    student_after = model.mimco.state_dict()
    changed = [name for name, value in student_before.items() if not torch.equal(student_after[name], value)]
    assert "embeddings.patch_embeddings.projection.weight" in changed
    assert "embeddings.mask_token" in changed
    assert len(changed) >= len(student_before) // 2


@pytest.mark.parametrize("teacher_kind", ["mimco", "vit_patch4"])
def test_teacher_stays_frozen_after_from_pretrained(
    tmp_path, tiny_mimco_config, tiny_vit_teacher_config, teacher_kind
):
    config = tiny_mimco_config(
        teacher_config=_teacher_config(teacher_kind, tiny_vit_teacher_config), position_embedding_type="sincos"
    )
    MimCoForPreTraining(config).save_pretrained(tmp_path)
    model = MimCoForPreTraining.from_pretrained(tmp_path)
    assert not model.teacher.training
    frozen = [name for name, p in model.named_parameters() if name.startswith("teacher.") and not p.requires_grad]
    assert len(frozen) == len(list(model.teacher.parameters()))
    assert not model.mimco.embeddings.position_embeddings.requires_grad


def test_train_mode_keeps_the_teacher_in_eval(tiny_mimco_config, tiny_vit_teacher_config):
    teacher_config = tiny_vit_teacher_config(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    model = MimCoForPreTraining(tiny_mimco_config(teacher_config=teacher_config, hidden_dropout_prob=0.1))
    for mode in (True, False, True):
        model.train(mode)
        assert model.training is mode
        assert model.mimco.training is mode and model.patch_head.training is mode
        assert all(not module.training for module in model.teacher.modules())
    model.train()
    pixel_values = _pixel_values(2)
    first, second = model.teacher_features(pixel_values), model.teacher_features(pixel_values)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # no dropout in the teacher


# ----------------------------------------------------------------------------------------------------------------
# ablations and loss variants


@pytest.mark.parametrize("patch_weight, image_weight", [(0.0, 0.7), (2.0, 0.0), (0.5, 1.5)])
def test_loss_weights_and_ablations(tiny_mimco_config, patch_weight, image_weight):
    torch.manual_seed(0)
    model = MimCoForPreTraining(tiny_mimco_config(patch_loss_weight=patch_weight, image_loss_weight=image_weight))
    output = model(_pixel_values(2), bool_masked_pos=_mask(2))
    expected = 0.0
    if patch_weight == 0:
        assert output.patch_loss is None and output.patch_predictions is None and model.patch_head is None
    else:
        expected = expected + patch_weight * output.patch_loss
    if image_weight == 0:
        assert output.image_loss is None and output.image_predictions is None and model.image_head is None
    else:
        expected = expected + image_weight * output.image_loss
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()


def test_disabled_loss_does_not_train_its_inputs(tiny_mimco_config):
    """With the patch loss off, no gradient reaches the mask token: only the CLS path is trained."""
    torch.manual_seed(0)
    model = MimCoForPreTraining(tiny_mimco_config(patch_loss_weight=0.0))
    output = model(_pixel_values(2), bool_masked_pos=_mask(2))
    output.last_hidden_state.retain_grad()
    output.loss.backward()
    assert torch.count_nonzero(output.last_hidden_state.grad[:, 1:]) == 0
    assert torch.count_nonzero(output.last_hidden_state.grad[:, 0]) > 0


def _reference_cosine(predictions, targets):
    return sum(1 - torch.dot(p, t) / (p.norm() * t.norm()) for p, t in zip(predictions, targets)) / len(predictions)


@pytest.mark.parametrize(
    "overrides",
    [
        {"patch_loss_type": "cosine", "image_loss_type": "cosine"},
        {"patch_loss_type": "smooth_l1", "image_loss_type": "smooth_l1"},
        {"patch_negatives": "batch"},
        {"patch_loss_type": "cosine", "image_loss_type": "infonce", "head_hidden_size": 0},
    ],
)
def test_loss_variants_run(tiny_mimco_config, overrides):
    torch.manual_seed(0)
    model = MimCoForPreTraining(tiny_mimco_config(**overrides))
    pixel_values, mask = _pixel_values(2), _mask(2)
    output = model(pixel_values, bool_masked_pos=mask)
    assert torch.isfinite(output.loss) and torch.isfinite(output.patch_loss) and torch.isfinite(output.image_loss)
    output.loss.backward()
    assert model.patch_head.fc2.weight.grad is not None and model.image_head.fc2.weight.grad is not None

    cls_feature, patch_tokens = model.teacher_features(pixel_values)
    if overrides.get("patch_loss_type") == "cosine":
        expected = _reference_cosine(output.patch_predictions.detach().double(), patch_tokens[mask].double())
        torch.testing.assert_close(output.patch_loss.double(), expected, atol=1e-5, rtol=1e-5)
    if overrides.get("image_loss_type") == "cosine":
        expected = _reference_cosine(output.image_predictions.detach().double(), cls_feature.double())
        torch.testing.assert_close(output.image_loss.double(), expected, atol=1e-5, rtol=1e-5)


def test_forward_draws_a_mask_when_none_is_given(tiny_mimco_config):
    model = MimCoForPreTraining(tiny_mimco_config(mask_ratio=0.5))
    output = model(_pixel_values(3))
    # ceil(0.5 * 16) blocks of 2x2 patches in each image
    assert output.patch_predictions.shape[0] == 3 * 8 * 4


# ----------------------------------------------------------------------------------------------------------------
# learning sanity


def _train_on_one_batch(model: MimCoForPreTraining, steps: int, lr: float) -> list[tuple[float, float, float]]:
    pixel_values, mask = _pixel_values(4, seed=7), _mask(4, seed=7, ratio=0.6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    history = []
    for _ in range(steps):
        output = model(pixel_values, bool_masked_pos=mask)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        history.append((output.loss.item(), output.patch_loss.item(), output.image_loss.item()))
    return history


@pytest.mark.slow
def test_pretraining_loss_goes_down_on_a_fixed_batch(tiny_mimco_config):
    torch.manual_seed(0)
    model = MimCoForPreTraining(tiny_mimco_config()).train()
    history = _train_on_one_batch(model, steps=30, lr=1e-3)
    (first_total, first_patch, first_image), (last_total, last_patch, last_image) = history[0], history[-1]
    assert last_total < 0.7 * first_total
    assert last_patch < 0.7 * first_patch
    assert last_image < first_image

    # control: the same loop with nothing trainable cannot pass the criterion
    torch.manual_seed(0)
    frozen = MimCoForPreTraining(tiny_mimco_config()).train()
    frozen.requires_grad_(False)
    frozen.mimco.embeddings.cls_token.requires_grad_(True)  # AdamW needs one parameter; lr 0 keeps it fixed
    control = _train_on_one_batch(frozen, steps=3, lr=0.0)
    assert control[-1][0] == pytest.approx(control[0][0])
    assert control[0][0] == pytest.approx(first_total)


# ----------------------------------------------------------------------------------------------------------------
# from_teacher


def test_from_teacher_with_a_saved_mimco_model(tmp_path, tiny_mimco_config):
    torch.manual_seed(1)
    teacher_config = tiny_mimco_config(hidden_size=48, num_attention_heads=3, num_hidden_layers=1)
    teacher = MimCoModel(teacher_config)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(torch.randn_like(parameter))  # distinctive weights that a fresh init would not give
    teacher.save_pretrained(tmp_path / "teacher")

    student_config = tiny_mimco_config()
    model = MimCoForPreTraining.from_teacher(str(tmp_path / "teacher"), student_config)
    assert student_config.teacher_config is None  # the caller's config is not modified
    assert model.config.teacher_config.hidden_size == 48
    assert isinstance(model.teacher, MimCoModel)
    saved = teacher.state_dict()
    loaded = model.teacher.state_dict()
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
    assert not any(parameter.requires_grad for parameter in model.teacher.parameters())
    assert model.config.teacher_image_mean == student_config.image_mean  # no preprocessor_config.json

    output = model(_pixel_values(2), bool_masked_pos=_mask(2))
    assert output.patch_predictions.shape[-1] == 48
    output.loss.backward()


def test_from_teacher_with_a_saved_vit_and_its_image_processor(tmp_path, tiny_mimco_config, tiny_vit_teacher_config):
    torch.manual_seed(2)
    teacher = ViTModel(tiny_vit_teacher_config(), add_pooling_layer=False)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(torch.randn_like(parameter))
    teacher.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path / "vit")

    model = MimCoForPreTraining.from_teacher(str(tmp_path / "vit"), tiny_mimco_config())
    assert isinstance(model.config.teacher_config, ViTConfig)
    assert model.config.teacher_image_mean == [0.5] * 3
    assert model.config.teacher_image_std == [0.5] * 3
    saved = teacher.state_dict()
    loaded = model.teacher.state_dict()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name

    # the teacher's normalisation is applied: student-normalised pixels become (x * std + mean - 0.5) / 0.5
    pixel_values = _pixel_values(1)
    student_mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    student_std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    expected = (pixel_values * student_std + student_mean - 0.5) / 0.5
    torch.testing.assert_close(model.teacher_adapter.teacher_inputs(pixel_values)["pixel_values"], expected)
    assert torch.isfinite(model(pixel_values, bool_masked_pos=_mask(1)).loss)


def test_from_teacher_with_a_dinov2_of_another_patch_size(tmp_path, tiny_mimco_config):
    torch.manual_seed(3)
    from transformers import Dinov2Model

    teacher = Dinov2Model(_dinov2_config(image_size=16))
    teacher.save_pretrained(tmp_path / "dinov2")
    model = MimCoForPreTraining.from_teacher(str(tmp_path / "dinov2"), tiny_mimco_config())
    for name, value in teacher.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[name], value), name
    assert model.teacher_adapter.teacher_inputs(_pixel_values(1))["pixel_values"].shape[-1] == 16
    assert torch.isfinite(model(_pixel_values(2), bool_masked_pos=_mask(2)).loss)
