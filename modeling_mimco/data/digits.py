"""The built-in demo dataset: scikit-learn's bundled 8x8 digits as an RGB image-classification dataset.

It needs no network, so `make demo` and the tests run offline; `sources.load_image_dataset` returns it when no data
source is given or `--dataset_name digits`. Imports nothing of the package.
"""

from __future__ import annotations

import datasets
import numpy as np
import PIL.Image


DIGITS_DATASET = "digits"
"""The `--dataset_name` that stands for this dataset (also the default when no source is given)."""
DIGITS_TEST_FRACTION = 0.15
DIGITS_SPLIT_SEED = 0


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
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "validation"):
        raise ValueError(
            f"Unknown split {split!r} for the {DIGITS_DATASET!r} dataset; available splits: ['train', 'test', "
            "'validation'] ('validation' is the same images as 'test')."
        )
    if image_size <= 0:
        raise ValueError(f"`image_size` must be a positive integer, got {image_size}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must lie strictly between 0 and 1, got {test_fraction}.")

    digits = load_digits()
    num_images = len(digits.target)
    order = np.random.RandomState(seed).permutation(num_images)
    num_train = int(round(num_images * (1.0 - test_fraction)))
    indices = order[:num_train] if split == "train" else order[num_train:]

    images = []
    for index in indices:
        pixels = np.clip(np.round(digits.images[index] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        image = PIL.Image.fromarray(pixels).resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
        images.append(image.convert("RGB"))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)]),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": [int(digits.target[index]) for index in indices]}, features=features
    )
