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

from modeling_mimco import MimCoConfig, MimCoModel
from modeling_mimco.configuration_mimco import preset_backbone_kwargs
from modeling_mimco.data.segmentation import load_digit_canvas_dataset
from modeling_mimco.experiments import dense_transfer


ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--seeds", "0", "--pretrain_images", "16", "--train_images", "8", "--test_images", "8",
    "--stage1_steps", "1", "--stage2_steps", "1", "--batch_size", "8", "--head_epochs", "1",
    "--dataloader_num_workers", "0", "--finetune_steps", "1", "--finetune_batch_size", "4",
    "--finetune_warmup_steps", "0", "--decoder_hidden_size", "16",
]  # fmt: skip


def refused_run(output_dir: Path, *flags: str, exit_code: int = 2) -> str:
    """Runs the script with `flags` on `output_dir`, which must refuse them with `exit_code` (2: the parser's, 1: a
    later check's) and no traceback, before writing anything new; returns its stderr."""
    existed = output_dir.exists()
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dense_transfer.py"), "--output_dir", str(output_dir), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == exit_code and "Traceback" not in completed.stderr, completed.stderr
    assert output_dir.exists() == existed
    return completed.stderr


@pytest.mark.slow
def test_the_script_prints_both_columns_for_every_backbone(tmp_path):
    output_dir = tmp_path / "dense"
    process = subprocess.run(
        # --train_teacher: the per-seed teacher's path (the README's line, with the shipped teacher, is
        # tests/test_segmentation.py's)
        [
            sys.executable,
            str(ROOT / "scripts" / "dense_transfer.py"),
            "--output_dir",
            str(output_dir),
            "--train_teacher",
            *TINY,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Teacher: one teacher per seed is trained here for 1 steps (--train_teacher)." in process.stdout
    assert (output_dir / "seed-0" / "teacher" / "config.json").is_file()
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
    # run again: every backbone and fine-tune is reused, and reports the time it took the first time
    again = dense_transfer.main(["--output_dir", str(output_dir), "--train_teacher", *TINY])
    for key, _ in dense_transfer.ROWS:
        first = report["per_seed"]["0"][key]
        assert first["upernet_wall_seconds"] > 0
        assert again["per_seed"]["0"][key]["upernet_wall_seconds"] == first["upernet_wall_seconds"]
        assert again["per_seed"]["0"][key]["upernet_mean_iou"] == first["upernet_mean_iou"]
    # mimco-segment read the very canvases the linear head used
    written = load_digit_canvas_dataset(
        "test", 8, 32, seed=0, max_digits=1, digit_scale=(0.45, 0.75), background="plain"
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
    folder = dense_transfer.pixel_mim_as_mimco(str(tmp_path / "vit"), str(tmp_path / "mimco"), dense_transfer.PRESET)
    side = config.image_size
    images = np.random.default_rng(0).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    original = dense_transfer.patch_features(str(tmp_path / "vit"), images)
    assert (dense_transfer.patch_features(folder, images) - original).abs().max() < 1e-5


def test_the_preset_sets_the_canvases_the_crop_and_the_teachers_shape(tmp_path):
    """`--model_preset tiny` (the shipped canvas-digits teacher's shape): 32-px canvases, UperNet cropped at 32 and
    given `--finetune_layer_decay`; a teacher of another shape than the preset is refused by name before any work."""
    args = dense_transfer.parse_args(
        ["--output_dir", str(tmp_path / "dense"), "--model_preset", "tiny", "--finetune_layer_decay", "0.65", *TINY]
    )
    assert dense_transfer.canvas_size(args) == 32
    files = {"train": "train.parquet", "test": "test.parquet", "id2label": "id2label.json"}
    command = dense_transfer.finetune_command(args, "backbone", files, "out", 0)
    assert command[command.index("--crop_size") + 1] == "32"
    assert command[command.index("--layer_decay") + 1] == "0.65"
    images = dense_transfer.write_pretraining_images(args, 0, str(tmp_path / "pretrain.parquet"))
    assert {image.size for image in datasets.Dataset.from_parquet(images)["image"]} == {(32, 32)}

    teacher = tmp_path / "teacher-32"
    MimCoModel(MimCoConfig(**preset_backbone_kwargs("tiny"))).save_pretrained(teacher)
    assert dense_transfer.parse_args(["--teacher_name_or_path", str(teacher), "--model_preset", "tiny"])
    stderr = refused_run(tmp_path / "refused", "--teacher_name_or_path", str(teacher), "--model_preset", "tiny-64")
    assert "image_size 32 where --model_preset tiny-64 has 64" in stderr


def test_the_shipped_teacher_is_every_seeds_teacher_by_default(tmp_path):
    """Without teacher flags the study starts from the shipped canvas-digits teacher and says so; --train_teacher or
    a preset of another shape trains one per seed (saying why); both teacher flags at once are refused."""
    shipped = ROOT / "model_cards" / "teachers" / "canvas-digits"
    if not (shipped / "config.json").is_file():
        pytest.skip("no shipped canvas-digits teacher in this checkout")
    args = dense_transfer.parse_args(["--output_dir", str(tmp_path / "dense")])
    assert Path(args.teacher_name_or_path).resolve() == shipped.resolve()
    assert args.teacher_source.startswith("Teacher: the shipped") and "stage-1 steps" in args.teacher_source
    trained = dense_transfer.parse_args(["--train_teacher"])
    assert trained.teacher_name_or_path is None and "(--train_teacher)" in trained.teacher_source
    other_shape = dense_transfer.parse_args(["--model_preset", "tiny-64"])
    assert other_shape.teacher_name_or_path is None
    assert "image_size 32 where --model_preset tiny-64 has 64" in other_shape.teacher_source
    stderr = refused_run(tmp_path / "refused", "--train_teacher", "--teacher_name_or_path", str(shipped))
    assert "give --teacher_name_or_path or --train_teacher, not both" in stderr


def test_an_output_folder_of_other_settings_is_refused_before_any_work(tmp_path):
    """Finished backbones are reused by folder, so a run with other settings (or one of an earlier version, which
    recorded none) in the same --output_dir is refused by the script with one line naming each difference."""
    earlier = tmp_path / "earlier"
    dense_transfer.check_run_settings(dense_transfer.parse_args(["--output_dir", str(earlier), "--max_digits", "2"]))
    dense_transfer.check_run_settings(  # the same settings, other seeds: resumed
        dense_transfer.parse_args(["--output_dir", str(earlier), "--max_digits", "2", "--seeds", "4"])
    )
    unrecorded = tmp_path / "unrecorded"
    (unrecorded / "seed-0").mkdir(parents=True)
    for folder, message in (
        (earlier, f"--output_dir {earlier} holds a run with other settings (--max_digits 2 there, 1 now)"),
        (unrecorded, f"--output_dir {unrecorded} holds a run whose settings were not recorded"),
    ):
        stderr = refused_run(folder, exit_code=1)
        assert stderr.strip().count("\n") == 0 and message in stderr, stderr
        assert not (folder / "seed-1").exists() and not (folder / "data").exists()
