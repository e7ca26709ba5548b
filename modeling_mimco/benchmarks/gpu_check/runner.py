"""Running the GPU check: each selected part in order under its time budget (`run_part`), the report written after
each (`run_check`), and the command line (`main`, `cli`) that `scripts/gpu_check.py` and `make gpu-check` start.
Imports torch, transformers' `HfArgumentParser`, the package's `commands.reports_errors` and the parts.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone

import torch
from transformers import HfArgumentParser

from modeling_mimco.benchmarks.gpu_check.arguments import GpuCheckArguments
from modeling_mimco.benchmarks.gpu_check.checks import Budget, PartSkipped, free_memory
from modeling_mimco.benchmarks.gpu_check.correctness import check_correctness
from modeling_mimco.benchmarks.gpu_check.environment import check_environment
from modeling_mimco.benchmarks.gpu_check.loader import check_data
from modeling_mimco.benchmarks.gpu_check.report import write_report
from modeling_mimco.benchmarks.gpu_check.reproduction import check_reproduce
from modeling_mimco.benchmarks.gpu_check.throughput import check_throughput
from modeling_mimco.commands import reports_errors


REPORT_VERSION = 1

# each part takes the arguments, the context that earlier parts leave for later ones (the datasheet peak, the GEMM
# rates, the stage-2 step's images/s) and its budget, and returns its figures with a list of checks
PART_FUNCTIONS: dict[str, Callable[[GpuCheckArguments, dict, Budget], dict]] = {
    "environment": check_environment,
    "correctness": check_correctness,
    "throughput": check_throughput,
    "data": check_data,
    "reproduce": check_reproduce,
}


def run_part(name: str, args: GpuCheckArguments, context: dict, run_deadline: float) -> dict:
    """Runs one part under its budget; an exception becomes `status: failed` with the error, never a crash."""
    budget = Budget(getattr(args, f"budget_{name}"), run_deadline)
    start = time.perf_counter()
    entry: dict = {"budget_seconds": budget.seconds}
    if budget.expired():
        return entry | {"status": "skipped", "reason": "skipped: the run's --max_minutes were spent", "seconds": 0.0}
    try:
        result = PART_FUNCTIONS[name](args, context, budget)
        checks = result.get("checks", [])
        failed = any(check["status"] == "failed" for check in checks)
        entry["status"] = "failed" if failed else "ok"
        entry.update(result)
    except PartSkipped as skip:
        entry.update(status="skipped", reason=str(skip))
    except Exception as error:  # one broken part must not cost the others their report
        entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000])
        entry["traceback"] = traceback.format_exc(limit=12)[-6000:]
    finally:
        free_memory(args.device)
    entry["seconds"] = time.perf_counter() - start
    if entry["seconds"] > budget.seconds * 1.1 + 5:
        entry["over_budget_note"] = "ran past its budget (a compilation or a single step cannot be interrupted)"
    return entry


def run_check(args: GpuCheckArguments, command: str | None = None) -> dict:
    """Runs the selected parts in order and writes the report after each, so that a killed run leaves one.
    `command` is the command line recorded in the report."""
    started = time.perf_counter()
    # the margin covers the process's start (imports) and what cannot stop on time (a compilation, one step)
    run_deadline = started + 60.0 * args.max_minutes - (10.0 if args.smoke else 25.0)
    if args.smoke:
        torch.set_num_threads(1)  # the CI machine's few cores are shared with the loader workers
    report = {
        "version": REPORT_VERSION,
        "kit": "modeling_mimco.benchmarks.gpu_check",
        "command": command or "run_check(...)",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "device": args.device,
        "settings": asdict(args),
        "parts": {},
    }
    context: dict = {}
    for name in args.part_list():
        print(f"[gpu_check] {name} (budget {getattr(args, f'budget_{name}'):.0f} s) ...", flush=True)
        report["parts"][name] = run_part(name, args, context, run_deadline)
        part = report["parts"][name]
        print(f"[gpu_check] {name}: {part['status']} in {part['seconds']:.1f} s", flush=True)
        report["total_seconds"] = time.perf_counter() - started
        write_report(report, args.output_dir)
    report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["total_seconds"] = time.perf_counter() - started
    write_report(report, args.output_dir)
    return report


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    """Parses `GpuCheckArguments` from `argv`, runs the check and returns the report."""
    parser = HfArgumentParser(GpuCheckArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    argv = sys.argv[1:] if argv is None else argv
    report = run_check(args, " ".join(["scripts/gpu_check.py", *argv]))
    print(f"[gpu_check] report: {os.path.join(args.output_dir, 'report.md')} and report.json")
    return report


def cli(argv: list[str] | None = None) -> int:
    """Runs the check; the exit code is 1 when a part failed, so that CI and `make gpu-check` notice."""
    report = main(sys.argv[1:] if argv is None else argv)
    return 1 if any(part["status"] == "failed" for part in report["parts"].values()) else 0


__all__ = ["PART_FUNCTIONS", "cli", "main", "run_check", "run_part"]
