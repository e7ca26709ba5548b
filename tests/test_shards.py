"""WebDataset shards as a training source (`--data_files "shards/train-{000000..000007}.tar" --streaming`).

The shards are written here with `tarfile`: sample `NNNNNN` is a tiny JPEG and its `NNNNNN.cls`. Every sample's
name (`__key__`) survives the example transform and the collator as the batch's `"keys"`, so what a process and
its DataLoader workers read can be listed with `run_pretraining.training_stream_keys`, which builds the stream as
`mimco-pretrain` does. Checked: every image seen exactly once per epoch over 2 real processes x 2 workers; a run of
`mimco-pretrain` on shards with 2 processes; a run resumed mid-epoch continues with the images (and the losses) of
the uninterrupted run; the bad inputs (a missing shard, shards mixed with parquet, fewer shards than workers x
processes) fail in one line; `scripts/make_shards.py` and the shard commands of docs/pretraining.md run as printed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from helpers.scripts import load_script

from modeling_mimco.data.sources import DataArguments, load_image_dataset, load_training_images
from modeling_mimco.data.webdataset import ShardError, expand_braces


REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BIN = Path(sys.executable).parent
NUM_SHARDS, PER_SHARD = 8, 6
BATCH = 4
# 2 processes x 2 workers: each worker reads 2 shards of 6 images, 3 batches of 4; 6 batches per process and epoch
BATCHES_PER_PROCESS = NUM_SHARDS * PER_SHARD // (2 * BATCH)
MODEL = ["--model_preset", "tiny", "--head_hidden_size", "32", "--report_to", "none", "--logging_steps", "1"]


def _jpeg(value: int, size: int = 32) -> bytes:
    """A JPEG whose pixels encode `value` (decoded back to within a few levels)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((size, size, 3), value % 256, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_test_shards(folder: Path, num_shards: int = NUM_SHARDS, per_shard: int = PER_SHARD) -> list[str]:
    """`folder/train-000000.tar`, ...: sample `NNNNNN` (numbered across shards) is `.jpg` + `.cls`. Returns the
    keys in shard order."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(num_shards):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as tar:
            for position in range(per_shard):
                index = shard * per_shard + position
                key = f"{index:06d}"
                _add(tar, f"{key}.jpg", _jpeg(index))
                _add(tar, f"{key}.cls", str(index % 3).encode())
                keys.append(key)
    return keys


def pattern(folder: Path, num_shards: int = NUM_SHARDS) -> str:
    return str(folder / f"train-{{000000..{num_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("shards")
    return folder, write_test_shards(folder)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny DINO-like ViT teacher at 32 px."""
    from conftest import make_tiny_vit_teacher_config
    from transformers import ViTModel

    folder = tmp_path_factory.mktemp("teacher")
    ViTModel(make_tiny_vit_teacher_config(), add_pooling_layer=False).save_pretrained(folder)
    return folder


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TQDM_DISABLE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        ACCELERATE_USE_CPU="1",
    )
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two(program: str | Path, args: list[str], env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 PROGRAM ARGS` over gloo on the CPU."""
    launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launcher += ["--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    command = [str(BIN / "accelerate"), "launch", *launcher, str(program), *args]
    completed = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return completed


def _stage2_arguments(teacher: Path, shard_pattern: str, **flags: str):
    """The argument dataclasses of `mimco-pretrain` for a streaming run on shards with 2 workers."""
    module = load_script("run_pretraining")
    argv = [*MODEL, "--teacher_name_or_path", str(teacher), "--output_dir", "unused", "--data_files", shard_pattern]
    argv += ["--streaming", "--dataloader_num_workers", "2", "--per_device_train_batch_size", str(BATCH)]
    argv += ["--max_train_steps", "100"]
    for flag, value in flags.items():
        argv += [f"--{flag}", value]
    from transformers import HfArgumentParser

    parser = HfArgumentParser((module.ModelArguments, module.DataArguments, module.MimCoPreTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


# --- the source --------------------------------------------------------------------------------------------------


def test_brace_ranges_and_lists_are_expanded():
    assert expand_braces("s/train-{000000..000002}.tar") == [f"s/train-{i:06d}.tar" for i in range(3)]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_load_with_image_and_label_columns_by_brace_range_or_glob(shards):
    folder, keys = shards
    for files in ([pattern(folder)], [str(folder / "*.tar")]):
        stream = load_image_dataset(data_files=files, streaming=True)
        assert stream.num_shards == NUM_SHARDS
        examples = list(stream)
        assert [example["__key__"] for example in examples] == keys
        assert {"image", "label"} <= set(examples[0])
        assert [example["label"] for example in examples] == [int(key) % 3 for key in keys]


def test_bad_shard_inputs_fail_in_one_line(shards, tmp_path):
    folder, _ = shards
    missing = str(folder / "train-000008.tar")
    with pytest.raises(ShardError, match=re.escape(f"shard {missing!r} does not exist")):
        load_image_dataset(data_files=[pattern(folder, NUM_SHARDS + 1)], streaming=True)
    with pytest.raises(ShardError, match="no shard matches"):
        load_image_dataset(data_files=[str(tmp_path / "nothing-*.tar")], streaming=True)
    with pytest.raises(ShardError, match="mixes WebDataset shards .* with other files .*parquet"):
        load_image_dataset(data_files=[pattern(folder), str(tmp_path / "a.parquet")], streaming=True)
    # 8 shards for 2 processes x 8 workers: 8 workers would get no shard
    arguments = DataArguments(data_files=[pattern(folder)], streaming=True)
    with pytest.raises(ShardError, match=r"8 shard\(s\) for 2 process\(es\) x 8 DataLoader worker\(s\).*8 of them"):
        load_training_images(arguments, 32, process_index=0, num_processes=2, num_workers=8)
    assert issubclass(ShardError, ValueError)  # an expected error: the commands print it as one line


def test_too_few_shards_is_one_error_line_of_the_command(shards, teacher, tmp_path, capsys):
    folder, _ = shards
    module = load_script("run_pretraining")
    argv = [*MODEL, "--teacher_name_or_path", str(teacher), "--output_dir", str(tmp_path / "out")]
    argv += ["--data_files", pattern(folder), "--streaming", "--dataloader_num_workers", "9", "--max_train_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    message = str(exit_info.value)
    assert message.count("\n") == 0 and "error: --data_files has 8 shard(s) for 1 process(es) x 9" in message


# --- processes, workers, resume ------------------------------------------------------------------------------------

KEYS_SCRIPT = """
import json, sys
from transformers import HfArgumentParser
from modeling_mimco.commands import run_pretraining as m
parser = HfArgumentParser((m.ModelArguments, m.DataArguments, m.MimCoPreTrainingArguments))
args = parser.parse_args_into_dataclasses(args=sys.argv[2:])
from accelerate import PartialState
state = PartialState(cpu=True)
epochs = [list(m.training_stream_keys(*args, epoch=epoch)) for epoch in (0, 1)]
with open(f"{sys.argv[1]}/keys-{state.process_index}.json", "w") as file:
    json.dump({"num_processes": state.num_processes, "epochs": epochs}, file)
"""


@pytest.mark.slow
def test_every_image_is_seen_once_per_epoch_over_two_processes_and_two_workers(shards, teacher, tmp_path):
    folder, keys = shards
    script = tmp_path / "stream_keys.py"
    script.write_text(KEYS_SCRIPT)
    argv = [*MODEL, "--teacher_name_or_path", str(teacher), "--output_dir", str(tmp_path / "unused")]
    argv += ["--data_files", pattern(folder), "--streaming", "--dataloader_num_workers", "2"]
    argv += ["--per_device_train_batch_size", str(BATCH), "--max_train_steps", "100"]
    _launch_two(script, [str(tmp_path), *argv], _env(tmp_path))
    ranks = [json.loads((tmp_path / f"keys-{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["num_processes"] for rank in ranks] == [2, 2]
    for epoch in (0, 1):
        per_rank = [[key for batch in rank["epochs"][epoch] for key in batch] for rank in ranks]
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(keys) == NUM_SHARDS * PER_SHARD and sorted(seen) == keys  # once each, none missing
        shards_read = []
        for rank, rank_keys in enumerate(per_rank):
            assert [len(batch) for batch in ranks[rank]["epochs"][epoch]] == [BATCH] * BATCHES_PER_PROCESS
            # each process reads whole shards, half of them (its 2 workers: whole shards each, none twice)
            shards = {int(key) // PER_SHARD for key in rank_keys}
            assert len(shards) == NUM_SHARDS // 2 and len(rank_keys) == len(shards) * PER_SHARD
            shards_read.append(sorted(shards))
        if epoch == 0:  # split_dataset_by_node: shards r, r + 2, ... for process r
            assert shards_read == [list(range(rank, NUM_SHARDS, 2)) for rank in (0, 1)]
    # datasets shuffles the shard order from epoch 1 on (seeded by the epoch, so alike in every process and in a
    # resumed run): another mix of shards per process and worker, each image still once
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]


def _losses(folder: Path) -> dict[int, float]:
    history = json.loads((folder / "train_results.json").read_text())["log_history"]
    return {record["step"]: record["loss"] for record in history if "loss" in record}


@pytest.mark.slow
def test_mimco_pretrain_on_shards_with_two_processes_resumes_mid_epoch_with_the_same_images(shards, teacher, tmp_path):
    """The console command on 2 processes x 2 workers, uninterrupted (5 steps, checkpoints every 2), and resumed
    from its step-2 checkpoint: the resumed run trains on the batches the uninterrupted one trained on next (the
    keys of the loop's stream from the checkpoint's position), with the same augmentations and masks (the losses)."""
    folder, _ = shards
    env = _env(tmp_path)
    run = [*MODEL, "--teacher_name_or_path", str(teacher), "--data_files", pattern(folder), "--streaming"]
    run += ["--dataloader_num_workers", "2", "--per_device_train_batch_size", str(BATCH), "--max_train_steps", "5"]
    run += ["--checkpointing_steps", "2"]
    uninterrupted = tmp_path / "uninterrupted"
    _launch_two(BIN / "mimco-pretrain", [*run, "--output_dir", str(uninterrupted)], env)
    results = json.loads((uninterrupted / "train_results.json").read_text())
    assert results["global_step"] == 5 and results["num_processes"] == 2

    checkpoint = uninterrupted / "checkpoints" / "checkpoint-2"
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoints" / "checkpoint-2")
    _launch_two(
        BIN / "mimco-pretrain", [*run, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], env
    )

    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (saved["epoch"], saved["batches_done_in_epoch"]) == (0, 2)
    for rank in (0, 1):
        arguments = _stage2_arguments(teacher, pattern(folder))
        whole = list(load_script("run_pretraining").training_stream_keys(*arguments, rank, 2))
        continued = list(
            load_script("run_pretraining").training_stream_keys(
                *arguments, rank, 2, epoch=saved["epoch"], start_batch=saved["batches_done_in_epoch"]
            )
        )
        assert len(whole) == BATCHES_PER_PROCESS and continued == whole[2:]
    losses, resumed_losses = _losses(uninterrupted), _losses(resumed)
    assert sorted(resumed_losses) == sorted(losses) == [1, 2, 3, 4, 5]  # steps 1-2: the checkpoint's history
    for step in (3, 4, 5):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-6), (step, resumed_losses, losses)


# --- writing shards, the README ------------------------------------------------------------------------------------


def _class_tree(root: Path, num_classes: int, per_class: int) -> Path:
    for label in range(num_classes):
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            (folder / f"img_{index:04d}.JPEG").write_bytes(_jpeg(label * per_class + index))
    return root


def test_make_shards_writes_every_image_once_with_its_class(tmp_path, capsys):
    """`mimco-make-shards`' `main` (its script runs in the README test): every image once, in its class."""
    tree = _class_tree(tmp_path / "train", num_classes=3, per_class=5)
    output = tmp_path / "shards"
    module = load_script("make_shards")
    module.main(["--train_dir", str(tree), "--output_dir", str(output), "--num_shards", "4"])
    shard_pattern = str(output / "train-{000000..000003}.tar")
    assert f"--data_files '{shard_pattern}'" in capsys.readouterr().out
    assert (output / "classes.txt").read_text().split() == [f"n{label:08d}" for label in range(3)]
    examples = list(load_image_dataset(data_files=[shard_pattern], streaming=True))
    assert len(examples) == 15 and len({example["__key__"] for example in examples}) == 15
    for example in examples:  # the pixel value says which image it was, hence its class
        value = int(np.asarray(example["image"]).mean().round())
        assert example["label"] == value // 5, example["__key__"]
    with pytest.raises(SystemExit) as exit_info:  # a folder that is not there: one line
        module.main(["--train_dir", str(tmp_path / "no"), "--output_dir", str(output)])
    assert "\n" not in str(exit_info.value) and "error: --train_dir" in str(exit_info.value)


def test_make_shards_max_samples_writes_a_seeded_subset_and_opens_no_other_file(tmp_path, caplog):
    """`--max_samples N` writes N images drawn with `--seed` (the same N for the same seed), their classes those of
    the whole tree; the files left out are never opened (unreadable ones here would be warned about)."""
    tree = _class_tree(tmp_path / "train", num_classes=3, per_class=5)
    module = load_script("make_shards")

    def subset(output: Path, seed: str) -> list[tuple[int, int]]:
        module.main(["--train_dir", str(tree), "--output_dir", str(output), "--num_shards", "2"]
                    + ["--max_samples", "4", "--seed", seed])  # fmt: skip
        pattern = str(output / "train-{000000..000001}.tar")
        examples = list(load_image_dataset(data_files=[pattern], streaming=True))
        pixels = sorted((int(np.asarray(example["image"]).mean().round()), example["label"]) for example in examples)
        assert (output / "classes.txt").read_text().split() == [f"n{label:08d}" for label in range(3)]
        return pixels

    first = subset(tmp_path / "a", "0")
    assert len(first) == 4 and all(label == value // 5 for value, label in first)
    assert subset(tmp_path / "b", "0") == first
    # with every file left out of the subset unreadable, the subset is written without a warning about them
    kept = {value for value, _ in first}
    for label in range(3):
        for index in range(5):
            if label * 5 + index not in kept:
                (tree / f"n{label:08d}" / f"img_{index:04d}.JPEG").write_bytes(b"not an image")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert subset(tmp_path / "c", "0") == first
    assert not [record.getMessage() for record in caplog.records if "img_" in record.getMessage()]
    with caplog.at_level(logging.WARNING):  # the whole tree: the unreadable files are named
        module.main(["--train_dir", str(tree), "--output_dir", str(tmp_path / "d"), "--num_shards", "2"])
    assert [record.getMessage() for record in caplog.records if "img_" in record.getMessage()]


def _documented_shard_commands() -> list[list[str]]:
    text = (REPO / "docs" / "pretraining.md").read_text()
    block = re.search(r"```bash\n(# WebDataset shards.*?)```", text, re.DOTALL).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


@pytest.mark.slow
def test_documented_shard_commands_run_as_printed(teacher, tmp_path):
    """docs/pretraining.md's two commands, paths pointed at a tiny class tree and teacher: the console command
    `mimco-make-shards`, then the training one (`accelerate launch -m ...`) run by one process as `python -m` for 2
    steps of a tiny student (the flags appended last win)."""
    make, train = _documented_shard_commands()
    assert make[0] == "mimco-make-shards"
    assert train[:2] == ["accelerate", "launch"] and "--streaming" in train
    assert train[train.index("-m") + 1] == "modeling_mimco.commands.run_pretraining"
    assert "shards/train-{000000..000099}.tar" in train
    tree = _class_tree(tmp_path / "imagenet" / "train", num_classes=4, per_class=25)  # 100 images, 100 shards
    env = _env(tmp_path)
    env.pop("ACCELERATE_USE_CPU")

    def localise(argument: str) -> str:
        return argument.replace("/data/imagenet/train", str(tree))

    console_command = str(Path(sys.executable).parent / make[0])
    completed = subprocess.run(
        [console_command, *map(localise, make[1:])], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "shards/train-{000000..000099}.tar" in completed.stdout
    labels = [
        example["label"] for example in load_image_dataset(data_files=[str(tmp_path / "shards/*.tar")], streaming=True)
    ]
    assert sorted(labels) == sorted(label for label in range(4) for _ in range(25))
    program = [localise(argument) for argument in train[train.index("-m") :]]
    program = [str(teacher) if argument == "out/teacher" else argument for argument in program]
    program += ["--max_train_steps", "2", "--per_device_train_batch_size", "4", "--dataloader_num_workers", "2"]
    program += ["--model_preset", "tiny", "--head_hidden_size", "32"]  # the tiny teacher's 32-px images
    completed = subprocess.run(
        [sys.executable, *program, "--report_to", "none"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    output = tmp_path / program[program.index("--output_dir") + 1]
    assert json.loads((output / "train_results.json").read_text())["global_step"] == 2
