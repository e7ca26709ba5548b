"""The GPU check's `reproduce` part: the reproduction of `make reproduce` (`modeling_mimco.experiments.reproduction`)
in its own design, at the scale the part's time budget affords on a GPU, on CIFAR-10 in a subprocess.

The design is `make reproduce`'s: 3 pre-training seeds whose students share one teacher, the rows raw pixels, random
init, teacher, pixel MIM, pixel MIM at MimCo's compute and MimCo, linear probe, kNN and fine-tune for every row, and
the comparisons of MimCo with each row against the seed spread. The step count comes from the reproduction's own
planner (`--budget_minutes`, steps timed on the GPU); pre-training, feature extraction and the fine-tune run on the GPU.
The run is stopped at the part's budget; what finished is reported (the reproduction writes its results after each row
and the seed summary at the end). `--smoke` runs the same flags with the reproduction's `--smoke` sizes and 2 seeds, so
the CPU rehearses this code path (`tests/test_gpu_check.py`). Skipped when the data is absent.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from modeling_mimco.benchmarks.gpu_check.arguments import GpuCheckArguments
from modeling_mimco.benchmarks.gpu_check.checks import Budget, Checks, PartSkipped
from modeling_mimco.experiments.reproduction_report import markdown_table


REPRODUCTION_MODULE = "modeling_mimco.experiments.reproduction"

DEVICES = (
    "pre-training: Accelerate's default device; feature extraction and fine-tune: `--eval_device auto` (the GPU when "
    "there is one); the probe's classifiers: CPU"
)
# `make reproduce`'s rows (the ablations are left to `--rows` runs of scripts/reproduce.py)
ROWS = ("pixels", "random_init", "teacher", "pixel_mim", "pixel_mim_matched", "mimco")
# What the step plan sets aside on a GPU machine: per row, for its features and a 1-epoch fine-tune of 5,000 images on
# the GPU with 8 loader workers, and once, for loading CIFAR-10 and the summary. Planning figures, not measurements (no
# GPU has run this part yet): the report shows what the rows took, and the part's budget stops the run regardless.
GPU_EVAL_SECONDS_PER_ROW = 8.0
GPU_FIXED_SECONDS = 25.0
# Seconds of the part's budget kept back for starting the subprocess and importing torch.
STARTUP_SECONDS = 15.0


def check_reproduce(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    """A short reproduction run in a subprocess, stopped at the part's budget; rows that finished are reported
    (the reproduction writes its results file after each row)."""
    if not os.path.isdir(args.dataset_dir):
        raise PartSkipped(f"skipped: CIFAR-10 not found at {args.dataset_dir} (pass --dataset_dir)")
    folder = os.path.abspath(os.path.join(args.output_dir, "reproduce"))
    results_dir = os.path.join(folder, "results")
    flags = reproduce_flags(args, folder, results_dir, budget.remaining())
    command = [sys.executable, "-m", REPRODUCTION_MODULE, *flags]
    # a fresh folder: reproduce.py would otherwise skip the rows a previous check finished (the folder is the kit's)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "reproduce.log")
    start = time.perf_counter()
    returncode, stopped_by_budget = _run_within_budget(command, log_path, budget)
    seconds = time.perf_counter() - start
    result: dict = {
        "command": " ".join(command),
        "returncode": returncode,
        "seconds": seconds,
        "stopped_by_budget": stopped_by_budget,
        "log": log_path,
        "devices": DEVICES,
    }
    result.update(finished_rows(results_dir))
    finished = result["rows_finished"]
    checks = Checks()
    if stopped_by_budget:
        result["reason"] = f"stopped by its time budget after {seconds:.0f} s; finished rows: {finished or 'none'}"
        checks.add("reproduce_rows", bool(finished), detail=result["reason"])
    else:
        with open(log_path) as handle:
            tail = handle.read()[-3000:]
        if returncode != 0:
            result["log_tail"] = tail
        checks.add("reproduce_rows", returncode == 0 and bool(finished), returncode=returncode)
        checks.add("reproduce_seed_summary", result["comparisons"] is not None, detail="MimCo against each row")
    result["checks"] = checks.items
    return result


def reproduce_flags(args: GpuCheckArguments, folder: str, results_dir: str, budget_seconds: float) -> list[str]:
    """The reproduction's flags: `make reproduce`'s design (seeds sharing a teacher, its rows, the fine-tune), sized
    by the reproduction's planner to `budget_seconds`; with `--smoke`, the same flags at the smoke sizes."""
    flags = ["--dataset_name", os.path.abspath(args.dataset_dir), "--output_dir", folder, "--results_dir", results_dir]
    seeds = [args.seed + offset for offset in range(2 if args.smoke else 3)]
    flags += ["--seeds", *map(str, seeds), "--rows", *ROWS]
    if args.smoke:
        return flags + ["--smoke", "--eval_repeats", "2", "--num_threads", "1"]
    minutes = max(budget_seconds - STARTUP_SECONDS, 60.0) / 60.0
    threads = max((os.cpu_count() or 2) // 2, 1)
    flags += ["--budget_minutes", f"{minutes:.2f}", "--eval_seconds_per_row", f"{GPU_EVAL_SECONDS_PER_ROW:g}"]
    flags += ["--fixed_seconds", f"{GPU_FIXED_SECONDS:g}", "--batch_size", "256", "--eval_device", "auto"]
    # the seeds give the spread the comparisons need; one evaluation seed keeps each row's evaluation short
    flags += [
        "--eval_repeats",
        "1",
        "--probe_train_samples",
        "10000",
        "--eval_samples",
        "5000",
        "--probe_epochs",
        "50",
    ]
    flags += ["--finetune_samples", "5000", "--finetune_epochs", "1", "--tsne_points", "500"]
    return flags + ["--num_threads", str(threads), "--num_workers", str(min(8, args.num_workers))]


def _run_within_budget(command: list[str], log_path: str, budget: Budget) -> tuple[int | None, bool]:
    """Runs `command` with its output in `log_path`, stopped when `budget` runs out: its return code, and whether
    the budget stopped it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log:
        # its own process group, so that the budget can stop the script and the loader workers it started
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        stopped_by_budget = False
        try:
            process.wait(timeout=max(budget.remaining(), 1.0))
        except subprocess.TimeoutExpired:
            stopped_by_budget = True
            _stop_group(process)
    return process.returncode, stopped_by_budget


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, then SIGKILL to what is left of it."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def finished_rows(results_dir: str) -> dict:
    """What the results say: the rows each seed finished (`seed-<S>/<row>`), their figures, and the seed summary's
    table and comparisons when the run got that far, else the first seed's own table."""
    rows, tables, steps = {}, [], None
    for path in sorted(glob.glob(os.path.join(results_dir, "seed-*", "reproduce_results.json"))):
        with open(path) as handle:
            state = json.load(handle)
        seed = os.path.basename(os.path.dirname(path))
        steps = steps or state.get("settings", {}).get("pretrain_steps")
        for key, row in state.get("rows", {}).items():
            figures = {name: row.get(name) for name in ("linear_probe_top1_cls", "knn_top1_cls", "finetune_top1")}
            rows[f"{seed}/{key}"] = figures | {"pretraining_seconds": row.get("pretraining_seconds")}
        if state.get("rows"):
            tables.append(f"{seed}:\n\n{markdown_table(state)}")
    summary = None
    summary_path = os.path.join(results_dir, "seed_summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as handle:
            summary = json.load(handle)
    return {
        "rows_finished": sorted(rows),
        "pretrain_steps": steps,
        "table_markdown": summary["table_markdown"] if summary else (tables[0] if tables else None),
        "comparisons": summary["comparisons"] if summary else None,
        "rows": rows,
    }


__all__ = ["check_reproduce"]
