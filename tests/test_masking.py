"""MimCoMaskGenerator: SimMIM random block masking and BEiT block-wise masking."""

import math

import pytest
import torch

from modeling_mimco import MimCoMaskGenerator


def _random_generator(seed: int | None = 0, **overrides) -> MimCoMaskGenerator:
    values = dict(image_size=32, patch_size=4, mask_ratio=0.4, mask_patch_size=8, strategy="random")
    values.update(overrides)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return MimCoMaskGenerator(**values, generator=generator)


def _block_generator(seed: int = 0, **overrides) -> MimCoMaskGenerator:
    values = dict(image_size=56, patch_size=4, mask_ratio=0.4, strategy="block", min_num_patches=4)
    values.update(overrides)
    return MimCoMaskGenerator(**values, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "image_size, patch_size, mask_patch_size, mask_ratio",
    [(32, 4, 8, 0.4), (32, 4, 8, 0.6), (48, 4, 16, 0.5), (32, 2, 4, 0.3), (32, 4, 4, 0.75)],
)
def test_random_masks_exactly_ceil_ratio_blocks(image_size, patch_size, mask_patch_size, mask_ratio):
    generator = _random_generator(
        image_size=image_size, patch_size=patch_size, mask_patch_size=mask_patch_size, mask_ratio=mask_ratio
    )
    grid = image_size // patch_size
    scale = mask_patch_size // patch_size
    block_grid = image_size // mask_patch_size
    expected_blocks = math.ceil(mask_ratio * block_grid**2)
    for _ in range(20):
        mask = generator()
        assert mask.shape == (grid * grid,) and mask.dtype == torch.bool
        # count the masked blocks and check each block is wholly masked or wholly visible, with explicit loops
        patches = mask.view(grid, grid)
        masked_blocks = 0
        for block_row in range(block_grid):
            for block_col in range(block_grid):
                block = patches[
                    block_row * scale : (block_row + 1) * scale, block_col * scale : (block_col + 1) * scale
                ]
                assert block.all() or not block.any(), "a mask block is split"
                masked_blocks += int(block.all())
        assert masked_blocks == expected_blocks
        assert int(mask.sum()) == expected_blocks * scale * scale


def test_random_rounds_the_block_count_up():
    # 16 blocks at ratio 0.4 are 6.4 blocks: 7 are masked (ceil), not 6 (round)
    generator = _random_generator(mask_ratio=0.4)
    assert int(generator().sum()) == 7 * 4


def test_batch_shape_and_independent_rows():
    generator = _random_generator()
    masks = generator.batch(6)
    assert masks.shape == (6, 64) and masks.dtype == torch.bool
    assert (masks.sum(dim=1) == 28).all()
    assert len({tuple(row.tolist()) for row in masks}) > 1


def test_seeded_generator_is_reproducible_and_calls_differ():
    first = _random_generator(seed=123).batch(8)
    second = _random_generator(seed=123).batch(8)
    other_seed = _random_generator(seed=124).batch(8)
    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)

    generator = _random_generator(seed=5)
    masks = [generator() for _ in range(10)]
    assert len({tuple(mask.tolist()) for mask in masks}) > 1


def test_block_masking_is_reproducible():
    assert torch.equal(_block_generator(seed=9).batch(4), _block_generator(seed=9).batch(4))
    assert not torch.equal(_block_generator(seed=9).batch(4), _block_generator(seed=10).batch(4))


@pytest.mark.parametrize(
    "image_size, mask_ratio, min_num_patches", [(56, 0.4, 4), (32, 0.6, 16), (32, 0.5, 4), (64, 0.3, 16)]
)
def test_block_masking_reaches_about_the_target_and_never_exceeds_it(image_size, mask_ratio, min_num_patches):
    generator = _block_generator(image_size=image_size, mask_ratio=mask_ratio, min_num_patches=min_num_patches)
    target = round(mask_ratio * (image_size // 4) ** 2)
    counts = [int(generator().sum()) for _ in range(50)]
    assert max(counts) <= target
    assert min(counts) >= 0.8 * target
    assert sum(counts) / len(counts) >= 0.95 * target


def test_block_masking_adds_whole_rectangles(monkeypatch):
    """Each step of block masking fills one axis-aligned rectangle: the patches it newly masks span a bounding box
    that is entirely masked afterwards, and the first one is exactly a rectangle."""
    generator = _block_generator(image_size=64, mask_ratio=0.5, min_num_patches=8)
    add_rectangle = generator._add_rectangle
    steps = []

    def recording_add_rectangle(mask, budget):
        before = mask.clone()
        added = add_rectangle(mask, budget)
        steps.append((before, mask.clone(), added, budget))
        return added

    monkeypatch.setattr(generator, "_add_rectangle", recording_add_rectangle)
    for _ in range(10):
        steps.clear()
        flat = generator()
        assert steps, "block masking added no rectangle"
        first_before, first_after, _, _ = steps[0]
        assert not first_before.any()
        rows, cols = first_after.nonzero(as_tuple=True)
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(first_after.sum()) == height * width, "the first masked region is not a rectangle"
        for before, after, added, budget in steps:
            new = after & ~before
            assert int(new.sum()) == added <= budget
            assert torch.equal(after & before, before)  # nothing is ever unmasked
            if added:
                rows, cols = new.nonzero(as_tuple=True)
                box = after[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
                assert box.all(), "the patches added in one step do not form a filled rectangle"
        assert torch.equal(steps[-1][1].flatten(), flat)


def test_from_config(tiny_mimco_config):
    config = tiny_mimco_config(mask_ratio=0.4, mask_patch_size=16)
    generator = MimCoMaskGenerator.from_config(config, generator=torch.Generator().manual_seed(0))
    mask = generator()
    assert mask.shape == (config.num_patches,)
    assert int(mask.sum()) == math.ceil(0.4 * 4) * 16  # 2x2 blocks of 4x4 patches

    block = MimCoMaskGenerator.from_config(tiny_mimco_config(mask_strategy="block", mask_ratio=0.5))
    assert block.strategy == "block"
    assert int(block().sum()) <= 32


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"strategy": "grid"}, "strategy"),
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": 1.2}, "mask_ratio"),
        ({"mask_ratio": -0.3}, "mask_ratio"),
        ({"image_size": 30}, "image_size"),
        ({"mask_patch_size": 6}, "mask_patch_size"),
        ({"mask_patch_size": 12}, "mask_patch_size"),
    ],
)
def test_invalid_arguments_raise(overrides, field):
    with pytest.raises(ValueError, match=field):
        _random_generator(**overrides)
