"""`make teachers` (`scripts/train_teachers.py`): a teacher trained segment by segment, probed after each, stopped
when its linear probe stops rising, and shipped with its curve and card; here on the digits, a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def run_teachers(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [
        sys.executable,
        str(REPO / "scripts" / "train_teachers.py"),
        *("--teachers", "canvas-digits", "--dataset_name", "digits", "--batch_size", "16"),
        *("--probe_every", "2", "--probe_train_samples", "200", "--probe_eval_samples", "100", "--probe_epochs", "5"),
        *("--output_dir", str(tmp_path / "runs"), "--cards_dir", str(tmp_path / "cards")),
        *flags,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_should_stop_when_the_linear_probe_stops_rising():
    from modeling_mimco.experiments.teachers import should_stop

    def curve(*linear: float) -> list[dict]:
        return [{"step": 100 * (index + 1), "linear": value} for index, value in enumerate(linear)]

    assert not should_stop(curve(30, 40), min_gain=0.5, patience=2)  # too few probes to tell
    assert not should_stop(curve(30, 40, 45), min_gain=0.5, patience=2)
    assert not should_stop(curve(30, 40, 39, 40.6), min_gain=0.5, patience=2)  # 40.6 > 40 + 0.5
    assert should_stop(curve(30, 40, 39, 40.5), min_gain=0.5, patience=2)
    assert should_stop(curve(30, 40, 40.4), min_gain=0.5, patience=1)


@pytest.mark.slow
def test_a_teacher_is_trained_probed_shipped_and_extended(tmp_path):
    completed = run_teachers(tmp_path, "--max_steps", "4", "--no_cooldown")
    assert completed.returncode == 0, completed.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "canvas-digits" / "curve.json").read_text())
    assert [point["step"] for point in state["curve"]] == [2, 4]
    assert state["stopped_because"] == "reached --max_steps 4"
    assert state["recipe"]["seed"] == 42 and state["recipe"]["dataset_name"] == "digits"
    assert (state["num_train_images"], state["num_test_images"]) == (200, 100)
    shipped = tmp_path / "cards" / "canvas-digits"
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "curve.json",
        "curve.png",
    ):
        assert (shipped / name).is_file(), name
    assert not (shipped / "checkpoints").exists() and not (shipped / "contrastive_model").exists()
    card = (shipped / "README.md").read_text()
    assert "library_name: transformers" in card and "| 2 |" in card and "| 4 |" in card
    from modeling_mimco import MimCoModel

    assert MimCoModel.from_pretrained(shipped).config.image_size == 32

    # a larger --max_steps goes on from the last probe, resuming the stage-1 checkpoint; then the cool-down takes the
    # learning rate down to 0 over one more segment
    extended = run_teachers(tmp_path, "--max_steps", "6")
    assert extended.returncode == 0, extended.stderr[-3000:]
    output = extended.stdout + extended.stderr
    assert "going on from step 4" in output and "checkpoint-4" in output
    assert "step 8/8 | lr 0.000e+00" in output
    state = json.loads((tmp_path / "runs" / "canvas-digits" / "curve.json").read_text())
    assert [point["step"] for point in state["curve"]] == [2, 4, 6, 8]
    assert state["curve"][-1]["cooldown_from"] == 6 and "cooldown_from" not in state["curve"][-2]
    assert "| 8 (cool-down) |" in (shipped / "README.md").read_text()
    again = run_teachers(tmp_path, "--max_steps", "6")  # a cooled teacher is finished: nothing more to train
    assert again.returncode == 0 and "stage 1 from" not in again.stdout + again.stderr


def test_momentum_final_makes_the_stage1_momentum_constant():
    """`make teachers` extends stage 1 segment by segment, so its EMA momentum must not depend on the planned steps."""
    from modeling_mimco import MimCoForContrastivePreTraining
    from modeling_mimco.commands.run_contrastive_pretraining import ModelArguments, build_config

    config = build_config(ModelArguments(model_preset="tiny", momentum=0.99, momentum_final=0.99))
    model = MimCoForContrastivePreTraining(config)
    assert [model.momentum_at(progress) for progress in (0.0, 0.5, 1.0)] == pytest.approx([0.99] * 3)
    default = MimCoForContrastivePreTraining(build_config(ModelArguments(model_preset="tiny")))
    assert default.momentum_at(0.0) == pytest.approx(0.99) and default.momentum_at(1.0) == pytest.approx(1.0)


SHIPPED_TEACHERS = sorted(path.parent for path in (REPO / "model_cards" / "teachers").glob("*/config.json"))

LOAD_SHIPPED_TEACHER = """
    import sys

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    torch.save({"pooled": outputs.pooler_output, "module": type(model).__module__}, sys.argv[2])
"""


@pytest.mark.parametrize("folder", SHIPPED_TEACHERS, ids=lambda folder: folder.name)
def test_a_shipped_teacher_loads_without_the_package_as_it_does_with_it(folder, tmp_path):
    """Every committed teacher (the demo's, CIFAR-10's) loads from its own code where the package is hidden, as a
    Hub user would load it, and gives the features the package's `MimCoModel` gives; its curve names its best probe."""
    import numpy as np
    import torch
    from helpers.clean_process import run_without_package
    from PIL import Image
    from transformers import AutoImageProcessor

    from modeling_mimco import MimCoModel

    result = run_without_package(LOAD_SHIPPED_TEACHER, [folder, tmp_path / "out.pt"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert loaded["module"].startswith("transformers_modules.")
    model = MimCoModel.from_pretrained(folder).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        here = model(**AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")).pooler_output
    assert here.shape == (1, model.config.hidden_size)
    torch.testing.assert_close(loaded["pooled"], here, rtol=1e-5, atol=1e-5)
    curve = json.loads((folder / "curve.json").read_text())
    assert curve["best"]["linear"] == max(probe["linear"] for probe in curve["curve"])
    assert f"{curve['best']['linear']:.1f}" in (folder / "README.md").read_text()
