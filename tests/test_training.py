"""End-to-end tests of the two pre-training scripts and the shared training loop (`modeling_mimco.training.loop`).

Everything runs on tiny models (the `tiny` preset, 32-px images) for a few steps on the built-in digits data or on
image folders generated here. Runs go through the scripts' `main(argv)` in this process where possible, and as
subprocesses where a process boundary is the point (kill, SIGTERM, argument errors, remote code).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.clean_process import run_without_package
from helpers.scripts import load_script
from safetensors.torch import load_file, save_file

from modeling_mimco import MimCoModel
from modeling_mimco.errors import MimCoError
from modeling_mimco.training.arguments import PreTrainingArguments
from modeling_mimco.training.checkpointing import (
    MANIFEST_NAME,
    TRAINER_STATE_NAME,
    CheckpointError,
    find_resume_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from modeling_mimco.training.log import TooManyUnreadableImagesError
from modeling_mimco.training.loop import train


REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
NUM_STEPS = 6
CHECKPOINT_EVERY = 3
BATCH_SIZE = 8

STAGE1_MODEL_ARGS = ["--model_preset", "tiny", "--projector_hidden_size", "64", "--projection_size", "16"]
# drop path as SimMIM and BEiT pre-train with: the resume and accumulation equivalences must hold with it
STAGE2_MODEL_ARGS = ["--model_preset", "tiny", "--head_hidden_size", "32", "--drop_path_rate", "0.1"]
COMMON_ARGS = ["--report_to", "none", "--dataloader_num_workers", "0", "--logging_steps", "1"]
# Fields of a log record that depend on the run's history, not on wall-clock time.
LOGGED_VALUES = ("loss", "lr", "grad_norm", "patch_loss", "image_loss")
FINAL_FILES = ("model.safetensors", "config.json", "preprocessor_config.json", "train_results.json")


stage1 = load_script("run_contrastive_pretraining")
stage2 = load_script("run_pretraining")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two cores shared with other work: several intra-op threads per process only fight each other (a tiny step
    # becomes 10x slower). Subprocesses get OMP_NUM_THREADS=1 from `_subprocess_env`.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _script_command(name: str, args: list[str]) -> list[str]:
    return [sys.executable, str(SCRIPTS / f"{name}.py"), *args]


def stage1_args(output_dir, *extra, steps: int = NUM_STEPS) -> list[str]:
    return [
        *STAGE1_MODEL_ARGS,
        *COMMON_ARGS,
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        str(BATCH_SIZE),
        "--max_train_steps",
        str(steps),
        *extra,
    ]


def stage2_args(teacher, output_dir, *extra, steps: int = NUM_STEPS) -> list[str]:
    return [
        *STAGE2_MODEL_ARGS,
        *COMMON_ARGS,
        "--teacher_name_or_path",
        str(teacher),
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        str(BATCH_SIZE),
        "--max_train_steps",
        str(steps),
        *extra,
    ]


# --- generated image folders -------------------------------------------------------------------------------------


def _noise_pixels(seed: int, size: int = 40) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(size, size, 3), dtype=np.uint8)


def write_image_folder(root: Path, num_images: int, seed: int = 0) -> Path:
    """`root/<class>/<n>.png` with random RGB images in two classes."""
    for index in range(num_images):
        folder = root / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(_noise_pixels(seed + index)).save(folder / f"{index:04d}.png")
    return root


def _encoded(image: PIL.Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


UNREADABLE_FILES = ("empty.jpg", "truncated.jpg", "text.png")
ODD_MODE_FILES = ("gray.png", "palette.png", "rgba.png", "cmyk.jpg", "sixteen_bit.png")


def write_bad_image_folder(root: Path, num_good: int) -> Path:
    """An image folder with `num_good` plain RGB images plus the readable odd modes and the unreadable files."""
    write_image_folder(root, num_good, seed=1000)
    odd = root / "odd"
    odd.mkdir()
    pixels = _noise_pixels(7)
    (odd / "empty.jpg").write_bytes(b"")
    jpeg = _encoded(PIL.Image.fromarray(pixels), "JPEG")
    (odd / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (odd / "text.png").write_text("this is not an image\n")
    PIL.Image.fromarray(pixels).convert("L").save(odd / "gray.png")
    PIL.Image.fromarray(pixels).convert("P", palette=PIL.Image.Palette.ADAPTIVE).save(odd / "palette.png")
    rgba = np.concatenate([pixels, np.full((*pixels.shape[:2], 1), 128, dtype=np.uint8)], axis=-1)
    PIL.Image.fromarray(rgba, mode="RGBA").save(odd / "rgba.png")
    PIL.Image.fromarray(pixels).convert("CMYK").save(odd / "cmyk.jpg")
    sixteen = (np.random.RandomState(8).randint(0, 65536, size=(40, 40))).astype(np.uint16)
    PIL.Image.fromarray(sixteen).save(odd / "sixteen_bit.png")
    assert PIL.Image.open(odd / "sixteen_bit.png").mode.startswith("I;16")
    assert PIL.Image.open(odd / "cmyk.jpg").mode == "CMYK"
    return root


# --- checks on outputs -------------------------------------------------------------------------------------------


def _assert_same_tensors(actual: dict, expected: dict, atol: float = 0.0, what: str = "") -> None:
    assert sorted(actual) == sorted(expected), f"{what}: different keys"
    for name in expected:
        a, e = actual[name], expected[name]
        assert a.shape == e.shape, f"{what}: {name} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        if a.dtype.is_floating_point:
            difference = (a.double() - e.double()).abs().max().item() if a.numel() else 0.0
            assert difference <= atol, f"{what}: {name} differs by {difference}"
        else:
            assert torch.equal(a, e), f"{what}: {name} differs"


def _strip(state: dict, prefix: str) -> dict:
    return {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}


def _assert_same_log_history(actual: list[dict], expected: list[dict], atol: float = 1e-6) -> None:
    assert [record["step"] for record in actual] == [record["step"] for record in expected]
    for got, want in zip(actual, expected):
        for key in LOGGED_VALUES:
            assert (key in got) == (key in want), f"step {want['step']}: {key} logged in only one run"
            if key in want:
                assert abs(got[key] - want[key]) <= atol * max(1.0, abs(want[key])), (
                    f"step {want['step']}: {key} {got[key]} != {want[key]}"
                )


def _check_preprocessor(output_dir: Path, image_size: int, image_mean, image_std) -> None:
    from transformers import ViTImageProcessor

    assert (output_dir / "preprocessor_config.json").is_file()
    processor = ViTImageProcessor.from_pretrained(output_dir)
    assert processor.size == {"height": image_size, "width": image_size}
    assert list(processor.image_mean) == pytest.approx(list(image_mean))
    assert list(processor.image_std) == pytest.approx(list(image_std))
    pixel_values = processor(PIL.Image.fromarray(_noise_pixels(3, size=50)), return_tensors="pt").pixel_values
    assert tuple(pixel_values.shape) == (1, 3, image_size, image_size)


def check_stage1_output(output_dir: Path, num_steps: int) -> None:
    """The stage-1 folder is a plain `MimCoModel` (the momentum encoder) with its image processor."""
    results = json.loads((output_dir / "train_results.json").read_text())
    assert results["global_step"] == num_steps
    assert len(results["log_history"]) == num_steps  # logging_steps 1
    assert all(np.isfinite(record["loss"]) for record in results["log_history"])

    teacher = MimCoModel.from_pretrained(output_dir)
    exported = load_file(output_dir / "model.safetensors")
    _assert_same_tensors(teacher.state_dict(), exported, what="stage-1 MimCoModel")
    contrastive = load_file(output_dir / "contrastive_model" / "model.safetensors")
    _assert_same_tensors(exported, _strip(contrastive, "momentum_encoder."), what="exported momentum encoder")
    base = _strip(contrastive, "base_encoder.")
    assert any(not torch.equal(base[name], exported[name]) for name in exported), (
        "the exported encoder equals the base encoder: the momentum encoder was not exported, or never trained"
    )
    config = teacher.config
    _check_preprocessor(output_dir, config.image_size, config.image_mean, config.image_std)


def check_stage2_output(output_dir: Path, teacher_dir: Path, num_steps: int) -> dict:
    """The stage-2 folder holds the student, heads and the unchanged stage-1 teacher; returns its weights."""
    results = json.loads((output_dir / "train_results.json").read_text())
    assert results["global_step"] == num_steps
    assert len(results["log_history"]) == num_steps
    for record in results["log_history"]:
        assert np.isfinite(record["loss"]) and np.isfinite(record["patch_loss"]) and np.isfinite(record["image_loss"])

    saved = load_file(output_dir / "model.safetensors")
    exported_teacher = load_file(teacher_dir / "model.safetensors")
    _assert_same_tensors(_strip(saved, "teacher."), exported_teacher, what="teacher inside the stage-2 model")

    student = MimCoModel.from_pretrained(output_dir)
    _assert_same_tensors(student.state_dict(), _strip(saved, "mimco."), what="student loaded with MimCoModel")
    config = student.config
    _check_preprocessor(output_dir, config.image_size, config.image_mean, config.image_std)
    return saved


# --- shared runs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_digits(tmp_path_factory):
    """Stage 1 on digits, 6 steps, checkpoints at 3 and 6."""
    output_dir = tmp_path_factory.mktemp("stage1_digits")
    args = stage1_args(output_dir, "--checkpointing_steps", str(CHECKPOINT_EVERY))
    result = stage1.main(args)
    return output_dir, args, result


@pytest.fixture(scope="module")
def stage2_digits(tmp_path_factory, stage1_digits):
    """Stage 2 on digits with the stage-1 teacher, 6 steps, checkpoints at 3 and 6."""
    teacher_dir = stage1_digits[0]
    output_dir = tmp_path_factory.mktemp("stage2_digits")
    result = stage2.main(stage2_args(teacher_dir, output_dir, "--checkpointing_steps", str(CHECKPOINT_EVERY)))
    return output_dir, result


# --- end to end --------------------------------------------------------------------------------------------------


REMOTE_CODE_CHILD = textwrap.dedent(
    """

    import torch
    from transformers import AutoModel

    checkpoint, inputs_path, results_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        last_hidden_state = model(torch.load(inputs_path, weights_only=True)).last_hidden_state
    torch.save(
        {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "state_dict": {name: value.detach().clone() for name, value in model.state_dict().items()},
            "last_hidden_state": last_hidden_state,
        },
        results_path,
    )
    """
)


@pytest.mark.slow
def test_end_to_end_on_digits_and_remote_code(tmp_path, stage1_digits, stage2_digits):
    teacher_dir, _, stage1_result = stage1_digits
    output_dir, stage2_result = stage2_digits
    assert stage1_result.global_step == NUM_STEPS and stage2_result.global_step == NUM_STEPS
    check_stage1_output(teacher_dir, NUM_STEPS)
    saved = check_stage2_output(output_dir, teacher_dir, NUM_STEPS)
    assert all(record["grad_norm"] > 0 for record in stage2_result.log_history)

    # AutoModel with remote code, in a process that has neither this package nor PYTHONPATH
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(pixel_values, tmp_path / "inputs.pt")
    student = MimCoModel.from_pretrained(output_dir).eval()
    with torch.no_grad():
        expected = student(pixel_values).last_hidden_state
    completed = run_without_package(
        REMOTE_CODE_CHILD, [output_dir, tmp_path / "inputs.pt", tmp_path / "o.pt"], tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = torch.load(tmp_path / "o.pt", weights_only=True)
    assert remote["class"] == "MimCoModel"
    assert remote["module"].startswith("transformers_modules."), remote["module"]
    _assert_same_tensors(remote["state_dict"], _strip(saved, "mimco."), what="AutoModel (remote code)")
    torch.testing.assert_close(remote["last_hidden_state"], expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_end_to_end_on_an_image_folder(tmp_path):
    train_dir = write_image_folder(tmp_path / "images", num_images=16)
    data_args = ["--train_dir", str(train_dir), "--cache_dir", str(tmp_path / "cache")]
    teacher_dir = tmp_path / "stage1"
    result = stage1.main(stage1_args(teacher_dir, *data_args, steps=2))
    assert result.global_step == 2 and result.skipped_images == 0
    check_stage1_output(teacher_dir, 2)

    output_dir = tmp_path / "stage2"
    result = stage2.main(stage2_args(teacher_dir, output_dir, *data_args, steps=2))
    assert result.global_step == 2 and result.skipped_images == 0
    check_stage2_output(output_dir, teacher_dir, 2)


# --- resume ------------------------------------------------------------------------------------------------------


def _keep_only_checkpoint(output_dir: Path, step: int) -> None:
    """Leaves `output_dir` as a run killed right after writing `checkpoint-{step}`."""
    for checkpoint in list_checkpoints(str(output_dir / "checkpoints")):
        if not checkpoint.endswith(f"checkpoint-{step}"):
            shutil.rmtree(checkpoint)
    for name in os.listdir(output_dir):
        if name not in ("checkpoints", "logs"):
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.slow
def test_stage2_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, stage1_digits, stage2_digits):
    teacher_dir = stage1_digits[0]
    reference_dir, reference = stage2_digits
    output_dir = tmp_path / "killed"
    args = stage2_args(teacher_dir, output_dir, "--checkpointing_steps", str(CHECKPOINT_EVERY))
    manifest = output_dir / "checkpoints" / f"checkpoint-{CHECKPOINT_EVERY}" / MANIFEST_NAME
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(
            _script_command("run_pretraining", args), env=_subprocess_env(), stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 240
            while not manifest.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            process.kill()  # SIGKILL: nothing after checkpoint-3 gets a chance to clean up
        finally:
            process.wait(timeout=60)
    assert manifest.exists(), (tmp_path / "log.txt").read_text()[-3000:]
    # If the kill landed late, the later checkpoint and the final model are removed: the state is the same as
    # that of a process killed right after checkpoint-3 (the checkpoint folder was complete when renamed).
    _keep_only_checkpoint(output_dir, CHECKPOINT_EVERY)
    verify_checkpoint(str(manifest.parent))
    state = json.loads((manifest.parent / TRAINER_STATE_NAME).read_text())
    assert state["global_step"] == CHECKPOINT_EVERY

    resumed = stage2.main([*args, "--resume_from_checkpoint", "latest"])
    assert resumed.global_step == NUM_STEPS
    _assert_same_log_history(resumed.log_history, reference.log_history)
    saved = json.loads((output_dir / "train_results.json").read_text())
    _assert_same_log_history(saved["log_history"], reference.log_history)
    _assert_same_tensors(
        load_file(output_dir / "model.safetensors"),
        load_file(reference_dir / "model.safetensors"),
        atol=1e-6,
        what="resumed vs uninterrupted",
    )


@pytest.mark.slow
def test_stage1_resume_matches_an_uninterrupted_run(tmp_path, stage1_digits):
    reference_dir, args, reference = stage1_digits
    output_dir = tmp_path / "resumed"
    (output_dir / "checkpoints").mkdir(parents=True)
    # The state of a run killed right after checkpoint-3: only that checkpoint exists.
    shutil.copytree(
        reference_dir / "checkpoints" / f"checkpoint-{CHECKPOINT_EVERY}",
        output_dir / "checkpoints" / f"checkpoint-{CHECKPOINT_EVERY}",
    )
    resume_args = [*args, "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"]
    resumed = stage1.main(resume_args)
    assert resumed.global_step == NUM_STEPS
    _assert_same_log_history(resumed.log_history, reference.log_history)
    # the whole contrastive model: base and momentum branches, projector, predictor, BatchNorm running statistics
    _assert_same_tensors(
        load_file(output_dir / "contrastive_model" / "model.safetensors"),
        load_file(reference_dir / "contrastive_model" / "model.safetensors"),
        atol=1e-6,
        what="stage 1 resumed vs uninterrupted",
    )


@pytest.mark.slow
def test_loader_workers_do_not_change_what_either_stage_trains(tmp_path):
    """`make demo` prepares batches in a worker process: both stages must train the same weights with 0 and 1
    workers, bit for bit, across an epoch boundary (where a new worker starts) and with stage 2's masks."""
    subset = ["--max_train_samples", str(3 * BATCH_SIZE)]  # 3 steps an epoch: 5 steps cross into the second
    outputs, losses = {}, {}
    for workers in (0, 1):
        teacher = tmp_path / f"teacher-{workers}"
        student = tmp_path / f"student-{workers}"
        flags = [*subset, "--dataloader_num_workers", str(workers)]
        first = stage1.main(stage1_args(teacher, *flags, steps=5))
        second = stage2.main(stage2_args(teacher, student, *flags, steps=5))
        outputs[workers] = (
            load_file(teacher / "contrastive_model" / "model.safetensors"),
            load_file(student / "model.safetensors"),
        )
        losses[workers] = [record["loss"] for record in first.log_history + second.log_history]
    assert len(losses[0]) == 10 and len(set(losses[0])) == 10  # five steps of each stage ran and trained
    assert losses[1] == losses[0]
    _assert_same_tensors(outputs[1][0], outputs[0][0], what="stage 1, 1 worker vs none")
    _assert_same_tensors(outputs[1][1], outputs[0][1], what="stage 2, 1 worker vs none")


# --- preemption --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path, stage1_digits):
    teacher_dir = stage1_digits[0]
    output_dir = tmp_path / "preempted"
    # Far more steps than can run before the signal; a checkpoint every 2 steps shows when training is under way.
    args = stage2_args(
        teacher_dir, output_dir, "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", steps=5000
    )
    first = output_dir / "checkpoints" / "checkpoint-2" / MANIFEST_NAME
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(
            _script_command("run_pretraining", args), env=_subprocess_env(), stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 240
            while not first.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert process.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    log_text = (tmp_path / "log.txt").read_text()
    assert returncode == 143, log_text[-3000:]
    assert "SIGTERM" in log_text
    for name in FINAL_FILES:  # the run did not finish: no final model
        assert not (output_dir / name).exists(), name

    latest = find_resume_checkpoint(str(output_dir), "latest")
    assert latest is not None
    verify_checkpoint(latest)
    state = json.loads(Path(latest, TRAINER_STATE_NAME).read_text())
    stopped_at = state["global_step"]
    assert 2 <= stopped_at < 5000
    assert Path(latest).name == f"checkpoint-{stopped_at}"  # written on SIGTERM, not only every 2 steps
    assert len(state["log_history"]) == stopped_at

    # The checkpoint resumes: one more step, on top of the logged history.
    resumed = stage2.main([*args, "--max_train_steps", str(stopped_at + 1), "--resume_from_checkpoint", "latest"])
    assert resumed.global_step == stopped_at + 1
    assert len(resumed.log_history) == stopped_at + 1
    _assert_same_log_history(resumed.log_history[:stopped_at], state["log_history"], atol=0.0)


# --- damaged checkpoints -----------------------------------------------------------------------------------------


def _damage(checkpoint: Path, how: str) -> str:
    """Damages `checkpoint` and returns the name of the file that an error must mention."""
    if how == "missing":
        victim = checkpoint / "optimizer.bin"
        if not victim.exists():
            victim = next(path for path in sorted(checkpoint.iterdir()) if path.name != MANIFEST_NAME)
        victim.unlink()
        return victim.name
    if how == "truncated":
        victim = checkpoint / "model.safetensors"
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
        return victim.name
    if how == "no_manifest":
        (checkpoint / MANIFEST_NAME).unlink()
        return MANIFEST_NAME
    raise ValueError(how)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["missing", "truncated", "no_manifest"])
def test_damaged_checkpoint_is_detected_and_skipped(tmp_path, stage2_digits, how):
    source = stage2_digits[0] / "checkpoints"
    output_dir = tmp_path / "run"
    shutil.copytree(source, output_dir / "checkpoints")
    earlier, latest = (output_dir / "checkpoints" / f"checkpoint-{step}" for step in (CHECKPOINT_EVERY, NUM_STEPS))
    verify_checkpoint(str(latest))  # intact before
    assert find_resume_checkpoint(str(output_dir), "latest") == str(latest)

    name = _damage(latest, how)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        verify_checkpoint(str(latest))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        find_resume_checkpoint(str(output_dir), str(latest))
    assert find_resume_checkpoint(str(output_dir), "latest") == str(earlier)
    verify_checkpoint(str(earlier))

    _damage(earlier, how)
    assert find_resume_checkpoint(str(output_dir), "latest") is None


@pytest.mark.slow
def test_resume_from_a_damaged_checkpoint_path_fails_clearly(tmp_path, stage1_digits, stage2_digits, capsys):
    teacher_dir = stage1_digits[0]
    output_dir = tmp_path / "run"
    shutil.copytree(stage2_digits[0] / "checkpoints", output_dir / "checkpoints")
    damaged = output_dir / "checkpoints" / f"checkpoint-{NUM_STEPS}"
    _damage(damaged, "truncated")
    before = sorted(os.listdir(output_dir / "checkpoints"))
    # refused while the arguments are checked, before the model or the data are loaded
    with pytest.raises(SystemExit) as exit_info:
        stage2.main(
            stage2_args(teacher_dir, output_dir, "--resume_from_checkpoint", str(damaged), steps=NUM_STEPS + 1)
        )
    # the one-line message that ends the program (printed on stderr by the interpreter as it exits with code 1)
    assert re.search(r": error: --resume_from_checkpoint: .*model\.safetensors.*truncated", str(exit_info.value.code))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        verify_checkpoint(str(damaged))
    assert sorted(os.listdir(output_dir / "checkpoints")) == before  # nothing trained, nothing written
    for name in FINAL_FILES:
        assert not (output_dir / name).exists(), name


# --- bad data ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_image_folder(tmp_path_factory):
    # 96 plain + 5 odd-mode readable + 3 unreadable = 104 files: 2 batches of 52 see every file exactly once.
    return write_bad_image_folder(tmp_path_factory.mktemp("bad") / "images", num_good=96)


NUM_BAD_FOLDER_FILES = 96 + len(ODD_MODE_FILES) + len(UNREADABLE_FILES)


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_counted(tmp_path, stage1_digits, bad_image_folder, caplog):
    output_dir = tmp_path / "run"
    batch = NUM_BAD_FOLDER_FILES // 2
    args = stage2_args(
        stage1_digits[0],
        output_dir,
        "--train_dir",
        str(bad_image_folder),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--max_skipped_fraction",
        "0.5",
        steps=2,
    )
    args[args.index("--per_device_train_batch_size") + 1] = str(batch)
    with caplog.at_level("WARNING", logger="modeling_mimco.data.pipeline"):
        result = stage2.main(args)
    assert result.global_step == 2
    assert result.skipped_images == len(UNREADABLE_FILES)
    results = json.loads((output_dir / "train_results.json").read_text())
    assert results["skipped_images"] == len(UNREADABLE_FILES)
    assert all(np.isfinite(record["loss"]) for record in results["log_history"])
    assert (output_dir / "model.safetensors").is_file()
    warned = caplog.text
    for name in UNREADABLE_FILES:
        assert name in warned, f"no warning names {name}"
    for name in ODD_MODE_FILES:
        assert name not in warned, f"{name} is readable but was reported"


@pytest.mark.slow
def test_too_many_unreadable_images_stop_the_run(tmp_path, stage1_digits, bad_image_folder):
    output_dir = tmp_path / "run"
    args = stage2_args(
        stage1_digits[0],
        output_dir,
        "--train_dir",
        str(bad_image_folder),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--max_skipped_fraction",
        "0.0",
        steps=1,
    )
    # one batch of every file: past the tracker's 100-image warm-up at the first batch
    args[args.index("--per_device_train_batch_size") + 1] = str(NUM_BAD_FOLDER_FILES)
    # through the real script: one error line, last on stderr, after the progress bar; no traceback
    completed = subprocess.run(
        _script_command("run_pretraining", args), env=_subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("run_pretraining.py: error: ") and "--max_skipped_fraction" in last_line
    assert issubclass(TooManyUnreadableImagesError, MimCoError)
    assert not (output_dir / "model.safetensors").exists()
    assert not (output_dir / "train_results.json").exists()


# --- bad arguments -----------------------------------------------------------------------------------------------


def _save_resnet_teacher(path: Path) -> Path:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(path)
    return path


@pytest.mark.slow
def test_bad_arguments_fail_before_training(tmp_path, stage1_digits):
    teacher_dir = stage1_digits[0]
    resnet = _save_resnet_teacher(tmp_path / "resnet")
    cases = {
        "image_column": (
            "run_pretraining",
            lambda out: stage2_args(teacher_dir, out, "--image_column", "no_such_column"),
            ["--image_column", "no_such_column"],
        ),
        "teacher": ("run_pretraining", lambda out: stage2_args(resnet, out), ["teacher", "ResNetConfig"]),
        "batch_size": (
            "run_pretraining",
            lambda out: stage2_args(teacher_dir, out, "--per_device_train_batch_size", "0"),
            ["--per_device_train_batch_size"],
        ),
        "stage1_image_column": (
            "run_contrastive_pretraining",
            lambda out: stage1_args(out, "--image_column", "no_such_column"),
            ["--image_column", "no_such_column"],
        ),
    }
    processes = {}
    for name, (script, make_args, _) in cases.items():
        output_dir = tmp_path / name
        processes[name] = (
            output_dir,
            subprocess.Popen(
                _script_command(script, make_args(output_dir)),
                env=_subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    for name, (output_dir, process) in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode not in (0, None), f"{name}: exit code {process.returncode}"
        assert "Traceback" not in stderr, f"{name}: a traceback instead of a message:\n{stderr[-3000:]}"
        for fragment in cases[name][2]:
            assert fragment in stderr, f"{name}: {fragment!r} not in\n{stderr[-3000:]}"
        assert not (output_dir / "checkpoints").exists(), name
        assert not (output_dir / "model.safetensors").exists(), name


# --- non-finite losses in the loop -------------------------------------------------------------------------------


class _TensorImages(torch.utils.data.Dataset):
    def __init__(self, num_images: int):
        self.images = torch.randn(num_images, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index]}


def _collate(examples):
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}


class _ScriptedLoss:
    """A loss that is NaN on the calls listed in `nan_calls` (0-based), finite otherwise.

    It also records whether the weights changed between consecutive calls: a step with a NaN loss must leave them
    untouched, a step with a finite loss must move them.
    """

    def __init__(self, nan_calls):
        self.nan_calls = nan_calls
        self.calls = 0
        self.nan_returned = 0
        self.previous = None  # (weights at the previous call, whether its loss was NaN)
        self.changed_after_nan, self.unchanged_after_finite = [], []

    def __call__(self, model, batch, progress):
        weights = [parameter.detach().clone() for parameter in model.parameters()]
        if self.previous is not None:
            before, was_nan = self.previous
            changed = any(not torch.equal(a, b) for a, b in zip(before, weights))
            if was_nan and changed:
                self.changed_after_nan.append(self.calls - 1)
            if not was_nan and not changed:
                self.unchanged_after_finite.append(self.calls - 1)
        is_nan = self.nan_calls == "all" or self.calls in self.nan_calls
        loss = model(batch["pixel_values"].flatten(1)).pow(2).mean()
        if is_nan:
            loss = loss * float("nan")
            self.nan_returned += 1
        self.previous = (weights, is_nan)
        self.calls += 1
        return loss, {}


def _run_loop(tmp_path, compute_loss, max_train_steps: int, max_consecutive_bad_steps: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(48, 4)
    args = PreTrainingArguments(
        output_dir=str(tmp_path / "loop"),
        per_device_train_batch_size=4,
        max_train_steps=max_train_steps,
        logging_steps=1,
        report_to="none",
        max_consecutive_bad_steps=max_consecutive_bad_steps,
        learning_rate=1e-2,
    )

    def save_final(unwrapped, output_dir):
        save_file({k: v.contiguous() for k, v in unwrapped.state_dict().items()}, f"{output_dir}/model.safetensors")

    return model, train(args, model, _TensorImages(64), _collate, compute_loss, save_final)


def test_nan_losses_are_skipped_and_counted(tmp_path):
    # bad steps, never three in a row: the consecutive count must reset on a finite loss
    compute_loss = _ScriptedLoss({1, 2, 4, 5})
    model, result = _run_loop(tmp_path, compute_loss, max_train_steps=6, max_consecutive_bad_steps=3)
    assert compute_loss.nan_returned >= 3
    assert result.bad_steps == compute_loss.nan_returned
    assert result.global_step == 6
    assert compute_loss.changed_after_nan == [], "a step with a NaN loss changed the weights"
    assert compute_loss.unchanged_after_finite == [], "a step with a finite loss did not update the weights"
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    saved = load_file(tmp_path / "loop" / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in saved.values())
    results = json.loads((tmp_path / "loop" / "train_results.json").read_text())
    assert results["bad_steps"] == compute_loss.nan_returned
    assert results["global_step"] == 6


def test_always_nan_stops_after_max_consecutive_bad_steps(tmp_path):
    compute_loss = _ScriptedLoss("all")
    with pytest.raises(RuntimeError, match="3 consecutive steps had a NaN/Inf loss"):
        _run_loop(tmp_path, compute_loss, max_train_steps=5, max_consecutive_bad_steps=3)
    assert compute_loss.calls == 3
    assert not (tmp_path / "loop" / "model.safetensors").exists()
