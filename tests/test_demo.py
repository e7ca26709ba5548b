"""`make demo` runs `scripts/demo.py`; here the same script with a few steps, as a user would start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_prints_the_table_with_the_pixel_baseline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--output_dir", str(tmp_path / "demo")]
    command += ["--stage1_steps", "3", "--stage2_steps", "3", "--batch_size", "16"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [line for line in completed.stdout.splitlines() if line.startswith("| ") and "%" in line]
    names = [row.split("|")[1].strip() for row in rows][-5:]  # the demo's own table, after the probe's
    assert names == [
        "raw pixels",
        "random init",
        "pixel MIM (SimMIM)",
        "teacher (MoCo v3, stage 1)",
        "student (MimCo, stage 2)",
    ], rows
    assert "| 6108 / 540 |" in completed.stdout  # the built-in cluttered digits: 4 placements of each training digit
    assert "student vs pixel MIM, aim: above" in completed.stdout
    assert (tmp_path / "demo" / "evaluation" / "tsne.png").is_file()
    for model in ("student", "pixel_mim", "teacher"):
        assert (tmp_path / "demo" / model / "model.safetensors").is_file()
    pixel_mim = json.loads((tmp_path / "demo" / "pixel_mim" / "config.json").read_text())
    student = json.loads((tmp_path / "demo" / "student" / "config.json").read_text())
    assert pixel_mim["architectures"] == ["ViTForMaskedImageModeling"]
    for field in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
        assert pixel_mim[field] == student[field], field  # the baseline has the student's shape


def test_demo_reading_is_computed_from_the_table():
    """The printed reading follows the numbers, and says plainly when an aim is missed."""
    from modeling_mimco.experiments import demo

    def row(linear: float, knn: float) -> dict:
        return {"linear_probe_top1": linear, "knn_top1": knn, "num_test_images": 270}

    keys = ["pixels", "random", "pixel_mim", "teacher", "student"]
    # pixels, random init, pixel MIM, teacher, student (linear, kNN)
    lines = demo.reading([row(0.30, 0.20), row(0.25, 0.18), row(0.40, 0.30), row(0.62, 0.55), row(0.615, 0.56)], keys)
    assert "student vs raw pixels, aim: above: +31.5 linear (met), +36.0 kNN (met)" in lines[1]
    assert "student vs pixel MIM, aim: above: +21.5 linear (met), +26.0 kNN (met)" in lines[2]
    assert "student vs teacher, aim: at most 1 point below: -0.5 linear (met), +1.0 kNN (met)" in lines[3]
    assert not any("beats every model" in line for line in lines)
    assert any("student (MimCo, stage 2): +36.5 linear-probe points" in line for line in lines)
    weak = demo.reading([row(0.97, 0.98), row(0.50, 0.40), row(0.80, 0.70), row(0.92, 0.55), row(0.78, 0.60)], keys)
    assert "-19.0 linear (missed), -38.0 kNN (missed)" in weak[1]  # below the pixels
    assert "-2.0 linear (missed), -10.0 kNN (missed)" in weak[2]  # below pixel MIM
    assert "-14.0 linear (missed), +5.0 kNN (met)" in weak[3]  # more than a point below the teacher's probe
    assert any("raw pixels' linear probe (97.0) beats every model" in line for line in weak)
    assert any("raw pixels' kNN (98.0) beats every model" in line for line in weak)


@pytest.mark.slow
def test_demo_image_size_and_mask_block_reach_both_stages(tmp_path):
    """The flags of the measured demo variants (docs/benchmarks.md) change the models the demo trains."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--output_dir", str(tmp_path / "demo")]
    command += ["--stage1_steps", "2", "--stage2_steps", "2", "--batch_size", "8", "--skip_pixel_mim"]
    command += ["--image_size", "16", "--mask_patch_size", "4", "--dataset_name", "digits"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    teacher = json.loads((tmp_path / "demo" / "teacher" / "config.json").read_text())
    student = json.loads((tmp_path / "demo" / "student" / "config.json").read_text())
    assert teacher["image_size"] == student["image_size"] == 16
    assert student["mask_patch_size"] == 4
    assert "| raw pixels | " in completed.stdout and "| 768 |" in completed.stdout  # 3 x 16 x 16 pixel features
