"""The dense-transfer study (`experiments/dense_transfer.py`) end to end with tiny settings: every backbone gets both
a frozen linear head and a UperNet fine-tuned by the real `mimco-segment` command, on the same labelled canvases."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from modeling_mimco.data.segmentation import load_digit_canvas_dataset
from modeling_mimco.experiments import dense_transfer


ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--seeds", "0", "--pretrain_images", "16", "--train_images", "8", "--test_images", "8",
    "--stage1_steps", "1", "--stage2_steps", "1", "--batch_size", "8", "--head_epochs", "1",
    "--dataloader_num_workers", "0", "--finetune_steps", "1", "--finetune_batch_size", "4",
    "--finetune_warmup_steps", "0", "--decoder_hidden_size", "16",
]  # fmt: skip


@pytest.mark.slow
def test_the_script_prints_both_columns_for_every_backbone(tmp_path):
    output_dir = tmp_path / "dense"
    process = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dense_transfer.py"), "--output_dir", str(output_dir), *TINY],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    rows = [line for line in process.stdout.splitlines() if line.startswith("| ")]
    assert "fine-tuned UperNet mIoU" in rows[0] and "frozen linear-head mIoU" in rows[0]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]] == [name for _, name in dense_transfer.ROWS]
    for row in rows[1:]:
        cells = row.strip("|").split("|")[1:5]  # UperNet mIoU, its digits', linear mIoU, its digits'
        means = [float(re.match(r"\s*([0-9.]+) ± ([0-9.]+)\s*$", cell).group(1)) for cell in cells]
        assert all(0.0 <= value <= 100.0 for value in means), row
    report = json.loads((output_dir / "dense_transfer_results.json").read_text())
    assert report["wall_seconds"] > 0 and report["cpu_seconds"] > 0
    for key, _ in dense_transfer.ROWS:
        row = report["per_seed"]["0"][key]
        assert 0.0 <= row["upernet_mean_iou"] <= 1.0 and 0.0 <= row["mean_iou"] <= 1.0
        assert (output_dir / "seed-0" / f"upernet-{key}" / "eval_results.json").is_file()
    # mimco-segment read the very canvases the linear head used
    written = load_digit_canvas_dataset(
        "test", 8, 64, seed=0, max_digits=4, digit_scale=(0.5, 0.75), background="plain"
    )
    stored = datasets.Dataset.from_parquet(str(output_dir / "seed-0" / "data" / "test.parquet"))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(written["image"], stored["image"]))


def test_the_task_defaults_keep_the_built_in_set():
    """`max_digits` and `digit_scale` left at their defaults give the scenes `mimco-segment` builds (as before)."""
    plain = load_digit_canvas_dataset("train", 3, 48, seed=5)
    explicit = load_digit_canvas_dataset("train", 3, 48, seed=5, max_digits=3, digit_scale=(0.375, 0.625))
    bigger = load_digit_canvas_dataset("train", 3, 48, seed=5, max_digits=4, digit_scale=(0.5, 0.75))
    for column in ("image", "annotation"):
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain[column], explicit[column]))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain["image"], bigger["image"]))
    with pytest.raises(ValueError, match="digit_scale"):
        load_digit_canvas_dataset("train", 1, 48, digit_scale=(0.8, 0.5))


def test_on_the_plain_background_every_bright_pixel_is_a_digit():
    """`background="plain"` (the study's canvases): outside the labelled digits the canvas is dark noise, where the
    built-in set's clutter puts bright strokes; an unknown background is refused by name."""
    for background, most_bright_background in (("plain", 0.0), ("clutter", None)):
        scenes = load_digit_canvas_dataset("train", 16, 64, seed=3, background=background)
        images = np.stack([np.asarray(image, dtype=np.float32) for image in scenes["image"]])
        masks = np.stack([np.asarray(mask) for mask in scenes["annotation"]])
        bright_background = float((images.max(axis=-1)[masks == 0] > 150).mean())
        if most_bright_background is not None:
            assert bright_background <= most_bright_background, background
        else:
            assert bright_background > 0.01, background
        assert set(np.unique(masks)) > {0}  # digits are labelled on both
    with pytest.raises(ValueError, match="'striped'.*clutter, plain"):
        load_digit_canvas_dataset("train", 1, 48, background="striped")


def test_a_given_teacher_is_every_seeds_teacher_and_is_not_trained(tmp_path, monkeypatch):
    """`--teacher_name_or_path`: the student and pixel MIM of every seed start from that folder, no teacher trains,
    and a folder without a config is refused by name before any work."""
    from modeling_mimco import MimCoConfig, MimCoModel
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs

    teacher = tmp_path / "given-teacher"
    MimCoModel(MimCoConfig(**preset_backbone_kwargs(dense_transfer.PRESET))).save_pretrained(teacher)
    args = dense_transfer.parse_args(
        ["--output_dir", str(tmp_path / "dense"), "--teacher_name_or_path", str(teacher), *TINY]
    )
    started = []

    def no_teacher_training(*arguments):
        raise AssertionError("a teacher was trained although one was given")

    monkeypatch.setattr(dense_transfer, "pretrain_teacher", no_teacher_training)
    monkeypatch.setattr(
        dense_transfer.run_pretraining, "run_pretraining", lambda model_args, *_: started.append(model_args)
    )
    monkeypatch.setattr(
        dense_transfer, "pretrain_pixel_mim", lambda args, data, out, teacher_dir, seed: started.append(teacher_dir)
    )
    for seed in (0, 1):
        folders = dense_transfer.pretrain_all(args, seed, str(tmp_path / "dense" / f"seed-{seed}"))
        assert folders["teacher"] == str(teacher)
    assert [getattr(item, "teacher_name_or_path", item) for item in started] == [str(teacher)] * 4

    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "dense_transfer.py"),
            "--teacher_name_or_path",
            str(tmp_path / "typo"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert f"--teacher_name_or_path {tmp_path / 'typo'}: no config.json there" in completed.stderr
    assert not (tmp_path / "typo").exists() and not (tmp_path / "outputs").exists()


def test_pixel_mim_becomes_an_equal_mimco_folder(tmp_path):
    """Pixel MIM's ViT folder renamed to a MimCo folder gives the same patch tokens (what UperNet starts from)."""
    from transformers import ViTForMaskedImageModeling

    from modeling_mimco import MimCoConfig
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs
    from modeling_mimco.experiments.pixel_mim import vit_config_like
    from modeling_mimco.interop.model_folders import save_image_processor

    config = MimCoConfig(**preset_backbone_kwargs(dense_transfer.PRESET))
    ViTForMaskedImageModeling(vit_config_like(config)).save_pretrained(tmp_path / "vit")
    save_image_processor(str(tmp_path / "vit"), config.image_size, config.image_mean, config.image_std)
    folder = dense_transfer.pixel_mim_as_mimco(str(tmp_path / "vit"), str(tmp_path / "mimco"))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    original = dense_transfer.patch_features(str(tmp_path / "vit"), images)
    assert (dense_transfer.patch_features(folder, images) - original).abs().max() < 1e-5
