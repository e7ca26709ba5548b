"""The built-in datasets, made from scikit-learn's bundled 8x8 digits; they need no network, so `make demo` and the
tests run offline.

- `digits` (`load_digits_dataset`): the digits themselves, upscaled, as an RGB image-classification dataset;
  `sources.load_image_dataset` returns it when no data source is given or `--dataset_name digits`.
- `canvas-digits` (`load_canvas_digits_dataset`): each digit at a random position and scale on a plain dark canvas
  with pixel noise. `make demo` trains on it: a linear classifier on the raw pixels does poorly on an object that
  moves, and the digit is the only thing that tells one image from another.
- `cluttered-digits` (`load_cluttered_digits_dataset`): the same, on a noisy grey background cluttered with pieces of
  other digits (the "cluttered translated digits" kind of task); the demo's data until its teacher was shipped (two
  views of one canvas can be matched by the clutter alone, a shortcut that stage 1 takes).
- The canvas helpers (`cluttered_background` or `plain_background`, then `paste_digit`) make the segmentation set
  `digit-canvas` (`segmentation.make_digit_canvas`).

Imports nothing of the package.
"""

from __future__ import annotations

import functools

import datasets
import numpy as np
import PIL.Image
import PIL.ImageDraw


DIGITS_DATASET = "digits"
"""The `--dataset_name` that stands for this dataset (also the default when no source is given)."""
CLUTTERED_DIGITS_DATASET = "cluttered-digits"
"""The `--dataset_name` of the digits placed on cluttered canvases (`load_cluttered_digits_dataset`)."""
CANVAS_DIGITS_DATASET = "canvas-digits"
"""The `--dataset_name` of the digits placed on plain canvases (`load_canvas_digits_dataset`), `make demo`'s data."""
DIGITS_TEST_FRACTION = 0.15
DIGITS_SPLIT_SEED = 0
SPLITS = ("train", "test", "validation")


def load_digits_dataset(
    split: str = "train",
    image_size: int = 32,
    test_fraction: float = DIGITS_TEST_FRACTION,
    seed: int = DIGITS_SPLIT_SEED,
) -> datasets.Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, no network) as an RGB image-classification dataset.

    Each 8x8 image (ink intensity 0..16) is scaled to 0..255 (bright ink on a dark background), upscaled to
    `image_size` x `image_size` with bilinear resampling and stored as a 3-channel RGB PIL image.

    The split is a seeded shuffle of all images: `"train"` holds the first `1 - test_fraction` (about 85 %, 1,527
    images with the defaults), `"test"` (alias `"validation"`) the rest. The same arguments always give the same split
    and the two splits are disjoint.

    Returns:
        A `datasets.Dataset` with columns `"image"` (`datasets.Image`) and `"label"` (`ClassLabel`, names "0".."9").
    """
    if image_size <= 0:
        raise ValueError(f"`image_size` must be a positive integer, got {image_size}.")
    digits, labels = digits_of_split(split, DIGITS_DATASET, test_fraction, seed)
    images = []
    for digit in digits:
        pixels = np.clip(np.round(digit * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        image = PIL.Image.fromarray(pixels).resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
        images.append(image.convert("RGB"))
    return _classification_dataset(images, labels)


def digits_of_split(
    split: str, dataset: str, test_fraction: float = DIGITS_TEST_FRACTION, seed: int = DIGITS_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits of one split: `(images (N, 8, 8) float, ink 0..16; labels (N,) int)`.

    The split is a seeded shuffle of all 1,797 images: `"train"` holds the first `1 - test_fraction`, `"test"` (alias
    `"validation"`) the rest, so every dataset built from the digits keeps test handwriting out of training."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(
            f"Unknown split {split!r} for the {dataset!r} dataset; available splits: ['train', 'test', "
            "'validation'] ('validation' is the same images as 'test')."
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must lie strictly between 0 and 1, got {test_fraction}.")
    bundled = load_digits()
    order = np.random.RandomState(seed).permutation(len(bundled.target))
    num_train = int(round(len(order) * (1.0 - test_fraction)))
    indices = order[:num_train] if split == "train" else order[num_train:]
    return bundled.images[indices], bundled.target[indices]


def _classification_dataset(images: list, labels) -> datasets.Dataset:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": [int(label) for label in labels]}, features=features)


# ---------------------------------------------------------------------------------------------------------------------
# digits on cluttered canvases


def _smooth_colour_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """An RGB field that varies slowly across the canvas: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
    return np.asarray(PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.Resampling.BILINEAR), np.float32)


def digit_ink(digit: np.ndarray, side: int) -> np.ndarray:
    """One 8x8 digit (ink 0..16) as an ink map in [0, 1] of `side` x `side` pixels."""
    image = PIL.Image.fromarray(np.uint8(np.clip(digit * (255.0 / 16.0), 0, 255)))
    return np.asarray(image.resize((side, side), PIL.Image.Resampling.BILINEAR), np.float32) / 255.0


def cluttered_background(rng: np.random.Generator, size: int, fragment_digits: np.ndarray) -> np.ndarray:
    """A `size` x `size` RGB background, float32 0..255, with no digit on it: a smooth colour field with some pixel
    noise, 3 to 6 lines and box outlines in random colours, and 1 or 2 fragments of digits (a quarter of one of
    `fragment_digits`, at low contrast), so that "bright strokes" alone do not say "digit"."""
    canvas = 0.85 * _smooth_colour_field(rng, size, 4) + 0.15 * rng.uniform(0, 255, size=(size, size, 3))
    clutter = PIL.Image.fromarray(np.uint8(canvas))
    draw = PIL.ImageDraw.Draw(clutter)
    for _ in range(rng.integers(3, 7)):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, size=4))
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 3)))
        else:
            draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=colour)
    canvas = np.asarray(clutter, np.float32).copy()
    for _ in range(rng.integers(1, 3)):
        side = int(rng.integers(size // 4, size // 2 + 1))
        ink = digit_ink(fragment_digits[rng.integers(len(fragment_digits))], side)
        half = side // 2
        quarter = ink[:half, :half] if rng.random() < 0.5 else ink[half:, half:]
        y, x = (int(v) for v in rng.integers(0, size - quarter.shape[0] + 1, size=2))
        colour = rng.uniform(0, 255, size=3)
        alpha = 0.6 * quarter[..., None]
        region = canvas[y : y + quarter.shape[0], x : x + quarter.shape[1]]
        region[:] = (1 - alpha) * region + alpha * colour
    return canvas


def plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A `size` x `size` x 3 dark grey background, float32 (about 0..255): level 30 with pixel noise (std 20) and
    nothing else, so that every bright stroke on it belongs to a digit."""
    canvas = 30.0 + 20 * rng.standard_normal((size, size, 1))
    return np.repeat(canvas, 3, axis=2).astype(np.float32)


def paste_digit(
    rng: np.random.Generator, canvas: np.ndarray, digit: np.ndarray, side: int
) -> tuple[np.ndarray, int, int]:
    """Paints one 8x8 `digit`, scaled to `side` pixels, at a random position of `canvas` (float32, changed in place),
    in a colour whose every channel lies at the far end from the background under it, so the digit stays visible
    where clutter in random colours may not. Returns `(ink (side, side) in [0, 1], top, left)`."""
    size = canvas.shape[0]
    ink = digit_ink(digit, side)
    y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    region = canvas[y : y + side, x : x + side]
    dark = region.mean(axis=(0, 1)) < 128
    colour = np.where(dark, rng.uniform(200, 255, size=3), rng.uniform(0, 55, size=3))
    region[:] = (1 - ink[..., None]) * region + ink[..., None] * colour
    return ink, y, x


def grey_clutter(rng: np.random.Generator, size: int, fragment_digits: np.ndarray) -> np.ndarray:
    """A `size` x `size` x 3 grey background, float32 (about 0..255), with no whole digit on it: a dark level (30) with
    a smooth variation (a quarter of a coarse random field's range) and pixel noise (std 20), and 1 or 2 pieces of
    other digits (a square half a digit's side, from one of `fragment_digits` drawn at 40-70 % of the canvas), at
    ink levels 120-230, so that a bright stroke alone does not say "digit"."""
    field = _smooth_colour_field(rng, size, 4).mean(axis=2, keepdims=True)
    canvas = 30 + 0.25 * (field - 127.5) + 20 * rng.standard_normal((size, size, 1))
    canvas = np.repeat(canvas, 3, axis=2).astype(np.float32)
    for _ in range(rng.integers(1, 3)):
        side = int(rng.integers(int(size * 0.4), int(size * 0.7) + 1))
        ink = digit_ink(fragment_digits[rng.integers(len(fragment_digits))], side)
        piece_side = int(side * 0.5)
        top, left = (int(v) for v in rng.integers(0, side - piece_side + 1, size=2))
        piece = ink[top : top + piece_side, left : left + piece_side]
        y, x = (int(v) for v in rng.integers(0, size - piece_side + 1, size=2))
        level = rng.uniform(120, 230)
        region = canvas[y : y + piece_side, x : x + piece_side]
        region[:] = np.maximum(region, piece[..., None] * level)
    return canvas


def load_cluttered_digits_dataset(
    split: str = "train",
    image_size: int = 32,
    placements: int | None = None,
    min_scale: float = 0.45,
    max_scale: float = 0.75,
    seed: int = 0,
) -> datasets.Dataset:
    """The bundled digits on cluttered canvases, as an RGB image-classification dataset (label: the digit).

    As `load_canvas_digits_dataset`, but each canvas is a new `grey_clutter` background instead of a plain one.
    """
    return _digits_on_canvases(split, image_size, placements, min_scale, max_scale, seed, "clutter")


def load_canvas_digits_dataset(
    split: str = "train",
    image_size: int = 32,
    placements: int | None = None,
    min_scale: float = 0.45,
    max_scale: float = 0.75,
    seed: int = 0,
) -> datasets.Dataset:
    """The bundled digits on plain canvases, as an RGB image-classification dataset (label: the digit).

    Every digit of the split (the split of `load_digits_dataset`, so test handwriting is unseen) is drawn
    `placements` times (default 4 for training, 2 for evaluation: 6,108 and 540 images), each time on a new
    `plain_background` of `image_size` pixels, scaled to `min_scale`..`max_scale` of the side, at a random position,
    in white ink. The same arguments always give the same images; the training and evaluation splits use separate
    streams of `seed`.

    The images are drawn once per process and arguments (about 5 s for the training split); each call returns its own
    `datasets.Dataset` over the same Arrow table, so one caller's format or transform does not reach another's.

    Returns:
        A `datasets.Dataset` with columns `"image"` (`datasets.Image`) and `"label"` (`ClassLabel`, names "0".."9").
    """
    return _digits_on_canvases(split, image_size, placements, min_scale, max_scale, seed, "plain")


def _digits_on_canvases(
    split: str, image_size: int, placements: int | None, min_scale: float, max_scale: float, seed: int, background: str
) -> datasets.Dataset:
    placements = placements if placements is not None else (4 if split == "train" else 2)
    drawn = _draw_digits_on_canvases(split, image_size, placements, min_scale, max_scale, seed, background)
    return datasets.Dataset(drawn.data, info=drawn.info.copy(), split=drawn.split)


@functools.lru_cache(maxsize=4)
def _draw_digits_on_canvases(
    split: str, image_size: int, placements: int, min_scale: float, max_scale: float, seed: int, background: str
) -> datasets.Dataset:
    name = CLUTTERED_DIGITS_DATASET if background == "clutter" else CANVAS_DIGITS_DATASET
    if image_size < 16:
        raise ValueError(f"`image_size` of {name!r} must be at least 16, got {image_size}.")
    if not 0.0 < min_scale <= max_scale <= 1.0:
        raise ValueError(f"Need 0 < min_scale <= max_scale <= 1, got {min_scale} and {max_scale}.")
    digits, labels = digits_of_split(split, name)
    if placements < 1:
        raise ValueError(f"`placements` must be at least 1, got {placements}.")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    smallest, largest = max(int(round(min_scale * image_size)), 8), int(round(max_scale * image_size))
    images, image_labels = [], []
    for _ in range(placements):
        for digit, label in zip(digits, labels):
            if background == "clutter":
                canvas = grey_clutter(rng, image_size, digits)
            else:
                canvas = plain_background(rng, image_size)
            side = int(rng.integers(smallest, largest + 1))
            ink = digit_ink(digit, side)
            y, x = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            region = canvas[y : y + side, x : x + side]
            region[:] = np.maximum(region, ink[..., None] * 255.0)
            images.append(PIL.Image.fromarray(np.uint8(np.clip(np.round(canvas), 0, 255))))
            image_labels.append(label)
    return _classification_dataset(images, image_labels)
