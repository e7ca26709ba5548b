"""A normal CPU run of the console commands prints no warning a user cannot act on, and a subset of a local image
folder is built from the chosen files only.

The commands run as a user runs them (the console scripts next to this interpreter, in subprocesses) on a folder
of ImageNet-like class folders with real-size JPEGs, with a fresh datasets cache: no "Downloading data" progress
bar for local files, no torch pin_memory warning on a machine without an accelerator, no terminal escape codes
(transformers' bold LOAD REPORT title) in output that goes to a file, no Accelerate launch defaults block.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from modeling_mimco.data.sources import load_classification_splits, load_image_dataset, take_subset


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLASSES = ("n01440764", "n01443537", "n01484850")
IMAGES_PER_CLASS = 6
NOISE = ("Downloading", "pin_memory", "\x1b[", "were not passed to")
TIMEOUT_S = 600


def _image_folder(root: Path, classes=CLASSES, per_class: int = IMAGES_PER_CLASS) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(root / name / f"{name}_{10026 + index}.JPEG", quality=80)
    return root


def _command(name: str) -> list[str]:
    console = BIN / name
    if not console.exists():
        pytest.skip(f"the console command {name} is not installed next to {sys.executable}")
    return [str(console)]


def _run(name: str, arguments: list[str], tmp_path: Path) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    for variable in ("MIMCO_TRACEBACK", "ACCELERATE_USE_CPU"):
        env.pop(variable, None)
    process = subprocess.run(
        _command(name) + arguments, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    return output


def _assert_quiet(name: str, output: str) -> None:
    found = [noise for noise in NOISE if noise in output]
    assert not found, f"{name} printed {found}:\n{output[-3000:]}"


@pytest.mark.slow
def test_pretraining_and_finetuning_on_a_local_folder_print_no_noise(tmp_path):
    folder = _image_folder(tmp_path / "train")
    cache = ["--cache_dir", str(tmp_path / "cache")]
    common = ["--report_to", "none", "--dataloader_num_workers", "0", "--logging_steps", "1"]
    data = ["--train_dir", str(folder), "--max_train_samples", "8", *cache]
    teacher = tmp_path / "teacher"
    stage1 = ["--model_preset", "tiny", "--projector_hidden_size", "64", "--projection_size", "16", *common]
    stage1 += ["--output_dir", str(teacher), "--per_device_train_batch_size", "4", "--max_train_steps", "1", *data]
    output = _run("mimco-contrastive", stage1, tmp_path)
    _assert_quiet("mimco-contrastive", output)

    student = tmp_path / "student"
    stage2 = ["--model_preset", "tiny", "--head_hidden_size", "32", "--teacher_name_or_path", str(teacher), *common]
    stage2 += ["--output_dir", str(student), "--per_device_train_batch_size", "4", "--max_train_steps", "1", *data]
    output = _run("mimco-pretrain", stage2, tmp_path)
    _assert_quiet("mimco-pretrain", output)
    assert "Reading 8 images (a subset of 18) in 3 classes" in output

    finetune = ["--model_name_or_path", str(student), "--output_dir", str(tmp_path / "finetuned")]
    finetune += ["--train_dir", str(folder), "--max_train_samples", "8", "--max_eval_samples", "4", *cache]
    finetune += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4"]
    finetune += ["--report_to", "none", "--save_strategy", "no"]
    output = _run("mimco-finetune", finetune, tmp_path)
    _assert_quiet("mimco-finetune", output)
    # the last line says which exports the saved model allows: mean pooling by default, so no stock-ViT export
    exports = [line for line in output.splitlines() if line.startswith("Exports")]
    assert len(exports) == 1 and "--to timm works" in exports[0], output[-2000:]
    assert "--to vit needs CLS pooling (this model pools by mean" in exports[0]


@pytest.mark.slow
def test_finetuning_with_cls_pooling_says_the_vit_export_works(tmp_path):
    folder = _image_folder(tmp_path / "train", per_class=3)
    finetune = ["--model_preset", "tiny", "--pooling", "cls", "--output_dir", str(tmp_path / "finetuned")]
    finetune += ["--train_dir", str(folder), "--cache_dir", str(tmp_path / "cache"), "--train_val_split", "0.34"]
    finetune += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4"]
    finetune += ["--report_to", "none", "--save_strategy", "no", "--do_eval", "false"]
    output = _run("mimco-finetune", finetune, tmp_path)
    _assert_quiet("mimco-finetune", output)
    exports = [line for line in output.splitlines() if line.startswith("Exports")]
    assert len(exports) == 1 and "--to vit (a stock transformers ViT) works" in exports[0], output[-2000:]


def _unreadable_outside(folder: Path, subset: list[str]) -> int:
    """Replaces every image of `folder` that is not in `subset` by bytes no decoder reads; returns how many."""
    count = 0
    for path in folder.rglob("*.JPEG"):
        if str(path) not in subset:
            path.write_bytes(b"not an image")
            count += 1
    return count


@pytest.mark.parametrize("keep_order", [True, False])
def test_a_folder_subset_is_built_from_the_chosen_files_only(tmp_path, keep_order):
    """`max_samples` on a folder gives the rows, in the order, that the subset of the whole folder gives, with the
    whole folder's class names, from a dataset of those files only: the other files are never read (here they are
    unreadable, and decoding the subset still succeeds)."""
    folder = _image_folder(tmp_path / "train", per_class=4)
    whole = load_image_dataset(train_dir=str(folder), cache_dir=str(tmp_path / "cache_whole"))
    expected = take_subset(whole, 5, seed=3, keep_order=keep_order)
    expected_files = [row["image"].filename for row in expected]
    assert _unreadable_outside(folder, expected_files) == 12 - 5

    subset = load_image_dataset(
        train_dir=str(folder), cache_dir=str(tmp_path / "cache"), max_samples=5, seed=3, keep_order=keep_order
    )
    assert subset.data.num_rows == 5  # the prepared table holds the subset only, not the 12 files
    assert subset.features["label"].names == list(CLASSES)
    assert [row["image"].filename for row in subset] == expected_files  # decodes: no other file is in it
    assert subset["label"] == expected["label"]


def test_a_classification_subset_of_a_folder_with_a_validation_folder_reads_only_its_files(tmp_path):
    """With evaluation images of their own (`--validation_dir`), `--max_train_samples` and `--max_eval_samples` are
    drawn from the file lists, as `shuffle(seed).select(range(N))` of the whole folders draws them."""
    train = _image_folder(tmp_path / "train", per_class=4)
    validation = _image_folder(tmp_path / "val", per_class=3)
    whole = load_classification_splits(
        train_dir=str(train), validation_dir=str(validation), cache_dir=str(tmp_path / "cache_whole"), seed=1
    )
    expected_train = whole.train.shuffle(seed=1).select(range(5))
    expected_eval = whole.eval.shuffle(seed=1).select(range(4))
    train_files = [row["path"] for row in expected_train[whole.image_column]]
    eval_files = [row["path"] for row in expected_eval[whole.image_column]]
    _unreadable_outside(train, train_files)
    _unreadable_outside(validation, eval_files)

    data = load_classification_splits(
        train_dir=str(train),
        validation_dir=str(validation),
        cache_dir=str(tmp_path / "cache"),
        max_train_samples=5,
        max_eval_samples=4,
        seed=1,
    )
    assert data.train.data.num_rows == 5 and data.eval.data.num_rows == 4
    assert [row["path"] for row in data.train[data.image_column]] == train_files
    assert [row["path"] for row in data.eval[data.image_column]] == eval_files
    assert data.train[data.label_column] == expected_train[whole.label_column]
    assert data.eval[data.label_column] == expected_eval[whole.label_column]
    assert data.class_names == whole.class_names == list(CLASSES)
