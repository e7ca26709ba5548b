"""The command-line arguments that name a command's images (`--dataset_name`, `--train_dir`, `--data_files`...), as
`HfArgumentParser` reads them.

This module imports only the standard library and PIL, so that a command builds its parser, prints `--help` and
rejects a bad flag without loading torch, `datasets` or the data pipeline; `sources` (which loads the images these
arguments name) re-exports its classes.
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
            "help": "Hub dataset (e.g. ILSVRC/imagenet-1k), a local dataset folder, 'digits' or 'cluttered-digits' (built in)."
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
