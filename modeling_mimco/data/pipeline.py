"""What happens to a row between the loaded dataset and the batch: decode, augment (`transforms.py`), collate.

`sources.py` loads the data (undecoded `{"bytes", "path"}` records); this module turns its rows into batches for
the training and evaluation commands:

- `PretrainingExampleTransform` / `ContrastiveExampleTransform`, attached lazily with `apply_example_transform`:
  decode and augment each example. An unreadable image does not raise: its pixel entries are `None` and
  `"unreadable_image"` names the file, or for a record without a file name its row (and parquet file).
- `MimCoPretrainingCollator` / `ContrastiveCollator`: drop the unreadable examples, stack the rest (stage 2: with one
  mask per image) and report how many were dropped as `"num_skipped"`, which the training loop counts.
- `build_pretraining_pipeline`: stage 2's whole input pipeline, the one every stage-2 run uses.

Imports `decoding` (one image value to RGB), `sources` (row provenance), `transforms` (the augmentations) and the
model files' `masking` and `configuration_mimco`; the model files never import this module (it needs `datasets` and
`torchvision`, which a checkpoint loaded as remote code must not).

Example (stage 2, map-style):

```python
>>> from torch.utils.data import DataLoader
>>> from modeling_mimco import MimCoConfig
>>> from modeling_mimco.data.pipeline import build_pretraining_pipeline
>>> from modeling_mimco.data.sources import disable_image_decoding, load_image_dataset, resolve_image_column
>>> dataset = load_image_dataset("digits", digits_image_size=32)
>>> image_column = resolve_image_column(dataset)
>>> dataset = disable_image_decoding(dataset, image_column)
>>> config = MimCoConfig(image_size=32, patch_size=4, mask_patch_size=8)
>>> dataset, collator = build_pretraining_pipeline(dataset, image_column, config)
>>> batch = next(iter(DataLoader(dataset, batch_size=8, collate_fn=collator)))
>>> batch["pixel_values"].shape, batch["bool_masked_pos"].shape, int(batch["num_skipped"])
(torch.Size([8, 3, 32, 32]), torch.Size([8, 64]), 0)
```
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable, concat_tables

from modeling_mimco.configuration_mimco import MimCoConfig
from modeling_mimco.data.contrastive_views import stack_parameters
from modeling_mimco.data.decoding import DEFAULT_MAX_IMAGE_PIXELS, UnreadableImageError, decode_image
from modeling_mimco.data.sources import row_sources
from modeling_mimco.data.transforms import ToNormalizedFloat, build_pretraining_transform
from modeling_mimco.masking import MimCoMaskGenerator


logger = logging.getLogger(__name__)


UNREADABLE_KEY = "unreadable_image"
"""Key of the per-example marker: `None` for a readable image, else the file name (or a description) of the bad one."""

KEY_COLUMN = "__key__"
"""Column of a WebDataset sample's name (`sources.load_image_dataset` keeps it). The example transforms pass it on
as `"key"` and the collators list the readable examples' keys as the batch's `"keys"`, so that which images a batch
holds can be told (`commands.run_pretraining.training_stream_keys`)."""

ROW_INDEX_COLUMN = "__mimco_row_index__"
"""Column that `apply_example_transform` adds to a map-style dataset: each example's row in the loaded data, so that
an unreadable image without a file name can be named by its row."""


# ---------------------------------------------------------------------------------------------------------------------
# per-example processing


class _ExampleTransform:
    """Decodes and augments the images of examples; shared logic of the two example transforms.

    Called with a *batch* (the image column holds a list, as `Dataset.with_transform` and `map(batched=True)` give)
    it returns a dict of lists; called with *one example* (as `IterableDataset.map` gives by default) it returns a
    dict of single values. `apply_example_transform` attaches it the right way for either kind of dataset.

    `max_image_pixels` (`--max_image_pixels`) travels with the transform into the DataLoader workers: an image whose
    header gives more pixels is not decoded but skipped as unreadable (`decoding.check_image_pixels`).
    """

    pixel_keys: tuple[str, ...] = ()

    fast_jpeg = False

    def __init__(
        self,
        image_column: str,
        label_column: str | None = None,
        draft_for: tuple[int, float] | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.image_column = image_column
        self.label_column = label_column
        self.draft_for = draft_for
        self.max_image_pixels = max_image_pixels
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
            if KEY_COLUMN in examples:
                output["key"] = list(examples[KEY_COLUMN])
            return output
        output = self._process(images, rows)
        if self.label_column is not None:
            output["labels"] = examples[self.label_column]
        if KEY_COLUMN in examples:
            output["key"] = examples[KEY_COLUMN]
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
            image = decode_image(
                value,
                draft_for=self.draft_for,
                fast_jpeg=self.fast_jpeg,
                where=where,
                max_image_pixels=self.max_image_pixels,
            )
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
        max_image_pixels: Images of more pixels (by their header) are skipped undecoded; `None` or 0: no limit.

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
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        super().__init__(image_column, label_column, draft_for, max_image_pixels)
        self.transform = transform

    def _augment(self, image: PIL.Image.Image) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.transform(image)}


class ContrastiveExampleTransform(_ExampleTransform):
    """Example transform for stage 1: two differently augmented views of each image.

    Args:
        transform_1, transform_2: The two view transforms (`build_contrastive_transforms`).
        image_column: Column holding the image.
        label_column: If given, its values are passed on as `"labels"`.
        max_image_pixels: Images of more pixels (by their header) are skipped undecoded; `None` or 0: no limit.

    Output per example: `"pixel_values_1"` and `"pixel_values_2"`, normalised float32 tensors `(3, H, W)` of the
    same image (both `None` when it is unreadable), `"unreadable_image"`, optionally `"labels"`.
    """

    pixel_keys = ("pixel_values_1", "pixel_values_2")

    def __init__(
        self,
        transform_1: Callable,
        transform_2: Callable,
        image_column: str,
        label_column: str | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        super().__init__(image_column, label_column, max_image_pixels=max_image_pixels)
        self.transform_1 = transform_1
        self.transform_2 = transform_2

    # JPEGs arrive as uint8 tensors from torchvision's decoder, which the views take as they are
    fast_jpeg = True

    def _augment(self, image: PIL.Image.Image | torch.Tensor) -> dict[str, torch.Tensor]:
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
        example_transform.row_sources = row_sources(dataset)
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


SAMPLE_SEED_KEY = "sample_seed"
"""Key of an example's per-image seed, which the training loop's seeded batches add; the collators stack the seeds
of the readable examples as `"sample_seeds"`, the model's per-image seeds of stochastic depth and dropout."""


def _add_sample_seeds(batch: dict[str, torch.Tensor], readable: list[dict[str, Any]]) -> None:
    if readable and SAMPLE_SEED_KEY in readable[0]:
        batch["sample_seeds"] = torch.tensor([example[SAMPLE_SEED_KEY] for example in readable], dtype=torch.long)
    if readable and "key" in readable[0]:
        batch["keys"] = [example["key"] for example in readable]  # names of WebDataset samples, row by row


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
        - `"sample_seeds"`: long `(B,)`, the per-image seeds, when the examples carry them (the training loop's
          seeded batches add them).
        - `"keys"`: the B readable examples' sample names, when they carry one (WebDataset shards, `KEY_COLUMN`).
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
        _add_sample_seeds(batch, readable)
        batch["num_skipped"] = torch.tensor(num_skipped, dtype=torch.long)
        return batch


class ContrastiveCollator:
    """Collates stage-1 examples into a batch, dropping unreadable ones.

    Args:
        image_size: Side of the images, used only for the shape of an empty batch.

    Returns (from `__call__`):
        - `"pixel_values_1"`, `"pixel_values_2"`: `(B, 3, H, W)`, the two views of the B readable images (row i of
          both is the same source image), as the views give them: normalised float32, or uint8. When the views leave their photometric half to the
          accelerator (`ContrastiveView(photometric_on_device=True)`): the uint8 crops, and
          `"photometric_1"` / `"photometric_2"`, dicts of the stacked parameters that `apply_photometric` takes.
        - `"labels"`: long `(B,)`, only when the examples carry labels.
        - `"sample_seeds"`: long `(B,)`, the per-image seeds, when the examples carry them (the training loop's
          seeded batches add them).
        - `"num_skipped"`: 0-dim long tensor, the number of unreadable examples dropped from this batch.
    """

    def __init__(self, image_size: int | None = None):
        self.image_size = image_size

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        readable, num_skipped = _split_readable(examples, "pixel_values_1")
        batch = {}
        for view in ("1", "2"):
            key = f"pixel_values_{view}"
            if readable and isinstance(readable[0][key], dict):
                # `--augment_on_device`: uint8 crops, and the parameters of the photometric half still to apply
                batch[key] = torch.stack([example[key]["crop"] for example in readable])
                batch[f"photometric_{view}"] = stack_parameters([example[key] for example in readable])
            else:
                # float views as they come; 8-bit ones (`ContrastiveView(normalize=False)`) for the training step to
                # normalise on its device (`contrastive_views.normalize_views`)
                batch[key] = _stack_views(readable, key, self.image_size)
        labels = _labels(examples, readable)
        if labels is not None:
            batch["labels"] = labels
        _add_sample_seeds(batch, readable)
        batch["num_skipped"] = torch.tensor(num_skipped, dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# pipelines


def build_pretraining_pipeline(
    dataset: datasets.Dataset | datasets.IterableDataset,
    image_column: str,
    config: MimCoConfig,
    crop_min_scale: float = 0.67,
    hflip: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[datasets.Dataset | datasets.IterableDataset, MimCoPretrainingCollator]:
    """Stage 2's input pipeline over a dataset of undecoded images (`sources.load_training_images`).

    Each example is decoded (large JPEGs at a reduced size when the crop allows it) and augmented by
    `build_pretraining_transform` with crop areas from `crop_min_scale` to 1, kept as uint8; the collator draws one
    `MimCoMaskGenerator.from_config(config)` mask per image and normalises the whole batch with the config's mean
    and std. `config` is the student's (image size, patch grid, masking, mean and std). An image of more than
    `max_image_pixels` pixels (`--max_image_pixels`; `None` or 0: no limit) is skipped undecoded.

    Returns:
        `(dataset, collator)`: the dataset with its example transform attached (`apply_example_transform`) and the
        `MimCoPretrainingCollator` that batches it.
    """
    example_transform = pretraining_example_transform(image_column, config, crop_min_scale, hflip, max_image_pixels)
    dataset = apply_example_transform(dataset, example_transform)
    collator = pretraining_collator(config)
    return dataset, collator


def pretraining_example_transform(
    image_column: str,
    config: MimCoConfig,
    crop_min_scale: float = 0.67,
    hflip: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> PretrainingExampleTransform:
    """Stage 2's per-example step: decode (large JPEGs at a reduced size when the crop allows it; none of more than
    `max_image_pixels` pixels) and augment with crop areas from `crop_min_scale` to 1, kept as uint8 (the collator
    normalises whole batches)."""
    transform = build_pretraining_transform(
        config.image_size,
        config.image_mean,
        config.image_std,
        crop_scale=(crop_min_scale, 1.0),
        hflip=hflip,
        normalize=False,
    )
    return PretrainingExampleTransform(
        transform, image_column, draft_for=(config.image_size, crop_min_scale), max_image_pixels=max_image_pixels
    )


def pretraining_collator(config: MimCoConfig) -> MimCoPretrainingCollator:
    """Stage 2's batching step: one `MimCoMaskGenerator.from_config(config)` mask per image, batch normalised with
    the config's mean and std."""
    return MimCoPretrainingCollator(
        MimCoMaskGenerator.from_config(config),
        image_size=config.image_size,
        normalize_with=(config.image_mean, config.image_std),
    )


__all__ = [
    "KEY_COLUMN",
    "ROW_INDEX_COLUMN",
    "SAMPLE_SEED_KEY",
    "UNREADABLE_KEY",
    "ContrastiveCollator",
    "ContrastiveExampleTransform",
    "MimCoPretrainingCollator",
    "PretrainingExampleTransform",
    "UnreadableImageError",
    "apply_example_transform",
    "build_pretraining_pipeline",
    "pretraining_collator",
    "pretraining_example_transform",
    "decode_image",
    "with_row_index",
]
