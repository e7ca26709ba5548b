"""Stage 1's two augmented views (MoCo v3's recipe), fast enough to feed a GPU from a few CPU cores.

A view is made in three steps:

1. `draw_view_parameters`: every random choice of the view, drawn once per image from torch's generator (which the
   training loop seeds per image): the crop box, the flip, whether colour jitter applies, its four factors and their
   order, grayscale, the blur's sigma (0: no blur), solarize.
2. `crop_view`: the geometric part on the decoded uint8 image: crop, antialiased bilinear resize, flip.
3. The photometric half: jitter, grayscale, blur, solarize and rounding to 8 bits (as every op of a PIL pipeline
   rounds). The default path makes it in the loader, one view at a time (`photometric_one`): NumPy on the 8-bit
   scale, every op skipped when it was not drawn, the hue shift per output channel with 0/1 masks, the blur's
   borders copied by slicing and a grayscale view blurred as one channel. `--augment_on_device` leaves the crops as
   uint8 and runs `apply_photometric` on the accelerator for the whole batch: torch, the same formulas on the same
   parameters, then normalisation.

What the photometric ops are, against torchvision's v2 transforms of the same recipe (MoCo v3's code applies them to
PIL images):

- brightness, contrast, saturation: torchvision's float formulas (contrast blends with the mean of the grayscale
  image, saturation with the grayscale image), in a random order, each clamped to [0, 1];
- hue: torchvision's HSV hue shift, computed directly on RGB (`adjust_hue`), without the HSV round trip;
- grayscale: torchvision's weights (0.2989, 0.587, 0.114), copied to the three channels;
- blur: an exact separable Gaussian of the drawn sigma with reflected borders, truncated at `ceil(3 sigma)` pixels
  (torchvision's 23-pixel kernel at 224 px keeps the tails beyond 3 sigma too: at most 0.3 % of the weight);
- solarize: `1 - x` where `x >= 128 / 255`, as torchvision's threshold 128 on uint8.

Imports nothing of the package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


# The parameters `apply_photometric` reads, one row per image: the keys of its `parameters` dict.
PHOTOMETRIC_KEYS = ("jitter", "jitter_factors", "jitter_order", "grayscale", "blur_sigma", "solarize")

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255
BLUR_TRUNCATE = 3.0  # the blur kernel reaches ceil(3 sigma) pixels either side


@dataclass(frozen=True)
class ViewRecipe:
    """The distribution of one view's augmentation (MoCo v3's values by default)."""

    image_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    hflip: bool = True


def moco_v3_view_recipes(
    image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True
) -> tuple[ViewRecipe, ViewRecipe]:
    """MoCo v3's two asymmetric views: view 1 always blurs and never solarizes; view 2 blurs with p 0.1 and
    solarizes with p 0.2."""
    crop_scale = tuple(crop_scale)
    return (
        ViewRecipe(image_size, crop_scale, blur_p=1.0, solarize_p=0.0, hflip=hflip),
        ViewRecipe(image_size, crop_scale, blur_p=0.1, solarize_p=0.2, hflip=hflip),
    )


# --- 1. parameters ------------------------------------------------------------------------------------------------


def draw_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, ...]:
    """`(top, left, crop_height, crop_width)`, drawn from torchvision's `RandomResizedCrop` distribution: up to 10
    tries of a random area fraction in `scale` and log-uniform aspect ratio in `ratio`, a uniform position for the
    first that fits, else the central crop. The draws of all tries come from one call (the generator's per-call
    cost is most of the drawing's)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    draws = torch.rand(40).tolist()
    for attempt in range(10):
        scale_u, ratio_u, top_u, left_u = draws[4 * attempt : 4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * scale_u)
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ratio_u)
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            # uniform over the height - crop_height + 1 positions (min: a draw of exactly 1.0 cannot overflow)
            top = min(int(top_u * (height - crop_height + 1)), height - crop_height)
            left = min(int(left_u * (width - crop_width + 1)), width - crop_width)
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height, crop_width = height, int(round(height * max(ratio)))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


@dataclass
class ViewParameters:
    """Every random choice of one view of one image, as plain Python values."""

    crop_box: tuple[int, int, int, int]  # top, left, height, width in the source image
    flip: bool
    jitter: bool
    jitter_factors: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    jitter_order: tuple[int, int, int, int]  # the order of the four ops, a permutation of 0..3 in that numbering
    grayscale: bool
    blur_sigma: float  # 0 without blur
    solarize: bool

    def photometric_tensors(self) -> dict[str, torch.Tensor]:
        """The `PHOTOMETRIC_KEYS` as tensors of one image, for the collator to stack."""
        return {
            "jitter": torch.tensor(self.jitter),
            "jitter_factors": torch.tensor(self.jitter_factors, dtype=torch.float32),
            "jitter_order": torch.tensor(self.jitter_order, dtype=torch.long),
            "grayscale": torch.tensor(self.grayscale),
            "blur_sigma": torch.tensor(self.blur_sigma, dtype=torch.float32),
            "solarize": torch.tensor(self.solarize),
        }


def draw_view_parameters(recipe: ViewRecipe, height: int, width: int) -> ViewParameters:
    """Every random choice of one view of a `height` x `width` image, from torch's global generator (the same number
    of draws whatever is chosen, so that one choice does not shift the next image's)."""
    crop_box = draw_crop_box(height, width, recipe.crop_scale, recipe.crop_ratio)
    # the other choices from one call (the generator's per-call cost exceeds the drawing at this size)
    flip_u, jitter_u, *factor_u, grayscale_u, blur_u, sigma_u, solarize_u = torch.rand(10).tolist()
    flip = recipe.hflip and flip_u < 0.5
    jitter = jitter_u < recipe.jitter_p
    ranges = (
        (max(0.0, 1 - recipe.brightness), 1 + recipe.brightness),
        (max(0.0, 1 - recipe.contrast), 1 + recipe.contrast),
        (max(0.0, 1 - recipe.saturation), 1 + recipe.saturation),
        (-recipe.hue, recipe.hue),
    )
    factors = tuple(low + (high - low) * u for (low, high), u in zip(ranges, factor_u))
    order = tuple(torch.randperm(4).tolist())
    grayscale = grayscale_u < recipe.grayscale_p
    blur = blur_u < recipe.blur_p
    sigma = recipe.blur_sigma[0] + (recipe.blur_sigma[1] - recipe.blur_sigma[0]) * sigma_u
    solarize = solarize_u < recipe.solarize_p
    return ViewParameters(crop_box, flip, jitter, factors, order, grayscale, sigma if blur else 0.0, solarize)


# --- 2. geometry --------------------------------------------------------------------------------------------------


def as_uint8_image(image: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
    """An RGB PIL image or uint8 tensor as a uint8 tensor `(3, H, W)`."""
    if isinstance(image, torch.Tensor):
        return image
    return TF.pil_to_tensor(image)


def crop_view(image: torch.Tensor, parameters: ViewParameters, image_size: int) -> torch.Tensor:
    """The view's crop of the uint8 image `(3, H, W)`, resized (bilinear, antialiased) to `image_size` and
    flipped if drawn so: uint8 `(3, image_size, image_size)`."""
    top, left, height, width = parameters.crop_box
    region = image[None, :, top : top + height, left : left + width]
    # torch's own call, which `TF.resized_crop` makes too (tested equal), without the wrapper's per-call cost
    crop = F.interpolate(region, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)[
        0
    ]
    return crop.flip(-1) if parameters.flip else crop


# --- 3. photometric ops on a batch ----------------------------------------------------------------------------------


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """`(B,)` -> `(B, 1, 1, 1)`, to broadcast over images."""
    return values.view(-1, 1, 1, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` -> `(B, 1, H, W)`, torchvision's grayscale."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return (images * _per_image(factors)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """`factor * x + (1 - factor) * mean(gray(x))`, written as one `lerp` from the mean towards the image; the mean
    of the grayscale image is the weighted sum of the channel means (no grayscale image is made)."""
    weights = torch.tensor(GRAY_WEIGHTS, device=images.device, dtype=images.dtype)
    mean = (images.mean(dim=(-2, -1)) @ weights).view(-1, 1, 1, 1)
    return torch.lerp(mean.expand_as(images), images, _per_image(factors)).clamp_(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """`factor * x + (1 - factor) * gray(x)`, written as one `lerp` from the grayscale image towards the image."""
    return torch.lerp(_gray(images).expand_as(images), images, _per_image(factors)).clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's hue shift (in HSV, by `factor` of a turn), computed without the HSV round trip: a shift keeps
    each pixel's largest and smallest channel and moves its hue on the hexagon, so the result is
    `max - chroma * clamp(min(k, 4 - k), 0, 1)` with `k = (n + 6 hue') mod 6`, n = 5, 3, 1 for R, G, B.
    Written with arithmetic masks instead of `where` and `remainder`, which are several times slower on a CPU."""
    red, green, blue = images.unbind(1)
    largest = torch.maximum(torch.maximum(red, green), blue)
    chroma = largest - torch.minimum(torch.minimum(red, green), blue)
    inverse = chroma.clamp(min=1e-12).reciprocal_()  # a gray pixel (chroma 0) keeps its value whatever its hue
    is_red = (largest == red).to(images.dtype)
    is_green = (largest == green).to(images.dtype) * (1.0 - is_red)
    is_blue = 1.0 - is_red - is_green
    # the hue in sixths of a turn, plus the shift, plus 6 so that it is positive
    hue = (green - blue).mul_(is_red)
    hue.add_((blue - red).add_(2.0 * chroma).mul_(is_green))
    hue.add_((red - green).add_(4.0 * chroma).mul_(is_blue))
    hue.mul_(inverse).add_((6.0 * factors.to(images.dtype) + 6.0).view(-1, 1, 1))
    k = hue.unsqueeze(1) + _HUE_CHANNEL_OFFSETS.to(images.device, images.dtype)
    k.sub_(torch.floor(k * (1.0 / 6.0)).mul_(6.0))  # k mod 6
    # clamp(min(k, 4 - k), 0, 1) = clamp(2 - |k - 2|, 0, 1)
    return largest.unsqueeze(1) - chroma.unsqueeze(1) * k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)


_HUE_CHANNEL_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def adjust_hue_one(image: np.ndarray, factor: float) -> np.ndarray:
    """`adjust_hue` for one float32 image `(3, H, W)` as a NumPy array (the loader's path), written per output
    channel: with `h` the shifted hue in sixths of a turn, each channel is `min + chroma * clamp(g(h), 0, 1)`, where
    g is `|h - 3| - 1` for red, `2 - |h - 2|` for green and `2 - |h - 4|` for blue. The branch on the largest
    channel is taken with 0/1 masks: NumPy's `where` and torch's CPU kernels are several times slower than the
    arithmetic. Equal to torchvision's `adjust_hue` to 1e-5 (tested)."""
    f32 = np.float32
    red, green, blue = image
    largest = np.maximum(np.maximum(red, green), blue)
    smallest = np.minimum(np.minimum(red, green), blue)
    chroma = largest - smallest
    # which channel is largest (ties go to red, then green), as 0/1
    is_red = (largest == red).astype(f32)
    is_green = (largest == green).astype(f32)
    is_green -= is_green * is_red
    is_blue = f32(1.0) - is_red
    is_blue -= is_green
    # the hue in sixths of a turn: (g - b) / c, (b - r) / c + 2 or (r - g) / c + 4
    hue = green - blue
    hue *= is_red
    term = blue - red
    term += f32(2.0) * chroma
    term *= is_green
    hue += term
    np.subtract(red, green, out=term)
    term += f32(4.0) * chroma
    term *= is_blue
    hue += term
    hue /= np.maximum(chroma, f32(1e-12))  # a gray pixel (chroma 0) keeps its value whatever its hue
    hue += f32(6.0 * factor + 6.0)
    hue -= np.floor(hue * f32(1.0 / 6.0)) * f32(6.0)  # shifted, into [0, 6)
    shifted = np.empty_like(image)
    for channel, centre in enumerate((3.0, 2.0, 4.0)):
        ramp = np.subtract(hue, f32(centre), out=shifted[channel])
        np.abs(ramp, out=ramp)
        if channel == 0:
            ramp -= f32(1.0)
        else:
            np.subtract(f32(2.0), ramp, out=ramp)
        torch.from_numpy(ramp).clamp_(0.0, 1.0)
        ramp *= chroma
        ramp += smallest
    return shifted


def _clip_levels(values: np.ndarray) -> np.ndarray:
    """Clamps to [0, 255] in place, with torch's kernel on the same memory (NumPy's `clip` costs twice as much at
    this size, its `maximum` / `minimum` with a scalar several times)."""
    torch.from_numpy(values).clamp_(0.0, 255.0)
    return values


def _gray_one(image: np.ndarray) -> np.ndarray:
    """`(3, H, W)` -> `(H, W)`, torchvision's grayscale."""
    gray = image[0] * np.float32(GRAY_WEIGHTS[0])
    gray += image[1] * np.float32(GRAY_WEIGHTS[1])
    gray += image[2] * np.float32(GRAY_WEIGHTS[2])
    return gray


def _blend_one(image: np.ndarray, factor: float, other: np.ndarray | float) -> np.ndarray:
    """torchvision's `_blend`: `factor * image + (1 - factor) * other`, clamped to the range."""
    blended = image * np.float32(factor)
    blended += (
        other * np.float32(1.0 - factor) if isinstance(other, np.ndarray) else np.float32((1.0 - factor) * other)
    )
    return _clip_levels(blended)


def _jitter_one(image: np.ndarray, op_index: int, factor: float) -> np.ndarray:
    """One of the four colour-jitter ops (brightness, contrast, saturation, hue) on one image `(3, H, W)` in
    [0, 255]."""
    if op_index == 0:
        return _clip_levels(image * np.float32(factor))
    if op_index == 1:
        # the mean of the grayscale image is the weighted sum of the channel means
        # (as a matrix-vector product: several times faster than NumPy's `mean` here)
        pixels = image.reshape(3, -1)
        channel_means = pixels @ np.full(pixels.shape[1], 1.0 / pixels.shape[1], dtype=np.float32)
        mean = float(np.dot(channel_means, np.asarray(GRAY_WEIGHTS, dtype=np.float32)))
        return _blend_one(image, factor, mean)
    if op_index == 2:
        return _blend_one(image, factor, _gray_one(image))
    return adjust_hue_one(image, factor)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """`(B, 2 * radius + 1)` normalised Gaussian weights, one row per sigma, each cut at its own `ceil(3 sigma)`:
    an image's blur does not depend on the sigmas of the others in its batch."""
    offsets = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=torch.float32)
    # a sigma of 0 (an image the batch does not blur) gets the identity kernel instead of 0 / 0
    sigmas = sigmas.to(torch.float32).clamp(min=1e-3).unsqueeze(1)
    weights = torch.exp(-(offsets**2) / (2 * sigmas**2))
    weights = weights * (offsets.abs() <= torch.ceil(BLUR_TRUNCATE * sigmas))
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each image blurred by a separable Gaussian of its own sigma (> 0), borders reflected, the kernel truncated at
    `ceil(3 sigma)` of the largest sigma: `2 (2 r + 1)` shifted multiply-adds over the batch."""
    height, width = images.shape[-2:]
    radius = min(int(math.ceil(BLUR_TRUNCATE * float(sigmas.max()))), height - 1, width - 1)
    weights = gaussian_kernels(sigmas, radius).to(images.dtype)
    if images.shape[0] == 1:
        taps = [float(weight) for weight in weights[0]]  # plain numbers: one fused op per tap
    else:
        taps = [weight.view(-1, 1, 1, 1) for weight in weights.unbind(1)]

    def accumulate(padded: torch.Tensor, length: int, dim: int) -> torch.Tensor:
        result = padded.narrow(dim, 0, length) * taps[0]
        for tap in range(1, 2 * radius + 1):
            shifted = padded.narrow(dim, tap, length)
            if isinstance(taps[tap], float):
                result.add_(shifted, alpha=taps[tap])
            else:
                result.addcmul_(shifted, taps[tap])
        return result

    rows = accumulate(F.pad(images, (radius, radius, 0, 0), mode="reflect"), width, -1)
    return accumulate(F.pad(rows, (0, 0, radius, radius), mode="reflect"), height, -2)


def gaussian_blur_one(image: np.ndarray, sigma: float) -> np.ndarray:
    """`gaussian_blur` for one float32 image `(C, H, W)` as a NumPy array (the loader's path): the same kernel and
    borders, with the reflected borders copied by slicing (`F.pad`'s reflect mode costs as much as several taps)
    and the taps as fused multiply-adds of torch on the same memory."""
    channels, height, width = image.shape
    radius = min(int(math.ceil(BLUR_TRUNCATE * sigma)), height - 1, width - 1)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    taps = [float(weight) for weight in (weights / weights.sum()).astype(np.float32)]
    # along the rows: padded left and right by the reflection (without the edge pixel, as `F.pad`'s reflect)
    padded = np.empty((channels, height, width + 2 * radius), dtype=np.float32)
    padded[..., radius : radius + width] = image
    padded[..., :radius] = image[..., radius:0:-1]
    padded[..., radius + width :] = image[..., width - 2 : width - 2 - radius : -1]
    source = torch.from_numpy(padded)
    # along the columns: the first pass writes into the middle rows of the second pass's padded input
    rows = torch.empty((channels, height + 2 * radius, width))
    middle = rows[:, radius : radius + height]
    torch.mul(source[..., :width], taps[0], out=middle)
    for tap in range(1, 2 * radius + 1):
        middle.add_(source[..., tap : tap + width], alpha=taps[tap])
    rows[:, :radius] = middle[:, 1 : radius + 1].flip(1)
    rows[:, radius + height :] = middle[:, height - 1 - radius : height - 1].flip(1)
    blurred = rows[:, :height] * taps[0]
    for tap in range(1, 2 * radius + 1):
        blurred.add_(rows[:, tap : tap + height], alpha=taps[tap])
    return blurred.numpy()


def _where_drawn(images: torch.Tensor, drawn: torch.Tensor, op, *arguments: torch.Tensor) -> torch.Tensor:
    """`op(images, *arguments)` for the images where `drawn` is True, the others as they are: the op runs on the
    whole batch and `torch.where` keeps the drawn rows, which needs no host-device synchronisation."""
    return torch.where(_per_image(drawn), op(images, *arguments), images)


def photometric_one(crop: torch.Tensor, parameters: ViewParameters) -> np.ndarray:
    """The photometric ops of one view on one uint8 crop `(3, H, W)` on the CPU (the loader's path): a float32 NumPy
    array `(3, H, W)` in [0, 255], not yet rounded. The parameters are read as Python values, so that nothing is
    computed for an op that was not drawn, and the ops run in NumPy (the blur in torch, on the same memory): per
    image, torch's CPU dispatch costs as much as the arithmetic. The same formulas as `apply_photometric`, on the
    8-bit scale instead of [0, 1] (every op is linear in the scale or, as the hue shift, independent of it), which
    saves the two passes of scaling to [0, 1] and back."""
    image = crop.numpy().astype(np.float32)
    if parameters.jitter:
        for op_index in parameters.jitter_order:
            image = _jitter_one(image, op_index, parameters.jitter_factors[op_index])
    if parameters.grayscale:
        image = _gray_one(image)[None]  # one channel through blur and solarize, copied to three at the end
    if parameters.blur_sigma > 0:
        image = gaussian_blur_one(image, parameters.blur_sigma)
    if parameters.solarize:
        # 255 - x where x >= 128, as x + above * (255 - 2x)
        flipped = np.float32(255.0) - np.float32(2.0) * image
        flipped *= (image >= np.float32(SOLARIZE_THRESHOLD * 255.0)).astype(np.float32)
        image += flipped
    return np.repeat(image, 3, axis=0) if parameters.grayscale else image


def _photometric_batch(images: torch.Tensor, parameters: dict[str, torch.Tensor]) -> torch.Tensor:
    """`apply_photometric`'s ops for a batch: each op runs where it was drawn, in each image's jitter order."""
    jitter = parameters["jitter"].to(torch.bool)
    factors, order = parameters["jitter_factors"], parameters["jitter_order"]
    for position in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            drawn = jitter & (order[:, position] == op_index)
            images = _where_drawn(images, drawn, op, factors[:, op_index])
    images = _where_drawn(images, parameters["grayscale"].to(torch.bool), lambda x: _gray(x).repeat(1, 3, 1, 1))
    sigmas = parameters["blur_sigma"]
    images = _where_drawn(images, sigmas > 0, gaussian_blur, sigmas)
    solarize = _per_image(parameters["solarize"].to(torch.bool)) & (images >= SOLARIZE_THRESHOLD)
    return torch.where(solarize, 1.0 - images, images)


def apply_photometric(
    crops: torch.Tensor,
    parameters: dict[str, torch.Tensor],
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> torch.Tensor:
    """The photometric half of a batch of views on any device (the `--augment_on_device` path): uint8 crops
    `(B, 3, H, W)` and their parameters (the `PHOTOMETRIC_KEYS`, stacked to `(B, ...)` by `stack_parameters` and
    moved to the crops' device) to normalised float32 `(B, 3, H, W)`. Jitter (its four ops in each image's order),
    grayscale, blur, solarize, then normalisation; the same op functions as the loader's `photometric_one`."""
    images = _photometric_batch(crops.to(torch.float32).div_(255.0), parameters)
    return _normalize(_round_to_8_bits(images), image_mean, image_std)


def _round_to_8_bits(images: torch.Tensor) -> torch.Tensor:
    """Views in [0, 1] rounded to 8 bits, as the loader's uint8 views are (and as a PIL pipeline rounds): the
    device path and the loader path then hand the model the same numbers."""
    return images.mul_(255.0).round_().div_(255.0)


def normalize_views(views: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]) -> torch.Tensor:
    """uint8 views `(B, 3, H, W)` (`ContrastiveView(normalize=False)`) to normalised float32, on their device: the
    training step's share when the loader hands over 8-bit batches (a quarter of the bytes of float32 to move
    between processes and to the accelerator)."""
    return _normalize(views.to(torch.float32).div_(255.0), image_mean, image_std)


def _normalize(images: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]) -> torch.Tensor:
    mean = torch.tensor(image_mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(image_std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)


def stack_parameters(parameters: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The photometric tensors of several views (`ViewParameters.photometric_tensors`), stacked to `(B, ...)`."""
    return {key: torch.stack([p[key] for p in parameters]) for key in PHOTOMETRIC_KEYS}


class ContrastiveView:
    """One view of MoCo v3's pair: a PIL image or uint8 tensor in, the augmented view out.

    By default the whole view is made here (on the CPU): a normalised float32 tensor `(3, size, size)`; with
    `normalize=False` the view as 8-bit RGB (uint8), rounded as every op of a PIL pipeline rounds, which a
    collator then stacks and normalises in one go (a quarter of the bytes to copy between processes). With
    `photometric_on_device=True` only the geometric part is made: the result is a dict of the uint8 crop (`"crop"`)
    and the `PHOTOMETRIC_KEYS`, which the collator stacks and the training step hands to `apply_photometric` on the
    accelerator.
    """

    def __init__(
        self,
        recipe: ViewRecipe,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        photometric_on_device: bool = False,
        normalize: bool = True,
    ):
        self.recipe = recipe
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self._mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.photometric_on_device = photometric_on_device
        self.normalize = normalize

    def __call__(self, image: PIL.Image.Image | torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        image = as_uint8_image(image)
        parameters = draw_view_parameters(self.recipe, image.shape[-2], image.shape[-1])
        crop = crop_view(image, parameters, self.recipe.image_size)
        if self.photometric_on_device:
            return {"crop": crop, **parameters.photometric_tensors()}
        view = photometric_one(crop, parameters)
        np.rint(view, out=view)  # half to even, as torch.round in `apply_photometric`
        if not self.normalize:
            return torch.from_numpy(view.astype(np.uint8))
        view /= np.float32(255.0)
        return torch.from_numpy(view)[None].sub_(self._mean).div_(self._std)[0]

    def __repr__(self) -> str:
        where = "accelerator" if self.photometric_on_device else "cpu"
        return f"{type(self).__name__}({self.recipe}, photometric on the {where})"


__all__ = [
    "PHOTOMETRIC_KEYS",
    "ContrastiveView",
    "ViewParameters",
    "ViewRecipe",
    "apply_photometric",
    "crop_view",
    "draw_view_parameters",
    "gaussian_blur",
    "gaussian_blur_one",
    "moco_v3_view_recipes",
    "normalize_views",
    "photometric_one",
    "stack_parameters",
]
