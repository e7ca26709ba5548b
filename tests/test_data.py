"""Tests of the data layer (`modeling_mimco.data.pipeline`), all on generated data: no network, no downloaded dataset."""

from __future__ import annotations

import collections
import io
import logging
import math
import os
import pickle
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from modeling_mimco.data.decoding import UnreadableImageError, decode_image, to_rgb
from modeling_mimco.data.digits import DIGITS_DATASET, load_digits_dataset
from modeling_mimco.data.pipeline import (
    ROW_INDEX_COLUMN,
    UNREADABLE_KEY,
    ContrastiveCollator,
    ContrastiveExampleTransform,
    MimCoPretrainingCollator,
    PretrainingExampleTransform,
    apply_example_transform,
    with_row_index,
)
from modeling_mimco.data.sources import (
    disable_image_decoding,
    find_skipped_links,
    load_image_dataset,
    resolve_image_column,
    resolve_label_column,
    shard_for_process,
)
from modeling_mimco.data.transforms import (
    build_contrastive_transforms,
    build_eval_transform,
    build_pretraining_transform,
)
from modeling_mimco.masking import MimCoMaskGenerator
from modeling_mimco.training.log import SkippedImageTracker, TooManyUnreadableImagesError


MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
IMAGE_SIZE = 16
CIFAR10_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10")


def _noise_image(seed: int, size=(20, 24), mode: str = "RGB") -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.randint(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels)


def _encode(image: PIL.Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


GOOD_FILES = {"cat": ["a.png", "b.jpg", "c.png"], "dog": ["d.jpg", "e.png", "f.png", "g.jpg"]}
BAD_FILES = {"cat": ["empty.jpg"], "dog": ["truncated.jpg", "text.png"]}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    """`root/<class>/<image>`: 7 good PNG/JPEG images (one grayscale, one RGBA) and 3 unreadable files."""
    root = tmp_path_factory.mktemp("images")
    seed = 0
    for class_name, names in GOOD_FILES.items():
        (root / class_name).mkdir()
        for name in names:
            seed += 1
            image = _noise_image(seed, mode="L" if seed == 2 else "RGB")
            if seed == 3:
                image = image.convert("RGBA")
            image.save(root / class_name / name)
    (root / "cat" / "empty.jpg").write_bytes(b"")
    whole = _encode(_noise_image(99, size=(64, 64)), "JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "dog" / "text.png").write_text("this is not an image\n")
    return str(root)


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("clean")
    for class_index, class_name in enumerate(["ant", "bee"]):
        (root / class_name).mkdir()
        for i in range(3):
            _noise_image(10 * class_index + i).save(root / class_name / f"{i}.png")
    return str(root)


def _parquet_file(directory, column: str = "img", num_rows: int = 10, bad_rows: tuple[int, ...] = ()) -> str:
    """A parquet file with an image column `column`, a "label" and an "id" column; rows in `bad_rows` hold junk."""
    records = []
    for i in range(num_rows):
        data = b"junk, not an image" if i in bad_rows else _encode(_noise_image(i, size=(12, 10)), "PNG")
        records.append({"bytes": data, "path": f"row{i}.png"})
    features = datasets.Features(
        {
            column: datasets.Image(),
            "label": datasets.ClassLabel(names=["even", "odd"]),
            "id": datasets.Value("int64"),
        }
    )
    dataset = datasets.Dataset.from_dict(
        {column: records, "label": [i % 2 for i in range(num_rows)], "id": list(range(num_rows))}, features=features
    )
    path = os.path.join(str(directory), f"{column}-{num_rows}-{len(bad_rows)}.parquet")
    dataset.to_parquet(path)
    return path


def _pretraining_pipeline(dataset, image_column, label_column=None):
    dataset = disable_image_decoding(dataset, image_column)
    transform = build_pretraining_transform(IMAGE_SIZE, MEAN, STD)
    return apply_example_transform(dataset, PretrainingExampleTransform(transform, image_column, label_column))


def _mask_generator() -> MimCoMaskGenerator:
    return MimCoMaskGenerator(image_size=IMAGE_SIZE, patch_size=4, mask_ratio=0.5, mask_patch_size=8)


# ---------------------------------------------------------------------------------------------------------------------
# digits


def test_digits_splits_partition_the_images_and_are_deterministic():
    from sklearn.datasets import load_digits

    train = load_digits_dataset("train", image_size=8)
    test = load_digits_dataset("test", image_size=8)
    assert len(train) + len(test) == 1797
    assert abs(len(train) / 1797 - 0.85) < 0.01

    def keys(dataset):
        # at 8 pixels no resampling happens: one channel of each image is the sklearn image scaled to 0..255
        return collections.Counter(np.asarray(image)[..., 0].tobytes() for image in dataset["image"])

    originals = load_digits().images
    expected = collections.Counter(
        np.clip(np.round(image * 255 / 16), 0, 255).astype(np.uint8).tobytes() for image in originals
    )
    assert keys(train) + keys(test) == expected  # disjoint and covering, as multisets

    again = load_digits_dataset("train", image_size=8)
    assert again["label"] == train["label"]
    assert keys(again) == keys(train)
    validation = load_digits_dataset("validation", image_size=8)
    assert validation["label"] == test["label"]


def test_digits_images_are_rgb_at_the_requested_size_with_labels_0_to_9():
    dataset = load_image_dataset(DIGITS_DATASET, split="test", digits_image_size=20)
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.features["label"].names == [str(d) for d in range(10)]
    assert set(dataset["label"]) == set(range(10))
    image = dataset[0]["image"]
    assert image.mode == "RGB" and image.size == (20, 20)
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and pixels.max() > 100
    assert len(load_image_dataset()) == len(load_digits_dataset("train"))  # no source -> digits


def test_digits_unknown_split_lists_splits():
    with pytest.raises(ValueError, match=r"'train', 'test'"):
        load_digits_dataset("dev")


def test_cluttered_digits_place_each_split_digit_on_a_new_canvas():
    """`make demo`'s data: every digit of a split at a random place and scale on its own cluttered canvas."""
    from modeling_mimco.data.digits import (
        CLUTTERED_DIGITS_DATASET,
        digits_of_split,
        load_cluttered_digits_dataset,
    )

    train = load_image_dataset(CLUTTERED_DIGITS_DATASET, split="train", digits_image_size=32)
    test = load_image_dataset(CLUTTERED_DIGITS_DATASET, split="validation", digits_image_size=32)
    train_digits, train_labels = digits_of_split("train", CLUTTERED_DIGITS_DATASET)
    test_digits, test_labels = digits_of_split("test", CLUTTERED_DIGITS_DATASET)
    assert (len(train), len(test)) == (4 * len(train_digits), 2 * len(test_digits)) == (6108, 540)
    assert train["label"] == 4 * [int(label) for label in train_labels]  # placement after placement, in split order
    assert test["label"] == 2 * [int(label) for label in test_labels]
    # the test split's handwriting is the digits' test split: none of it in training
    assert not {digit.tobytes() for digit in train_digits} & {digit.tobytes() for digit in test_digits}
    images = np.stack([np.asarray(image, np.float32) for image in train["image"][:200]])
    assert images.shape == (200, 32, 32, 3)
    assert images.std(axis=0).mean() > 40  # backgrounds, clutter and places differ from image to image
    # the same digit in two placements: different images
    assert not np.array_equal(np.asarray(train[0]["image"]), np.asarray(train[len(train_digits)]["image"]))
    again = load_cluttered_digits_dataset("validation", image_size=32)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again["image"][:20], test["image"][:20]))
    again.set_transform(lambda batch: {"only": [0] * len(batch["label"])})  # drawn once, but each call its own view
    assert set(load_cluttered_digits_dataset("validation", image_size=32)[0]) == {"image", "label"}
    other_seed = load_cluttered_digits_dataset("validation", image_size=32, seed=1, placements=1)
    assert not np.array_equal(np.asarray(other_seed[0]["image"]), np.asarray(test[0]["image"]))
    with pytest.raises(ValueError, match="at least 16"):
        load_cluttered_digits_dataset("train", image_size=8)
    with pytest.raises(ValueError, match=r"'cluttered-digits'.*'train', 'test'"):
        load_cluttered_digits_dataset("dev")


def test_canvas_digits_are_the_cluttered_digits_without_clutter():
    """`make demo`'s data: the same digits, places and scales as `cluttered-digits`, on plain canvases (nothing bright
    but the digit), drawn once per process and named in their errors."""
    from modeling_mimco.data.digits import (
        CANVAS_DIGITS_DATASET,
        CLUTTERED_DIGITS_DATASET,
        load_canvas_digits_dataset,
    )

    plain = load_image_dataset(CANVAS_DIGITS_DATASET, split="validation", digits_image_size=32)
    cluttered = load_image_dataset(CLUTTERED_DIGITS_DATASET, split="validation", digits_image_size=32)
    assert len(plain) == len(cluttered) == 540 and plain["label"] == cluttered["label"]
    assert len(load_image_dataset(CANVAS_DIGITS_DATASET, split="train", digits_image_size=32)) == 6108
    images = np.stack([np.asarray(image, np.float32) for image in plain["image"][:100]])
    # a dark background with pixel noise: the median pixel is background, and only a digit's ink is bright
    assert 20 < np.median(images) < 45
    assert images.std(axis=0).mean() > 30  # the digits move from image to image
    for image in images[:20]:
        assert (image > 200).mean() > 0.01  # every canvas holds a digit
    assert not np.array_equal(images[0], np.asarray(cluttered[0]["image"], np.float32))
    again = load_canvas_digits_dataset("validation", image_size=32)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again["image"][:20], plain["image"][:20]))
    with pytest.raises(ValueError, match=r"'canvas-digits'.*'train', 'test'"):
        load_canvas_digits_dataset("dev")
    with pytest.raises(ValueError, match="'canvas-digits' must be at least 16"):
        load_canvas_digits_dataset("train", image_size=8)


def test_paste_digit_paints_the_ink_in_a_contrasting_colour_where_it_says():
    from modeling_mimco.data.digits import digits_of_split, paste_digit

    digits, _ = digits_of_split("train", "digits")
    canvas = np.full((32, 32, 3), 20.0, np.float32)  # dark: the digit must come out bright
    ink, top, left = paste_digit(np.random.default_rng(0), canvas, digits[0], 16)
    assert ink.shape == (16, 16) and 0 <= top <= 16 and 0 <= left <= 16
    inside = canvas[top : top + 16, left : left + 16]
    assert inside[ink > 0.9].min() > 150  # strong ink: the bright colour
    outside = np.ones((32, 32), bool)
    outside[top : top + 16, left : left + 16] = False
    assert (canvas[outside] == 20.0).all()  # nothing painted outside the digit's square


# ---------------------------------------------------------------------------------------------------------------------
# sources and columns


def test_image_folder_loads_with_class_labels(clean_folder):
    dataset = load_image_dataset(train_dir=clean_folder)
    assert len(dataset) == 6
    assert resolve_image_column(dataset) == "image"
    assert resolve_label_column(dataset) == "label"
    assert dataset.features["label"].names == ["ant", "bee"]
    assert sorted(dataset["label"]) == [0, 0, 0, 1, 1, 1]


def test_parquet_data_files_load_and_img_column_is_detected(tmp_path):
    path = _parquet_file(tmp_path, column="img", num_rows=5)
    dataset = load_image_dataset(data_files=path)
    assert len(dataset) == 5
    assert resolve_image_column(dataset) == "img"
    assert resolve_label_column(dataset) == "label"
    assert dataset[0]["img"].size == (12, 10)


def test_image_column_found_by_feature_type(tmp_path):
    path = _parquet_file(tmp_path, column="picture", num_rows=2)
    assert resolve_image_column(load_image_dataset(data_files=path)) == "picture"


def test_unknown_columns_raise_naming_the_flag_and_the_columns(tmp_path):
    dataset = load_image_dataset(data_files=_parquet_file(tmp_path, num_rows=2))
    with pytest.raises(ValueError, match=r"--image_column 'photo'.*'img', 'label', 'id'"):
        resolve_image_column(dataset, "photo")
    with pytest.raises(ValueError, match=r"--label_column 'target'"):
        resolve_label_column(dataset, "target")
    assert resolve_image_column(dataset, "img") == "img"
    raw = datasets.Dataset.from_dict({"path": ["x.png"], "img": [_encode(_noise_image(0), "PNG")]})
    assert resolve_image_column(raw) == "img"  # found by name although it is not a datasets.Image column
    unlabeled = datasets.Dataset.from_dict({"image": [_encode(_noise_image(0), "PNG")]})
    assert resolve_label_column(unlabeled) is None
    with pytest.raises(ValueError, match="--image_column"):
        resolve_image_column(datasets.Dataset.from_dict({"text": ["x"]}))


def test_two_sources_raise(tmp_path, clean_folder):
    with pytest.raises(ValueError, match=r"--train_dir, --data_files"):
        load_image_dataset(train_dir=clean_folder, data_files=_parquet_file(tmp_path, num_rows=2))
    with pytest.raises(ValueError, match=r"--dataset_name, --train_dir"):
        load_image_dataset(dataset_name="digits", train_dir=clean_folder)


def test_unknown_split_raises_listing_the_splits(tmp_path, clean_folder):
    with pytest.raises(ValueError, match=r"'validation'.*available splits: \['train'\]"):
        load_image_dataset(train_dir=clean_folder, split="validation")
    with pytest.raises(ValueError, match=r"available splits: \['train'\]"):
        load_image_dataset(data_files=_parquet_file(tmp_path, num_rows=2), split="test")


@pytest.mark.skipif(not os.path.isdir(CIFAR10_DIR), reason="the shared CIFAR-10 parquet folder is not present")
def test_local_dataset_folder_unknown_split_lists_its_splits():
    with pytest.raises(ValueError, match=r"available splits: \['train', 'test'\]"):
        load_image_dataset(CIFAR10_DIR, split="valid", streaming=True)
    stream = load_image_dataset(CIFAR10_DIR, split="test", streaming=True)
    assert resolve_image_column(stream) == "img"


# ---------------------------------------------------------------------------------------------------------------------
# decoding


def _with_transparency() -> PIL.Image.Image:
    image = PIL.Image.new("P", (6, 5), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    return image


def _transparent_rgba() -> PIL.Image.Image:
    image = PIL.Image.new("RGBA", (6, 5), (0, 0, 0, 0))
    image.putpixel((1, 1), (200, 10, 10, 255))
    return image


TO_RGB_CASES = {
    "L": (lambda: PIL.Image.new("L", (6, 5), 77), (77, 77, 77)),
    "P": (lambda: PIL.Image.new("RGB", (6, 5), (10, 200, 30)).quantize(4), (10, 200, 30)),
    "P+transparency": (lambda: _with_transparency(), (255, 255, 255)),
    "RGBA": (_transparent_rgba, (255, 255, 255)),
    "LA": (lambda: PIL.Image.new("LA", (6, 5), (0, 0)), (255, 255, 255)),
    "PA": (lambda: _with_transparency().convert("PA"), (255, 255, 255)),
    "CMYK": (lambda: PIL.Image.new("CMYK", (6, 5), (0, 0, 0, 0)), (255, 255, 255)),
    "I;16": (lambda: PIL.Image.fromarray(np.full((5, 6), 65535, dtype=np.uint16)), (255, 255, 255)),
    "I;16 half": (lambda: PIL.Image.fromarray(np.full((5, 6), 32768, dtype=np.uint16)), (128, 128, 128)),
    "I;16B": (lambda: PIL.Image.new("I;16B", (6, 5), 65535), (255, 255, 255)),
    "I 16-bit values": (lambda: PIL.Image.fromarray(np.full((5, 6), 65535, dtype=np.int32)), (255, 255, 255)),
    "I 8-bit values": (lambda: PIL.Image.fromarray(np.full((5, 6), 100, dtype=np.int32)), (100, 100, 100)),
    "F 0..1": (lambda: PIL.Image.fromarray(np.full((5, 6), 0.5, dtype=np.float32)), (128, 128, 128)),
    "F 0..255": (lambda: PIL.Image.fromarray(np.full((5, 6), 200.0, dtype=np.float32)), (200, 200, 200)),
}


@pytest.mark.parametrize("case", list(TO_RGB_CASES))
def test_to_rgb_gives_8bit_rgb_of_the_same_size(case):
    make, corner_rgb = TO_RGB_CASES[case]
    image = make()
    expected_mode = case.split(" ")[0].split("+")[0]
    assert image.mode == expected_mode
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert converted.size == image.size
    assert np.abs(np.asarray(converted)[0, 0].astype(int) - corner_rgb).max() <= 1


def test_to_rgb_keeps_opaque_pixels_and_scales_wide_ranges():
    assert to_rgb(_transparent_rgba()).getpixel((1, 1)) == (200, 10, 10)
    assert to_rgb(_with_transparency()).getpixel((1, 1)) == (200, 10, 10)
    ramp = np.linspace(0, 65535, 30, dtype=np.float64).reshape(5, 6)
    converted = np.asarray(to_rgb(PIL.Image.fromarray(ramp.astype(np.uint16))))[..., 0]
    np.testing.assert_allclose(converted, np.round(ramp * 255 / 65535), atol=1)
    wide = PIL.Image.fromarray(np.array([[-5.0, 5.0]], dtype=np.float32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 255]


def test_decode_image_accepts_records_bytes_paths_and_pil(tmp_path):
    image = _noise_image(3)
    data = _encode(image, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for value in ({"bytes": data, "path": "x.png"}, {"bytes": None, "path": str(path)}, data, str(path), image):
        decoded = decode_image(value)
        assert decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), np.asarray(image))
    gray = decode_image(_encode(_noise_image(4, mode="L"), "PNG"))
    assert gray.mode == "RGB"


def test_decode_image_applies_exif_orientation():
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6  # stored sideways: display rotated by 90 degrees
    buffer = io.BytesIO()
    _noise_image(5, size=(20, 10)).save(buffer, format="JPEG", exif=exif)
    assert decode_image({"bytes": buffer.getvalue(), "path": "sideways.jpg"}).size == (10, 20)


def test_decode_image_raises_unreadable_image_error_naming_the_file(image_folder):
    for class_name, name in (("cat", "empty.jpg"), ("dog", "truncated.jpg"), ("dog", "text.png")):
        path = os.path.join(image_folder, class_name, name)
        with pytest.raises(UnreadableImageError, match=name) as info:
            decode_image({"bytes": None, "path": path})
        assert info.value.path == path
        with open(path, "rb") as file:
            data = file.read()
        with pytest.raises(UnreadableImageError, match=name):
            decode_image({"bytes": data, "path": name})
    with pytest.raises(UnreadableImageError):
        decode_image(b"")


# ---------------------------------------------------------------------------------------------------------------------
# unreadable images through the whole pipeline


def _run_loader(dataset, collator, num_workers, batch_size=4):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collator)
    num_rows = num_skipped = 0
    labels = []
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["bool_masked_pos"].shape == (batch["pixel_values"].shape[0], 16)
        num_rows += batch["pixel_values"].shape[0]
        num_skipped += int(batch["num_skipped"])
        labels += batch["labels"].tolist()
    return num_rows, num_skipped, labels


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_images_are_skipped_and_counted(image_folder, num_workers, caplog):
    dataset = load_image_dataset(train_dir=image_folder)
    assert len(dataset) == 10
    dataset = _pretraining_pipeline(dataset, "image", "label")
    collator = MimCoPretrainingCollator(_mask_generator(), image_size=IMAGE_SIZE)
    with caplog.at_level(logging.WARNING, logger="modeling_mimco.data.pipeline"):
        num_rows, num_skipped, labels = _run_loader(dataset, collator, num_workers)
    assert num_skipped == sum(len(names) for names in BAD_FILES.values())
    assert num_rows == sum(len(names) for names in GOOD_FILES.values())
    assert sorted(labels) == [0] * 3 + [1] * 4
    if num_workers == 0:  # warnings of worker processes do not reach caplog
        messages = "\n".join(record.getMessage() for record in caplog.records)
        for names in BAD_FILES.values():
            for name in names:
                assert name in messages


def test_bad_image_warning_is_logged_once_per_file(image_folder, caplog):
    transform = PretrainingExampleTransform(build_eval_transform(IMAGE_SIZE, MEAN, STD), "image")
    bad = {"bytes": None, "path": os.path.join(image_folder, "cat", "empty.jpg")}
    with caplog.at_level(logging.WARNING, logger="modeling_mimco.data.pipeline"):
        output = transform({"image": [bad, bad]})
        transform({"image": bad})
    assert output == {"pixel_values": [None, None], UNREADABLE_KEY: [bad["path"], bad["path"]]}
    assert sum("empty.jpg" in record.getMessage() for record in caplog.records) == 1


def test_streaming_parquet_with_a_bad_row_is_counted(tmp_path):
    path = _parquet_file(tmp_path, column="image", num_rows=9, bad_rows=(4,))
    stream = load_image_dataset(data_files=path, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    dataset = _pretraining_pipeline(stream, resolve_image_column(stream), resolve_label_column(stream))
    collator = MimCoPretrainingCollator(_mask_generator(), image_size=IMAGE_SIZE)
    num_rows, num_skipped, labels = _run_loader(dataset, collator, num_workers=0)
    assert (num_rows, num_skipped) == (8, 1)
    assert sorted(labels) == sorted(i % 2 for i in range(9) if i != 4)


def _pathless_parquet(path, num_rows: int, bad_rows: tuple[int, ...] = (), first_id: int = 0) -> str:
    """A parquet file whose image records carry bytes but no path (as many exported datasets do); rows in `bad_rows`
    hold junk. Several row groups, so that the rows of a file arrive in several Arrow batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {"bytes": b"junk" if i in bad_rows else _encode(_noise_image(i, size=(12, 10)), "PNG"), "path": None}
        for i in range(num_rows)
    ]
    ids = list(range(first_id, first_id + num_rows))
    pq.write_table(pa.table({"image": records, "id": ids}), str(path), row_group_size=4)
    return str(path)


def _unreadable_markers(dataset) -> list[str]:
    return [marker for marker in (dataset[i][UNREADABLE_KEY] for i in range(len(dataset))) if marker is not None]


def test_unreadable_row_without_a_path_is_named_by_its_row_and_parquet_file(tmp_path, caplog):
    first = _pathless_parquet(tmp_path / "a.parquet", 10)
    second = _pathless_parquet(tmp_path / "b.parquet", 10, bad_rows=(3,), first_id=10)
    dataset = disable_image_decoding(load_image_dataset(data_files=[first, second]), "image")
    transform = PretrainingExampleTransform(build_eval_transform(IMAGE_SIZE, MEAN, STD), "image")
    expected = f"row 3 (0-based) of {second!r}"
    # shuffled, split and cut to a prefix: each example keeps the row it was loaded at
    for variant in (
        dataset.shuffle(seed=0),
        dataset.train_test_split(test_size=0.5, seed=0)["train"],
        dataset.select(range(15)),
    ):
        with caplog.at_level(logging.WARNING, logger="modeling_mimco.data.pipeline"):
            caplog.clear()
            markers = _unreadable_markers(apply_example_transform(variant, transform))
        if 13 in variant["id"]:
            assert markers == [expected]
            assert f"Unreadable image in {expected} (no file name): UnidentifiedImageError" in caplog.text
            assert "BytesIO object" not in caplog.text
        else:
            assert markers == []
        transform = PretrainingExampleTransform(build_eval_transform(IMAGE_SIZE, MEAN, STD), "image")

    # without a parquet source, the row of the dataset is named
    in_memory = datasets.Dataset.from_dict({"image": [_encode(_noise_image(0), "PNG"), b"junk", b""]})
    markers = _unreadable_markers(apply_example_transform(in_memory, transform))
    assert markers == ["row 1 (0-based) of the dataset", "row 2 (0-based) of the dataset"]


def test_row_index_column_keeps_the_order_and_rewrites_nothing(tmp_path):
    dataset = load_image_dataset(data_files=_pathless_parquet(tmp_path / "a.parquet", 9)).shuffle(seed=1)
    indexed = with_row_index(dataset)
    assert indexed[ROW_INDEX_COLUMN] == dataset["id"]  # the ids are the loaded rows
    assert indexed["id"] == dataset["id"] and len(indexed) == len(dataset)
    assert indexed.cache_files == dataset.cache_files  # no flattened copy of the shuffled data was written
    assert with_row_index(indexed) is indexed


def test_truncated_or_non_parquet_data_files_are_named(tmp_path):
    good = _pathless_parquet(tmp_path / "good.parquet", 4)
    data = Path(good).read_bytes()
    broken = {
        "truncated.parquet": data[: len(data) // 2],
        "empty.parquet": b"",
        "text.parquet": b"not parquet at all\n",
    }
    for name, content in broken.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        for streaming in (False, True):
            # the bad file after a good one: datasets reads the first file's schema and fails only on the second
            with pytest.raises(ValueError, match=rf"--data_files: '.*{name}' is not a readable parquet file"):
                load_image_dataset(data_files=[good, str(bad)], streaming=streaming, cache_dir=str(tmp_path / "c"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train-00000-of-00001.parquet").write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"--dataset_name '.*folder': '.*train-00000-of-00001.parquet' is not a"):
        load_image_dataset(str(folder), cache_dir=str(tmp_path / "c"))


def _link_folder(root) -> tuple[str, list[tuple[str, str]]]:
    """An image folder with 4 good images, a good link, and links that imagefolder drops; returns the folder and the
    expected `find_skipped_links` result."""
    for class_name in ("ant", "bee"):
        (root / "data" / class_name).mkdir(parents=True)
        for i in range(2):
            _noise_image(i).save(root / "data" / class_name / f"{i}.png")
    (root / "elsewhere" / "wasp").mkdir(parents=True)
    _noise_image(5).save(root / "elsewhere" / "wasp" / "0.png")
    data = root / "data"
    os.symlink(root / "missing.png", data / "ant" / "dangling.png")
    os.symlink("loop_b.jpg", data / "ant" / "loop_a.jpg")
    os.symlink("loop_a.jpg", data / "ant" / "loop_b.jpg")
    os.symlink(root / "elsewhere" / "wasp", data / "wasp")
    os.symlink("0.png", data / "bee" / "good_link.png")  # a link to a file: read as usual
    os.symlink(root / "missing.txt", data / "bee" / "notes.txt")  # no image even if it existed
    os.symlink(root / "missing.png", data / "bee" / ".hidden.png")  # datasets ignores hidden files
    expected = [
        ("ant/dangling.png", f"a dangling link: its target {str(root / 'missing.png')!r} does not exist"),
        ("ant/loop_a.jpg", "a symbolic link loop"),
        ("ant/loop_b.jpg", "a symbolic link loop"),
        ("wasp", "a link to a folder, which datasets does not follow"),
    ]
    return str(data), expected


def test_links_that_imagefolder_drops_are_named_and_counted(tmp_path, caplog):
    folder, expected = _link_folder(tmp_path)
    assert find_skipped_links(folder) == expected
    with caplog.at_level(logging.WARNING, logger="modeling_mimco.data.pipeline"):
        dataset = load_image_dataset(train_dir=folder, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 5  # the good images and the good link still load
    warnings = [record.getMessage() for record in caplog.records if "symbolic link" in record.getMessage()]
    assert len(warnings) == 1
    assert f"--train_dir {folder!r}: 4 symbolic link(s) skipped" in warnings[0]
    for path, reason in expected:
        assert f"{path} ({reason})" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_mimco.data.pipeline"):
        load_image_dataset(train_dir=folder, cache_dir=str(tmp_path / "cache"), report_skipped_links=False)
    assert "symbolic link" not in caplog.text

    # many links: ten are named, the rest counted
    for i in range(12):
        os.symlink(tmp_path / "missing.png", os.path.join(folder, "bee", f"gone{i:02d}.png"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_mimco.data.pipeline"):
        load_image_dataset(train_dir=folder, cache_dir=str(tmp_path / "cache"))
    assert "16 symbolic link(s) skipped" in caplog.text and "; and 6 more." in caplog.text
    assert caplog.text.count("(a dangling link") == 8  # ten named: dangling.png, the two loops, seven gone*.png


def test_all_unreadable_batch_has_zero_rows():
    generator = _mask_generator()
    examples = [{"pixel_values": None, UNREADABLE_KEY: "a.jpg"}, {"pixel_values": None, UNREADABLE_KEY: "b.jpg"}]
    batch = MimCoPretrainingCollator(generator, image_size=IMAGE_SIZE)(examples)
    assert batch["pixel_values"].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["bool_masked_pos"].shape == (0, generator.num_patches)
    assert int(batch["num_skipped"]) == 2
    views = ContrastiveCollator()([{"pixel_values_1": None, "pixel_values_2": None, UNREADABLE_KEY: "a.jpg"}])
    assert views["pixel_values_1"].shape[0] == views["pixel_values_2"].shape[0] == 0
    assert int(views["num_skipped"]) == 1


def test_skipped_image_tracker_threshold_and_state():
    tracker = SkippedImageTracker(max_skipped_fraction=0.1, min_seen=50)
    tracker.update(10, 5)  # 50 % but fewer than min_seen images seen
    tracker.update(40, 0)  # 5 of 50 = 10 %: at the threshold, not above
    assert (tracker.num_seen, tracker.num_skipped) == (50, 5)
    assert "5 of 50" in tracker.summary()

    restored = SkippedImageTracker(max_skipped_fraction=0.1, min_seen=50)
    restored.load_state_dict(tracker.state_dict())
    copied = pickle.loads(pickle.dumps(tracker))
    for candidate in (tracker, restored, copied):
        with pytest.raises(TooManyUnreadableImagesError, match=r"6 of 51.*--max_skipped_fraction"):
            candidate.update(1, 1)
    assert issubclass(TooManyUnreadableImagesError, RuntimeError)

    relaxed = SkippedImageTracker(max_skipped_fraction=0.5, min_seen=1)
    relaxed.update(100, 50)
    with pytest.raises(ValueError):
        relaxed.update(1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# streaming and sharding


def test_streaming_shards_per_process_are_disjoint_and_cover(tmp_path):
    path = _parquet_file(tmp_path, column="img", num_rows=11)
    stream = load_image_dataset(data_files=path, streaming=True)
    ids = [[example["id"] for example in shard_for_process(stream, rank, 2)] for rank in (0, 1)]
    assert ids[0] and ids[1]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == list(range(11))
    assert [example["id"] for example in shard_for_process(stream, 0, 1)] == list(range(11))

    digits = load_image_dataset(split="test", streaming=True)
    labels = [[example["label"] for example in shard_for_process(digits, rank, 2)] for rank in (0, 1)]
    assert len(labels[0]) + len(labels[1]) == 270
    assert collections.Counter(labels[0]) + collections.Counter(labels[1]) == collections.Counter(
        load_digits_dataset("test")["label"]
    )

    map_style = load_digits_dataset("test")
    assert shard_for_process(map_style, 1, 2) is map_style
    with pytest.raises(ValueError):
        shard_for_process(stream, 2, 2)


# ---------------------------------------------------------------------------------------------------------------------
# transforms and collators


def _expected_gray(value: int) -> torch.Tensor:
    return (value / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


def test_transforms_give_normalised_float_tensors():
    gray = PIL.Image.new("RGB", (40, 30), (128, 128, 128))
    expected = _expected_gray(128)
    for transform in (
        build_pretraining_transform(IMAGE_SIZE, MEAN, STD),
        build_eval_transform(IMAGE_SIZE, MEAN, STD),
        build_pretraining_transform(IMAGE_SIZE, MEAN, STD, crop_scale=(0.2, 0.3), hflip=False),
    ):
        output = transform(gray)
        assert output.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert output.dtype == torch.float32
        torch.testing.assert_close(output.mean(dim=(1, 2)), expected, atol=2e-2, rtol=0)


def test_eval_transform_resizes_then_center_crops():
    # a white image with a black band on its left quarter: the central crop leaves the band out entirely
    pixels = np.full((64, 96, 3), 255, dtype=np.uint8)
    pixels[:, :24] = 0
    output = build_eval_transform(32, [0.0] * 3, [1.0] * 3, crop_pct=0.5)(PIL.Image.fromarray(pixels))
    assert output.shape == (3, 32, 32)
    assert output.min() > 0.95  # short side stays 64, the crop keeps columns 32..64 of 96


def test_contrastive_views_differ_and_have_the_right_shape():
    torch.manual_seed(0)
    transform_1, transform_2 = build_contrastive_transforms(IMAGE_SIZE, MEAN, STD)
    image = _noise_image(7, size=(48, 40))
    transform = ContrastiveExampleTransform(transform_1, transform_2, "image", label_column="label")
    output = transform({"image": [image, image, b"bad"], "label": [1, 2, 3]})
    assert output["pixel_values_1"][0].shape == output["pixel_values_2"][0].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert not torch.allclose(output["pixel_values_1"][0], output["pixel_values_2"][0])
    assert not torch.allclose(output["pixel_values_1"][0], output["pixel_values_1"][1])
    assert output["pixel_values_1"][2] is None and output[UNREADABLE_KEY][2] is not None

    examples = [{key: values[i] for key, values in output.items()} for i in range(3)]
    batch = ContrastiveCollator(image_size=IMAGE_SIZE)(examples)
    assert batch["pixel_values_1"].shape == batch["pixel_values_2"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["labels"].tolist() == [1, 2]
    assert int(batch["num_skipped"]) == 1


def test_contrastive_views_apply_view_specific_augmentations():
    """MoCo v3's asymmetry: view 1 always blurs and never solarizes, view 2 blurs with p 0.1, solarizes with p 0.2."""
    view_1, view_2 = build_contrastive_transforms(224, MEAN, STD)
    assert (view_1.recipe.blur_p, view_1.recipe.solarize_p) == (1.0, 0.0)
    assert (view_2.recipe.blur_p, view_2.recipe.solarize_p) == (0.1, 0.2)
    assert view_1.recipe.blur_sigma == view_2.recipe.blur_sigma == (0.1, 2.0)


def test_contrastive_pipeline_on_digits_through_a_dataloader():
    dataset = load_image_dataset(split="test", digits_image_size=IMAGE_SIZE).select(range(10))
    dataset = disable_image_decoding(dataset, "image")
    assert dataset.features["image"].decode is False
    views = build_contrastive_transforms(IMAGE_SIZE, MEAN, STD)
    dataset = apply_example_transform(dataset, ContrastiveExampleTransform(*views, "image"))
    batch = next(iter(DataLoader(dataset, batch_size=6, collate_fn=ContrastiveCollator())))
    assert batch["pixel_values_1"].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["pixel_values_1"].dtype == torch.float32
    assert int(batch["num_skipped"]) == 0 and "labels" not in batch


@pytest.mark.parametrize("strategy", ["random", "block"])
def test_pretraining_collator_masks_the_configured_count_per_row(strategy):
    generator = MimCoMaskGenerator(
        image_size=32, patch_size=4, mask_ratio=0.6, mask_patch_size=8, strategy=strategy, min_num_patches=4
    )
    examples = [{"pixel_values": torch.randn(3, 32, 32), "labels": i} for i in range(5)]
    examples.insert(2, {"pixel_values": None, UNREADABLE_KEY: "bad.png", "labels": 9})
    batch = MimCoPretrainingCollator(generator)(examples)
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["bool_masked_pos"].shape == (5, 64)
    assert batch["bool_masked_pos"].dtype == torch.bool
    expected = 40 if strategy == "random" else 38  # ceil(0.6 * 16) blocks of 4 patches / round(0.6 * 64) patches
    if strategy == "random":
        assert batch["bool_masked_pos"].sum(dim=1).tolist() == [expected] * 5
    else:
        assert (batch["bool_masked_pos"].sum(dim=1) <= expected).all()
        assert (batch["bool_masked_pos"].sum(dim=1) >= expected // 2).all()
    assert batch["labels"].tolist() == [0, 1, 2, 3, 4]
    assert int(batch["num_skipped"]) == 1
    assert "bool_masked_pos" not in MimCoPretrainingCollator(None)(examples)


def test_large_jpegs_are_decoded_at_a_reduced_size_only_when_the_crop_allows_it():
    from modeling_mimco.data.decoding import reduced_decode_size

    def jpeg(width, height):
        buffer = io.BytesIO()
        PIL.Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="JPEG")
        return {"bytes": buffer.getvalue(), "path": None}

    large = decode_image(jpeg(1600, 1200), draft_for=(224, 0.67))
    assert large.size[0] < 1600
    # the smallest crop the augmentation may take still holds at least 224 pixels on its short side
    assert math.sqrt(0.67 * large.size[0] * large.size[1] * 0.75) >= 224
    assert decode_image(jpeg(500, 375), draft_for=(224, 0.67)).size == (500, 375)
    assert decode_image(jpeg(1600, 1200)).size == (1600, 1200)
    assert reduced_decode_size(300, 300, 224, 0.67) is None


def test_fast_jpeg_decoding_matches_pil_and_keeps_broken_files_unreadable():
    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()

    fast = decode_image({"bytes": data, "path": None}, fast_jpeg=True)
    slow = decode_image({"bytes": data, "path": None})
    assert isinstance(fast, torch.Tensor) and fast.dtype == torch.uint8 and fast.shape == (3, 40, 56)
    reference = torch.from_numpy(np.array(slow)).permute(2, 0, 1).int()
    assert (fast.int() - reference).abs().max() <= 2

    with pytest.raises(UnreadableImageError, match="truncated.jpg"):
        decode_image({"bytes": data[: len(data) // 2], "path": "truncated.jpg"}, fast_jpeg=True)
    # a PNG is not a JPEG: it takes the PIL path
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    assert isinstance(decode_image({"bytes": buffer.getvalue(), "path": None}, fast_jpeg=True), PIL.Image.Image)


def test_fused_normalisation_equals_todtype_then_normalize():
    from torchvision.transforms import v2

    from modeling_mimco.data.transforms import ToNormalizedFloat

    image = v2.ToImage()(torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8))
    mean, std = [0.5, 0.25, 0.1], [0.2, 0.3, 0.4]
    expected = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(image))
    assert torch.allclose(ToNormalizedFloat(mean, std)(image), expected, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        ToNormalizedFloat(mean, std)(image.float())


def test_collator_normalises_uint8_batches_like_the_per_image_transform():
    from modeling_mimco.data.transforms import ToNormalizedFloat

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    images = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8) for _ in range(3)]
    examples = [{"pixel_values": image, "unreadable_image": None} for image in images]
    examples.append({"pixel_values": None, "unreadable_image": "bad.jpg"})
    batch = MimCoPretrainingCollator(image_size=8, normalize_with=(mean, std))(examples)
    expected = torch.stack([ToNormalizedFloat(mean, std)(image) for image in images])
    assert batch["pixel_values"].dtype == torch.float32
    assert torch.allclose(batch["pixel_values"], expected, atol=1e-6)
    assert int(batch["num_skipped"]) == 1


def test_horizontal_flip_can_be_turned_off_in_both_stages():
    """Digits and text must not be mirrored: `--no_horizontal_flip` leaves the flip out of every view."""
    from torchvision.transforms import v2

    from modeling_mimco import MimCoConfig
    from modeling_mimco.data.pipeline import pretraining_example_transform
    from modeling_mimco.data.transforms import build_contrastive_transforms

    def flips(transform) -> int:
        return sum(isinstance(step, v2.RandomHorizontalFlip) for step in transform.transforms)

    with_flip = build_contrastive_transforms(32, [0.5] * 3, [0.5] * 3)
    without = build_contrastive_transforms(32, [0.5] * 3, [0.5] * 3, hflip=False)
    assert [view.recipe.hflip for view in with_flip] == [True, True]
    assert [view.recipe.hflip for view in without] == [False, False]
    # and no view of an image is ever its mirror image when the flip is off
    image = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(3, 32, 32).div(3 * 32 * 32 / 255).to(torch.uint8)
    torch.manual_seed(0)
    assert not any(view_parameters_flip(without[0], image) for _ in range(50))
    config = MimCoConfig(image_size=32, patch_size=4, mask_patch_size=8)
    assert flips(pretraining_example_transform("image", config).transform) == 1
    assert flips(pretraining_example_transform("image", config, hflip=False).transform) == 0


def view_parameters_flip(view, image) -> bool:
    """Whether `view` would flip `image`, drawn as the view draws it."""
    from modeling_mimco.data.contrastive_views import draw_view_parameters

    return draw_view_parameters(view.recipe, image.shape[-2], image.shape[-1]).flip
