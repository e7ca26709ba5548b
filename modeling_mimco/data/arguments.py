"""The command-line arguments that name a command's images (`--dataset_name`, `--train_dir`, `--data_files`...), as
`HfArgumentParser` reads them.

This module imports only the standard library and PIL, so that a command builds its parser, prints `--help` and
rejects a bad flag without loading torch, `datasets` or the data pipeline; `sources` (which loads the images these
arguments name) re-exports its classes, and `segmentation` re-exports `SegmentationDataArguments` (the images and
masks of `mimco-segment`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image


DEFAULT_MAX_IMAGE_PIXELS: int | None = PIL.Image.MAX_IMAGE_PIXELS
"""The default `max_image_pixels`: PIL's `Image.MAX_IMAGE_PIXELS` when this module is imported (89,478,485, about
9,459 x 9,459 pixels, unless changed before)."""


@dataclass
class ImageSourceArguments:
    """Where a script's images come from: a Hub dataset or local dataset folder (`--dataset_name`), a folder with one
    sub-folder per class (`--train_dir`), parquet files (`--data_files`), or, without any of those, the built-in
    digits data. Every script's data arguments extend this class, so a new kind of source is added here once."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset (e.g. ILSVRC/imagenet-1k), a local dataset folder, 'digits', 'canvas-digits' or 'cluttered-digits' (built in)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "A local folder with one sub-folder per class."})
    data_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Parquet files with an image column, or WebDataset .tar shards (KEY.jpg + KEY.cls samples); "
            "globs and brace ranges such as 'shards/train-{000000..000099}.tar'."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; found automatically if unset."})
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use a subset of N training images, drawn with --seed (a folder sorted by class still gives every "
            "class); with --streaming, the first N of the stream."
        },
    )
    max_image_pixels: int | None = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": "Largest image decoded, in pixels (width x height, read from the file's header first): a larger "
            "one is skipped as unreadable, within --max_skipped_fraction, and never decoded (a decompression bomb). "
            "0 for no limit. Default: PIL's Image.MAX_IMAGE_PIXELS."
        },
    )

    def __post_init__(self):
        if self.max_train_samples is not None and not self.max_train_samples > 0:
            raise ValueError(f"--max_train_samples must be positive, got {self.max_train_samples}.")
        if self.max_image_pixels is not None and self.max_image_pixels < 0:
            raise ValueError(f"--max_image_pixels must be 0 (no limit) or positive, got {self.max_image_pixels}.")

    def source_kwargs(self) -> dict:
        """The `load_image_dataset` arguments that name the source (all but the split)."""
        return {
            "dataset_name": self.dataset_name,
            "dataset_config_name": self.dataset_config_name,
            "train_dir": self.train_dir,
            "data_files": self.data_files,
        }


@dataclass
class DataArguments(ImageSourceArguments):
    """The images of the two pre-training stages (unlabelled; a label column is ignored)."""

    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of preparing it locally."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})


@dataclass
class LabelledDataArguments(ImageSourceArguments):
    """The labelled images of fine-tuning and frozen-feature evaluation: a training split and an evaluation split."""

    eval_split: str | None = field(
        default=None, metadata={"help": "Evaluation split; default: validation, else test, else --train_val_split."}
    )
    validation_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder of evaluation images by class (the class folders of the training data), used instead "
            "of an evaluation split, as transformers' example scripts take it."
        },
    )
    train_val_split: float = field(default=0.15, metadata={"help": "Fraction split off train when there is no eval."})
    label_column: str | None = field(default=None, metadata={"help": "Found automatically if unset."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of N eval images."})


DIGIT_CANVAS_DATASET = "digit-canvas"
"""The `--dataset_name` of the built-in synthetic segmentation set (also the default when no source is given)."""


@dataclass
class SegmentationDataArguments:
    """Where `mimco-segment`'s images and masks come from. Exactly one source: `--dataset_name` (a Hub dataset such as
    `scene_parse_150`, a local dataset folder, or `digit-canvas`), `--train_file` / `--validation_file` or
    `--data_files` (parquet), or `--train_dir` with `--train_masks_dir` (images and same-named masks). Without any,
    the built-in `digit-canvas` set is used."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset (e.g. scene_parse_150), a local dataset folder, or 'digit-canvas'."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "A parquet file of training rows."})
    validation_file: str | None = field(default=None, metadata={"help": "A parquet file of evaluation rows."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Parquet files (split 'train')."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of training images."})
    train_masks_dir: str | None = field(
        default=None, metadata={"help": "Their masks: same file names (any image extension) as in --train_dir."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "A folder of evaluation images."})
    validation_masks_dir: str | None = field(default=None, metadata={"help": "Their masks, named as the images."})
    image_column: str = field(default="image", metadata={"help": "Column of the images."})
    annotation_column: str = field(default="annotation", metadata={"help": "Column of the label masks."})
    train_split: str = field(default="train")
    eval_split: str | None = field(
        default=None, metadata={"help": "Evaluation split; default: validation, else test, else --train_val_split."}
    )
    train_val_split: float = field(default=0.15, metadata={"help": "Fraction split off train when there is no eval."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of N evaluation rows."})
    reduce_labels: bool = field(
        default=False,
        metadata={"help": "Label 0 (ADE20K's 'other') becomes the ignore index 255 and every other label drops by 1."},
    )
    id2label_file: str | None = field(
        default=None, metadata={"help": "A JSON file {id: name} of the classes (after --reduce_labels)."}
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Number of classes, when there is no --id2label_file (default: read off the masks)."},
    )
    synthetic_train_images: int = field(default=512, metadata={"help": "digit-canvas: training scenes."})
    synthetic_eval_images: int = field(default=128, metadata={"help": "digit-canvas: evaluation scenes."})
    synthetic_canvas_size: int = field(default=64, metadata={"help": "digit-canvas: side of a scene in pixels."})
    max_image_pixels: int | None = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": "Largest image or mask decoded, in pixels (width x height, read from the file's header first): a "
            "larger one is an unreadable image, never decoded (a decompression bomb). 0 for no limit. Default: PIL's "
            "Image.MAX_IMAGE_PIXELS."
        },
    )

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples", "num_labels"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}.")
        if self.max_image_pixels is not None and self.max_image_pixels < 0:
            raise ValueError(f"--max_image_pixels must be 0 (no limit) or positive, got {self.max_image_pixels}.")
        if (self.train_dir is None) != (self.train_masks_dir is None):
            raise ValueError("--train_dir and --train_masks_dir go together: images and their masks.")
        if (self.validation_dir is None) != (self.validation_masks_dir is None):
            raise ValueError("--validation_dir and --validation_masks_dir go together: images and their masks.")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file needs --train_file.")
        sources = [
            flag
            for flag, value in (
                ("--dataset_name", self.dataset_name),
                ("--train_file", self.train_file),
                ("--data_files", self.data_files),
                ("--train_dir", self.train_dir),
            )
            if value is not None
        ]
        if len(sources) > 1:
            raise ValueError(f"Give one data source, got {', '.join(sources)}.")

    @property
    def source_name(self) -> str:
        """The data source as the results and the model card name it."""
        return (
            self.dataset_name
            or self.train_file
            or self.train_dir
            or (", ".join(self.data_files) if self.data_files else DIGIT_CANVAS_DATASET)
        )
