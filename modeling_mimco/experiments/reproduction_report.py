"""The reproduction's report: the Markdown table of one run, the mean ± std over pre-training seeds and MimCo's
differences against the seed spread, the t-SNE figure and the MimCo student's model card.

    python -m modeling_mimco.experiments.reproduction_report OUT_DIR RESULTS_DIR [RESULTS_DIR ...]

merges the seed runs of several `--results_dir` folders (each `seed-<S>/reproduce_results.json`) into one seed
summary, `OUT_DIR/merged_summary.{json,md,png}`: each row from the first folder that has it, for the seeds every
folder has. Runs whose rows do not depend on each other (the baselines do not depend on the teacher) then share one
table without training anything again; runs evaluated under other settings are refused.
"""

from __future__ import annotations

import argparse
import json
import os

from modeling_mimco.experiments.reproduction_arguments import COMPARED_ROWS, HUB_CIFAR10, ROW_KINDS, ROWS, TSNE_ROWS
from modeling_mimco.experiments.reproduction_evaluation import spread
from modeling_mimco.experiments.reproduction_results import RESULTS_VERSION, write_json


# the settings under which two runs' rows are measured alike: data, shape, batch, student steps and evaluation
MERGE_SETTINGS = (
    "version",
    "dataset",
    "smoke",
    "model_preset",
    "batch_size",
    "base_learning_rate",
    "pretrain_steps",
    "eval_seed",
    "eval_repeats",
    "probe_train_samples",
    "eval_samples",
    "probe_epochs",
    "finetune_samples",
    "finetune_epochs",
    "finetune_learning_rate",
)


def percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def spread_text(row: dict, metric: str) -> str:
    """The standard deviation of a CLS score over the evaluation seeds, in points ("–" when not measured)."""
    measured = (row.get("evaluation_spread") or {}).get(metric)
    if not measured or len(measured["values"]) < 2:
        return "–"
    return f"±{100 * measured['std']:.1f}"


def pretraining_text(row: dict) -> str:
    """A row's pre-training cost: wall time, and images per second when the run logged it."""
    seconds = row.get("pretraining_seconds")
    if not seconds:
        return "–"
    rate = row.get("pretraining_images_per_second")
    return f"{seconds / 60:.1f} min" + ("" if rate is None else f", {rate:.0f} img/s")


def markdown_table(state: dict) -> str:
    """One run's table; the eval-seed column is the standard deviation of the CLS probe / kNN over the evaluation
    seeds (other probe-training and test subsets, other probe initialisation)."""
    lines = [
        "| row | linear probe (CLS) | linear probe (mean) | kNN (CLS) | kNN (mean) | eval-seed std (CLS probe / kNN) "
        "| fine-tune | pre-training |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = state.get("rows", {})
    for key, name, _, _ in ROWS:
        row = rows.get(key)
        if row is None:
            continue
        lines.append(
            f"| {row.get('name', name)} | {percent(row.get('linear_probe_top1_cls'))} | {percent(row.get('linear_probe_top1_mean'))} "
            f"| {percent(row.get('knn_top1_cls'))} | {percent(row.get('knn_top1_mean'))} "
            f"| {spread_text(row, 'linear_probe_top1_cls')} / {spread_text(row, 'knn_top1_cls')} "
            f"| {percent(row.get('finetune_top1'))} | {pretraining_text(row)} |"
        )
    return "\n".join(lines)


SEED_METRICS = ("linear_probe_top1_cls", "linear_probe_top1_mean", "knn_top1_cls", "knn_top1_mean", "finetune_top1")


def seed_summary(states: dict[int, dict]) -> dict:
    """Mean and standard deviation over pre-training seeds (`states`: seed -> one run's results) of every metric of
    every row that all seeds have, plus the pre-training wall time."""
    rows = {}
    for key, name, _, _ in ROWS:
        runs = [state["rows"][key] for state in states.values() if key in state.get("rows", {})]
        if len(runs) != len(states):
            continue
        summary = {"name": runs[0].get("name", name)}  # the name the run gave the row (a given teacher's, say)
        for metric in (*SEED_METRICS, "pretraining_seconds"):
            values = [run.get(metric) for run in runs]
            if all(value is not None for value in values):
                summary[metric] = spread(values)
        rows[key] = summary
    return {"seeds": sorted(states), "rows": rows}


def write_seed_summary(states: dict[int, dict], settings: dict, results_dir: str, stem: str) -> dict:
    """The seed summary of `states` with MimCo's comparisons against the seed spread, written to
    `results_dir/<stem>.json`, `.md` (the tables) and `.png` (bars with error bars); returned."""
    from modeling_mimco.experiments.figures import plot_seed_summary

    summary = seed_summary(states)
    summary["comparisons"] = compare_with_seed_spread(summary)
    summary["table_markdown"] = seed_summary_table(summary) + "\n\n" + comparison_table(summary["comparisons"])
    summary["settings"] = settings
    write_json(os.path.join(results_dir, f"{stem}.json"), summary)
    with open(os.path.join(results_dir, f"{stem}.md"), "w") as handle:
        handle.write(summary["table_markdown"] + "\n")
    plot_seed_summary(summary, os.path.join(results_dir, f"{stem}.png"))
    return summary


def merged_seed_states(results_dirs: list[str]) -> tuple[dict[int, dict], list[dict]]:
    """Per seed that every folder of `results_dirs` has, the rows of all of them (a row from the first folder that has
    it); and each folder's settings. Raises `ValueError` naming the folder and the settings when two runs were
    measured under other `MERGE_SETTINGS`, or when the folders share no seed."""
    per_folder = []
    for folder in results_dirs:
        runs = {}
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name, "reproduce_results.json")
            if name.startswith("seed-") and os.path.isfile(path):
                with open(path) as handle:
                    runs[int(name.removeprefix("seed-"))] = json.load(handle)
        if not runs:
            raise ValueError(f"{folder}: no seed-<S>/reproduce_results.json there.")
        per_folder.append(runs)
    seeds = sorted(set.intersection(*(set(runs) for runs in per_folder)))
    if not seeds:
        raise ValueError(f"{', '.join(results_dirs)}: no seed that every folder has.")
    reference = {key: per_folder[0][seeds[0]]["settings"].get(key) for key in MERGE_SETTINGS}
    states = {}
    for seed in seeds:
        rows = {}
        for folder, runs in zip(results_dirs, per_folder):
            settings = runs[seed]["settings"]
            changed = sorted(key for key in MERGE_SETTINGS if settings.get(key) != reference[key])
            if changed or settings.get("version") != RESULTS_VERSION:
                raise ValueError(
                    f"{folder}/seed-{seed}: measured under other settings than {results_dirs[0]} "
                    f"({', '.join(changed) or 'version'}); its rows cannot share a table."
                )
            for key, row in runs[seed]["rows"].items():
                rows.setdefault(key, row)
        states[seed] = {"rows": rows}
    return states, [runs[seeds[0]]["settings"] for runs in per_folder]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="Where merged_summary.{json,md,png} go.")
    parser.add_argument("results_dirs", nargs="+", help="`--results_dir` folders of reproduce.py, first first.")
    args = parser.parse_args(argv)
    try:
        states, settings = merged_seed_states(args.results_dirs)
    except ValueError as error:
        parser.error(str(error))
    merged = {"results_dirs": args.results_dirs, "settings": settings}
    summary = write_seed_summary(states, merged, args.output_dir, "merged_summary")
    print(summary["table_markdown"])
    return summary


def mean_std_text(measured: dict | None) -> str:
    if measured is None:
        return "–"
    return f"{100 * measured['mean']:.1f} ± {100 * measured['std']:.1f}"


def seed_summary_table(summary: dict) -> str:
    """Markdown: mean ± standard deviation (n - 1) over the pre-training seeds, in points."""
    lines = [
        f"| row (mean ± std over seeds {', '.join(map(str, summary['seeds']))}) | linear probe (CLS) "
        "| linear probe (mean) | kNN (CLS) | kNN (mean) | fine-tune | pre-training |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"].values():
        seconds = row.get("pretraining_seconds")
        time_text = "–" if seconds is None else f"{seconds['mean'] / 60:.1f} min"
        cells = " | ".join(mean_std_text(row.get(metric)) for metric in SEED_METRICS)
        lines.append(f"| {row['name']} | {cells} | {time_text} |")
    return "\n".join(lines)


def compare_with_seed_spread(summary: dict) -> list[dict]:
    """MimCo's mean against each row of `COMPARED_ROWS`, metric by metric: the difference of the means and whether
    it is larger than the two rows' seed standard deviations added (a conservative reading of a few seeds: a
    difference inside that spread could come from the seed alone)."""
    rows = summary["rows"]
    mimco = rows.get("mimco")
    comparisons = []
    if mimco is None:
        return comparisons
    for other in COMPARED_ROWS:
        for metric in SEED_METRICS:
            ours, theirs = mimco.get(metric), rows.get(other, {}).get(metric)
            if ours is None or theirs is None:
                continue
            difference, seed_spread = ours["mean"] - theirs["mean"], ours["std"] + theirs["std"]
            comparisons.append(
                {
                    "row": other,
                    "name": rows[other]["name"],
                    "metric": metric,
                    "difference": difference,
                    "seed_spread": seed_spread,
                    "larger_than_spread": abs(difference) > seed_spread,
                }
            )
    return comparisons


def comparison_table(comparisons: list[dict]) -> str:
    """Markdown: MimCo minus each other row, in points, against the two rows' seed standard deviations added."""
    lines = [
        "| MimCo student against | metric | difference (points) | seed spread (std + std) | larger than the spread? |",
        "|---|---|---:|---:|---|",
    ]
    for item in comparisons:
        lines.append(
            f"| {item.get('name', ROW_KINDS[item['row']][0])} | {item['metric']} | {100 * item['difference']:+.1f} "
            f"| {100 * item['seed_spread']:.1f} | {'yes' if item['larger_than_spread'] else 'no'} |"
        )
    return "\n".join(lines)


def write_tsne(args, state: dict, data, features_dir: str, path: str) -> str | None:
    import torch

    from modeling_mimco.evaluation.frozen_features import plot_tsne

    panels = []
    for key in TSNE_ROWS:
        row = state["rows"].get(key)
        feature_file = os.path.join(features_dir, f"{key}.pt")
        if row is None or not os.path.isfile(feature_file):
            continue
        saved = torch.load(feature_file, weights_only=True)
        title = f"{row.get('name', ROW_KINDS[key][0])}\nlinear (CLS) {percent(row['linear_probe_top1_cls'])}%"
        panels.append((title, saved["features"], saved["labels"]))
    if not panels:
        return None
    return plot_tsne(panels, path, class_names=data.class_names, max_points=args.tsne_points, seed=args.seed)


def card_results(args, state: dict, row: dict) -> dict:
    """The MimCo student's results in the schema of `modeling_mimco.hub.model_card` (percent)."""
    dataset_id = HUB_CIFAR10 if "cifar10" in args.dataset_name else args.dataset_name
    steps = state["settings"]["pretrain_steps"]
    return {
        "model_name": f"mimco-{args.model_preset}-cifar10-reproduction",
        "dataset": {"id": dataset_id, "name": "CIFAR-10" if "cifar10" in args.dataset_name else dataset_id},
        "results": {
            "linear_probe_top1": round(100 * row["linear_probe_top1_cls"], 2),
            "knn_top1": round(100 * row["knn_top1_cls"], 2),
            "finetune_top1": None if row.get("finetune_top1") is None else round(100 * row["finetune_top1"], 2),
        },
        "pretraining": {
            "teacher": (
                f"MoCo v3 {args.model_preset} ViT from {state['settings']['given_teacher']} (given, not trained here)"
                if state["settings"].get("given_teacher")
                else f"MoCo v3 {args.model_preset} ViT trained by stage 1 of this run ({steps} steps)"
            ),
            "dataset": dataset_id,
            "steps": steps,
            "batch size": args.batch_size,
            "evaluation": (
                f"test subset of {row['num_test_images']} images; linear probe / k-NN trained on "
                f"{row['num_probe_train_images']} training images; fine-tune {args.finetune_epochs} epochs on "
                f"{args.finetune_samples} training images"
            ),
            "produced by": "scripts/reproduce.py",
        },
        "license": "apache-2.0",
    }


def write_model_card(args, state: dict, student_dir: str, results_dir: str) -> str | None:
    """The MimCo student's card, from a results file in the schema of `modeling_mimco.hub.model_card` (percent)."""
    from modeling_mimco.commands.make_model_card import ModelCardArguments, ResultsArguments, make_model_card

    row = state["rows"].get("mimco")
    if row is None:
        return None
    results = card_results(args, state, row)
    results_file = os.path.join(results_dir, "mimco_student_card_results.json")
    write_json(results_file, results)
    card_args = ModelCardArguments(
        checkpoint_dir=student_dir,
        output_file=os.path.join(results_dir, "mimco_student_model_card.md"),
        hub_model_id=f"your-namespace/{results['model_name']}",
        overwrite_output=True,
    )
    return str(make_model_card(card_args, ResultsArguments(results_file=results_file)))


if __name__ == "__main__":
    main()
