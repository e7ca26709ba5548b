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
