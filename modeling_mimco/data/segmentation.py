"""Semantic-segmentation data: where images and their label masks come from, and how both are augmented together.

- `SegmentationDataArguments`: the data flags of `mimco-segment` (a Hub dataset or local dataset folder in the ADE20K
  `scene_parse_150` layout, parquet files, two folders of images and same-named masks, or the built-in synthetic
  `digit-canvas` data; defined in the light `arguments` module, so that `--help` loads no torch, and re-exported
  here), `load_segmentation_splits` (a train and an evaluation split, checked columns, the classes).
- `load_digit_canvas_dataset`: the built-in synthetic set, scikit-learn's digits pasted at random positions and
  scales on a cluttered, textured canvas (or, with `background="plain"`, a dark noisy one), with per-pixel labels
  (background + 10 digits); deterministic by seed.
- `build_segmentation_transforms`: joint augmentations of an image and its mask (random resize, crop, flip; the mask
  always with nearest-neighbour resampling and padded with the ignore index), `SegmentationExampleTransform` (decode,
  check, `--reduce_labels`, augment) and `SegmentationCollator`.

A bad row is an expected error naming it (`errors.EXPECTED_ERRORS`): a mask whose size differs from its image, a
label value outside the classes other than the ignore index, a mask that is not single-channel.
Imports `digits`, `decoding`, `pipeline` and `sources` of this folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from modeling_mimco.data.arguments import (  # noqa: F401 (the argument class's first home, re-exported)
    DIGIT_CANVAS_DATASET,
    SegmentationDataArguments,
)
from modeling_mimco.data.decoding import (
    DEFAULT_MAX_IMAGE_PIXELS,
    _describe_image_value,
    _read_image_bytes,
    check_image_pixels,
    decode_image,
    open_checked,
)
from modeling_mimco.data.digits import cluttered_background, digits_of_split, paste_digit, plain_background
from modeling_mimco.data.pipeline import ROW_INDEX_COLUMN, _ExampleTransform
from modeling_mimco.data.sources import load_image_dataset


logger = logging.getLogger(__name__)


IGNORE_INDEX = 255
"""The label of pixels that count in neither the loss nor the metric (ADE20K's convention, and the padding value)."""
DIGIT_CANVAS_CLASSES = ["background"] + [str(digit) for digit in range(10)]
DIGIT_CANVAS_BACKGROUNDS = ("clutter", "plain")
"""The canvases `make_digit_canvas` draws on: `digits.cluttered_background` (the built-in set's) or
`digits.plain_background`."""
MASK_MODES = ("L", "P", "I", "I;16", "1")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------------------------------------------------------
# the synthetic set


def make_digit_canvas(
    rng: np.random.Generator,
    digits: np.ndarray,
    labels: np.ndarray,
    canvas_size: int = 64,
    max_digits: int = 3,
    digit_scale: tuple[float, float] = (0.375, 0.625),
    background: str = "clutter",
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: `(image uint8 (S, S, 3), mask uint8 (S, S))`, mask 0 = background, 1 + d = digit d.

    The background is `digits.cluttered_background` (`background="clutter"`: a smooth colour field, pixel noise,
    lines, boxes and digit fragments) or `digits.plain_background` (`"plain"`: dark grey and pixel noise). 1 to
    `max_digits` digits of random scale (`digit_scale`: their side as fractions of the canvas side, 3/8 to 5/8 by
    default) and position, in a colour that contrasts with the background under them (`digits.paste_digit`), are
    pasted on top, later ones over earlier ones; a pixel is labelled with the digit whose ink covers it by more than
    0.3, widened by one pixel (a 3x3 maximum filter).
    """
    size = canvas_size
    canvas = cluttered_background(rng, size, digits) if background == "clutter" else plain_background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, max_digits + 1)):
        index = int(rng.integers(len(digits)))
        side = int(rng.integers(int(digit_scale[0] * size), int(digit_scale[1] * size) + 1))
        ink, y, x = paste_digit(rng, canvas, digits[index], side)
        # the digit's shape, its strokes widened by a pixel: a label a few patches wide, not a 2-px line
        shape = PIL.Image.fromarray(np.uint8(ink > 0.3) * 255).filter(PIL.ImageFilter.MaxFilter(3))
        mask[y : y + side, x : x + side][np.asarray(shape) > 0] = 1 + int(labels[index])
    return np.uint8(np.clip(np.round(canvas), 0, 255)), mask


def load_digit_canvas_dataset(
    split: str = "train",
    num_images: int = 512,
    canvas_size: int = 64,
    seed: int = 0,
    max_digits: int = 3,
    digit_scale: tuple[float, float] = (0.375, 0.625),
    background: str = "clutter",
) -> datasets.Dataset:
    """The built-in synthetic segmentation set: `num_images` scenes of `make_digit_canvas`, columns `"image"` (RGB)
    and `"annotation"` (L mode mask: 0 background, 1 + d digit d), in the ADE20K layout.

    The training scenes draw their digits from the digits' training images and the evaluation scenes from the test
    images (the split of `digits.load_digits_dataset`), so evaluation digits are unseen handwriting. The same
    arguments always give the same images; the evaluation split uses another stream of the seed than the training one.
    `max_digits`, `digit_scale` (the digits' side as fractions of the canvas side) and `background` (one of
    `DIGIT_CANVAS_BACKGROUNDS`) are `make_digit_canvas`'s; their defaults give the set `mimco-segment` builds.
    """
    if split not in ("train", "validation", "test"):
        raise ValueError(f"Unknown split {split!r} of {DIGIT_CANVAS_DATASET!r}; available: train, validation, test.")
    if not (max_digits >= 1 and 0.0 < digit_scale[0] <= digit_scale[1] <= 1.0):
        raise ValueError(
            f"Need max_digits >= 1 and 0 < digit_scale[0] <= digit_scale[1] <= 1, got {max_digits}, {digit_scale}."
        )
    if background not in DIGIT_CANVAS_BACKGROUNDS:
        raise ValueError(f"Unknown background {background!r}; available: {', '.join(DIGIT_CANVAS_BACKGROUNDS)}.")
    if num_images <= 0 or canvas_size < 16:
        raise ValueError(f"Need num_images > 0 and canvas_size >= 16, got {num_images} and {canvas_size}.")
    digits, labels = digits_of_split(split, DIGIT_CANVAS_DATASET)
    # one independent stream per split, so that the training set does not change with the evaluation set's size
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, masks = [], []
    for _ in range(num_images):
        image, mask = make_digit_canvas(rng, digits, labels, canvas_size, max_digits, digit_scale, background)
        images.append(PIL.Image.fromarray(image))
        masks.append(PIL.Image.fromarray(mask, mode="L"))
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "annotation": masks}, features=features)


# ---------------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class SegmentationData:
    """A train and an evaluation split with undecoded image and mask columns, and the classes."""

    train: datasets.Dataset
    eval: datasets.Dataset
    image_column: str
    annotation_column: str
    id2label: dict[int, str]
    eval_split: str

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in self.id2label.items()}


def _folder_pairs(images_dir: str, masks_dir: str, images_flag: str) -> datasets.Dataset:
    """Images of `images_dir` and the masks of the same name (any image extension) in `masks_dir`."""
    for folder in (images_dir, masks_dir):
        if not os.path.isdir(folder):
            raise ValueError(f"{folder!r} is not a directory.")
    masks = {}
    for name in sorted(os.listdir(masks_dir)):
        if name.lower().endswith(IMAGE_EXTENSIONS):
            masks.setdefault(os.path.splitext(name)[0], os.path.join(masks_dir, name))
    image_paths, mask_paths = [], []
    for name in sorted(os.listdir(images_dir)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        mask = masks.get(os.path.splitext(name)[0])
        if mask is None:
            raise ValueError(f"{images_flag}: image {name!r} has no mask of the same name in {masks_dir!r}.")
        image_paths.append(os.path.join(images_dir, name))
        mask_paths.append(mask)
    if not image_paths:
        raise ValueError(f"{images_flag} {images_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    features = datasets.Features({"image": datasets.Image(decode=False), "annotation": datasets.Image(decode=False)})
    return datasets.Dataset.from_dict({"image": image_paths, "annotation": mask_paths}, features=features)


def _check_columns(dataset: datasets.Dataset, args: SegmentationDataArguments, what: str) -> None:
    for flag, column in (("--image_column", args.image_column), ("--annotation_column", args.annotation_column)):
        if column not in dataset.column_names:
            kind = "annotation (label mask)" if flag == "--annotation_column" else "image"
            raise ValueError(
                f"The {what} has no {kind} column {column!r} ({flag}); its columns are {dataset.column_names}."
            )


def _undecoded(dataset: datasets.Dataset, columns: Sequence[str]) -> datasets.Dataset:
    # decoding happens in the example transform, where a bad row can be named
    for column in columns:
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def load_segmentation_splits(
    args: SegmentationDataArguments, seed: int = 42, cache_dir: str | None = None, token: str | bool | None = None
) -> SegmentationData:
    """The training and evaluation splits of `args`, their columns checked, images and masks left undecoded.

    The evaluation rows are `--validation_dir` / `--validation_file` when given, else the split `--eval_split`, else
    `validation`, else `test`, else a seeded `--train_val_split` of the training rows. The classes come from
    `--id2label_file`, else `--num_labels`, else (named `0..N-1`) the largest label in the training masks.
    """
    hub = {"cache_dir": cache_dir, "token": token}
    eval_dataset, eval_name = None, None
    if (
        args.dataset_name in (None, DIGIT_CANVAS_DATASET)
        and args.train_file is None
        and not (args.data_files or args.train_dir)
    ):
        canvas = {"canvas_size": args.synthetic_canvas_size, "seed": seed}
        train = load_digit_canvas_dataset("train", args.synthetic_train_images, **canvas)
        eval_dataset = load_digit_canvas_dataset("validation", args.synthetic_eval_images, **canvas)
        eval_name = "validation"
    elif args.train_dir is not None:
        train = _folder_pairs(args.train_dir, args.train_masks_dir, "--train_dir")
    elif args.train_file is not None:
        files = {"train": [args.train_file]}
        if args.validation_file is not None:
            files["validation"] = [args.validation_file]
        train = load_image_dataset(data_files=files, split="train", **hub)
        if args.validation_file is not None:
            eval_dataset = load_image_dataset(data_files=files, split="validation", **hub)
            eval_name = "validation"
    else:
        source = {"dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name}
        source = source if args.dataset_name is not None else {"data_files": args.data_files}
        train = load_image_dataset(**source, split=args.train_split, **hub)
        candidates = [args.eval_split] if args.eval_split is not None else ["validation", "test"]
        if args.validation_dir is None:
            for candidate in candidates:
                if candidate == args.train_split:
                    continue
                try:
                    eval_dataset = load_image_dataset(**source, split=candidate, **hub)
                except ValueError:
                    if args.eval_split is not None:
                        raise
                    continue
                eval_name = candidate
                break
    if args.validation_dir is not None:
        eval_dataset = _folder_pairs(args.validation_dir, args.validation_masks_dir, "--validation_dir")
        eval_name = f"--validation_dir {args.validation_dir}"
    _check_columns(train, args, "training data")
    columns = (args.image_column, args.annotation_column)
    train = _undecoded(train, columns)
    if eval_dataset is None:
        if not 0.0 < args.train_val_split < 1.0:
            raise ValueError(f"No evaluation split; set --train_val_split in (0, 1), got {args.train_val_split}.")
        parts = train.train_test_split(test_size=args.train_val_split, seed=seed)
        train, eval_dataset = parts["train"], parts["test"]
        eval_name = f"{args.train_split}[split off {args.train_val_split:.0%}]"
    else:
        _check_columns(eval_dataset, args, "evaluation data")
        eval_dataset = _undecoded(eval_dataset, columns)
    if args.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        eval_dataset = eval_dataset.shuffle(seed=seed).select(range(min(args.max_eval_samples, len(eval_dataset))))
    id2label = _classes(args, train)
    return SegmentationData(train, eval_dataset, args.image_column, args.annotation_column, id2label, eval_name)


def _classes(args: SegmentationDataArguments, train: datasets.Dataset) -> dict[int, str]:
    if args.id2label_file is not None:
        try:
            with open(args.id2label_file, encoding="utf-8") as handle:
                mapping = json.load(handle)
            id2label = {int(key): str(value) for key, value in mapping.items()}
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(
                f"--id2label_file {args.id2label_file!r}: not a JSON object {{id: name}} ({error})."
            ) from None
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"--id2label_file {args.id2label_file!r}: the ids must be 0..N-1.")
        return id2label
    if args.num_labels is not None:
        return {index: str(index) for index in range(args.num_labels)}
    if (
        args.dataset_name in (None, DIGIT_CANVAS_DATASET)
        and args.train_file is None
        and not (args.data_files or args.train_dir)
    ):
        return dict(enumerate(DIGIT_CANVAS_CLASSES))
    logger.info("Reading the training masks for the number of classes (give --num_labels or --id2label_file to skip).")
    largest = -1
    for row, value in enumerate(train[args.annotation_column]):
        mask = read_mask(value, f"row {row} (0-based) of the training data", args.max_image_pixels)
        labels = np.unique(reduce_labels(mask) if args.reduce_labels else mask)
        labels = labels[labels != IGNORE_INDEX]
        if labels.size:
            largest = max(largest, int(labels.max()))
    if largest < 0:
        raise ValueError("The training masks hold no labels other than the ignore index 255.")
    return {index: str(index) for index in range(largest + 1)}


# ---------------------------------------------------------------------------------------------------------------------
# masks and joint transforms


def read_mask(
    value: Any, where: str | None = None, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """A stored label mask (an undecoded record, bytes, a path or a PIL image) as an int64 array `(H, W)`.

    Raises `ValueError` naming `where` for a mask that is not single-channel (class indices, not colours), and
    `decoding.UnreadableImageError` for a mask whose header gives more than `max_image_pixels` pixels (not decoded;
    `None` or 0: no limit), as for the images (`decoding.check_image_pixels`)."""
    name = _describe_image_value(value)
    label = f"(the mask of {where or 'an example'})"
    if isinstance(value, PIL.Image.Image):
        image = value
        check_image_pixels(*image.size, label, max_image_pixels, name)
    else:
        image = open_checked(_read_image_bytes(value, None), label, max_image_pixels, name)
    if image.mode not in MASK_MODES:
        raise ValueError(
            f"The mask of {where or 'an example'} is a {image.mode} image; a label mask must be single-channel "
            f"({', '.join(MASK_MODES)}) with one class index per pixel."
        )
    return np.asarray(image, dtype=np.int64)


def reduce_labels(mask: np.ndarray) -> np.ndarray:
    """ADE20K's `reduce_labels`: 0 ('other') becomes the ignore index 255, every other label drops by one (255
    stays 255)."""
    reduced = mask - 1
    reduced[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return reduced


def build_segmentation_transforms(
    crop_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    min_scale: float = 0.5,
    max_scale: float = 2.0,
    horizontal_flip: bool = True,
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
) -> tuple[v2.Compose, v2.Compose]:
    """`(train, eval)` joint transforms of a `tv_tensors.Image` uint8 and a `tv_tensors.Mask` `(H, W)`.

    Training: the short side resized to a random size in `[min_scale, max_scale] * crop_size`, a random
    `crop_size` crop (padded where the image is smaller: pixels with 0, the mask with the ignore index), a horizontal
    flip with probability 1/2 (`horizontal_flip`). Evaluation: both resized to `crop_size` x `crop_size`. Then the
    image becomes normalised float32 and the mask int64. torchvision's v2 resamples a `Mask` with nearest neighbour
    whatever `interpolation` the image gets, so labels are never blended.
    """
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"Need 0 < --min_scale <= --max_scale, got {min_scale} and {max_scale}.")
    finish = [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(list(image_mean), list(image_std)),
    ]
    train = [
        # RandomResize draws the short side in [min, max); + 1 keeps max_scale reachable
        v2.RandomResize(int(min_scale * crop_size), int(max_scale * crop_size) + 1, interpolation=interpolation),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if horizontal_flip:
        train.append(v2.RandomHorizontalFlip())
    evaluation = [v2.Resize((crop_size, crop_size), interpolation=interpolation)]
    return v2.Compose(train + finish), v2.Compose(evaluation + finish)


class SegmentationExampleTransform(_ExampleTransform):
    """Decodes an image and its mask, checks them, applies `--reduce_labels` and a joint transform.

    Output per example: `"pixel_values"` float32 `(3, H, W)` and `"labels"` int64 `(H, W)`. Raises `ValueError`
    naming the row (and the files, when they have names) for a mask of another size than its image, a label value
    that is neither a class (`0..num_labels-1`) nor the ignore index, or a mask that is not single-channel, and
    `decoding.UnreadableImageError` for an unreadable image, or an image or mask of more than `max_image_pixels`
    pixels (refused from its header, never decoded).
    """

    def __init__(
        self,
        transform: v2.Compose,
        image_column: str,
        annotation_column: str,
        num_labels: int,
        reduce: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        super().__init__(image_column, max_image_pixels=max_image_pixels)
        self.transform = transform
        self.annotation_column = annotation_column
        self.num_labels = num_labels
        self.reduce = reduce

    def __call__(self, examples: dict[str, Any]) -> dict[str, Any]:
        images, masks = examples[self.image_column], examples[self.annotation_column]
        rows = examples.get(ROW_INDEX_COLUMN)
        if not isinstance(images, list):
            return self.process(images, masks, rows)
        rows = rows if rows is not None else [None] * len(images)
        processed = [self.process(image, mask, row) for image, mask, row in zip(images, masks, rows)]
        return {key: [item[key] for item in processed] for key in ("pixel_values", "labels")}

    def _where(self, image_value: Any, mask_value: Any, row: int | None) -> str:
        parts = [self.describe_row(row) or "an example"]
        for kind, value in (("image", image_value), ("mask", mask_value)):
            name = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
            if name:
                parts.append(f"{kind} {os.path.basename(str(name))!r}")
        return ", ".join(parts)

    def process(self, image_value: Any, mask_value: Any, row: int | None = None) -> dict[str, torch.Tensor]:
        """One example: checked, reduced and jointly transformed."""
        where = self._where(image_value, mask_value, row)
        image = decode_image(image_value, where=where, max_image_pixels=self.max_image_pixels)
        mask = read_mask(mask_value, where, self.max_image_pixels)
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"The mask of {where} is {mask.shape[1]}x{mask.shape[0]} (width x height) but its image is "
                f"{image.width}x{image.height}; a mask must have its image's size."
            )
        if self.reduce:
            mask = reduce_labels(mask)
        bad = mask[(mask != IGNORE_INDEX) & ((mask < 0) | (mask >= self.num_labels))]
        if bad.size:
            raise ValueError(
                f"Label value {int(bad[0])} in {where} is outside the {self.num_labels} classes (0..{self.num_labels - 1}"
                f"{', after --reduce_labels' if self.reduce else ''}) and not the ignore index {IGNORE_INDEX}; "
                "check --num_labels / --id2label_file / --reduce_labels."
            )
        pixels = tv_tensors.Image(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
        pixels, labels = self.transform(pixels, tv_tensors.Mask(torch.from_numpy(mask)))
        return {"pixel_values": pixels.as_subclass(torch.Tensor), "labels": labels.as_subclass(torch.Tensor)}


class SegmentationCollator:
    """Stacks `pixel_values` `(B, 3, H, W)` and `labels` `(B, H, W)`."""

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.stack([example["labels"] for example in examples]),
        }


__all__ = [
    "DIGIT_CANVAS_CLASSES",
    "DIGIT_CANVAS_DATASET",
    "IGNORE_INDEX",
    "SegmentationCollator",
    "SegmentationData",
    "SegmentationDataArguments",
    "SegmentationExampleTransform",
    "build_segmentation_transforms",
    "load_digit_canvas_dataset",
    "load_segmentation_splits",
    "make_digit_canvas",
    "read_mask",
    "reduce_labels",
]
