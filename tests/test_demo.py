"""`make demo` runs `scripts/demo.py`; here the same script with a few steps, as a user would start it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


REPO = Path(__file__).resolve().parents[1]


def run_demo(output_dir: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})}
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--output_dir", str(output_dir), *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_prints_the_table_with_the_pixel_baseline(tmp_path):
    # 5 probe epochs and 16-px images (mask blocks of 4 px: the default's 4 x 4 grid of blocks): the rows, their
    # order and the two runs' agreement are what this test reads, not the probe's convergence; each of the 5 rows
    # extracts the features of all 6,648 images, twice as fast at 16 px
    tiny = ("--stage1_steps", "3", "--stage2_steps", "3", "--batch_size", "16", "--probe_epochs", "5")
    tiny += ("--image_size", "16", "--mask_patch_size", "4")
    completed = run_demo(tmp_path / "demo", *tiny)
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
    # pixel MIM and the baseline rows ran in the second process, whose output went to its log
    log = (tmp_path / "demo" / "baselines.log").read_text()
    assert "pixel MIM (SimMIM): linear probe" in log and "raw pixels: linear probe" in log
    assert "pixel MIM (SimMIM): linear probe" not in completed.stdout

    # --sequential does the same work in one process, and gets the same weights and the same table
    sequential = run_demo(tmp_path / "sequential", *tiny, "--sequential")
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    assert "pixel MIM (SimMIM): linear probe" in sequential.stdout
    assert not (tmp_path / "sequential" / "baselines.log").exists()
    for model in ("pixel_mim", "student"):
        weights = [(tmp_path / run / model / "model.safetensors").read_bytes() for run in ("demo", "sequential")]
        assert weights[0] == weights[1], model
    results = [
        json.loads((tmp_path / run / "evaluation" / "linear_probe_results.json").read_text())["models"]
        for run in ("demo", "sequential")
    ]
    for row in results[0] + results[1]:
        del row["model_name_or_path"], row["source"]  # these name the run's folders
    assert results[0] == results[1]


@pytest.mark.slow
def test_demo_bad_data_is_one_line_and_stops_the_second_process(tmp_path):
    marker = f"demo-test-{os.getpid()}-{tmp_path.name}"  # every process of this run inherits it
    completed = run_demo(
        tmp_path / "demo", "--dataset_name", str(tmp_path / "no-such-folder"), env={"MIMCO_TEST_RUN": marker}
    )
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    error_lines = [line for line in completed.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "no-such-folder" in error_lines[0], completed.stderr[-3000:]
    # the second process (and any loader worker) was stopped with the first; multiprocessing's resource tracker may
    # take a moment to notice that the first has ended
    deadline = time.monotonic() + 15
    while processes_with_environment("MIMCO_TEST_RUN", marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with_environment("MIMCO_TEST_RUN", marker) == []


@pytest.mark.slow
def test_ctrl_c_stops_both_processes(tmp_path):
    """Ctrl-C while the teacher trains: the first process ends, and stops the second, which trains pixel MIM."""
    marker = f"demo-test-{os.getpid()}-{tmp_path.name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["MIMCO_TEST_RUN"] = marker
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--output_dir", str(tmp_path / "demo")]
    # as a terminal's Ctrl-C would: the test itself may run where SIGINT is ignored (a shell's background job), and
    # a child inherits that
    demo = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        log = tmp_path / "demo" / "baselines.log"
        deadline = time.monotonic() + 120
        while "Training" not in (log.read_text() if log.is_file() else "") and time.monotonic() < deadline:
            time.sleep(0.5)  # until pixel MIM trains in the second process
        assert len(processes_with_environment("MIMCO_TEST_RUN", marker)) >= 2
        demo.send_signal(signal.SIGINT)
        demo.communicate(timeout=60)
    finally:
        demo.kill()
    assert demo.returncode != 0
    deadline = time.monotonic() + 15
    while processes_with_environment("MIMCO_TEST_RUN", marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with_environment("MIMCO_TEST_RUN", marker) == []


def processes_with_environment(name: str, value: str) -> list[int]:
    """The ids of the processes whose environment sets `name` to `value`."""
    return [
        process.pid
        for process in psutil.process_iter(["environ"])
        if (process.info["environ"] or {}).get(name) == value  # None where it may not be read
    ]


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
    completed = run_demo(
        tmp_path / "demo",
        *(
            "--stage1_steps",
            "2",
            "--stage2_steps",
            "2",
            "--batch_size",
            "8",
            "--skip_pixel_mim",
            "--probe_epochs",
            "5",
        ),
        *("--image_size", "16", "--mask_patch_size", "4", "--mask_ratio", "0.3", "--dataset_name", "digits"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    teacher = json.loads((tmp_path / "demo" / "teacher" / "config.json").read_text())
    student = json.loads((tmp_path / "demo" / "student" / "config.json").read_text())
    assert teacher["image_size"] == student["image_size"] == 16
    assert student["mask_patch_size"] == 4 and student["mask_ratio"] == 0.3
    assert "| raw pixels | " in completed.stdout and "| 768 |" in completed.stdout  # 3 x 16 x 16 pixel features
    # the shipped teacher is for canvas-digits at 32 px: at 16 px the demo trains its own, and says why
    assert "so a teacher is trained here for 2 steps" in completed.stdout

    # a given teacher is the student's teacher and the table's, and is not trained again
    teacher_dir = tmp_path / "demo" / "teacher"
    teacher_bytes = (teacher_dir / "model.safetensors").read_bytes()
    given = run_demo(
        tmp_path / "given",
        *("--teacher_name_or_path", str(teacher_dir), "--stage2_steps", "2", "--batch_size", "8", "--skip_pixel_mim"),
        *("--probe_epochs", "5", "--image_size", "16", "--mask_patch_size", "4", "--dataset_name", "digits"),
    )
    assert given.returncode == 0, given.stderr[-3000:]
    assert f"the given teacher {teacher_dir} (not trained here)" in given.stdout
    assert "Stage 1 (MoCo v3 teacher)" not in given.stdout  # no stage-1 loss summary: nothing trained
    assert not (tmp_path / "given" / "teacher").exists()
    assert (teacher_dir / "model.safetensors").read_bytes() == teacher_bytes
    assert (tmp_path / "given" / "student" / "model.safetensors").is_file()
    teacher_rows = [
        [line for line in run.stdout.splitlines() if line.startswith("| teacher (MoCo v3, stage 1) |")][-1]
        for run in (completed, given)
    ]
    assert teacher_rows[0] == teacher_rows[1]  # the same teacher, the same probe


def test_demo_teacher_choice():
    """By default the shipped teacher of the demo's data; --train_teacher, another image size or another data set
    trains one; a given folder is used as it is."""
    from modeling_mimco.experiments import demo

    shipped = str(Path(__file__).resolve().parent.parent / demo.SHIPPED_TEACHER_RELATIVE)
    if not os.path.isfile(os.path.join(shipped, "config.json")):
        pytest.skip("no shipped demo teacher in this checkout")
    teacher, default_line = demo.choose_teacher(demo.parse_args([]))
    assert os.path.samefile(teacher, shipped)
    assert "the shipped teacher model_cards/teachers/canvas-digits" in default_line
    assert "--train_teacher trains one for 200 steps instead" in default_line
    assert demo.choose_teacher(demo.parse_args(["--train_teacher"]))[0] is None
    teacher, line = demo.choose_teacher(demo.parse_args(["--image_size", "16"]))
    assert teacher is None and "not canvas-digits at 16 px" in line
    assert demo.choose_teacher(demo.parse_args(["--dataset_name", "digits"]))[0] is None
    assert demo.choose_teacher(demo.parse_args(["--teacher_name_or_path", shipped]))[0] == shipped
    with open(os.path.join(shipped, "curve.json")) as handle:
        best = json.load(handle)["best"]
    assert f"({best['step']:,} stage-1 steps; its probe: {best['linear']:.1f} % linear" in default_line


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--teacher_name_or_path", "no-such-teacher"), "--teacher_name_or_path no-such-teacher: no config.json"),
        (("--train_teacher", "--teacher_name_or_path", "."), "--train_teacher and --teacher_name_or_path exclude"),
    ],
)
def test_demo_bad_teacher_flags_are_one_line(tmp_path, flags, message):
    completed = run_demo(tmp_path / "demo", *flags)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], completed.stderr
    assert not (tmp_path / "demo").exists()  # refused before anything was written
