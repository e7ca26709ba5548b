"""Bad inputs fed to the real scripts (`scripts/*.py` in subprocesses): each must end in one clear `error:` line
naming the file, row or argument (exit code 1), or in a warning that names and counts what was skipped while the run
goes on (exit code 0); never in a traceback, never silently.

The eight runs are independent (about 8 CPU-seconds each, mostly imports), so the module starts them together
(`runs`) and each test checks one of them: on two idle cores the file takes well under a minute.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers.scripts import finish_all
from test_training import (
    _encoded,
    _noise_pixels,
    _script_command,
    _subprocess_env,
    stage1_args,
    stage2_args,
    write_image_folder,
)

from modeling_mimco import MimCoConfig, MimCoModel
from modeling_mimco.configuration_mimco import preset_backbone_kwargs


pytestmark = pytest.mark.slow

ERROR_LINE = re.compile(r"^\S+: error: ", re.MULTILINE)
BAD_ROW = 3  # of the second parquet file
PROBE_DATA_ARGS = ["--max_train_samples", "40", "--max_eval_samples", "20", "--probe_epochs", "2"]
FINETUNE_ARGS = ["--max_train_samples", "16", "--max_eval_samples", "8", "--report_to", "none", "--use_cpu"]


def _pathless_parquet(path: Path, num_rows: int, bad_row: int | None = None) -> Path:
    """Image records with bytes and no path (as exported datasets often have); `bad_row` holds junk bytes."""
    from PIL import Image

    records = [
        {"bytes": b"junk" if i == bad_row else _encoded(Image.fromarray(_noise_pixels(i)), "PNG"), "path": None}
        for i in range(num_rows)
    ]
    pq.write_table(pa.table({"image": records}), path, row_group_size=4)
    return path


def _tiny_backbone(path: Path) -> Path:
    torch.manual_seed(0)
    MimCoModel(MimCoConfig(**preset_backbone_kwargs("tiny"))).save_pretrained(path)
    return path


def _link_folder(root: Path) -> tuple[Path, list[str]]:
    """16 good images in two classes plus the links imagefolder drops; returns the folder and the links' names."""
    write_image_folder(root / "images", 16)
    write_image_folder(root / "elsewhere", 2, seed=50)
    images = root / "images"
    os.symlink(root / "missing.png", images / "cat" / "dangling.png")
    os.symlink("loop_b.png", images / "dog" / "loop_a.png")
    os.symlink("loop_a.png", images / "dog" / "loop_b.png")
    os.symlink(root / "elsewhere" / "cat", images / "linked_cats")
    return images, ["cat/dangling.png", "dog/loop_a.png", "dog/loop_b.png", "linked_cats"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    links, link_names = _link_folder(root)
    damaged = _tiny_backbone(root / "damaged_model")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    good_parquet = _pathless_parquet(root / "a.parquet", 10)
    whole = good_parquet.read_bytes()
    (root / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    return {
        "root": root,
        "links": links,
        "link_names": link_names,
        "teacher": _tiny_backbone(root / "teacher"),
        "damaged_model": damaged,
        "missing_model": root / "no_such_model",
        "good_parquet": good_parquet,
        "bad_row_parquet": _pathless_parquet(root / "b.parquet", 10, bad_row=BAD_ROW),
        "truncated_parquet": root / "truncated.parquet",
    }


def _cases(inputs: dict, root: Path) -> dict[str, tuple[str, list[str]]]:
    def out(name: str) -> list[str]:
        return ["--output_dir", str(root / name)]

    def cache(name: str) -> list[str]:
        return ["--cache_dir", str(root / f"cache_{name}")]

    # two batches of 10: one epoch over the 20 rows, so the bad row is drawn whatever the order
    bad_row_args = stage2_args(
        inputs["teacher"],
        root / "bad_row_stage2",
        "--data_files",
        str(inputs["good_parquet"]),
        str(inputs["bad_row_parquet"]),
        "--max_skipped_fraction",
        "0.5",
        *cache("bad_row_stage2"),
        steps=2,
    )
    bad_row_args[bad_row_args.index("--per_device_train_batch_size") + 1] = "10"
    probe = ["--model_name_or_path"]
    return {
        "links_stage1": (
            "run_contrastive_pretraining",
            stage1_args(root / "links_stage1", "--train_dir", str(inputs["links"]), *cache("links_stage1"), steps=2),
        ),
        "links_probe": (
            "run_linear_probe",
            [*probe, "random-init", "--train_dir", str(inputs["links"]), "--train_val_split", "0.25"]
            + ["--probe_epochs", "2", "--knn_k", "3", "--knn_temperature", "0.2"]
            + [*out("links_probe"), *cache("links_probe")],
        ),
        "bad_row_stage2": ("run_pretraining", bad_row_args),
        "truncated_parquet_stage1": (
            "run_contrastive_pretraining",
            stage1_args(
                root / "truncated_parquet_stage1",
                "--data_files",
                str(inputs["good_parquet"]),
                str(inputs["truncated_parquet"]),
                *cache("truncated_parquet_stage1"),
                steps=2,
            ),
        ),
        "probe_missing_model": (
            "run_linear_probe",
            [*probe, str(inputs["missing_model"]), *PROBE_DATA_ARGS, *out("probe_missing_model")],
        ),
        "probe_damaged_model": (
            "run_linear_probe",
            [*probe, str(inputs["damaged_model"]), *PROBE_DATA_ARGS, *out("probe_damaged_model")],
        ),
        "finetune_missing_model": (
            "run_finetuning",
            [*probe, str(inputs["missing_model"]), *FINETUNE_ARGS, *out("finetune_missing_model")],
        ),
        "finetune_damaged_model": (
            "run_finetuning",
            [*probe, str(inputs["damaged_model"]), *FINETUNE_ARGS, *out("finetune_damaged_model")],
        ),
    }


@pytest.fixture(scope="module")
def runs(inputs) -> dict[str, subprocess.CompletedProcess]:
    """Every case's script run, started together; `{case: CompletedProcess}`."""
    root = inputs["root"]
    processes = {
        name: subprocess.Popen(
            _script_command(script, args),
            env=_subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (script, args) in _cases(inputs, root).items()
    }
    return finish_all(processes)


def _assert_went_on(result: subprocess.CompletedProcess, name: str) -> str:
    """The run finished (exit 0) without a traceback or an error line; returns its stderr."""
    tail = result.stderr[-4000:]
    assert result.returncode == 0, f"{name}: exit code {result.returncode}\n{tail}"
    assert "Traceback" not in result.stderr, f"{name}: a traceback\n{tail}"
    assert not ERROR_LINE.search(result.stderr), f"{name}: an error line\n{tail}"
    return result.stderr


def _assert_one_error_line(result: subprocess.CompletedProcess, name: str, *fragments: str) -> str:
    """The run failed with exit code 1 and exactly one `PROGRAM: error: MESSAGE` line holding every fragment."""
    tail = result.stderr[-4000:]
    assert result.returncode == 1, f"{name}: exit code {result.returncode}\n{tail}"
    assert "Traceback" not in result.stderr, f"{name}: a traceback instead of a message\n{tail}"
    lines = [line for line in result.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, f"{name}: {len(lines)} error lines\n{tail}"
    for fragment in fragments:
        assert fragment in lines[0], f"{name}: {fragment!r} not in {lines[0]!r}"
    return lines[0]


# --- 6: links that datasets' imagefolder drops without a word ------------------------------------------------------


def test_links_in_a_train_dir_are_named_and_counted_and_training_goes_on(runs, inputs):
    stderr = _assert_went_on(runs["links_stage1"], "links_stage1")
    warnings = [line for line in stderr.splitlines() if "symbolic link(s) skipped" in line]
    assert len(warnings) == 1, stderr[-4000:]
    assert f"--train_dir {str(inputs['links'])!r}: 4 symbolic link(s) skipped" in warnings[0]
    for name in inputs["link_names"]:
        assert name in warnings[0], name
    assert "a dangling link" in warnings[0] and "a symbolic link loop" in warnings[0]
    assert "a link to a folder" in warnings[0]
    assert (inputs["root"] / "links_stage1" / "model.safetensors").is_file()


def test_links_in_a_probe_train_dir_are_reported_once(runs, inputs):
    stderr = _assert_went_on(runs["links_probe"], "links_probe")
    warnings = [line for line in stderr.splitlines() if "symbolic link(s) skipped" in line]
    assert len(warnings) == 1, stderr[-4000:]  # loading the train split and looking for an eval split: one warning
    for name in inputs["link_names"]:
        assert name in warnings[0], name


# --- 7: an unreadable parquet row without a file name ----------------------------------------------------------------


def test_unreadable_parquet_row_is_named_by_its_row_and_file(runs, inputs):
    stderr = _assert_went_on(runs["bad_row_stage2"], "bad_row_stage2")
    where = f"row {BAD_ROW} (0-based) of {str(inputs['bad_row_parquet'])!r}"
    assert f"Skipping an unreadable image: Unreadable image in {where} (no file name)" in stderr, stderr[-4000:]
    assert "1 of 20 images skipped as unreadable" in runs["bad_row_stage2"].stdout + stderr
    assert (inputs["root"] / "bad_row_stage2" / "model.safetensors").is_file()


# --- 8: a truncated parquet file, and checkpoints that do not load ---------------------------------------------------


def test_truncated_parquet_file_is_named(runs, inputs):
    _assert_one_error_line(
        runs["truncated_parquet_stage1"],
        "truncated_parquet_stage1",
        f"--data_files: {str(inputs['truncated_parquet'])!r} is not a readable parquet file",
    )
    assert not (inputs["root"] / "truncated_parquet_stage1" / "model.safetensors").exists()


@pytest.mark.parametrize("script", ["probe", "finetune"])
def test_missing_model_folder_says_it_was_tried_as_a_hub_id(runs, inputs, script):
    name = f"{script}_missing_model"
    _assert_one_error_line(
        runs[name],
        name,
        f"--model_name_or_path {str(inputs['missing_model'])!r}: no such file or folder here",
        "Hub repository id",
    )


@pytest.mark.parametrize("script", ["probe", "finetune"])
def test_truncated_weights_file_is_called_damaged(runs, inputs, script):
    name = f"{script}_damaged_model"
    _assert_one_error_line(
        runs[name],
        name,
        f"--model_name_or_path {str(inputs['damaged_model'])!r}: a weights file in it is damaged or truncated",
    )


# --- 9: the probe's table names the k-NN settings used ---------------------------------------------------------------


def test_probe_table_header_names_the_knn_settings_used(runs):
    _assert_went_on(runs["links_probe"], "links_probe")
    stdout = runs["links_probe"].stdout
    assert "| kNN top-1 (k=3, T=0.2) |" in stdout, stdout[-3000:]
    assert "k=20" not in stdout
