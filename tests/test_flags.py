"""The flags a Hugging Face user types, with the names of the transformers example scripts, through the scripts'
own `main(argv)` and, for argument errors, through `scripts/*.py` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.fake_hub import FakeHub, assert_token_only_in_authorization, subprocess_env
from test_training import (
    _script_command,
    _subprocess_env,
    stage1,
    stage2,
    stage2_args,
    write_image_folder,
)

from modeling_mimco import MimCoConfig, MimCoModel
from modeling_mimco.data.sources import DataArguments, load_training_images
from modeling_mimco.training.loop import sample_seed


pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BATCH = 8  # test_training's per-device batch: the base learning rate is scaled by BATCH / 256


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny stage-1 teacher, 2 steps."""
    output_dir = tmp_path_factory.mktemp("flags_teacher")
    stage1.main(
        ["--model_preset", "tiny", "--projector_hidden_size", "64", "--projection_size", "16", "--report_to", "none"]
        + ["--output_dir", str(output_dir), "--per_device_train_batch_size", str(BATCH), "--max_train_steps", "2"]
    )
    return output_dir


def _learning_rates(output_dir) -> list[float]:
    history = json.loads((output_dir / "train_results.json").read_text())["log_history"]
    return [record["lr"] for record in history]


def test_lr_scheduler_type_and_num_warmup_steps(tmp_path, teacher):
    base = 1e-3 * BATCH / 256
    stage2.main(
        stage2_args(teacher, tmp_path / "constant", "--learning_rate", "1e-3", steps=3)
        + ["--lr_scheduler_type", "constant_with_warmup", "--num_warmup_steps", "0"]
    )
    assert _learning_rates(tmp_path / "constant") == pytest.approx([base] * 3)
    # --num_warmup_steps replaces --warmup_ratio: 2 warm-up steps of 4, then linear decay to 0
    stage2.main(
        stage2_args(teacher, tmp_path / "linear", "--learning_rate", "1e-3", steps=4)
        + ["--lr_scheduler_type", "linear", "--num_warmup_steps", "2", "--warmup_ratio", "0.0"]
    )
    assert _learning_rates(tmp_path / "linear") == pytest.approx([base / 2, base, base / 2, 0.0])


def test_model_name_or_path_starts_the_student_from_a_checkpoint(tmp_path, teacher):
    first = tmp_path / "first"
    stage2.main(stage2_args(teacher, first, steps=2))
    model_args = stage2.ModelArguments(
        teacher_name_or_path=str(teacher),
        model_name_or_path=str(first),
        model_preset="vit-small-patch16",  # replaced by the checkpoint's shape
        head_hidden_size=32,
    )
    model = stage2.build_model(model_args)
    start = MimCoModel.from_pretrained(first)
    assert model.config.hidden_size == MimCoConfig.from_pretrained(first).hidden_size == 64
    expected = start.state_dict()
    for name, value in model.mimco.state_dict().items():
        assert torch.equal(value, expected[name]), name
    # and a run started from it trains on
    stage2.main(stage2_args(teacher, tmp_path / "second", "--model_name_or_path", str(first), steps=1))
    assert (tmp_path / "second" / "model.safetensors").is_file()


def test_sample_seeds_depend_on_seed_epoch_and_index_only():
    seeds = {sample_seed(seed, epoch, index) for seed in (0, 1) for epoch in (0, 1) for index in range(50)}
    assert len(seeds) == 200
    assert sample_seed(42, 3, 7) == sample_seed(42, 3, 7)


BAD_FLAGS = {
    "lr_scheduler_type": (["--lr_scheduler_type", "bogus"], ["--lr_scheduler_type", "bogus", "cosine"]),
    "with_tracking_without_tracker": (["--with_tracking", "--report_to", "none"], ["--with_tracking", "none"]),
    "num_warmup_steps": (["--num_warmup_steps", "-1"], ["--num_warmup_steps", "-1"]),
    "learning_rate": (["--learning_rate", "-0.001"], ["--learning_rate", "-0.001"]),
    "crop_min_scale": (["--crop_min_scale", "0"], ["--crop_min_scale", "(0, 1]"]),
    "patch_temperature": (["--patch_temperature", "-1"], ["patch_temperature", "-1"]),
    "student_checkpoint": (["--model_name_or_path", "/no/such/student"], ["--model_name_or_path", "/no/such/student"]),
}


def test_bad_flags_fail_before_training_with_a_message_naming_them(tmp_path, teacher):
    processes = {}
    for name, (flags, _) in BAD_FLAGS.items():
        output_dir = tmp_path / name
        processes[name] = (
            output_dir,
            subprocess.Popen(
                _script_command("run_pretraining", stage2_args(teacher, output_dir, *flags)),
                env=_subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    for name, (output_dir, process) in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, f"{name}: exit code {process.returncode}\n{stderr[-2000:]}"
        error_lines = [line for line in stderr.splitlines() if line.startswith("run_pretraining.py: error: ")]
        assert len(error_lines) == 1, f"{name}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, f"{name}:\n{stderr[-3000:]}"
        assert "Some specified arguments are not used" not in stderr + stdout
        for fragment in BAD_FLAGS[name][1]:
            assert fragment in error_lines[0], f"{name}: {fragment!r} not in\n{stderr[-3000:]}"
        assert "Running training" not in stdout, name
        assert not (output_dir / "model.safetensors").exists(), name


def test_push_to_hub_of_a_pretraining_run_goes_through_the_checked_path(tmp_path, teacher):
    """`run_pretraining.py --push_to_hub --hub_token T` against a stand-in Hub on 127.0.0.1: one commit with a model
    card, the model, its code and its image processor; the token is sent only as the Authorization header."""
    token = "hf_flagstestFAKEtoken0123456789"
    output_dir = tmp_path / "pushed"
    args = stage2_args(teacher, output_dir, steps=1)
    args += ["--push_to_hub", "--hub_model_id", "someone/mimco-tiny", "--hub_token", token]
    with FakeHub(token=token, max_requests=40, timeout_s=200) as fake:
        env = subprocess_env(fake, "", tmp_path)
        env.pop("HF_TOKEN")  # the token comes from --hub_token only
        env["OMP_NUM_THREADS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(REPO)])
        completed = subprocess.run(
            _script_command("run_pretraining", args), env=env, capture_output=True, text=True, timeout=180
        )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(fake.commits) == 1
    files = set(fake.commits[0].files)
    for name in ("README.md", "config.json", "model.safetensors", "preprocessor_config.json", "modeling_mimco.py"):
        assert name in files, (name, sorted(files))
    assert not any(name.startswith(("checkpoints/", "logs/")) for name in files)
    assert b"mimco" in fake.commits[0].files["README.md"]
    assert token not in completed.stdout + completed.stderr
    assert "someone/mimco-tiny" in completed.stdout
    assert_token_only_in_authorization(fake, token)


def test_max_train_samples_draws_a_seeded_subset_of_every_class(tmp_path):
    folder = write_image_folder(tmp_path / "images", 40)  # listed class by class: 20 cat, then 20 dog

    def subset(seed: int):
        data_args = DataArguments(train_dir=str(folder), max_train_samples=10, cache_dir=str(tmp_path / "cache"))
        dataset, _ = load_training_images(data_args, 32, seed=seed)
        return [(row["image"]["path"], row["label"]) for row in dataset]

    first = subset(0)
    assert len(first) == 10
    assert {label for _, label in first} == {0, 1}
    assert subset(0) == first
    assert subset(1) != first
