"""The GPU check's `reproduce` part: a short run of the reproduction (`modeling_mimco.experiments.reproduction`,
what `scripts/reproduce.py` runs) on CIFAR-10 in a subprocess, stopped at the part's time budget; the rows that
finished are reported with the reproduction's own table (it writes its results file after each row). Skipped when the
data is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from modeling_mimco.benchmarks.gpu_check.arguments import GpuCheckArguments
from modeling_mimco.benchmarks.gpu_check.checks import Budget, Checks, PartSkipped
from modeling_mimco.experiments.reproduction import markdown_table


REPRODUCTION_MODULE = "modeling_mimco.experiments.reproduction"

DEVICES = (
    "pre-training: Accelerate's default device (the GPU when there is one); probe and fine-tune: CPU "
    "(reproduce.py evaluates on the CPU)"
)


def check_reproduce(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    """A short reproduction run in a subprocess, stopped at the part's budget; rows that finished are reported
    (the reproduction writes its results file after each row)."""
    if not os.path.isdir(args.dataset_dir):
        raise PartSkipped(f"skipped: CIFAR-10 not found at {args.dataset_dir} (pass --dataset_dir)")
    folder = os.path.abspath(os.path.join(args.output_dir, "reproduce"))
    results_dir = os.path.join(folder, "results")
    command = [sys.executable, "-m", REPRODUCTION_MODULE, *reproduce_flags(args, folder, results_dir)]
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
    result.update(finished_rows(os.path.join(results_dir, "reproduce_results.json")))
    finished = sorted(result["rows"])
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
    result["checks"] = checks.items
    return result


def reproduce_flags(args: GpuCheckArguments, folder: str, results_dir: str) -> list[str]:
    """The reproduction's flags: one row in the smoke run, the main comparison otherwise."""
    flags = ["--dataset_name", os.path.abspath(args.dataset_dir), "--output_dir", folder, "--results_dir", results_dir]
    flags += ["--seed", str(args.seed)]
    if args.smoke:
        # one row is enough to exercise this part (tests/test_reproduce.py runs the script's smoke mode in full)
        return flags + ["--smoke", "--rows", "teacher", "--num_threads", "1"]
    # the main comparison; pre-training runs on the GPU (Accelerate picks it), evaluation on the CPU
    threads = max((os.cpu_count() or 2) // 2, 1)
    flags += ["--rows", "teacher", "mimco", "pixel_mim", "random_init", "--budget_minutes", "4"]
    flags += ["--pretrain_steps", str(args.reproduce_steps), "--batch_size", "256"]
    flags += ["--probe_train_samples", "5000", "--eval_samples", "2000", "--probe_epochs", "30"]
    flags += ["--finetune_samples", "5000", "--finetune_epochs", "1", "--tsne_points", "500"]
    return flags + ["--num_threads", str(threads), "--num_workers", str(min(4, args.num_workers))]


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


def finished_rows(results_path: str) -> dict:
    """What the results file says: the rows that finished, their figures and the reproduction's own table."""
    state = None
    if os.path.isfile(results_path):
        with open(results_path) as handle:
            state = json.load(handle)
    rows = (state or {}).get("rows", {})
    return {
        "rows_finished": sorted(rows),
        "pretrain_steps": (state or {}).get("settings", {}).get("pretrain_steps"),
        "table_markdown": markdown_table(state) if rows else None,
        "rows": {
            key: {name: row.get(name) for name in ("linear_probe_top1_cls", "knn_top1_cls", "finetune_top1")}
            | {"pretraining_seconds": row.get("pretraining_seconds")}
            for key, row in rows.items()
        },
    }


__all__ = ["check_reproduce"]
