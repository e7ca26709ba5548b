"""Mask generators that choose which patches the MimCo student sees replaced by the mask token."""

from __future__ import annotations

import math

import torch


class MimCoMaskGenerator:
    """Draws `bool_masked_pos` for one image: a flat boolean tensor of `num_patches` entries, `True` where masked.

    Two strategies are available:

    - `"random"` (SimMIM): the image is cut into `mask_patch_size` x `mask_patch_size` pixel blocks and a random
      `mask_ratio` fraction of the blocks is masked, so exactly `ceil(mask_ratio * num_blocks)` blocks are hidden.
    - `"block"` (BEiT): rectangles of random area (at least `min_num_patches` patches) and aspect ratio are masked
      until `round(mask_ratio * num_patches)` patches are hidden. When no further rectangle fits the remaining budget
      (BEiT's loop then stops short), single random patches make up the difference.

    Either way every mask hides exactly `num_masked` patches, so a batch of masks has one static shape of masked
    positions, `(batch_size, num_masked)`, which the model gathers without a data-dependent shape.

    Args:
        image_size: Side of the square input in pixels.
        patch_size: Side of a ViT patch in pixels.
        mask_ratio: Fraction of the image to mask, in (0, 1).
        mask_patch_size: Side of a random-masking block in pixels; a multiple of `patch_size`.
        strategy: `"random"` or `"block"`.
        min_num_patches: Smallest rectangle of block masking, in patches (capped by the grid size).
        min_aspect_ratio: Smallest aspect ratio of a block-masking rectangle; the largest is its inverse.
        generator: Optional `torch.Generator` for reproducible masks.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        mask_ratio: float = 0.6,
        mask_patch_size: int = 32,
        strategy: str = "random",
        min_num_patches: int = 16,
        min_aspect_ratio: float = 0.3,
        generator: torch.Generator | None = None,
    ):
        if strategy not in ("random", "block"):
            raise ValueError(f"`strategy` must be 'random' or 'block', got {strategy!r}.")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"`mask_ratio` must lie strictly between 0 and 1, got {mask_ratio}.")
        if image_size % patch_size != 0:
            raise ValueError(f"`image_size` ({image_size}) must be divisible by `patch_size` ({patch_size}).")
        if strategy == "random" and (mask_patch_size % patch_size != 0 or image_size % mask_patch_size != 0):
            raise ValueError(
                f"`mask_patch_size` ({mask_patch_size}) must be a multiple of `patch_size` ({patch_size}) "
                f"that divides `image_size` ({image_size})."
            )
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.mask_ratio = mask_ratio
        self.strategy = strategy
        self.generator = generator

        # random masking works on a coarser grid of mask blocks, upsampled to patches afterwards
        self.block_grid_size = image_size // mask_patch_size
        self.block_scale = mask_patch_size // patch_size
        self.num_masked_blocks = int(math.ceil(self.block_grid_size**2 * mask_ratio))

        self.num_masking_patches = int(round(self.num_patches * mask_ratio))
        self.min_num_patches = min(min_num_patches, self.num_masking_patches)
        # what every mask of this generator hides, in patches
        if strategy == "random":
            self.num_masked = self.num_masked_blocks * self.block_scale**2
        else:
            self.num_masked = self.num_masking_patches
        self.log_aspect_ratio = (math.log(min_aspect_ratio), math.log(1 / min_aspect_ratio))

    @classmethod
    def from_config(cls, config, generator: torch.Generator | None = None) -> MimCoMaskGenerator:
        """Builds the generator that a `MimCoConfig` describes."""
        return cls(
            image_size=config.image_size,
            patch_size=config.patch_size,
            mask_ratio=config.mask_ratio,
            mask_patch_size=config.mask_patch_size,
            strategy=config.mask_strategy,
            generator=generator,
        )

    def __call__(self) -> torch.BoolTensor:
        """Returns a `torch.BoolTensor` of shape `(num_patches,)`, row-major over the patch grid."""
        if self.strategy == "random":
            return self._random_mask()
        return self._block_mask()

    def batch(self, batch_size: int) -> torch.BoolTensor:
        """Returns `bool_masked_pos` of shape `(batch_size, num_patches)`, one independent mask per image."""
        return torch.stack([self() for _ in range(batch_size)])

    def _random_mask(self) -> torch.BoolTensor:
        num_blocks = self.block_grid_size**2
        order = torch.randperm(num_blocks, generator=self.generator)
        block_mask = torch.zeros(num_blocks, dtype=torch.bool)
        block_mask[order[: self.num_masked_blocks]] = True
        block_mask = block_mask.view(self.block_grid_size, self.block_grid_size)
        patch_mask = block_mask.repeat_interleave(self.block_scale, 0).repeat_interleave(self.block_scale, 1)
        return patch_mask.flatten()

    def _block_mask(self) -> torch.BoolTensor:
        mask = torch.zeros(self.grid_size, self.grid_size, dtype=torch.bool)
        num_masked = 0
        while num_masked < self.num_masking_patches:
            budget = self.num_masking_patches - num_masked
            added = self._add_rectangle(mask, budget)
            if added == 0:
                break
            num_masked += added
        mask = mask.flatten()
        if num_masked < self.num_masking_patches:
            # no rectangle fits what is left: top up with single patches, for a count that never varies
            unmasked = (~mask).nonzero().squeeze(1)
            order = torch.randperm(unmasked.numel(), generator=self.generator)
            mask[unmasked[order[: self.num_masking_patches - num_masked]]] = True
        return mask

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def _add_rectangle(self, mask: torch.BoolTensor, budget: int) -> int:
        """Masks one rectangle that adds at most `budget` new patches; returns how many it added."""
        grid = self.grid_size
        for _attempt in range(10):
            target_area = self._uniform(min(self.min_num_patches, budget), budget)
            aspect_ratio = math.exp(self._uniform(*self.log_aspect_ratio))
            height = int(round(math.sqrt(target_area * aspect_ratio)))
            width = int(round(math.sqrt(target_area / aspect_ratio)))
            if not (0 < height <= grid and 0 < width <= grid):
                continue
            top = int(torch.randint(0, grid - height + 1, (), generator=self.generator))
            left = int(torch.randint(0, grid - width + 1, (), generator=self.generator))
            window = mask[top : top + height, left : left + width]
            added = height * width - int(window.sum())
            if 0 < added <= budget:
                window.fill_(True)
                return added
        return 0


__all__ = ["MimCoMaskGenerator"]
