"""Faults and bad setups through the real pre-training scripts: each ends in one `error:` line before work is spent,
or is survived with the last good checkpoint resuming to the result of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_training
import torch
from safetensors.torch import load_file
from test_training import (
    CHECKPOINT_EVERY,
    MANIFEST_NAME,
    NUM_STEPS,
    TRAINER_STATE_NAME,
    _assert_same_log_history,
    _assert_same_tensors,
    _script_command,
    _subprocess_env,
    stage2,
    stage2_args,
)

from modeling_mimco.training.arguments import PreTrainingArguments
from modeling_mimco.training.checkpointing import (
    LOCK_HOLDER_NAME,
    OutputDirLock,
    _write_manifest,
    find_resume_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from modeling_mimco.training.loop import train


pytestmark = pytest.mark.slow
# the tiny digits runs of test_training (stage 1, and stage 2 with checkpoints at 3 and 6), built once here too
stage1_digits = test_training.stage1_digits
stage2_digits = test_training.stage2_digits


def _start(script: str, args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(
        _script_command(script, args),
        env=_subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _assert_one_error_line(name: str, process: subprocess.Popen, fragments: list[str]) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, f"{name}: exit code {process.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, f"{name}:\n{stderr[-3000:]}"
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, f"{name}:\n{stderr[-3000:]}"
    for fragment in fragments:
        assert fragment in errors[0], f"{name}: {fragment!r} not in {errors[0]!r}"
    assert "Running training" not in stdout, f"{name}: training started"
    return errors[0]


@contextmanager
def _tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (a read-only or a tiny file system); skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "none", str(path)], capture_output=True)
    if completed.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {completed.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- bad setups, refused before training ---------------------------------------------------------------------------


def test_bad_setups_fail_in_one_line_before_training(tmp_path, stage1_digits):
    teacher = stage1_digits[0]
    truncated_teacher = tmp_path / "truncated_teacher"
    shutil.copytree(teacher, truncated_teacher)
    weights = truncated_teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    existing_file = tmp_path / "a_file"
    existing_file.write_text("not a folder")
    cases = {
        "output_dir_is_a_file": (teacher, existing_file, [], ["--output_dir", "not a folder"]),
        "fp16_on_cpu": (teacher, tmp_path / "fp16", ["--mixed_precision", "fp16"], ["fp16", "bf16"]),
        "truncated_teacher": (truncated_teacher, tmp_path / "t", [], ["--teacher_name_or_path", "damaged"]),
        "missing_teacher": (tmp_path / "no_such_teacher", tmp_path / "m", [], ["no such file or folder", "Hub"]),
        "negative_learning_rate": (
            teacher,
            tmp_path / "lr",
            ["--learning_rate", "-0.001"],
            ["--learning_rate", "-0.001"],
        ),
    }
    processes = {
        name: _start("run_pretraining", stage2_args(teacher_dir, output_dir, *flags))
        for name, (teacher_dir, output_dir, flags, _) in cases.items()
    }
    for name, process in processes.items():
        _assert_one_error_line(name, process, cases[name][3])
    assert existing_file.read_text() == "not a folder"


def test_read_only_output_folders_fail_before_training(tmp_path, stage1_digits):
    with _tmpfs(tmp_path / "read_only", "ro,size=1m") as read_only:
        processes = {
            "existing_read_only": _start("run_pretraining", stage2_args(stage1_digits[0], read_only)),
            "new_in_read_only": _start("run_pretraining", stage2_args(stage1_digits[0], read_only / "new")),
        }
        for name, process in processes.items():
            _assert_one_error_line(name, process, ["--output_dir", "not writable"])


# --- two runs, one folder -------------------------------------------------------------------------------------------


def test_a_second_run_in_the_same_output_folder_is_refused(tmp_path, stage1_digits):
    output_dir = tmp_path / "shared"
    first = _start("run_pretraining", stage2_args(stage1_digits[0], output_dir, steps=400))
    holder = output_dir / LOCK_HOLDER_NAME
    try:
        deadline = time.monotonic() + 120
        while not holder.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-3000:]
        second = _start("run_pretraining", stage2_args(stage1_digits[0], output_dir, "--seed", "7", steps=2))
        line = _assert_one_error_line("second", second, ["--output_dir", "in use by another run", f"pid {first.pid}"])
        assert "choose another --output_dir" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143  # the first run was not disturbed: it wrote its checkpoint on SIGTERM
    assert not holder.exists()  # released on exit
    # a holder file left by a run that died (its OS lock died with it) does not block the next run
    holder.write_text(json.dumps({"host": "gone", "pid": 999999, "started": "yesterday"}))
    lock = OutputDirLock(str(output_dir))
    assert lock.acquire() is None
    assert json.loads(holder.read_text())["pid"] == os.getpid()
    assert OutputDirLock(str(output_dir)).acquire().startswith(f"--output_dir {str(output_dir)!r} is in use")
    lock.release()
    assert not holder.exists()


# --- damaged checkpoints -----------------------------------------------------------------------------------------


def _overwrite_in_place(path: Path, offset: int = 200, length: int = 4096) -> None:
    """4 KiB of zeros over the middle of a file: same size, different content."""
    data = bytearray(path.read_bytes())
    offset = min(offset, max(len(data) - length, 0))
    data[offset : offset + length] = bytes(min(length, len(data) - offset))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", TRAINER_STATE_NAME])
def test_silent_corruption_is_detected_and_latest_falls_back(tmp_path, stage2_digits, victim):
    output_dir = tmp_path / "run"
    shutil.copytree(stage2_digits[0] / "checkpoints", output_dir / "checkpoints")
    earlier, latest = (output_dir / "checkpoints" / f"checkpoint-{step}" for step in (CHECKPOINT_EVERY, NUM_STEPS))
    path = latest / victim
    size = path.stat().st_size
    if victim == TRAINER_STATE_NAME:
        path.write_text("{" + " " * (size - 1))  # same size, not JSON
    else:
        _overwrite_in_place(path)
    assert path.stat().st_size == size
    with pytest.raises(Exception, match="checksum"):
        verify_checkpoint(str(latest))
    assert find_resume_checkpoint(str(output_dir), "latest") == str(earlier)


def test_resume_falls_back_past_checkpoints_that_verify_but_do_not_load(tmp_path, stage1_digits, stage2_digits):
    """A checkpoint whose manifest matches damaged files (written damaged) is skipped when it fails to load, and the
    run resumed from the one before it ends exactly like the uninterrupted run."""
    reference_dir, reference = stage2_digits
    output_dir = tmp_path / "run"
    shutil.copytree(reference_dir / "checkpoints", output_dir / "checkpoints")
    latest = output_dir / "checkpoints" / f"checkpoint-{NUM_STEPS}"
    (latest / TRAINER_STATE_NAME).write_text("{not json")
    _overwrite_in_place(latest / "model.safetensors", offset=0)  # the safetensors header itself
    (latest / MANIFEST_NAME).unlink()
    _write_manifest(str(latest))  # the damage is now what the manifest records
    verify_checkpoint(str(latest))
    args = stage2_args(
        stage1_digits[0],
        output_dir,
        "--checkpointing_steps",
        str(CHECKPOINT_EVERY),
        "--resume_from_checkpoint",
        "latest",
    )
    completed = subprocess.run(
        _script_command("run_pretraining", args), env=_subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"checkpoint-{NUM_STEPS} could not be loaded" in completed.stderr
    assert f"Resumed from {output_dir / 'checkpoints' / f'checkpoint-{CHECKPOINT_EVERY}'}" in completed.stdout
    saved = json.loads((output_dir / "train_results.json").read_text())
    _assert_same_log_history(saved["log_history"], reference.log_history)
    _assert_same_tensors(
        load_file(output_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors"), atol=1e-6
    )


def test_the_log_window_open_at_a_checkpoint_is_resumed(tmp_path, stage1_digits):
    """Logging every 2 steps, a checkpoint at step 3: the resumed run's step-4 record averages steps 3 and 4, as the
    uninterrupted run's does."""
    args = ["--logging_steps", "2", "--checkpointing_steps", "3"]
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference = stage2.main(stage2_args(stage1_digits[0], reference_dir, *args))
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_dir / "checkpoints" / "checkpoint-3", resumed_dir / "checkpoints" / "checkpoint-3")
    resumed = stage2.main(stage2_args(stage1_digits[0], resumed_dir, *args, "--resume_from_checkpoint", "latest"))
    assert [record["step"] for record in reference.log_history] == [2, 4, 6]
    _assert_same_log_history(resumed.log_history, reference.log_history)


def test_full_disk_while_writing_the_optimizer_state_is_a_clear_error(tmp_path, stage1_digits, stage2_digits):
    checkpoint = Path(list_checkpoints(str(stage2_digits[0] / "checkpoints"))[-1])
    model_bytes = (checkpoint / "model.safetensors").stat().st_size
    optimizer_bytes = (checkpoint / "optimizer.bin").stat().st_size
    # room for the output folder's small files and the model, not for the optimizer state
    size_kib = (model_bytes + optimizer_bytes // 2) // 1024
    with _tmpfs(tmp_path / "small_disk", f"size={size_kib}k") as small_disk:
        args = stage2_args(stage1_digits[0], small_disk / "run", "--checkpointing_steps", "1", steps=2)
        completed = subprocess.run(
            _script_command("run_pretraining", args),
            env=_subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert completed.returncode == 1, completed.stderr[-3000:]
        assert "Traceback" not in completed.stderr
        assert "basic_ios" not in completed.stderr.splitlines()[-1]
        assert "No space left" in completed.stderr.splitlines()[-1]


# --- SIGTERM during the final save ----------------------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        return {"pixel_values": torch.full((3, 4, 4), float(index))}


def test_sigterm_during_the_final_save_leaves_a_whole_final_model(tmp_path):
    model = torch.nn.Linear(48, 1)

    def compute_loss(wrapped, batch, progress):
        return wrapped(batch["pixel_values"].flatten(1)).pow(2).mean(), {}

    def save_final(unwrapped, output_dir):
        Path(output_dir, "config.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGTERM)  # preempted between the config and the weights
        torch.save(unwrapped.state_dict(), Path(output_dir, "weights.pt"))

    args = PreTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_train_steps=2, report_to="none"
    )
    with pytest.raises(SystemExit) as exit_info:
        train(
            args,
            model,
            _Images(),
            lambda examples: {"pixel_values": torch.stack([e["pixel_values"] for e in examples])},
            compute_loss,
            save_final,
        )
    assert exit_info.value.code == 143
    assert (tmp_path / "run" / "config.json").is_file()
    assert (tmp_path / "run" / "weights.pt").is_file()
    assert (tmp_path / "run" / "train_results.json").is_file()
    assert not (tmp_path / "run" / ".tmp-final").exists()
    assert not (tmp_path / "run" / LOCK_HOLDER_NAME).exists()


# --- accumulation -------------------------------------------------------------------------------------------------


def test_accumulation_with_cosine_losses_equals_the_big_batch(tmp_path, stage1_digits):
    losses = ["--patch_loss_type", "cosine", "--image_loss_type", "cosine"]
    big = tmp_path / "big"
    stage2.main(stage2_args(stage1_digits[0], big, *losses, steps=3))
    accumulated = tmp_path / "accumulated"
    args = stage2_args(stage1_digits[0], accumulated, *losses, "--gradient_accumulation_steps", "2", steps=3)
    args[args.index("--per_device_train_batch_size") + 1] = "4"
    stage2.main(args)
    history_big = json.loads((big / "train_results.json").read_text())["log_history"]
    history_accumulated = json.loads((accumulated / "train_results.json").read_text())["log_history"]
    _assert_same_log_history(history_accumulated, history_big, atol=1e-5)
    _assert_same_tensors(load_file(accumulated / "model.safetensors"), load_file(big / "model.safetensors"), atol=1e-5)


def test_accumulation_with_infonce_or_in_stage1_warns(tmp_path, stage1_digits):
    stage2_run = _start(
        "run_pretraining",
        stage2_args(stage1_digits[0], tmp_path / "run", "--gradient_accumulation_steps", "2", steps=1),
    )
    stage1_run = _start(
        "run_contrastive_pretraining",
        test_training.stage1_args(tmp_path / "stage1", "--gradient_accumulation_steps", "2", steps=1),
    )
    for process, expected in (
        (stage2_run, "--gradient_accumulation_steps 2 with InfoNCE losses"),
        (stage1_run, "--gradient_accumulation_steps 2 in stage 1"),
    ):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        assert expected in stderr


# --- resuming with other settings -----------------------------------------------------------------------------------


def test_a_resume_with_another_global_batch_or_seed_is_refused_in_one_line(tmp_path, stage1_digits, stage2_digits):
    """`scripts/run_pretraining.py --resume_from_checkpoint latest` with a global batch or seed of its own would see
    other data than the run it continues: refused before any step, in one line that names what differs."""
    output_dir = tmp_path / "run"
    (output_dir / "checkpoints").mkdir(parents=True)
    checkpoint = f"checkpoint-{CHECKPOINT_EVERY}"
    shutil.copytree(stage2_digits[0] / "checkpoints" / checkpoint, output_dir / "checkpoints" / checkpoint)
    for extra, expected in (
        (["--per_device_train_batch_size", "4"], "global_batch_size 8 -> 4"),
        (["--seed", "7"], "seed 42 -> 7"),
    ):
        args = stage2_args(stage1_digits[0], output_dir, "--resume_from_checkpoint", "latest")
        completed = subprocess.run(
            _script_command("run_pretraining", [*args, *extra]),
            env=_subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert completed.returncode == 1, completed.stderr[-3000:]
        last = completed.stderr.strip().splitlines()[-1]
        assert "error: --resume_from_checkpoint: this run would not continue" in last and expected in last, last
        assert "Traceback" not in completed.stderr
        assert not (output_dir / "model.safetensors").exists()
