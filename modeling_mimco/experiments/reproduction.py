"""`make reproduce`: MimCo's claim at small scale — the comparison table on CIFAR-10, one command, on CPUs.

This module runs the rows, seed by seed (`main`, `cli`; `python -m modeling_mimco.experiments.reproduction`). What a
run does, its rows, columns and flags are in `reproduction_arguments` (its docstring is the `--help` text). The other
parts live beside it:

- `reproduction_arguments`: the rows, the shared model shape and the command line;
- `reproduction_budget`: the step plan that fits the time budget;
- `reproduction_pretraining`: each row's pre-training;
- `reproduction_evaluation`: the frozen-feature scores and the fine-tune of one row;
- `reproduction_results`: the results file, its settings and the step plan a run continues;
- `reproduction_report`: the tables, the seed statistics, the t-SNE figure and the model card.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone

from modeling_mimco.experiments.reproduction_arguments import (
    ROW_KINDS,
    RUN_ORDER,
    UNTRAINED_KINDS,
    given_teacher,
    log,
    parse_args,
    row_name,
    set_threads,
)
from modeling_mimco.experiments.reproduction_budget import row_steps
from modeling_mimco.experiments.reproduction_evaluation import (
    finetune_top1,
    frozen_feature_scores,
    load_evaluation_splits,
)
from modeling_mimco.experiments.reproduction_pretraining import (
    count_pretraining_images,
    final_losses,
    pretrain_row,
    pretraining_throughput,
    row_directory,
    teacher_directory,
)
from modeling_mimco.experiments.reproduction_report import (
    markdown_table,
    percent,
    write_model_card,
    write_seed_summary,
    write_tsne,
)
from modeling_mimco.experiments.reproduction_results import (
    TEACHER_SETTINGS,
    check_pretraining_settings,
    start_results,
    write_json,
)


def run_row(args, key: str, state: dict, splits: list, results_path: str, start: float) -> bool:
    """Pre-trains and evaluates one row and writes it to the results; `False` when the results already hold it."""
    _, kind, overrides = ROW_KINDS[key]
    name = row_name(args, key)
    if key in state["rows"]:
        log(f"{name}: already in {results_path}, skipped.")
        return False
    shared = getattr(args, "shared_rows", {}).get(key)
    if shared is not None:
        # the teacher of `--seeds` is one model: trained and evaluated with the first seed, its results reused
        state["rows"][key] = shared
        write_json(results_path, state)
        log(f"{name}: shared by every seed, results of seed {shared['trained_with_seed']} reused.")
        return True
    steps = row_steps(state["settings"], key)
    row_dir = row_directory(args, key)
    log(f"{name}: pre-training ({kind}) ...")
    pretraining_seconds, resumed = pretrain_row(args, key, steps)
    log(f"{name}: frozen-feature evaluation ...")
    eval_start = time.perf_counter()
    checkpoint = "pixels" if kind == "pixels" else row_dir
    row = {"name": name, "kind": kind, "checkpoint": checkpoint, "overrides": overrides}
    row.update(frozen_feature_scores(args, splits, checkpoint, key, os.path.join(args.output_dir, "features")))
    row["finetune_top1"] = None
    if kind != "pixels" and args.finetune_epochs > 0:
        log(f"{name}: fine-tuning ...")
        row["finetune_top1"] = finetune_top1(args, row_dir, os.path.join(args.output_dir, "finetune", key))
        set_threads(args)
    trained = kind not in UNTRAINED_KINDS and not (key == "teacher" and given_teacher(args))
    row["trained_with_seed"] = args.seed
    row.update(
        pretraining_steps=steps if trained else 0,
        pretraining_epochs=round(steps * args.batch_size / state["num_pretraining_images"], 2) if trained else 0,
        pretraining_seconds=pretraining_seconds,
        pretraining_images_per_second=pretraining_throughput(row_dir) if trained else None,
        pretraining_resumed=resumed,
        final_losses=final_losses(row_dir) if trained else {},
        evaluation_seconds=time.perf_counter() - eval_start,
    )
    state["rows"][key] = row
    write_json(results_path, state)
    log(
        f"{name}: linear probe CLS {percent(row['linear_probe_top1_cls'])}% / mean "
        f"{percent(row['linear_probe_top1_mean'])}%, kNN CLS {percent(row['knn_top1_cls'])}%, fine-tune "
        f"{percent(row['finetune_top1'])}%; elapsed {(time.perf_counter() - start) / 60:.1f} min"
    )
    return True


def finish(args, state: dict, data, results_path: str, start: float, started: str, ran: list[str]) -> None:
    """The table, the t-SNE figure, the model card and this invocation's record, written and printed."""
    table = markdown_table(state)
    state["table_markdown"] = table
    features_dir = os.path.join(args.output_dir, "features")
    state["tsne_file"] = write_tsne(args, state, data, features_dir, os.path.join(args.results_dir, "tsne.png"))
    state["model_card_file"] = write_model_card(args, state, os.path.join(args.output_dir, "mimco"), args.results_dir)
    minutes = round((time.perf_counter() - start) / 60.0, 2)
    # one record per invocation, so that a rerun that only skips rows does not hide how long the real run took
    state.setdefault("invocations", []).append(
        {"started": started, "finished": datetime.now(timezone.utc).isoformat(), "minutes": minutes, "rows_run": ran}
    )
    write_json(results_path, state)
    print()
    print(table)
    print()
    log(f"Results: {results_path}; t-SNE: {state['tsne_file']}; model card: {state['model_card_file']}")
    log(f"This invocation took {minutes:.1f} min.")


def run_one_seed(args) -> dict:
    """Every wanted row for `args.seed` into `args.output_dir` / `args.results_dir`; returns the results state."""
    start, started = time.perf_counter(), datetime.now(timezone.utc).isoformat()
    results_path = os.path.join(args.results_dir, "reproduce_results.json")
    state, plan = start_results(args, results_path)
    steps = plan["pretrain_steps"]
    state["num_pretraining_images"] = count_pretraining_images(args)
    epochs = steps * args.batch_size / state["num_pretraining_images"]
    log(
        f"Plan: {steps} pre-training steps per row ({epochs:.2f} epochs of {state['num_pretraining_images']} images), "
        f"batch {args.batch_size}, seed {args.seed}, dataset {args.dataset_name}; {plan}"
    )

    check_pretraining_settings(args.output_dir, state["settings"])
    if (
        state["settings"]["shared_teacher"]
        and not given_teacher(args)
        and "teacher" not in getattr(args, "shared_rows", {})
    ):
        # this seed trains the teacher that the others share: beside the seeds' folders, with its own record
        root = os.path.dirname(teacher_directory(args))
        check_pretraining_settings(root, state["settings"], TEACHER_SETTINGS, "teacher_settings")
    splits = load_evaluation_splits(args)
    wanted = [key for key in RUN_ORDER if args.rows is None or key in args.rows]
    ran = [key for key in wanted if run_row(args, key, state, splits, results_path, start)]
    finish(args, state, splits[0], results_path, start, started, ran)
    state["results_file"] = results_path
    return state


def run_seeds(args) -> dict:
    """`--seeds`: one full run per pre-training seed (same step plan, same evaluation subsets) in `seed-<S>` folders,
    with one teacher for all of them (stage 1 is most of the cost; trained and evaluated with the first seed), then
    the mean ± std table over the seeds and the comparisons of MimCo with the other rows against the seed spread,
    written to `RESULTS_DIR/seed_summary.json` and `.md`, and drawn with error bars in `seed_summary.png`."""
    states: dict[int, dict] = {}
    plan, shared_rows = None, {}
    for seed in args.seeds:
        seed_args = argparse.Namespace(**vars(args))
        seed_args.seed, seed_args.plan, seed_args.shared_rows = seed, plan, dict(shared_rows)
        seed_args.teacher_dir = os.path.join(args.output_dir, "teacher")
        seed_args.output_dir = os.path.join(args.output_dir, f"seed-{seed}")
        seed_args.results_dir = os.path.join(args.results_dir, f"seed-{seed}")
        log(f"=== pre-training seed {seed} ({len(states) + 1} of {len(args.seeds)}) ===")
        states[seed] = run_one_seed(seed_args)
        # the later seeds train the step counts the first one planned, so the seeds are comparable
        plan = states[seed]["plan"]
        if "teacher" in states[seed]["rows"]:
            shared_rows.setdefault("teacher", states[seed]["rows"]["teacher"])
    settings = {k: v for k, v in states[args.seeds[0]]["settings"].items() if k != "seed"}
    summary = write_seed_summary(states, settings, args.results_dir, "seed_summary")
    print()
    print(summary["table_markdown"])
    print()
    log(f"Seed summary: {os.path.join(args.results_dir, 'seed_summary.json')}")
    return summary


def main(argv: list[str] | None = None, local_dataset: str | None = None) -> dict:
    """Runs the reproduction that the command line `argv` asks for and returns its results (or the seed summary)."""
    args = parse_args(argv, local_dataset)
    set_threads(args)
    from modeling_mimco.training.host_memory import keep_freed_memory

    keep_freed_memory()  # fewer page faults per CPU training step (modeling_mimco/training/host_memory.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_seeds(args) if args.seeds else run_one_seed(args)


def cli(local_dataset: str | None = None) -> int:
    """The process's command line run as `main`, an expected error as one `error:` line; the exit code."""
    from modeling_mimco.commands import reports_errors, run_command

    return run_command(reports_errors(lambda argv: main(argv, local_dataset)))


if __name__ == "__main__":  # `python -m modeling_mimco.experiments.reproduction`, as the GPU check runs it
    sys.exit(cli())
