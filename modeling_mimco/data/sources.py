"""Where images come from: the one place that knows the data sources the scripts accept.

- `ImageSourceArguments`: the source flags every script shares (`--dataset_name`, `--train_dir`, `--data_files`,
  `--train_split`, `--image_column`, `--max_train_samples`, `--max_image_pixels`); `DataArguments` (pre-training) and
  `LabelledDataArguments` (fine-tuning, frozen-feature evaluation) extend it.
- `load_image_dataset`: one split from a Hub dataset or local dataset folder, a folder of class sub-folders, parquet
  files, WebDataset `.tar` shards (`webdataset.py`), or the built-in digits (`digits.load_digits_dataset`), optionally streaming. It checks local parquet files by name,
  warns about the symbolic links a class folder drops silently (`find_skipped_links`), and remembers which parquet
  file each row came from, so that `data.apply_example_transform` can name an unreadable image by its row.
- `resolve_image_column` / `resolve_label_column`, `disable_image_decoding` (images stay `{"bytes", "path"}` records
  until `decoding.decode_image`), `shard_for_process` (a stream split between processes), `take_subset` (the seeded
  `--max_train_samples` subset; a folder draws it from its file list, reading no other file).
- `load_training_images` (pre-training) and `load_classification_splits` (a labelled train and evaluation split).

Imports only `digits`, `webdataset` (shards), `decoding` (the default size limit) and `errors`; the augmentations and collators that consume these datasets are in
`transforms.py` and `pipeline.py`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError
from datasets.table import list_table_cache_files

from modeling_mimco.data.arguments import (  # noqa: F401 (the argument classes' first home, re-exported)
    DataArguments,
    ImageSourceArguments,
    LabelledDataArguments,
)
from modeling_mimco.data.digits import (
    CANVAS_DIGITS_DATASET,
    CLUTTERED_DIGITS_DATASET,
    DIGITS_DATASET,
    load_canvas_digits_dataset,
    load_cluttered_digits_dataset,
    load_digits_dataset,
)
from modeling_mimco.data.webdataset import (
    check_shard_files,
    check_shards_for_workers,
    data_files_format,
    webdataset_columns,
)
from modeling_mimco.errors import one_line


logger = logging.getLogger(__name__)


MAX_LISTED_NAMES = 10
"""How many names a warning about skipped files lists before it only counts the rest."""


def load_training_images(
    data_args: DataArguments,
    image_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    seed: int = 42,
    num_workers: int = 0,
):
    """Loads the training split of `data_args` with undecoded images; returns `(dataset, image_column)`.

    `seed` draws the `--max_train_samples` subset. A stream of WebDataset shards must give every one of the
    `num_processes` x `num_workers` DataLoader workers whole shards (`check_shards_for_workers`)."""
    dataset = load_image_dataset(
        **data_args.source_kwargs(),
        split=data_args.train_split,
        streaming=data_args.streaming,
        cache_dir=data_args.cache_dir,
        digits_image_size=image_size,
        max_samples=data_args.max_train_samples,
        seed=seed,
        keep_order=True,
    )
    image_column = resolve_image_column(dataset, data_args.image_column)
    dataset = disable_image_decoding(dataset, image_column)
    if isinstance(dataset, datasets.IterableDataset) and is_webdataset(data_args.data_files):
        check_shards_for_workers(dataset.num_shards, num_processes, num_workers)
    dataset = shard_for_process(dataset, process_index, num_processes)
    return dataset, image_column


def is_webdataset(data_files) -> bool:
    """Whether `--data_files` names WebDataset `.tar` shards (a mix with other files raises `ShardError`)."""
    return data_files is not None and data_files_format(data_files) == "webdataset"


@dataclass
class ClassificationData:
    """A labelled train split and evaluation split, images left undecoded (see `disable_image_decoding`)."""

    train: datasets.Dataset
    eval: datasets.Dataset
    image_column: str
    label_column: str
    class_names: list[str]
    eval_split: str
    """Where the evaluation images came from: a split name, or `"train[split off N%]"`."""

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.class_names)}


def load_classification_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    data_files: str | list[str] | dict | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    validation_dir: str | None = None,
    train_val_split: float = 0.15,
    image_column: str | None = None,
    label_column: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    seed: int = 42,
    digits_image_size: int = 32,
) -> ClassificationData:
    """Loads a labelled image dataset (any source of `load_image_dataset`) as a train and an evaluation split.

    The evaluation images are those of `validation_dir` (a folder of class sub-folders) when given; else the split
    `eval_split` when given; otherwise `"validation"`, else `"test"`, else a seeded split of `train_val_split` of the
    training images (stratified by class when the labels are a `ClassLabel`). Labels must be a `ClassLabel`,
    integers (class `i` is named `str(i)`) or strings (classes sorted by name).
    """
    if validation_dir is not None and eval_split is not None:
        raise ValueError("Give --validation_dir or --eval_split, not both.")
    source = dict(
        dataset_name=dataset_name,
        dataset_config_name=dataset_config_name,
        train_dir=train_dir,
        data_files=data_files,
        cache_dir=cache_dir,
        token=token,
        digits_image_size=digits_image_size,
    )
    subset_early = _subsets_from_file_lists(train_dir, validation_dir, train_split, eval_split)
    early = {"max_samples": max_train_samples, "seed": seed} if subset_early else {}
    train = load_image_dataset(split=train_split, **source, **early)
    image_column = resolve_image_column(train, image_column)
    label_column = resolve_label_column(train, label_column)
    if label_column is None:
        raise ValueError(
            f"The dataset has no label column (tried 'label', 'labels' and any ClassLabel column) among "
            f"{train.column_names}; name it with --label_column."
        )
    train = disable_image_decoding(train, image_column)

    eval_dataset, eval_name = None, None
    if validation_dir is not None:
        eval_dataset = _load_validation_dir(
            validation_dir, train, image_column, label_column, cache_dir, max_eval_samples, seed
        )
        max_eval_samples = None  # taken from the folder's file list
        eval_name = f"--validation_dir {validation_dir!r}"
    else:
        subset = {"max_samples": max_eval_samples, "seed": seed} if subset_early else {}
        eval_dataset, eval_name = _load_eval_split(source, train_split, eval_split, subset)
    if eval_dataset is None:
        train, eval_dataset, class_names = _split_off_eval(train, label_column, train_val_split, seed)
        eval_name = f"{train_split}[split off {train_val_split:.0%}]"
    else:
        eval_dataset = disable_image_decoding(eval_dataset, image_column)
        train, eval_dataset, class_names = _encode_labels(train, eval_dataset, label_column)
    if not subset_early:
        train = take_subset(train, max_train_samples, seed)
        eval_dataset = take_subset(eval_dataset, max_eval_samples, seed)
    return ClassificationData(train, eval_dataset, image_column, label_column, class_names, eval_name)


def load_labelled_splits(
    data_args: LabelledDataArguments, seed: int, cache_dir: str | None = None, token: str | bool | None = None
) -> ClassificationData:
    """The training and evaluation splits that `data_args` describe (`load_classification_splits`)."""
    return load_classification_splits(
        **data_args.source_kwargs(),
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        validation_dir=data_args.validation_dir,
        train_val_split=data_args.train_val_split,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        cache_dir=cache_dir,
        token=token,
        seed=seed,
    )


def _load_eval_split(
    source: dict, train_split: str, eval_split: str | None, subset: dict
) -> tuple[datasets.Dataset | None, str | None]:
    """The split `eval_split` of `source` (its absence raises), else `"validation"`, else `"test"`, else none:
    `(dataset, split name)` or `(None, None)`."""
    candidates = [eval_split] if eval_split is not None else ["validation", "test"]
    for candidate in candidates:
        if candidate == train_split:
            continue
        try:
            # the train split's load already warned about the folder's skipped links
            dataset = load_image_dataset(split=candidate, report_skipped_links=False, **source, **subset)
        except ValueError:
            if eval_split is not None:
                raise
            continue
        return dataset, candidate
    return None, None


def _subsets_from_file_lists(
    train_dir: str | None, validation_dir: str | None, train_split: str, eval_split: str | None
) -> bool:
    """Whether the training (and evaluation) subsets are drawn from the file lists of a folder: a `--train_dir`
    whose evaluation images lie apart (`--validation_dir`, or a split sub-folder), so that nothing else is read. A
    folder whose evaluation images are split off its training images is read whole first."""
    if train_dir is None or not os.path.isdir(train_dir):
        return False
    eval_names = {eval_split} if eval_split is not None else {"validation", "test"}
    return validation_dir is not None or bool((eval_names - {train_split}) & set(folder_data_files(train_dir)))


def _split_off_eval(
    train: datasets.Dataset, label_column: str, train_val_split: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """A seeded `train_val_split` of the training images as the evaluation split (stratified by class where every
    class is large enough); returns `(train, eval, class_names)`."""
    if not 0.0 < train_val_split < 1.0:
        raise ValueError(
            f"The dataset has no 'validation' or 'test' split; set --train_val_split in (0, 1) to split one off "
            f"the training images (got {train_val_split})."
        )
    train, _, class_names = _encode_labels(train, None, label_column)
    try:
        parts = train.train_test_split(test_size=train_val_split, seed=seed, stratify_by_column=label_column)
    except ValueError:  # a class too small to stratify
        parts = train.train_test_split(test_size=train_val_split, seed=seed)
    return parts["train"], parts["test"], class_names


def _load_validation_dir(
    validation_dir: str,
    train: datasets.Dataset,
    image_column: str,
    label_column: str,
    cache_dir: str | None,
    max_samples: int | None = None,
    seed: int = 42,
) -> datasets.Dataset:
    """The images of `--validation_dir` (a seeded subset of `max_samples`, as `take_subset` draws it), their class
    numbers made those of the training data's (by class name)."""
    if not os.path.isdir(validation_dir):
        raise ValueError(f"--validation_dir {validation_dir!r} is not a directory.")
    builder_files = {"validation": [os.path.join(validation_dir, "**")]}
    try:
        # labels from the class folders even where there is only one (the builder leaves them out then)
        validation = _load_image_folder(
            validation_dir, builder_files, "validation", max_samples, seed, False, cache_dir, drop_labels=False
        )
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--validation_dir {validation_dir!r}: {one_line(err)}") from err
    train_feature = train.features.get(label_column)
    validation_feature = validation.features.get("label")
    if not isinstance(train_feature, datasets.ClassLabel) or not isinstance(validation_feature, datasets.ClassLabel):
        raise ValueError(
            f"--validation_dir {validation_dir!r}: its class folders need training data with class names "
            f"(--train_dir, or a ClassLabel column), got {train_feature}."
        )
    unknown = sorted(set(validation_feature.names) - set(train_feature.names))
    if unknown:
        raise ValueError(
            f"--validation_dir {validation_dir!r}: classes {unknown[:MAX_LISTED_NAMES]} are not among the training "
            f"data's {len(train_feature.names)} classes."
        )
    if image_column != "image":
        validation = validation.rename_column("image", image_column)
    if label_column != "label":
        validation = validation.rename_column("label", label_column)
    label2id = {name: index for index, name in enumerate(train_feature.names)}
    return validation.align_labels_with_mapping(label2id, label_column).cast_column(label_column, train_feature)


def _encode_labels(
    train: datasets.Dataset, eval_dataset: datasets.Dataset | None, label_column: str
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """Casts the label column of both splits to one `ClassLabel` (integers keep their values, strings are numbered in
    sorted order) and returns the class names."""
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return train, eval_dataset, list(feature.names)
    values = set(train[label_column]) | (set(eval_dataset[label_column]) if eval_dataset is not None else set())
    if values and all(isinstance(value, (int, np.integer)) for value in values):
        if min(values) < 0:
            raise ValueError(f"Integer labels must be >= 0, found {min(values)} in column {label_column!r}.")
        class_label = datasets.ClassLabel(names=[str(index) for index in range(max(values) + 1)])
    elif values and all(isinstance(value, str) for value in values):
        class_label = datasets.ClassLabel(names=sorted(values))
    else:
        raise ValueError(f"Labels in column {label_column!r} must be a ClassLabel, integers or strings.")
    train = train.cast_column(label_column, class_label)
    if eval_dataset is not None:
        eval_dataset = eval_dataset.cast_column(label_column, class_label)
    return train, eval_dataset, list(class_label.names)


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
    max_samples: int | None = None,
    seed: int = 42,
    keep_order: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """Loads one split of an image dataset from exactly one source.

    Sources (give at most one):

    - `dataset_name`: a Hub dataset (`"ILSVRC/imagenet-1k"`, gated: `token`, or the environment / cached login) or a
      local dataset folder (e.g. a parquet folder in the Hub layout), read with `datasets.load_dataset`;
      `dataset_config_name` picks a configuration. `"digits"`, `"canvas-digits"` and `"cluttered-digits"` are reserved for the
      built-in datasets (`data/digits.py`).
    - `train_dir`: a local folder of class sub-folders (`train_dir/<class>/<image>`), read with the `"imagefolder"`
      builder; class names become a `ClassLabel` `"label"` column. Every image is in the split `"train"`, whatever
      its file name; sub-folders named after splits (`train_dir/train/<class>/...`, `train_dir/val/<class>/...`)
      give those splits instead (`folder_data_files`).
    - `data_files`: parquet file(s) or glob(s), read with the `"parquet"` builder, or WebDataset `.tar` shards (names,
      globs, brace ranges such as `train-{000000..000099}.tar`), read with the `"webdataset"` builder: each sample's
      image field (`jpg`, `png`, ...) becomes the `"image"` column, its `cls` the `"label"` column, and `__key__`
      (the sample's name) is kept. A list or a string gives the single split `"train"`; a dict maps split names to
      files. A missing shard, or shards mixed with parquet files, raise `ValueError` in one line.
    - none of them, or `dataset_name="digits"`: `load_digits_dataset(split, digits_image_size)`;
      `"canvas-digits"` (the demo's) and `"cluttered-digits"`: `load_canvas_digits_dataset` and the cluttered one.

    Args:
        split: The split to load; an unknown split raises `ValueError` listing the available ones.
        streaming: Return a `datasets.IterableDataset` that reads lazily (the digits demo is converted with
            `to_iterable_dataset`).
        cache_dir: Where `datasets` caches downloads and prepared Arrow files.
        token: Hub token for gated or private datasets; `None` uses the cached login / `HF_TOKEN`.
        digits_image_size: Side of the images, when a built-in digits dataset is the source.
        report_skipped_links: With `train_dir`, warn about the symbolic links that `"imagefolder"` drops without a
            word (dangling links, link loops, links to folders), naming up to 10 of them and counting all
            (`find_skipped_links`). Loading further splits of a folder already reported can turn this off.
        max_samples: Keep a seeded subset of at most this many rows (`take_subset`: the first N of a stream). A
            folder (`train_dir`) lists its files and builds the dataset of the chosen ones only, so that a subset of
            a large folder reads nothing else; the rows are those the subset of the whole folder would hold.
        seed: Draws the subset.
        keep_order: The subset's rows in the source's order, instead of in the order they were drawn.

    Local parquet files (`data_files`, or the files of a local dataset folder) are checked first: one that is
    truncated or not parquet raises `ValueError` naming it, and `datasets` failing to prepare a source raises
    `ValueError` naming the source. The row counts of the files are remembered, so that an unreadable image without
    a file name is reported by its row and parquet file (see `apply_example_transform`). A folder logs how many
    images in how many classes it reads, instead of `datasets`' download and generation progress bars.

    Returns:
        A `datasets.Dataset`, or a `datasets.IterableDataset` when `streaming=True`.
    """
    _check_one_source(dataset_name, train_dir, data_files)
    builtin = _builtin_dataset(dataset_name, train_dir, data_files, split, digits_image_size)
    if builtin is not None:
        if streaming:
            builtin = builtin.to_iterable_dataset(num_shards=_digits_num_shards(len(builtin)))
        return take_subset(builtin, max_samples, seed, keep_order)

    path, kwargs, source = _builder_for_source(dataset_name, dataset_config_name, train_dir, data_files)
    if train_dir is not None and report_skipped_links:
        _warn_about_skipped_links(train_dir)
    if train_dir is not None and not streaming and _split_base_names(split) == {split}:
        return _load_image_folder(train_dir, kwargs["data_files"], split, max_samples, seed, keep_order, cache_dir)
    local_folder = dataset_name is not None and os.path.isdir(dataset_name)  # the Hub is not looked into
    check_parquet_as = source if local_folder else "--data_files" if data_files is not None else None
    dataset = _load_with_builder(path, kwargs, source, split, streaming, cache_dir, token, check_parquet_as)
    if path == "webdataset":
        renames = webdataset_columns(dataset.column_names or [])
        if renames:
            dataset = _rename_undecoded(dataset, renames)
    return take_subset(dataset, max_samples, seed, keep_order)


def _builtin_dataset(
    dataset_name: str | None, train_dir: str | None, data_files, split: str, image_size: int
) -> datasets.Dataset | None:
    """The split of a built-in digits dataset when the source names one (or none is given), else `None`."""
    if (dataset_name is None and train_dir is None and data_files is None) or dataset_name == DIGITS_DATASET:
        return load_digits_dataset(split=split, image_size=image_size)
    if dataset_name == CLUTTERED_DIGITS_DATASET:
        return load_cluttered_digits_dataset(split=split, image_size=image_size)
    if dataset_name == CANVAS_DIGITS_DATASET:
        return load_canvas_digits_dataset(split=split, image_size=image_size)
    return None


def _load_with_builder(
    path: str,
    kwargs: dict,
    source: str,
    split: str,
    streaming: bool,
    cache_dir: str | None,
    token: str | bool | None,
    check_parquet_as: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """`datasets.load_dataset` of one source, its failures in one line naming `source`. With `check_parquet_as`, the
    source's local parquet files are checked first (named as coming from it) and their rows remembered."""
    hub_kwargs = {"cache_dir": cache_dir, "token": token}
    parquet_files = None
    if check_parquet_as is not None and (path == "parquet" or check_parquet_as == source):
        parquet_files = _checked_parquet_files(path, kwargs, check_parquet_as, **hub_kwargs)
    try:
        dataset = datasets.load_dataset(path, **kwargs, split=split, streaming=streaming, **hub_kwargs)
    except DatasetGenerationError as err:
        # e.g. a parquet file whose footer is intact but whose pages are damaged; the cause says what failed
        raise ValueError(f"{source}: datasets could not read the data: {one_line(err.__cause__ or err)}") from err
    except ValueError as err:
        if "split" not in str(err).lower():
            raise
        available = _available_splits(path, kwargs, **hub_kwargs)
        if available is None or _split_base_names(split) <= set(available):
            raise
        raise ValueError(f"Split {split!r} does not exist in {source}; available splits: {available}.") from err
    if parquet_files is not None and isinstance(dataset, datasets.Dataset):
        _remember_row_sources(dataset, parquet_files.get(str(split)))
    return dataset


def take_subset(
    dataset: datasets.Dataset | datasets.IterableDataset, max_samples: int | None, seed: int, keep_order: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """A seeded subset of at most `max_samples` rows: rows `np.random.default_rng(seed).permutation(len(dataset))
    [:max_samples]`, in that order (as `dataset.shuffle(seed=seed).select(range(max_samples))` gives them), or in
    the dataset's order with `keep_order`; the first `max_samples` of a stream. `None` keeps every row."""
    if max_samples is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(max_samples)
    chosen = _subset_positions(len(dataset), max_samples, seed, keep_order)
    return dataset.select(chosen)


def _subset_positions(num_rows: int, max_samples: int, seed: int, keep_order: bool) -> np.ndarray:
    chosen = np.random.default_rng(seed).permutation(num_rows)[:max_samples]
    return np.sort(chosen) if keep_order else chosen


def _rename_undecoded(
    dataset: datasets.Dataset | datasets.IterableDataset, renames: dict[str, str]
) -> datasets.Dataset | datasets.IterableDataset:
    """`dataset.rename_columns(renames)`, the image columns renamed undecoded. A stream renames in a step of its own
    that would decode every image with PIL, so that a truncated file or an image over the size limit stopped the
    stream there instead of being skipped by `decoding.decode_image` (and every image was decoded and re-encoded
    once more); the renamed columns get their decoding back."""
    if not isinstance(dataset, datasets.IterableDataset) or dataset.features is None:
        return dataset.rename_columns(renames)
    images = {
        name: feature
        for name, feature in dataset.features.items()
        if name in renames and isinstance(feature, datasets.Image) and feature.decode
    }
    for name, feature in images.items():
        dataset = dataset.cast_column(name, datasets.Image(mode=feature.mode, decode=False))
    dataset = dataset.rename_columns(renames)
    for name, feature in images.items():
        dataset = dataset.cast_column(renames[name], feature)
    return dataset


def _check_one_source(dataset_name: str | None, train_dir: str | None, data_files) -> None:
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


def _builder_for_source(
    dataset_name: str | None, dataset_config_name: str | None, train_dir: str | None, data_files
) -> tuple[str, dict, str]:
    """The `datasets.load_dataset` path and keyword arguments of one (non-digits) source, and the flag naming it."""
    if dataset_name is not None:
        return dataset_name, {"name": dataset_config_name}, f"--dataset_name {dataset_name!r}"
    if train_dir is not None:
        if not os.path.isdir(train_dir):
            raise ValueError(f"--train_dir {train_dir!r} is not a directory.")
        return "imagefolder", {"data_files": folder_data_files(train_dir)}, f"--train_dir {train_dir!r}"
    if data_files_format(data_files) == "webdataset":
        # brace ranges expanded and every local shard checked here: datasets knows globs only
        return "webdataset", {"data_files": check_shard_files(data_files)}, f"--data_files {data_files!r}"
    return "parquet", {"data_files": data_files}, f"--data_files {data_files!r}"


def _load_image_folder(
    folder: str,
    data_files: dict[str, list[str]],
    split: str,
    max_samples: int | None,
    seed: int,
    keep_order: bool,
    cache_dir: str | None,
    drop_labels: bool | None = None,
) -> datasets.Dataset:
    """One split of a folder of class sub-folders with the `"imagefolder"` builder, from a file list made here.

    The builder gets the list (`datasets`' own listing of `data_files[split]`) or, with `max_samples`, the files of
    the subset that `take_subset` would draw from the whole folder, with the class names of the whole folder: the
    dataset equals the subset of the whole folder's, and no other file is read. A folder with a metadata file or a
    zip archive is read whole. Logs what it reads instead of `datasets`' progress bars."""
    from datasets.data_files import DataFilesList
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if split not in data_files:  # known without preparing the folder
        raise ValueError(
            f"Split {split!r} does not exist in --train_dir {folder!r}; available splits: {list(data_files)}."
        )
    with _quiet_datasets():
        listed = DataFilesList.from_patterns(data_files[split])
    images = [index for index, name in enumerate(listed) if _image_extension(name, ImageFolder.EXTENSIONS)]
    metadata = {os.path.basename(name) for name in listed} & set(ImageFolder.METADATA_FILENAMES)
    if not images or metadata or any(name.lower().endswith(".zip") for name in listed):
        # rows from metadata files or archives, or no image (datasets says so): the builder reads the folder itself
        dataset = _read_image_folder(folder, data_files, split, None, drop_labels, cache_dir)
        return take_subset(dataset, max_samples, seed, keep_order)
    class_names = sorted({os.path.basename(os.path.dirname(listed[index])) for index in images})
    depths = {listed[index].replace("\\", "/").count("/") for index in images}
    add_labels = (len(class_names) > 1 and len(depths) == 1) if drop_labels is None else not drop_labels
    num_images, chosen = len(images), None
    if max_samples is not None:
        chosen = _subset_positions(num_images, max_samples, seed, keep_order)
        images = [images[position] for position in np.sort(chosen)]
    files = DataFilesList([listed[index] for index in images], [listed.origin_metadata[index] for index in images])
    features = None
    if add_labels:
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    subset = f" (a subset of {num_images})" if len(images) < num_images else ""
    logger.info(f"Reading {len(images)} images{subset} in {len(class_names)} classes from {folder}")
    dataset = _read_image_folder(folder, {split: files}, split, features, not add_labels, cache_dir)
    if chosen is not None and not keep_order:
        dataset = dataset.select(np.argsort(np.argsort(chosen)))  # the rows in the order they were drawn
    return dataset


def _read_image_folder(
    folder: str, data_files: dict, split: str, features, drop_labels: bool | None, cache_dir: str | None
) -> datasets.Dataset:
    """`datasets.load_dataset("imagefolder", ...)` without its progress bars, its failures in one line."""
    try:
        with _without_progress_bars():
            return datasets.load_dataset(
                "imagefolder",
                data_files=data_files,
                split=split,
                features=features,
                drop_labels=drop_labels,
                cache_dir=cache_dir,
            )
    except DatasetGenerationError as err:
        raise ValueError(f"{folder!r}: datasets could not read the data: {one_line(err.__cause__ or err)}") from err


def _image_extension(name: str, extensions) -> bool:
    """Whether the `"imagefolder"` builder takes the file `name` for an image (`x.jpg`, also `x.jpg.gz`)."""
    root, extension = os.path.splitext(name)
    return extension.lower() in extensions or os.path.splitext(root)[1].lower() in extensions


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """Hides `datasets`' progress bars ("Downloading data" for local files, "Generating train split")."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


# Sub-folders of a --train_dir that name a split, and the split each gives.
SPLIT_FOLDERS = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
}


def folder_data_files(folder: str) -> dict[str, list[str]]:
    """The `"imagefolder"` builder's `data_files` for a folder of class sub-folders: every image under it is in
    the split `"train"`, or, when its sub-folders are named after splits (`train/`, `val/`...), every image under
    each of those is in that split.

    Given explicitly, as transformers' example scripts do (`data_files={"train": "<dir>/**"}`): left to itself,
    `datasets` guesses splits from file names too, so ImageNet's own `ILSVRC2012_val_00000293.JPEG` would make a
    training folder a validation split and drop the files without such a name.
    """
    splits: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        split = SPLIT_FOLDERS.get(name.lower())
        if split is not None and os.path.isdir(os.path.join(folder, name)):
            splits.setdefault(split, []).append(os.path.join(folder, name, "**"))
    return splits or {"train": [os.path.join(folder, "**")]}


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


def row_sources(dataset: datasets.Dataset) -> tuple[tuple[str, int], ...] | None:
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
