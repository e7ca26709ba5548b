"""Class-folder sources as users have them: ImageNet's own file names (`n01440764_10026.JPEG`,
`ILSVRC2012_val_00000293.JPEG`) in a `--train_dir`, split-named sub-folders, and a separate `--validation_dir`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from modeling_mimco.data.sources import load_classification_splits, load_image_dataset


REPO = Path(__file__).resolve().parents[1]
CLASSES = ("n01440764", "n02102040", "n02979186")


def _write(folder: Path, names: list[str], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / name, format="JPEG")


def imagenet_named_folder(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """Class folders whose files carry ImageNet's names, training-style and validation-style mixed (Imagenette's
    training folders hold both kinds)."""
    for index, synset in enumerate(CLASSES):
        names = [f"{synset}_{1000 + n}.JPEG" for n in range(per_class - 1)]
        names.append(f"ILSVRC2012_val_{index * 100 + 293:08d}.JPEG")
        _write(root / synset, names, seed + index)
    return root


def test_train_dir_keeps_every_image_whatever_its_file_name(tmp_path):
    """`datasets` left to itself makes a folder with a `*_val_*` file a validation split; --train_dir must not."""
    folder = imagenet_named_folder(tmp_path / "train")
    dataset = load_image_dataset(train_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 3 * 4
    assert dataset.features["label"].names == list(CLASSES)
    assert sorted(dataset["label"]) == sorted([0, 1, 2] * 4)


def test_split_named_sub_folders_give_their_splits(tmp_path):
    root = tmp_path / "imagenette"
    imagenet_named_folder(root / "train")
    imagenet_named_folder(root / "val", per_class=2, seed=10)
    cache = str(tmp_path / "cache")
    assert len(load_image_dataset(train_dir=str(root), cache_dir=cache)) == 12
    assert len(load_image_dataset(train_dir=str(root), split="validation", cache_dir=cache)) == 6
    data = load_classification_splits(train_dir=str(root), cache_dir=cache)
    assert data.eval_split == "validation" and len(data.eval) == 6


def test_validation_dir_numbers_its_classes_as_the_training_folder_does(tmp_path):
    train = imagenet_named_folder(tmp_path / "train")
    validation = tmp_path / "val"
    _write(validation / CLASSES[2], ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"], seed=5)
    _write(validation / CLASSES[0], ["ILSVRC2012_val_00000003.JPEG"], seed=6)
    data = load_classification_splits(
        train_dir=str(train), validation_dir=str(validation), cache_dir=str(tmp_path / "cache")
    )
    # the validation folder lacks the middle class: its own numbering would be 0, 1; the training data's is 0, 2
    assert data.class_names == list(CLASSES) and sorted(data.eval["label"]) == [0, 2, 2]
    assert data.eval_split.startswith("--validation_dir") and len(data.train) == 12


def test_validation_dir_with_an_unknown_class_is_refused(tmp_path):
    train = imagenet_named_folder(tmp_path / "train")
    _write(tmp_path / "val" / "n09999999", ["ILSVRC2012_val_00000004.JPEG"], seed=7)
    with pytest.raises(ValueError, match=r"--validation_dir .*classes \['n09999999'\] are not among"):
        load_classification_splits(train_dir=str(train), validation_dir=str(tmp_path / "val"))


@pytest.mark.slow
def test_probe_script_trains_on_train_dir_and_evaluates_on_validation_dir(tmp_path):
    """`scripts/run_linear_probe.py --train_dir ... --validation_dir ...` as a user runs it on an ImageNet-like
    copy; a missing --validation_dir is one `error:` line."""
    train = imagenet_named_folder(tmp_path / "train", per_class=6)
    imagenet_named_folder(tmp_path / "val", per_class=2, seed=20)
    script = str(REPO / "scripts" / "run_linear_probe.py")
    common = ["--model_name_or_path", "random-init", "--model_preset", "tiny", "--train_dir", str(train)]
    common += ["--probe_epochs", "2", "--cache_dir", str(tmp_path / "cache")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    output_dir = tmp_path / "probe"
    command = [sys.executable, script, *common, "--validation_dir", str(tmp_path / "val")]
    completed = subprocess.run(
        [*command, "--output_dir", str(output_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((output_dir / "linear_probe_results.json").read_text())
    assert results["eval_split"] == f"--validation_dir {str(tmp_path / 'val')!r}" and results["num_classes"] == 3
    (model,) = results["models"]
    assert model["num_train_images"] == 3 * 6 and model["num_test_images"] == 3 * 2

    missing = subprocess.run(
        [sys.executable, script, *common, "--validation_dir", str(tmp_path / "nowhere"), "--output_dir",
         str(tmp_path / "other")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].endswith("is not a directory.")
    assert "Traceback" not in missing.stderr
