"""Stochastic depth and dropout drawn from per-image seeds (`sample_seeds`): an image gets the same draws in whichever
process or micro-batch it lands, the draws keep the configured rates, and a forward without seeds works as before.

The end-to-end equivalences (2 processes against 1, accumulation, resume) run with `--drop_path_rate 0.1` in
test_launch.py, test_distributed.py, test_faults.py and test_training.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_mimco_config

from modeling_mimco import (
    MimCoConfig,
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForPreTraining,
    MimCoModel,
)
from modeling_mimco.data.pipeline import MimCoPretrainingCollator
from modeling_mimco.masking import MimCoMaskGenerator
from modeling_mimco.modeling_mimco import derive_seeds, drop_path, seeded_uniform
from modeling_mimco.training.loop import SeededBatches, sample_seed


def _config(**overrides) -> MimCoConfig:
    """The suite's tiny config with three layers and drop path 0.3 (each override replaces a field)."""
    return make_tiny_mimco_config(**{**dict(num_hidden_layers=3, drop_path_rate=0.3), **overrides})


SEEDS = torch.tensor([sample_seed(0, 0, index) for index in range(8)])


@pytest.mark.parametrize(
    "randomness",
    [
        {"drop_path_rate": 0.3},
        {"drop_path_rate": 0.0, "hidden_dropout_prob": 0.2},
        {"drop_path_rate": 0.0, "attention_probs_dropout_prob": 0.2},
    ],
    ids=["drop_path", "hidden_dropout", "attention_dropout"],
)
def test_an_image_gets_the_same_draws_in_any_split_of_the_batch(randomness):
    torch.manual_seed(0)
    model = MimCoForPreTraining(_config(**randomness)).train()
    pixel_values = torch.randn(8, 3, 32, 32)
    masks = model.mask_generator.batch(8)
    whole = model(pixel_values, bool_masked_pos=masks, sample_seeds=SEEDS).last_hidden_state
    halves = [
        model(pixel_values[part], bool_masked_pos=masks[part], sample_seeds=SEEDS[part]).last_hidden_state
        for part in (slice(0, 4), slice(4, 8))
    ]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=1e-6)
    # the global generator plays no part: drawing from it in between changes nothing
    torch.rand(1000)
    again = model(pixel_values, bool_masked_pos=masks, sample_seeds=SEEDS).last_hidden_state
    torch.testing.assert_close(again, whole, rtol=0, atol=0)
    # the randomness is real: other seeds give other draws, and evaluation mode none
    other = model(pixel_values, bool_masked_pos=masks, sample_seeds=SEEDS + 1).last_hidden_state
    assert (other - whole).abs().max() > 1e-3
    model.eval()
    first = model(pixel_values, bool_masked_pos=masks, sample_seeds=SEEDS).last_hidden_state
    second = model(pixel_values, bool_masked_pos=masks, sample_seeds=SEEDS + 1).last_hidden_state
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_gradients_of_a_split_batch_add_up_to_the_whole_batch():
    """What accumulation and data parallelism rely on: with seeded drop path the per-image gradients do not depend on
    which images share the forward pass (a cosine loss, which has no negatives)."""
    torch.manual_seed(0)
    model = MimCoForPreTraining(_config(patch_loss_type="cosine", image_loss_type="cosine")).train()
    pixel_values, masks = torch.randn(8, 3, 32, 32), model.mask_generator.batch(8)

    def gradients(parts: list[slice]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for part in parts:
            loss = model(pixel_values[part], bool_masked_pos=masks[part], sample_seeds=SEEDS[part]).loss
            (loss / len(parts)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    whole, split = gradients([slice(0, 8)]), gradients([slice(0, 4), slice(4, 8)])
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_seeded_draws_keep_the_rate_and_are_independent_between_sites():
    seeds = torch.arange(200_000, dtype=torch.long) * 2654435761 % (1 << 32)
    first, second = seeded_uniform(seeds, 8), seeded_uniform(seeds, 9)
    assert 0.0 <= float(first.min()) and float(first.max()) < 1.0
    # a binomial proportion over 200k draws has a standard deviation below 0.0012
    for rate in (0.1, 0.3, 0.5):
        assert abs(float((first < rate).float().mean()) - rate) < 0.006
    correlation = torch.corrcoef(torch.stack([first, second]))[0, 1]
    assert abs(float(correlation)) < 0.01
    elements = seeded_uniform(seeds[:1000], 3, (17, 32))
    assert elements.shape == (1000, 17, 32) and abs(float(elements.mean()) - 0.5) < 0.005
    # neighbouring images, and the four passes of stage 1 (derived seeds), draw unrelated numbers
    neighbours = torch.corrcoef(torch.stack([seeded_uniform(seeds[:-1], 8), seeded_uniform(seeds[1:], 8)]))[0, 1]
    assert abs(float(neighbours)) < 0.01
    streams = torch.stack([seeded_uniform(derive_seeds(seeds, stream), 8) for stream in range(4)])
    off_diagonal = torch.corrcoef(streams) - torch.eye(4)
    assert off_diagonal.abs().max() < 0.01


def test_seeded_drop_path_zeroes_whole_images_at_the_configured_rate():
    hidden_states = torch.ones(10_000, 5, 4)
    seeds = torch.arange(10_000)
    dropped = drop_path(hidden_states, 0.25, True, seeds, site=12)
    per_image = dropped.flatten(1)
    assert torch.all((per_image == 0).all(1) | (per_image == 1 / 0.75).all(1))  # whole images, rescaled
    assert abs(float((per_image[:, 0] == 0).float().mean()) - 0.25) < 0.02


def test_a_forward_without_seeds_draws_from_torchs_generator():
    """A user's own loop or the `Trainer` calls `forward()` without seeds: drop path still works, seeded by torch."""
    torch.manual_seed(0)
    model = MimCoModel(_config(drop_path_rate=0.5)).train()
    pixel_values = torch.randn(8, 3, 32, 32)
    torch.manual_seed(1)
    first = model(pixel_values).last_hidden_state
    torch.manual_seed(1)
    same = model(pixel_values).last_hidden_state
    torch.manual_seed(2)
    other = model(pixel_values).last_hidden_state
    torch.testing.assert_close(first, same, rtol=0, atol=0)
    assert (first - other).abs().max() > 1e-3


def test_stage1_passes_each_view_and_encoder_its_own_seeds():
    """The four encoder passes of stage 1 draw from derived seeds: the same images in two views get other draws."""
    backbone = _config(drop_path_rate=0.5, num_hidden_layers=2)
    torch.manual_seed(0)
    model = MimCoForContrastivePreTraining(
        MimCoContrastiveConfig(backbone_config=backbone, projector_hidden_size=64, projection_size=16)
    ).train()
    images = torch.randn(8, 3, 32, 32)
    output = model(pixel_values_1=images, pixel_values_2=images, sample_seeds=SEEDS)
    again = model(pixel_values_1=images, pixel_values_2=images, sample_seeds=SEEDS)
    torch.testing.assert_close(output.queries[0], again.queries[0], rtol=0, atol=0)
    # identical views, different draws: the two queries differ
    assert (output.queries[0] - output.queries[1]).abs().max() > 1e-4


def test_the_training_loops_batches_carry_each_images_seed():
    """`SeededBatches` gives every readable image its `sample_seed(seed, epoch, index)` as `sample_seeds`."""
    config = _config()

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, index):
            return {"pixel_values": torch.full((3, 32, 32), float(index)), "unreadable_image": None}

    collator = MimCoPretrainingCollator(MimCoMaskGenerator.from_config(config))
    batches = SeededBatches(Images(), collator, seed=3)
    batches.epoch = 2
    (batch,) = batches.__getitems__([4, 1, 5])
    assert batch["sample_seeds"].tolist() == [sample_seed(3, 2, index) for index in (4, 1, 5)]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [4.0, 1.0, 5.0]
