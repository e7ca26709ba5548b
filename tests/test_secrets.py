"""No secret on disk: a Hub token given on a command line is never written to a file the commands write.

Every program that takes a token (`--hub_token`, and `--token` where a program has it) runs here as a subprocess
through its script, a few steps on tiny models and the built-in data, with TensorBoard on and checkpoints written,
without `--push_to_hub` (the Hub is not reachable from the tests). Then every file under the test's folder (the
output folder with its logs, events, checkpoints and the `Trainer`'s pickled `training_args.bin`; zip members read
uncompressed) and what the program printed are searched for the token's bytes. The unit tests pin the one helper
that every writer uses, `modeling_mimco.training.log.mask_secrets` / `without_secrets`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from modeling_mimco import MimCoModel
from modeling_mimco.interop.model_folders import save_image_processor
from modeling_mimco.training.log import is_secret_name, mask_secrets, without_secrets


pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_SecretTestToken1234567890abcdef"
TIMEOUT_S = 300

# a few steps, a checkpoint after each, TensorBoard required (`--with_tracking`: an error if it is missing)
PRETRAINING = [
    "--model_preset", "tiny", "--max_train_samples", "32", "--per_device_train_batch_size", "8",
    "--max_train_steps", "2", "--checkpointing_steps", "1", "--logging_steps", "1", "--dataloader_num_workers", "0",
    "--report_to", "tensorboard", "--with_tracking", "--hub_token", TOKEN,
]  # fmt: skip
TRAINER = [
    "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
    "--eval_strategy", "no", "--report_to", "tensorboard", "--use_cpu", "--dataloader_pin_memory", "false",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--warmup_steps", "0",
    "--hub_token", TOKEN, "--token", TOKEN,
]  # fmt: skip


def tiny_backbone(folder: Path, tiny_mimco_config) -> Path:
    torch.manual_seed(0)
    MimCoModel(tiny_mimco_config(num_hidden_layers=4)).save_pretrained(folder)
    save_image_processor(folder, 32, [0.5] * 3, [0.5] * 3)
    return folder


def command_arguments(program: str, tmp_path: Path, output_dir: Path, tiny_mimco_config) -> list[str]:
    if program == "run_contrastive_pretraining":
        return [*PRETRAINING, "--projector_hidden_size", "64", "--projection_size", "16", "--output_dir", output_dir]
    if program == "run_pretraining":
        teacher = tiny_backbone(tmp_path / "teacher", tiny_mimco_config)
        teacher_args = ["--teacher_name_or_path", teacher]
        return [*PRETRAINING, "--head_hidden_size", "32", *teacher_args, "--output_dir", output_dir]
    checkpoint = tiny_backbone(tmp_path / "pretrained", tiny_mimco_config)
    common = ["--model_name_or_path", checkpoint, "--output_dir", output_dir, *TRAINER]
    if program == "run_finetuning":
        return [*common, "--dataset_name", "digits", "--max_train_samples", "32", "--max_eval_samples", "16"]
    assert program == "run_semantic_segmentation"
    return [
        *common, "--synthetic_canvas_size", "32", "--synthetic_train_images", "16", "--synthetic_eval_images", "8",
        "--crop_size", "32", "--decoder_hidden_size", "16",
    ]  # fmt: skip


def files_holding(folder: Path, secret: bytes) -> list[str]:
    """The files under `folder` whose bytes (or, for a zip such as torch's pickles, a member's bytes) hold `secret`."""
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        contents = [path.read_bytes()]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                contents += [archive.read(member) for member in archive.namelist()]
        if any(secret in content for content in contents):
            found.append(str(path.relative_to(folder)))
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    "program, written",
    [
        ("run_contrastive_pretraining", ["logs", "checkpoints"]),
        ("run_pretraining", ["logs", "checkpoints"]),
        ("run_finetuning", ["training_args.bin", "checkpoint-1"]),
        ("run_semantic_segmentation", ["training_args.bin", "checkpoint-1"]),
    ],
)
def test_a_token_on_the_command_line_is_written_nowhere(program, written, tmp_path, tiny_mimco_config):
    output_dir = tmp_path / "output"
    arguments = [str(argument) for argument in command_arguments(program, tmp_path, output_dir, tiny_mimco_config)]
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="info")
    process = subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{program}.py"), *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    # the run wrote what could hold the token: tracker files, checkpoints, the Trainer's pickled arguments
    present = {path.name for path in output_dir.iterdir()}
    assert set(written) <= present, sorted(present)
    assert list(output_dir.rglob("events.out.tfevents*")), "TensorBoard wrote no events file"
    assert files_holding(tmp_path, TOKEN.encode()) == []
    assert TOKEN not in process.stdout + process.stderr


# --- the helper ------------------------------------------------------------------------------------------------------


def test_mask_secrets_hides_token_values_also_inside_other_strings():
    values = {
        "hub_token": TOKEN,
        "token": TOKEN,
        "use_mask_token": True,  # not a secret: no string
        "push_to_hub_token": None,
        "output_dir": "out",
        "nested": {"access_token": TOKEN, "steps": [1, f"--hub_token {TOKEN}"]},
        "described": f"Args(hub_token={TOKEN!r})",
    }
    masked = mask_secrets(values)
    assert TOKEN not in repr(masked)
    assert masked["hub_token"] == "<HUB_TOKEN>" and masked["token"] == "<TOKEN>"
    assert masked["use_mask_token"] is True and masked["push_to_hub_token"] is None
    assert masked["output_dir"] == "out" and masked["nested"]["steps"][0] == 1
    assert values["hub_token"] == TOKEN  # a copy: the caller's values keep the token
    assert is_secret_name("hub_token") and is_secret_name("token") and not is_secret_name("num_register_tokens")


def test_without_secrets_is_a_copy_without_the_token():
    @dataclass
    class Arguments:
        output_dir: str
        hub_token: str | None = None

    arguments = Arguments("out", hub_token=TOKEN)
    cleaned = without_secrets(arguments)
    assert cleaned.hub_token is None and cleaned.output_dir == "out"
    assert arguments.hub_token == TOKEN  # still there for the upload at the end


def test_the_trainer_gets_no_token_and_the_upload_at_the_end_gets_it(tmp_path, monkeypatch):
    import pickle

    from transformers import TrainingArguments

    from modeling_mimco.evaluation import finetuning
    from modeling_mimco.hub import upload

    training_args = TrainingArguments(
        output_dir=str(tmp_path), hub_token=TOKEN, push_to_hub=True, hub_model_id="me/model", do_train=True
    )
    trainer_args = finetuning.trainer_arguments(training_args)
    assert trainer_args.hub_token is None and trainer_args.push_to_hub is False
    assert TOKEN.encode() not in pickle.dumps(trainer_args)  # what `training_args.bin` holds
    assert training_args.hub_token == TOKEN and training_args.push_to_hub

    uploads = []
    monkeypatch.setattr(upload, "push_to_hub", lambda folder, repo_id, **kwargs: uploads.append(kwargs["token"]))

    class MainProcessTrainer:
        def is_world_process_zero(self):
            return True

    finetuning.push_trainer_output(MainProcessTrainer(), training_args, "digits", "validation", "Upload")
    assert uploads == [TOKEN]
