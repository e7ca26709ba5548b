"""The stage-2 forward with static shapes: masks that hide the same number of patches in every image are gathered
with an index tensor `(batch, num_masked)` and the patch loss is computed densely, with the same numbers as the
general (boolean-index) path; the whole model then traces into one graph with no graph break."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_mimco_config
from helpers.scripts import load_script

from modeling_mimco import MimCoConfig, MimCoForPreTraining, MimCoMaskGenerator


stage2 = load_script("run_pretraining")


def _loss_and_gradients(model: MimCoForPreTraining, pixel_values, masks, general: bool):
    """The loss, predictions and gradients, through the static-shape path or (`general`) the boolean-index one."""
    model.zero_grad(set_to_none=True)
    if general:
        model.masked_positions = lambda bool_masked_pos: None  # what a mask of varying counts gets
    try:
        outputs = model(pixel_values, bool_masked_pos=masks)
    finally:
        model.__dict__.pop("masked_positions", None)
    outputs.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, gradients


@pytest.mark.parametrize("negatives", ["image", "batch"])
@pytest.mark.parametrize("loss_type", ["infonce", "cosine", "smooth_l1"])
def test_static_shape_path_gives_the_general_paths_loss_and_gradients(loss_type, negatives):
    torch.manual_seed(0)
    model = MimCoForPreTraining(make_tiny_mimco_config(patch_loss_type=loss_type, patch_negatives=negatives)).train()
    pixel_values, masks = torch.randn(4, 3, 32, 32), model.mask_generator.batch(4)
    assert model.masked_positions(masks) is not None
    fast, fast_gradients = _loss_and_gradients(model, pixel_values, masks, general=False)
    general, general_gradients = _loss_and_gradients(model, pixel_values, masks, general=True)
    torch.testing.assert_close(fast.loss, general.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.patch_predictions, general.patch_predictions, rtol=1e-6, atol=1e-6)
    assert fast_gradients.keys() == general_gradients.keys()
    for name in fast_gradients:
        torch.testing.assert_close(fast_gradients[name], general_gradients[name], rtol=1e-5, atol=1e-7, msg=name)


def test_masked_positions_are_each_images_masked_patches_in_order():
    model = MimCoForPreTraining(make_tiny_mimco_config())
    masks = model.mask_generator.batch(6)
    positions = model.masked_positions(masks)
    assert positions.shape == (6, model.mask_generator.num_masked)
    for mask, row in zip(masks, positions):
        assert row.tolist() == mask.nonzero().squeeze(1).tolist()


def test_a_mask_of_varying_counts_takes_the_general_path():
    torch.manual_seed(0)
    model = MimCoForPreTraining(make_tiny_mimco_config()).train()
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, :10], masks[1, 5:30] = True, True
    assert model.masked_positions(masks) is None
    outputs = model(torch.randn(2, 3, 32, 32), bool_masked_pos=masks)
    assert outputs.patch_predictions.shape[0] == 35 and torch.isfinite(outputs.loss)


@pytest.mark.parametrize("strategy", ["random", "block"])
def test_every_drawn_mask_hides_num_masked_patches(strategy):
    # block masking on a grid where BEiT's rectangles often stall before the budget: the top-up keeps the count
    generator = MimCoMaskGenerator(
        image_size=28, patch_size=4, mask_ratio=0.75, mask_patch_size=4, strategy=strategy, min_num_patches=16,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    counts = generator.batch(200).sum(1)
    assert (counts == generator.num_masked).all(), counts.unique()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("output_hidden_states", [False, True], ids=["tokens", "hidden_states"])
def test_the_whole_pretraining_model_traces_into_one_graph(train, output_hidden_states):
    torch.manual_seed(0)
    model = MimCoForPreTraining(make_tiny_mimco_config(drop_path_rate=0.1)).train(train)
    pixel_values, masks = torch.randn(4, 3, 32, 32), model.mask_generator.batch(4)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(
        pixel_values, bool_masked_pos=masks, output_hidden_states=output_hidden_states, sample_seeds=torch.arange(4)
    )
    reasons = [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_pretraining_with_torch_compile_mode_trains_and_saves(tmp_path, stage1_teacher):
    """`mimco-pretrain --torch_compile_mode default`: the whole model compiled, a few steps, an ordinary save."""
    result = stage2.main(
        [
            "--teacher_name_or_path", str(stage1_teacher), "--model_preset", "tiny", "--head_hidden_size", "32",
            "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "8", "--max_train_steps", "2",
            "--report_to", "none", "--logging_steps", "1", "--drop_path_rate", "0.1",
            "--torch_compile_mode", "default",
        ]
    )  # fmt: skip
    assert result.global_step == 2
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in result.log_history)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_an_unknown_torch_compile_mode_is_refused(tmp_path, stage1_teacher):
    with pytest.raises(SystemExit, match="--torch_compile_mode must be one of"):
        stage2.main(
            ["--teacher_name_or_path", str(stage1_teacher), "--output_dir", str(tmp_path / "out"),
             "--torch_compile_mode", "fastest"]
        )  # fmt: skip


@pytest.fixture(scope="module")
def stage1_teacher(tmp_path_factory):
    """A saved tiny MimCoModel teacher (random weights) in the tiny preset's shape."""
    from modeling_mimco import MimCoModel
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs

    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    MimCoModel(MimCoConfig(**preset_backbone_kwargs("tiny"))).save_pretrained(folder)
    return folder


def test_stage1_compiles_whole_and_stops_recompiling_once_the_momentum_is_a_symbol():
    """Stage 1's model traces into one graph; its momentum, a float that changes every step, costs one
    recompilation (dynamo then traces it as a symbol), not one per step."""
    from modeling_mimco import MimCoContrastiveConfig, MimCoForContrastivePreTraining

    torch.manual_seed(0)
    config = MimCoContrastiveConfig(
        backbone_config=make_tiny_mimco_config(drop_path_rate=0.1), projector_hidden_size=64, projection_size=16
    )
    model = MimCoForContrastivePreTraining(config).train()
    images, seeds = torch.randn(4, 3, 32, 32), torch.arange(4)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(images, images, momentum=0.99, sample_seeds=seeds)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for step in range(6):
        compiled(images, images, momentum=0.99 + step * 1e-3, sample_seeds=seeds).loss.backward()
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
