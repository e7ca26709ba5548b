"""`make demo` runs `scripts/demo.py`; here the same script with a few steps, as a user would start it."""

from __future__ import annotations

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
    names = [row.split("|")[1].strip() for row in rows][-4:]  # the demo's own table, after the probe's
    assert names == ["raw pixels", "random init", "teacher (MoCo v3, stage 1)", "student (MimCo, stage 2)"], rows
    assert (tmp_path / "demo" / "evaluation" / "tsne.png").is_file()
    assert (tmp_path / "demo" / "student" / "model.safetensors").is_file()


def test_demo_reading_is_computed_from_the_table():
    """The printed reading follows the numbers, and says plainly when an aim is missed."""
    from modeling_mimco.experiments import demo

    def row(linear: float, knn: float) -> dict:
        return {"linear_probe_top1": linear, "knn_top1": knn, "num_test_images": 270}

    lines = demo.reading([row(0.97, 0.98), row(0.80, 0.40), row(0.92, 0.55), row(0.91, 0.60)])
    assert (
        lines[0].startswith("- the teacher is +12.0 (linear) / +15.0 (kNN)") and "meets the 10-point aim" in lines[0]
    )
    assert "+11.0 (linear) / +20.0 (kNN)" in lines[1] and "meets" in lines[1]
    assert "-1.0 linear (within the 1-point aim), +5.0 kNN (at or above the teacher)" in lines[2]
    assert "raw pixels (97.0 / 98.0) beat every model" in lines[3]
    weak = demo.reading([row(0.5, 0.5), row(0.80, 0.40), row(0.85, 0.55), row(0.80, 0.45)])
    assert "short of the 10-point aim" in weak[0] and "short of the 10-point aim" in weak[1]
    assert "below the 1-point aim" in weak[2] and "below the teacher" in weak[2]
    assert not any("raw pixels" in line for line in weak)


@pytest.mark.slow
def test_demo_image_size_and_mask_block_reach_both_stages(tmp_path):
    """The flags of the measured demo variants (docs/benchmarks.md) change the models the demo trains."""
    import json

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--output_dir", str(tmp_path / "demo")]
    command += ["--stage1_steps", "2", "--stage2_steps", "2", "--batch_size", "8"]
    command += ["--image_size", "16", "--mask_patch_size", "4"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    teacher = json.loads((tmp_path / "demo" / "teacher" / "config.json").read_text())
    student = json.loads((tmp_path / "demo" / "student" / "config.json").read_text())
    assert teacher["image_size"] == student["image_size"] == 16
    assert student["mask_patch_size"] == 4
    assert "| raw pixels | " in completed.stdout and "| 768 |" in completed.stdout  # 3 x 16 x 16 pixel features
