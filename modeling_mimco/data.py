"""Data layer shared by the MimCo training scripts: loading, decoding, augmentation, collation, skip accounting.

Used by stage 1 (contrastive teacher), stage 2 (MimCo) and the fine-tuning / linear-probe scripts. The model files
never import this module (it needs `datasets` and `torchvision`, which a checkpoint loaded as remote code must not).

The pipeline, from a source to a batch:

1. `load_image_dataset(...)` returns a `datasets.Dataset` (or an `IterableDataset` with `streaming=True`) from a
   Hub name or local dataset folder, a folder of class sub-folders, parquet files, or the built-in `"digits"` demo.
   It warns about the symbolic links of a class folder that `datasets` drops silently (`find_skipped_links`) and
   refuses a truncated or non-parquet file by name.
2. `resolve_image_column` / `resolve_label_column` find the columns; `disable_image_decoding` casts the image column
   to `datasets.Image(decode=False)` so that `datasets` hands over raw `{"bytes", "path"}` records and never decodes a
   file itself (a broken file would otherwise crash the iterator).
3. `shard_for_process` splits a streaming dataset between processes.
4. An example transform (`PretrainingExampleTransform` or `ContrastiveExampleTransform`) attached with
   `apply_example_transform` decodes each image with `decode_image` and augments it. An unreadable image does not
   raise: its pixel entries are `None` and `"unreadable_image"` names the file, or for a record without a file name
   its row (and parquet file) (a warning is logged once per file or row).
5. A collator (`MimCoPretrainingCollator` or `ContrastiveCollator`) drops the unreadable examples, stacks the rest
   and reports how many it dropped as `"num_skipped"` inside the batch, so the count survives DataLoader workers.
6. The training loop feeds the counts to a `SkippedImageTracker`, which stops the run with
   `TooManyUnreadableImagesError` when too large a fraction of the data is unreadable.

Example (stage 2, map-style):

```python
>>> from torch.utils.data import DataLoader
>>> from modeling_mimco import MimCoMaskGenerator
>>> from modeling_mimco.data import (MimCoPretrainingCollator, PretrainingExampleTransform, apply_example_transform,
...     build_pretraining_transform, disable_image_decoding, load_image_dataset, resolve_image_column)
>>> dataset = load_image_dataset("digits")
>>> image_column = resolve_image_column(dataset)
>>> dataset = disable_image_decoding(dataset, image_column)
>>> transform = build_pretraining_transform(32, [0.5] * 3, [0.5] * 3)
>>> dataset = apply_example_transform(dataset, PretrainingExampleTransform(transform, image_column))
>>> collator = MimCoPretrainingCollator(MimCoMaskGenerator(32, 4, mask_patch_size=8), image_size=32)
>>> batch = next(iter(DataLoader(dataset, batch_size=8, collate_fn=collator)))
>>> batch["pixel_values"].shape, batch["bool_masked_pos"].shape, int(batch["num_skipped"])
(torch.Size([8, 3, 32, 32]), torch.Size([8, 64]), 0)
```
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import io
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable, concat_tables, list_table_cache_files
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as decode_image_tensor
from torchvision.transforms import v2

from .errors import MimCoError, one_line


logger = logging.getLogger(__name__)

DIGITS_DATASET = "digits"
DIGITS_TEST_FRACTION = 0.15
DIGITS_SPLIT_SEED = 0

UNREADABLE_KEY = "unreadable_image"
"""Key of the per-example marker: `None` for a readable image, else the file name (or a description) of the bad one."""

ROW_INDEX_COLUMN = "__mimco_row_index__"
"""Column that `apply_example_transform` adds to a map-style dataset: each example's row in the loaded data, so that
an unreadable image without a file name can be named by its row."""

MAX_LISTED_NAMES = 10
"""How many names a warning about skipped files lists before it only counts the rest."""


# ---------------------------------------------------------------------------------------------------------------------
# errors


class UnreadableImageError(OSError):
    """An image that cannot be decoded: empty, truncated, not an image, or of an unsupported kind.

    Attributes:
        path: The file path or name of the image when known, else `None`.
    """

    def __init__(self, description: str, path: str | None = None):
        super().__init__(description)
        self.path = path


class TooManyUnreadableImagesError(MimCoError):
    """Raised by `SkippedImageTracker` when the fraction of unreadable images exceeds `--max_skipped_fraction`."""


# ---------------------------------------------------------------------------------------------------------------------
# loading


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


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    train_dir: str | None = None,
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    digits_image_size: int = 32,
    report_skipped_links: bool = True,
) -> datasets.Dataset | datasets.IterableDataset:
    """Loads one split of an image dataset from exactly one source.

    Sources (give at most one):

    - `dataset_name`: a Hub dataset (`"ILSVRC/imagenet-1k"`, gated: `token`, or the environment / cached login) or a
      local dataset folder (e.g. a parquet folder in the Hub layout), read with `datasets.load_dataset`;
      `dataset_config_name` picks a configuration. `"digits"` is reserved for the built-in demo dataset.
    - `train_dir`: a local folder of class sub-folders (`train_dir/<class>/<image>`), read with the `"imagefolder"`
      builder; class names become a `ClassLabel` `"label"` column. Sub-folders named after splits
      (`train_dir/train/<class>/...`, `train_dir/validation/<class>/...`) give several splits.
    - `data_files`: parquet file(s) or glob(s), read with the `"parquet"` builder. A list or a string gives the single
      split `"train"`; a dict maps split names to files.
    - none of them, or `dataset_name="digits"`: `load_digits_dataset(split, digits_image_size)`.

    Args:
        split: The split to load; an unknown split raises `ValueError` listing the available ones.
        streaming: Return a `datasets.IterableDataset` that reads lazily (the digits demo is converted with
            `to_iterable_dataset`).
        cache_dir: Where `datasets` caches downloads and prepared Arrow files.
        token: Hub token for gated or private datasets; `None` uses the cached login / `HF_TOKEN`.
        digits_image_size: Side of the digits images, when the digits demo is the source.
        report_skipped_links: With `train_dir`, warn about the symbolic links that `"imagefolder"` drops without a
            word (dangling links, link loops, links to folders), naming up to 10 of them and counting all
            (`find_skipped_links`). Loading further splits of a folder already reported can turn this off.

    Local parquet files (`data_files`, or the files of a local dataset folder) are checked first: one that is
    truncated or not parquet raises `ValueError` naming it, and `datasets` failing to prepare a source raises
    `ValueError` naming the source. The row counts of the files are remembered, so that an unreadable image without
    a file name is reported by its row and parquet file (see `apply_example_transform`).

    Returns:
        A `datasets.Dataset`, or a `datasets.IterableDataset` when `streaming=True`.
    """
    given = [
        flag
        for flag, value in (("--dataset_name", dataset_name), ("--train_dir", train_dir), ("--data_files", data_files))
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"Give exactly one data source, got {len(given)}: {', '.join(given)}. Use --dataset_name for a Hub dataset "
            "or local dataset folder, --train_dir for a folder of class sub-folders, or --data_files for parquet files."
        )

    if (dataset_name is None and train_dir is None and data_files is None) or dataset_name == DIGITS_DATASET:
        dataset = load_digits_dataset(split=split, image_size=digits_image_size)
        return dataset.to_iterable_dataset(num_shards=_digits_num_shards(len(dataset))) if streaming else dataset

    common = {"split": split, "streaming": streaming, "cache_dir": cache_dir, "token": token}
    parquet_files = None
    if dataset_name is not None:
        path, kwargs, source = dataset_name, {"name": dataset_config_name}, f"--dataset_name {dataset_name!r}"
        if os.path.isdir(dataset_name):  # a local dataset folder; a Hub dataset is not looked into here
            parquet_files = _checked_parquet_files(path, kwargs, source, cache_dir=cache_dir, token=token)
    elif train_dir is not None:
        if not os.path.isdir(train_dir):
            raise ValueError(f"--train_dir {train_dir!r} is not a directory.")
        path, kwargs, source = "imagefolder", {"data_dir": train_dir}, f"--train_dir {train_dir!r}"
        if report_skipped_links:
            _warn_about_skipped_links(train_dir)
    else:
        path, kwargs, source = "parquet", {"data_files": data_files}, f"--data_files {data_files!r}"
        parquet_files = _checked_parquet_files(path, kwargs, "--data_files", cache_dir=cache_dir, token=token)

    try:
        dataset = datasets.load_dataset(path, **kwargs, **common)
    except DatasetGenerationError as err:
        # e.g. a parquet file whose footer is intact but whose pages are damaged; the cause says what failed
        raise ValueError(f"{source}: datasets could not read the data: {one_line(err.__cause__ or err)}") from err
    except ValueError as err:
        if "split" not in str(err).lower():
            raise
        available = _available_splits(path, kwargs, cache_dir=cache_dir, token=token)
        if available is None or _split_base_names(split) <= set(available):
            raise
        raise ValueError(f"Split {split!r} does not exist in {source}; available splits: {available}.") from err
    if parquet_files is not None and isinstance(dataset, datasets.Dataset):
        _remember_row_sources(dataset, parquet_files.get(str(split)))
    return dataset


def _digits_num_shards(num_rows: int) -> int:
    # several shards, so that streaming can be split between processes and DataLoader workers by shard
    return max(1, min(8, num_rows))


def _split_base_names(split: str) -> set[str]:
    """`"train[:10%]+test"` -> `{"train", "test"}`."""
    return {part.split("[", 1)[0].strip() for part in str(split).split("+")}


def _available_splits(path: str, kwargs: dict, cache_dir: str | None, token: str | bool | None) -> list[str] | None:
    """Best-effort list of the split names of a source, without preparing it; `None` when unknown."""
    try:
        builder = datasets.load_dataset_builder(path, **kwargs, cache_dir=cache_dir, token=token)
    except Exception:  # only used to improve an error message
        return None
    # split keys may be `datasets.NamedSplit` objects (e.g. before the source was ever prepared); name them as strings
    if builder.info.splits:
        return [str(name) for name in builder.info.splits]
    data_files = getattr(builder.config, "data_files", None)
    if data_files:
        return [str(name) for name in data_files]
    return None


# Symbolic links that `datasets`' file listing drops: it neither follows links to folders nor keeps links whose
# target is missing or loops, and it says nothing about either.


def find_skipped_links(folder: str) -> list[tuple[str, str]]:
    """The symbolic links under `folder` whose images the `"imagefolder"` builder silently leaves out.

    These are dangling links and link loops whose name could be an image (an image extension, or no extension: it
    may have been a class folder), and links to folders (`datasets` does not follow them). Hidden entries and
    `__*` folders are passed over, as `datasets` ignores them too. Only links cost a `stat`, so the walk is about as
    fast as `datasets`' own listing.

    Returns:
        `(path relative to folder, reason)` pairs, sorted by path.
    """
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    image_extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    skipped = []
    pending = [folder]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:  # an unreadable folder: datasets' listing reports it itself
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_symlink():
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("__"):
                    pending.append(entry.path)
                continue
            relative = os.path.relpath(entry.path, folder)
            try:
                is_folder = stat.S_ISDIR(os.stat(entry.path).st_mode)  # follows the link
            except OSError as error:
                extension = os.path.splitext(entry.name)[1].lower()
                if extension and extension not in image_extensions:
                    continue  # not an image even if its target existed
                if error.errno == errno.ELOOP:
                    skipped.append((relative, "a symbolic link loop"))
                else:
                    skipped.append(
                        (relative, f"a dangling link: its target {os.readlink(entry.path)!r} does not exist")
                    )
                continue
            if is_folder:
                skipped.append((relative, "a link to a folder, which datasets does not follow"))
    return sorted(skipped)


def _warn_about_skipped_links(train_dir: str) -> None:
    skipped = find_skipped_links(train_dir)
    if not skipped:
        return
    listed = "; ".join(f"{path} ({reason})" for path, reason in skipped[:MAX_LISTED_NAMES])
    more = f"; and {len(skipped) - MAX_LISTED_NAMES} more" if len(skipped) > MAX_LISTED_NAMES else ""
    logger.warning(
        "--train_dir %r: %d symbolic link(s) skipped, their images are not used: %s%s. Fix or remove them (copy a "
        "linked folder into --train_dir instead of linking it).",
        train_dir,
        len(skipped),
        listed,
        more,
    )


# Parquet files: checked before `datasets` reads them (a truncated file otherwise fails without its name), and their
# row counts remembered so that a bad row can be named by its file.


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Keeps `datasets`' info and warnings (e.g. about a missing dataset card) out of a look-ahead that
    `datasets.load_dataset` repeats right after."""
    previous = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(previous)


def _checked_parquet_files(
    path: str, kwargs: dict, source: str, cache_dir: str | None, token: str | bool | None
) -> dict[str, list[tuple[str, int]] | None] | None:
    """Checks that every local parquet file of a source can be opened; returns `{split: [(file, num_rows), ...]}`
    (`None` for a split with remote files), or `None` when the source is not parquet.

    Only each file's footer is read. Every split's files are checked, since `datasets` prepares all splits at once.

    Raises:
        ValueError: naming `source` and the file, for a truncated, damaged or non-parquet file.
    """
    try:
        with _quiet_datasets():
            builder = datasets.load_dataset_builder(path, **kwargs, cache_dir=cache_dir, token=token)
    except Exception:  # e.g. no file matches: `datasets.load_dataset` raises its own message right after
        return None
    if builder.name != "parquet" or not builder.config.data_files:
        return None
    checked: dict[str, list[tuple[str, int]] | None] = {}
    for split_name, files in builder.config.data_files.items():
        spans: list[tuple[str, int]] | None = []
        for file in files:
            if not os.path.isfile(file):  # a remote file: read by datasets only
                spans = None
                continue
            try:
                num_rows = pq.read_metadata(file).num_rows
            except (pa.ArrowException, OSError) as error:
                raise ValueError(
                    f"{source}: {file!r} is not a readable parquet file (truncated, damaged or not parquet: "
                    f"{one_line(error)})"
                ) from error
            if spans is not None:
                spans.append((file, num_rows))
        checked[str(split_name)] = spans
    return checked


# Row -> parquet file, per prepared Arrow table (keyed by its cache files, which `select`, `shuffle`, `cast` and
# `train_test_split` keep). Filled by `load_image_dataset`, read by `apply_example_transform` in the same process.
_ROW_SOURCES: dict[tuple[str, ...], tuple[tuple[str, int], ...]] = {}


def _remember_row_sources(dataset: datasets.Dataset, spans: list[tuple[str, int]] | None) -> None:
    files = tuple(list_table_cache_files(dataset.data))
    # the Arrow table holds the files' rows in the order of `spans` (datasets reads the files one after the other)
    if spans and files and sum(num_rows for _, num_rows in spans) == len(dataset.data):
        _ROW_SOURCES[files] = tuple(spans)


def _row_sources(dataset: datasets.Dataset) -> tuple[tuple[str, int], ...] | None:
    spans = _ROW_SOURCES.get(tuple(list_table_cache_files(dataset.data)))
    # a table cut down by `select(range(n))` keeps its first rows, the only kind of cut this package makes
    if spans is None or len(dataset.data) > sum(num_rows for _, num_rows in spans):
        return None
    return spans


def resolve_image_column(dataset: datasets.Dataset | datasets.IterableDataset, image_column: str | None = None) -> str:
    """Name of the image column: `image_column` if given (it must exist), else `"image"`, `"img"`, or the first column
    whose feature is `datasets.Image`.

    Raises:
        ValueError: naming `--image_column` and the existing columns when the column is missing or none is found.
    """
    columns, features = _columns_and_features(dataset)
    if image_column is not None:
        if columns is not None and image_column not in columns:
            raise ValueError(
                f"--image_column {image_column!r} is not a column of the dataset; its columns are {columns}."
            )
        return image_column
    for candidate in ("image", "img"):
        if candidate in columns:
            return candidate
    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(
        f"Could not find an image column (tried 'image', 'img' and any datasets.Image column) among {columns}; "
        "name it with --image_column."
    )


def resolve_label_column(
    dataset: datasets.Dataset | datasets.IterableDataset, label_column: str | None = None
) -> str | None:
    """Name of the label column: `label_column` if given (it must exist), else `"label"`, `"labels"`, or the first
    `ClassLabel` column; `None` when the dataset has no labels.

    Raises:
        ValueError: naming `--label_column` and the existing columns when a named column is missing.
    """
    columns, features = _columns_and_features(dataset)
    if label_column is not None:
        if columns is not None and label_column not in columns:
            raise ValueError(
                f"--label_column {label_column!r} is not a column of the dataset; its columns are {columns}."
            )
        return label_column
    for candidate in ("label", "labels"):
        if candidate in columns:
            return candidate
    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    return None


def _columns_and_features(dataset) -> tuple[list[str] | None, dict | None]:
    features = dataset.features
    if features is not None:
        return list(features), dict(features)
    if isinstance(dataset, datasets.IterableDataset):
        # a streaming dataset of unknown features: look at the first example
        first = next(iter(dataset.take(1)), None)
        return (list(first) if first is not None else []), None
    return list(dataset.column_names or []), None


def disable_image_decoding(
    dataset: datasets.Dataset | datasets.IterableDataset, image_column: str
) -> datasets.Dataset | datasets.IterableDataset:
    """Casts `image_column` to `datasets.Image(decode=False)`, so that examples carry `{"bytes", "path"}` records.

    Decoding then happens in the example transforms (`decode_image`), where an unreadable file is caught and skipped,
    instead of inside `datasets`, where it would crash the iterator. A column that is not a `datasets.Image` feature
    (raw bytes, paths, or a streaming dataset whose features are unknown) is left as it is: `decode_image` accepts
    those values too.
    """
    features = dataset.features
    if features is None or image_column not in features:
        return dataset
    feature = features[image_column]
    if not isinstance(feature, datasets.Image) or not feature.decode:
        return dataset
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def shard_for_process(
    dataset: datasets.Dataset | datasets.IterableDataset, process_index: int, num_processes: int
) -> datasets.Dataset | datasets.IterableDataset:
    """The part of `dataset` that process `process_index` of `num_processes` reads.

    A streaming `IterableDataset` is split with `datasets.distributed.split_dataset_by_node` (whole shards when their
    number is divisible by `num_processes`, else every `num_processes`-th example). A map-style `Dataset` is returned
    unchanged: the distributed sampler of the accelerate-prepared DataLoader shards it.

    Do not let accelerate shard a dataset that this function already split: prepare its DataLoader with
    `DataLoaderConfiguration(dispatch_batches=False)` and `split_batches=False` *and* skip accelerate's own sharding
    (e.g. leave such a DataLoader out of `accelerator.prepare`, moving batches to the device yourself), or else skip
    this function and let accelerate shard the stream.
    """
    if num_processes < 1:
        raise ValueError(f"`num_processes` must be >= 1, got {num_processes}.")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"`process_index` must lie in [0, {num_processes}), got {process_index}.")
    if isinstance(dataset, datasets.IterableDataset) and num_processes > 1:
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# decoding


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Converts any PIL image to 8-bit RGB of the same size.

    - `RGB` is returned as is; `1`, `L`, `P`, `CMYK`, `YCbCr`, `HSV`, `RGBX` are converted by PIL.
    - Transparency (`RGBA`, `RGBa`, `LA`, `La`, `PA`, and `P`/`L`/`RGB` images with a `transparency` entry) is
      **composited on a white background**: fully transparent pixels become white, not whatever colour happens to
      lie under zero alpha (often black or noise), which is what an image viewer shows.
    - 16-bit integers (`I;16`, `I;16B`, `I;16L`, `I;16N`) are scaled from 0..65535 to 0..255 (not clipped).
    - 32-bit integers (`I`): values within 0..255 are kept, within 0..65535 scaled as 16-bit, anything else
      (negative or larger) min-max normalised.
    - 32-bit floats (`F`): values within 0..1 are multiplied by 255, within 0..255 kept, anything else min-max
      normalised; NaNs become 0.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        return _array_to_rgb(np.asarray(image).astype(np.float64) * (255.0 / 65535.0))
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 255:
            return _array_to_rgb(values)
        if low >= 0 and high <= 65535:
            return _array_to_rgb(values * (255.0 / 65535.0))
        return _array_to_rgb(_min_max(values))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            return _array_to_rgb(values * 255.0)
        if low >= 0 and high <= 255:
            return _array_to_rgb(values)
        return _array_to_rgb(_min_max(values))
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        if mode == "La":  # premultiplied; PIL converts it to RGBA only through LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _array_to_rgb(values: np.ndarray) -> PIL.Image.Image:
    pixels = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels).convert("RGB")


def _describe_image_value(value: Any) -> str | None:
    """The file path or name behind an image value, when it has one."""
    if isinstance(value, dict):
        path = value.get("path")
        return str(path) if path else None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, PIL.Image.Image):
        return getattr(value, "filename", None) or None
    return None


def reduced_decode_size(width: int, height: int, image_size: int, min_crop_scale: float) -> tuple[int, int] | None:
    """The smallest size a JPEG may be decoded at so that even the smallest random crop (area fraction
    `min_crop_scale`, aspect ratio down to 3/4) still covers `image_size` pixels on its short side; `None` when
    decoding at full size is needed."""
    factor = image_size / math.sqrt(min_crop_scale * width * height * 0.75)
    if factor >= 0.5:  # libjpeg reduces by 1/2, 1/4 or 1/8 only
        return None
    return max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))


def _decode_jpeg_to_tensor(data: bytes) -> torch.Tensor | None:
    """libjpeg-turbo through torchvision, straight into a uint8 `(3, H, W)` tensor, about twice as fast as PIL
    followed by a conversion; `None` for anything but a complete JPEG, or when it fails (PIL then decodes, and reports
    a broken file the usual way)."""
    if not (data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"):
        return None
    try:
        return decode_image_tensor(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True
        )
    except RuntimeError:
        return None


def decode_image(
    value: Any,
    token: str | bool | None = None,
    draft_for: tuple[int, float] | None = None,
    fast_jpeg: bool = False,
    where: str | None = None,
) -> PIL.Image.Image | torch.Tensor:
    """Opens, fully loads and converts one image to 8-bit RGB (see `to_rgb`).

    Args:
        value: What a `datasets.Image(decode=False)` column holds (`{"bytes": ..., "path": ...}`; `bytes` may be
            `None`, then the local or remote `path` is read), a PIL image, raw encoded `bytes`, or a file path.
        token: Hub token used to read a remote `path` (streamed Hub datasets without embedded bytes).
        draft_for: `(image_size, min_crop_scale)` of the random crop that follows. A large JPEG is then decoded by
            libjpeg at 1/2, 1/4 or 1/8 of its size when even the smallest crop keeps `image_size` pixels
            (`reduced_decode_size`), which makes decoding several times faster.
        fast_jpeg: Return a JPEG that needs no reduction as a uint8 `(3, H, W)` tensor decoded by torchvision
            (faster); other images are still returned as PIL images. For transforms that accept both.
        where: Where the value came from (e.g. `"row 7 (0-based) of '/data/train.parquet'"`), named in the error
            when the value carries no file name.

    The pixels are read completely (`Image.load()`), so a truncated file fails here rather than later. The EXIF
    orientation is applied, as `datasets` does when it decodes images itself. Note that PIL decodes truncated files
    without error if some code sets `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`.

    Raises:
        UnreadableImageError: for empty, truncated or non-image data; the message names the file when known.
    """
    name = _describe_image_value(value)
    if name:
        label = repr(name)
    else:
        label = f"in {where} (no file name)" if where else "(no file name)"
    try:
        if isinstance(value, PIL.Image.Image):
            image = value
            image.load()
        else:
            data = _read_image_bytes(value, token)
            if len(data) == 0:
                raise UnreadableImageError(f"Unreadable image {label}: the file is empty (0 bytes).", path=name)
            image = PIL.Image.open(io.BytesIO(data))
            reduced = None
            if draft_for is not None and image.format == "JPEG":
                reduced = reduced_decode_size(*image.size, *draft_for)
                if reduced is not None:
                    image.draft("RGB", reduced)
            if fast_jpeg and reduced is None:
                tensor = _decode_jpeg_to_tensor(data)
                if tensor is not None:
                    return tensor
            image.load()
        image = _apply_exif_orientation(image)
        return to_rgb(image)
    except UnreadableImageError:
        raise
    except Exception as err:  # PIL raises many kinds of errors for broken files
        # PIL names an in-memory file by its object address, which tells the reader nothing
        detail = _BYTES_IO_REPR.sub("", str(err))
        raise UnreadableImageError(f"Unreadable image {label}: {type(err).__name__}: {detail}", path=name) from err


_BYTES_IO_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _read_image_bytes(value: Any, token: str | bool | None) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    if not isinstance(value, dict):
        raise TypeError(f"expected an image record, PIL image, bytes or path, got {type(value).__name__}")
    if value.get("bytes") is not None:
        return bytes(value["bytes"])
    path = value.get("path")
    if not path:
        raise ValueError("the image record has neither bytes nor a path")
    if "://" in path or "::" in path:
        from datasets import DownloadConfig
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb", download_config=DownloadConfig(token=token)) as file:
            return file.read()
    with open(path, "rb") as file:
        return file.read()


def _apply_exif_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    try:
        orientation = image.getexif().get(PIL.Image.ExifTags.Base.Orientation)
    except Exception:  # a broken EXIF block does not make the pixels unreadable
        return image
    if orientation is None or orientation == 1:
        return image
    return PIL.ImageOps.exif_transpose(image)


# ---------------------------------------------------------------------------------------------------------------------
# augmentation


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


def _blur_kernel_size(image_size: int) -> int:
    """About 10 % of the image side, odd, at least 3 (23 at 224 pixels)."""
    kernel = max(3, int(0.1 * image_size))
    return kernel if kernel % 2 == 1 else kernel + 1


def _contrastive_view(
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    crop_scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
    interpolation: v2.InterpolationMode,
) -> v2.Compose:
    blur = v2.GaussianBlur(_blur_kernel_size(image_size), sigma=(0.1, 2.0))
    steps = [
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=interpolation, antialias=True),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        blur if blur_p >= 1.0 else v2.RandomApply([blur], p=blur_p),
    ]
    if solarize_p > 0:
        # on the PIL image, so the threshold is in uint8 units
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _normalize(image_mean, image_std))


def build_contrastive_transforms(
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    crop_scale: tuple[float, float] = (0.08, 1.0),
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
) -> tuple[v2.Compose, v2.Compose]:
    """Stage-1 (MoCo v3) augmentations: two asymmetric views of one RGB PIL image.

    Both views: RandomResizedCrop(`image_size`, scale=`crop_scale`) -> ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8 ->
    RandomGrayscale(p=0.2) -> GaussianBlur(sigma 0.1..2.0, kernel about 10 % of `image_size`, odd) -> [solarize] ->
    RandomHorizontalFlip -> float32 in [0, 1] -> Normalize. View 1 always blurs and never solarizes; view 2 blurs with
    p=0.1 and solarizes (threshold 128 of 255) with p=0.2.

    Returns:
        `(transform_1, transform_2)`, each mapping a PIL image to a float32 tensor `(3, image_size, image_size)`.
    """
    view_1 = _contrastive_view(image_size, image_mean, image_std, crop_scale, 1.0, 0.0, interpolation)
    view_2 = _contrastive_view(image_size, image_mean, image_std, crop_scale, 0.1, 0.2, interpolation)
    return view_1, view_2


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


# ---------------------------------------------------------------------------------------------------------------------
# per-example processing


class _ExampleTransform:
    """Decodes and augments the images of examples; shared logic of the two example transforms.

    Called with a *batch* (the image column holds a list, as `Dataset.with_transform` and `map(batched=True)` give)
    it returns a dict of lists; called with *one example* (as `IterableDataset.map` gives by default) it returns a
    dict of single values. `apply_example_transform` attaches it the right way for either kind of dataset.
    """

    pixel_keys: tuple[str, ...] = ()

    fast_jpeg = False

    def __init__(self, image_column: str, label_column: str | None = None, draft_for: tuple[int, float] | None = None):
        self.image_column = image_column
        self.label_column = label_column
        self.draft_for = draft_for
        self.row_sources = None
        self._warned: set[str] = set()

    @property
    def row_sources(self) -> tuple[tuple[str, int], ...] | None:
        """`(parquet file, number of rows)` of the loaded data in row order, when known (set by
        `apply_example_transform`): a bad row is then named by its file and its row in that file."""
        return self._row_sources

    @row_sources.setter
    def row_sources(self, spans: Sequence[tuple[str, int]] | None) -> None:
        self._row_sources = tuple(spans) if spans else None
        self._row_starts = [0]
        for _, num_rows in self._row_sources or ():
            self._row_starts.append(self._row_starts[-1] + int(num_rows))

    def _augment(self, image: PIL.Image.Image) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, examples: dict[str, Any]) -> dict[str, Any]:
        images = examples[self.image_column]
        rows = examples.get(ROW_INDEX_COLUMN)
        if isinstance(images, list):
            rows = rows if rows is not None else [None] * len(images)
            processed = [self._process(value, row) for value, row in zip(images, rows)]
            output = {key: [item[key] for item in processed] for key in (*self.pixel_keys, UNREADABLE_KEY)}
            if self.label_column is not None:
                output["labels"] = list(examples[self.label_column])
            return output
        output = self._process(images, rows)
        if self.label_column is not None:
            output["labels"] = examples[self.label_column]
        return output

    def describe_row(self, row: int | None) -> str | None:
        """`"row R (0-based) of 'FILE'"` when the parquet file of dataset row `row` is known, else
        `"row R (0-based) of the dataset"`; `None` without a row."""
        if row is None:
            return None
        row = int(row)
        if self._row_sources:
            position = bisect.bisect_right(self._row_starts, row) - 1
            if 0 <= position < len(self._row_sources):
                return f"row {row - self._row_starts[position]} (0-based) of {self._row_sources[position][0]!r}"
        return f"row {row} (0-based) of the dataset"

    def _process(self, value: Any, row: int | None = None) -> dict[str, Any]:
        where = self.describe_row(row)
        try:
            image = decode_image(value, draft_for=self.draft_for, fast_jpeg=self.fast_jpeg, where=where)
        except UnreadableImageError as err:
            marker = err.path or where or str(err)
            if marker not in self._warned:
                self._warned.add(marker)
                logger.warning("Skipping an unreadable image: %s", err)
            return {**dict.fromkeys(self.pixel_keys), UNREADABLE_KEY: marker}
        return {**self._augment(image), UNREADABLE_KEY: None}


class PretrainingExampleTransform(_ExampleTransform):
    """Example transform for stage 2 (and, with an eval transform, for evaluation / fine-tuning).

    Args:
        transform: Maps an RGB PIL image to a float32 tensor `(3, H, W)` (e.g. `build_pretraining_transform`).
        image_column: Column holding the image (undecoded records, PIL images, bytes or paths).
        label_column: If given, its values are passed on as `"labels"`.
        draft_for: `(image_size, min_crop_scale)` of `transform`'s random crop: large JPEGs are then decoded at a
            reduced size when the crop allows it (see `decode_image`). Leave `None` for transforms without one.

    Output per example: `"pixel_values"`, the normalised float32 tensor `(3, H, W)` or `None` when the image is
    unreadable; `"unreadable_image"`, `None` or the bad file's name; optionally `"labels"`. Never raises for a bad
    image: it logs a warning naming the file once per file (per worker process).
    """

    pixel_keys = ("pixel_values",)
    # JPEGs arrive as uint8 tensors from torchvision's decoder; `build_pretraining_transform` starts on tensors
    fast_jpeg = True

    def __init__(
        self,
        transform: Callable,
        image_column: str,
        label_column: str | None = None,
        draft_for: tuple[int, float] | None = None,
    ):
        super().__init__(image_column, label_column, draft_for)
        self.transform = transform

    def _augment(self, image: PIL.Image.Image) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.transform(image)}


class ContrastiveExampleTransform(_ExampleTransform):
    """Example transform for stage 1: two differently augmented views of each image.

    Args:
        transform_1, transform_2: The two view transforms (`build_contrastive_transforms`).
        image_column: Column holding the image.
        label_column: If given, its values are passed on as `"labels"`.

    Output per example: `"pixel_values_1"` and `"pixel_values_2"`, normalised float32 tensors `(3, H, W)` of the
    same image (both `None` when it is unreadable), `"unreadable_image"`, optionally `"labels"`.
    """

    pixel_keys = ("pixel_values_1", "pixel_values_2")

    def __init__(
        self, transform_1: Callable, transform_2: Callable, image_column: str, label_column: str | None = None
    ):
        super().__init__(image_column, label_column)
        self.transform_1 = transform_1
        self.transform_2 = transform_2

    def _augment(self, image: PIL.Image.Image) -> dict[str, torch.Tensor]:
        return {"pixel_values_1": self.transform_1(image), "pixel_values_2": self.transform_2(image)}


def apply_example_transform(
    dataset: datasets.Dataset | datasets.IterableDataset, example_transform: Callable
) -> datasets.Dataset | datasets.IterableDataset:
    """Attaches an example transform so that it runs lazily, in the DataLoader workers.

    A map-style `Dataset` gets it with `with_transform` (called on batches, output columns only). A streaming
    `IterableDataset` gets it with `map` (called per example), dropping the input columns when they are known.

    For the package's example transforms on a map-style dataset, a `ROW_INDEX_COLUMN` holding each example's row in
    the loaded data (before any shuffle or split) is added first, and the transform learns which parquet file each
    row came from when `load_image_dataset` read parquet files: an unreadable image without a file name is then
    named by its row and file. The column costs 8 bytes per row of memory, no rewrite of the data.
    """
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(example_transform, remove_columns=dataset.column_names)
    if isinstance(example_transform, _ExampleTransform):
        example_transform.row_sources = _row_sources(dataset)
        dataset = with_row_index(dataset)
    return dataset.with_transform(example_transform)


def with_row_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` with an int64 `ROW_INDEX_COLUMN`: the row of each example in the underlying Arrow table.

    The column is added beside the (memory-mapped) table and any indices mapping of a `shuffle`, `select` or
    `train_test_split` is kept, so nothing is rewritten or reordered (`Dataset.add_column` would first write the
    whole shuffled dataset to a new file). A shuffled example thus keeps the row it had when loaded.
    """
    if ROW_INDEX_COLUMN in dataset.column_names:
        return dataset
    table = dataset.data
    rows = InMemoryTable.from_pydict({ROW_INDEX_COLUMN: np.arange(len(table), dtype=np.int64)})
    info = dataset.info.copy()
    info.features[ROW_INDEX_COLUMN] = datasets.Value("int64")
    return datasets.Dataset(
        concat_tables([table, rows], axis=1),
        info=info,
        split=dataset.split,
        indices_table=dataset._indices,  # no public accessor; the mapping is what keeps the order
        fingerprint=generate_random_fingerprint(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# collation


def _stack_views(
    examples: list[dict[str, Any]], key: str, image_size: int | None, num_channels: int = 3
) -> torch.Tensor:
    if examples:
        return torch.stack([example[key] for example in examples])
    side = image_size or 0
    return torch.zeros(0, num_channels, side, side, dtype=torch.float32)


def _split_readable(examples: Sequence[dict[str, Any]], key: str) -> tuple[list[dict[str, Any]], int]:
    readable = [example for example in examples if example.get(key) is not None]
    return readable, len(examples) - len(readable)


def _labels(examples: Sequence[dict[str, Any]], readable: list[dict[str, Any]]) -> torch.Tensor | None:
    if not any("labels" in example for example in examples):
        return None
    return torch.tensor([example["labels"] for example in readable], dtype=torch.long)


class MimCoPretrainingCollator:
    """Collates stage-2 examples into a batch, dropping unreadable ones.

    Args:
        mask_generator: A `MimCoMaskGenerator`; one independent mask is drawn per image. `None` leaves out
            `bool_masked_pos` (for evaluation / fine-tuning batches). In DataLoader workers, build it without a
            `generator` (the global torch RNG is seeded differently in each worker), or every worker draws the same
            masks.
        image_size: Side of the images, used only for the shape of an empty batch; without it an empty batch has
            `pixel_values` of shape `(0, 3, 0, 0)`.
        normalize_with: `(image_mean, image_std)` when the examples hold uint8 images
            (`build_pretraining_transform(normalize=False)`): the stacked batch is normalised in one go.

    Returns (from `__call__`):
        - `"pixel_values"`: float32 `(B, 3, H, W)`, the normalised images of the B readable examples.
        - `"bool_masked_pos"`: bool `(B, num_patches)`, `True` for the patches the student sees masked.
        - `"labels"`: long `(B,)`, only when the examples carry labels.
        - `"num_skipped"`: 0-dim long tensor, the number of unreadable examples dropped from this batch.

        When every example is unreadable, B is 0; the training loop should skip such a batch.

    `prepare_example` draws one example's mask on its own; the training loop calls it under that image's seed, so
    an image's mask does not depend on the batch it lands in. Examples without a drawn mask get one in `__call__`.
    """

    def __init__(
        self,
        mask_generator=None,
        image_size: int | None = None,
        normalize_with: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        self.mask_generator = mask_generator
        self.image_size = image_size
        self.normalize = ToNormalizedFloat(*normalize_with) if normalize_with is not None else None

    def prepare_example(self, example: dict[str, Any]) -> dict[str, Any]:
        """Adds `"bool_masked_pos"`, the mask `(num_patches,)` of one readable example."""
        if self.mask_generator is not None and example.get("pixel_values") is not None:
            example = {**example, "bool_masked_pos": self.mask_generator()}
        return example

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        readable, num_skipped = _split_readable(examples, "pixel_values")
        pixel_values = _stack_views(readable, "pixel_values", self.image_size)
        if self.normalize is not None:
            pixel_values = self.normalize(pixel_values.to(torch.uint8)) if readable else pixel_values.float()
        batch = {"pixel_values": pixel_values}
        if self.mask_generator is not None:
            masks = [example.get("bool_masked_pos") for example in readable]
            masks = [mask if mask is not None else self.mask_generator() for mask in masks]
            if masks:
                batch["bool_masked_pos"] = torch.stack(masks)
            else:
                batch["bool_masked_pos"] = torch.zeros(0, self.mask_generator.num_patches, dtype=torch.bool)
        labels = _labels(examples, readable)
        if labels is not None:
            batch["labels"] = labels
        batch["num_skipped"] = torch.tensor(num_skipped, dtype=torch.long)
        return batch


class ContrastiveCollator:
    """Collates stage-1 examples into a batch, dropping unreadable ones.

    Args:
        image_size: Side of the images, used only for the shape of an empty batch.

    Returns (from `__call__`):
        - `"pixel_values_1"`, `"pixel_values_2"`: float32 `(B, 3, H, W)`, the two normalised views of the B readable
          images (row i of both is the same source image).
        - `"labels"`: long `(B,)`, only when the examples carry labels.
        - `"num_skipped"`: 0-dim long tensor, the number of unreadable examples dropped from this batch.
    """

    def __init__(self, image_size: int | None = None):
        self.image_size = image_size

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        readable, num_skipped = _split_readable(examples, "pixel_values_1")
        batch = {
            "pixel_values_1": _stack_views(readable, "pixel_values_1", self.image_size),
            "pixel_values_2": _stack_views(readable, "pixel_values_2", self.image_size),
        }
        labels = _labels(examples, readable)
        if labels is not None:
            batch["labels"] = labels
        batch["num_skipped"] = torch.tensor(num_skipped, dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# skip accounting


class SkippedImageTracker:
    """Counts unreadable images over a run and stops it when there are too many.

    Args:
        max_skipped_fraction: Largest tolerated fraction of unreadable images (`--max_skipped_fraction`); 1.0 never
            stops.
        min_seen: The check starts once this many images were seen, so that a few bad files at the start do not stop
            a run.

    `update(num_seen, num_skipped)` adds one batch: `num_seen` counts every example drawn (readable and unreadable,
    i.e. `len(pixel_values) + num_skipped`), `num_skipped` the unreadable ones. In a multi-process run, sum the counts
    over processes first (or keep one tracker per process). The counts are saved by `state_dict()` and restored by
    `load_state_dict()` (so `accelerator.register_for_checkpointing(tracker)` carries them across a resume); the
    thresholds come from the current run's flags.
    """

    def __init__(self, max_skipped_fraction: float = 0.05, min_seen: int = 100):
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(f"`max_skipped_fraction` must lie in [0, 1], got {max_skipped_fraction}.")
        if min_seen < 0:
            raise ValueError(f"`min_seen` must be >= 0, got {min_seen}.")
        self.max_skipped_fraction = float(max_skipped_fraction)
        self.min_seen = int(min_seen)
        self.num_seen = 0
        self.num_skipped = 0

    @property
    def skipped_fraction(self) -> float:
        return self.num_skipped / self.num_seen if self.num_seen else 0.0

    def update(self, num_seen: int, num_skipped: int) -> None:
        """Adds the counts of one batch and raises `TooManyUnreadableImagesError` when the fraction is too high."""
        num_seen, num_skipped = int(num_seen), int(num_skipped)
        if num_seen < 0 or num_skipped < 0 or num_skipped > num_seen:
            raise ValueError(
                f"Counts must satisfy 0 <= num_skipped <= num_seen, got num_seen={num_seen}, num_skipped={num_skipped}."
            )
        self.num_seen += num_seen
        self.num_skipped += num_skipped
        if self.num_seen >= self.min_seen and self.skipped_fraction > self.max_skipped_fraction:
            raise TooManyUnreadableImagesError(
                f"{self.num_skipped} of {self.num_seen} images ({self.skipped_fraction:.2%}) could not be read, more "
                f"than the allowed {self.max_skipped_fraction:.2%} set by --max_skipped_fraction. Check the dataset "
                "(the warnings above name the unreadable files) or raise --max_skipped_fraction."
            )

    def summary(self) -> str:
        return (
            f"{self.num_skipped} of {self.num_seen} images skipped as unreadable ({self.skipped_fraction:.2%}; "
            f"limit {self.max_skipped_fraction:.2%}, --max_skipped_fraction)"
        )

    def state_dict(self) -> dict[str, int]:
        return {"num_seen": self.num_seen, "num_skipped": self.num_skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.num_seen = int(state_dict["num_seen"])
        self.num_skipped = int(state_dict["num_skipped"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary()})"


__all__ = [
    "DIGITS_DATASET",
    "ROW_INDEX_COLUMN",
    "UNREADABLE_KEY",
    "ContrastiveCollator",
    "ContrastiveExampleTransform",
    "MimCoPretrainingCollator",
    "PretrainingExampleTransform",
    "SkippedImageTracker",
    "TooManyUnreadableImagesError",
    "UnreadableImageError",
    "apply_example_transform",
    "build_contrastive_transforms",
    "build_eval_transform",
    "build_pretraining_transform",
    "decode_image",
    "disable_image_decoding",
    "find_skipped_links",
    "load_digits_dataset",
    "load_image_dataset",
    "resolve_image_column",
    "resolve_label_column",
    "shard_for_process",
    "to_rgb",
    "with_row_index",
]
