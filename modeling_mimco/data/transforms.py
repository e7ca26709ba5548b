"""The augmentations: what an image goes through before it reaches a model, for every stage and evaluation.

- `build_pretraining_transform` (stage 2): random resized crop and flip, optionally kept as uint8 so that the collator
  normalises the stacked batch in one go (`ToNormalizedFloat`).
- `build_contrastive_transforms` (stage 1): MoCo v3's two asymmetric views (crop, colour jitter, grayscale, blur,
  solarize, flip).
- `build_eval_transform`: resize and centre crop for frozen-feature evaluation and fine-tuning.

Imports `contrastive_views` (how stage 1's views are computed); `pipeline.py` applies these transforms to dataset
rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from modeling_mimco.data.contrastive_views import ContrastiveView, moco_v3_view_recipes


def _normalize(image_mean: Sequence[float], image_std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(image_mean), list(image_std))]


class ToNormalizedFloat(v2.Transform):
    """uint8 image -> float32 `(x / 255 - mean) / std`, as `ToDtype(scale=True)` then `Normalize`, but in one
    conversion and two in-place passes instead of three allocating ones."""

    def __init__(self, image_mean: Sequence[float], image_std: Sequence[float]):
        super().__init__()
        std = torch.tensor(image_std, dtype=torch.float32).view(-1, 1, 1)
        mean = torch.tensor(image_mean, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or inpt.dtype != torch.uint8:
            raise TypeError(f"ToNormalizedFloat expects a uint8 image tensor, got {type(inpt).__name__}.")
        # works on one image (C, H, W) and on a batch (B, C, H, W) alike
        return inpt.to(torch.float32).mul_(self.scale).sub_(self.shift)


def build_pretraining_transform(
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    crop_scale: tuple[float, float] = (0.67, 1.0),
    hflip: bool = True,
    normalize: bool = True,
) -> v2.Compose:
    """Stage-2 (MimCo / SimMIM-style) augmentation of one RGB image (PIL image or uint8 tensor).

    uint8 tensor -> RandomResizedCrop(`image_size`, scale=`crop_scale`, bilinear, antialiased) ->
    RandomHorizontalFlip (p=0.5, if `hflip`) -> float32 `(x / 255 - image_mean) / image_std`.

    With `normalize=False` the last step is left out and the transform returns the uint8 crop: normalising a whole
    batch at once in `MimCoPretrainingCollator(normalize_with=(mean, std))` is faster, and stacking uint8 images
    moves a quarter of the bytes.

    Returns:
        A transform mapping an image to a tensor `(3, image_size, image_size)`: float32 normalised, or uint8.
    """
    # Cropping and resizing a uint8 tensor (torchvision's vectorised antialiased bilinear kernel) is about twice as
    # fast as doing it on the PIL image, and bilinear is what SimMIM's recipe uses.
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            image_size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BILINEAR, antialias=True
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if normalize:
        steps.append(ToNormalizedFloat(image_mean, image_std))
    return v2.Compose(steps)


def build_contrastive_transforms(
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    photometric_on_device: bool = False,
    normalize: bool = True,
) -> tuple[ContrastiveView, ContrastiveView]:
    """Stage-1 (MoCo v3) augmentations: two asymmetric views of one RGB image (PIL image or uint8 tensor).

    Both views: RandomResizedCrop(`image_size`, scale=`crop_scale`, bilinear, antialiased) -> ColorJitter(0.4, 0.4,
    0.2, 0.1) with p=0.8 -> RandomGrayscale(p=0.2) -> GaussianBlur(sigma 0.1..2.0) -> [solarize] ->
    RandomHorizontalFlip (if `hflip`) -> float32 normalised. View 1 always blurs and never solarizes; view 2 blurs
    with p=0.1 and solarizes (threshold 128 of 255) with p=0.2. See `contrastive_views` for how each op is computed
    (about 7x faster than torchvision's v2 transforms of the same recipe, docs/benchmarks.md).

    Returns:
        `(view_1, view_2)`, each mapping an image to a float32 tensor `(3, image_size, image_size)`; with
        `normalize=False`, to the uint8 view, which the training step normalises per batch on its device
        (`contrastive_views.normalize_views`); with `photometric_on_device`, to the uint8 crop and the parameters of its photometric half instead,
        which the training step applies to the whole batch on the accelerator (`apply_photometric`).
    """
    recipe_1, recipe_2 = moco_v3_view_recipes(image_size, crop_scale, hflip)
    return (
        ContrastiveView(recipe_1, image_mean, image_std, photometric_on_device, normalize),
        ContrastiveView(recipe_2, image_mean, image_std, photometric_on_device, normalize),
    )


def build_eval_transform(
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    crop_pct: float = 0.875,
) -> v2.Compose:
    """Evaluation preprocessing: Resize the short side to `int(image_size / crop_pct)` (bicubic, antialiased) ->
    CenterCrop(`image_size`) -> float32 in [0, 1] -> Normalize.

    Returns:
        A transform mapping a PIL image to a float32 tensor of shape `(3, image_size, image_size)`.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"`crop_pct` must lie in (0, 1], got {crop_pct}.")
    resize = int(math.floor(image_size / crop_pct))
    steps = [
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
    ]
    return v2.Compose(steps + _normalize(image_mean, image_std))
