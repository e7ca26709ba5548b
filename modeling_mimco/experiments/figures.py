"""The pictures of the docs, drawn from the results files the studies write.

    python -m modeling_mimco.experiments.figures seeds docs/results/seed_summary.json docs/results/seed_summary.png
    python -m modeling_mimco.experiments.figures losses OUT.png RUN_DIR [RUN_DIR ...]

`seeds`: the reproduction's seed summary (`make reproduce` writes `seed_summary.json`) as grouped bars, one group per
metric and one bar per row, each the mean over the seeds with the sample standard deviation as its error bar.
`losses`: the training-loss curves of pre-training runs, from the `log_history` in each run's `train_results.json`.
Both render with matplotlib's Agg canvas, so no display is needed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence


SEED_METRICS = (
    ("linear_probe_top1_cls", "linear probe (CLS)"),
    ("knn_top1_cls", "kNN (CLS)"),
    ("finetune_top1", "fine-tune"),
)
"""The metrics of the seed-summary plot, by key in `seed_summary.json`, with their axis labels."""


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the figures need matplotlib: pip install matplotlib") from error
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_seed_summary(summary: dict, output_path: str) -> str:
    """Grouped bars of `summary["rows"]` (mean ± std over the seeds, in %), one group per `SEED_METRICS` entry that
    some row has. Returns `output_path`."""
    rows = summary["rows"]
    metrics = [(key, label) for key, label in SEED_METRICS if any(key in row for row in rows.values())]
    figure = _figure(9.0, 5.0)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(len(rows), 1)
    for index, row in enumerate(rows.values()):
        positions = [group + (index - (len(rows) - 1) / 2) * width for group in range(len(metrics))]
        means = [100 * row[key]["mean"] if key in row else 0.0 for key, _ in metrics]
        errors = [100 * row[key]["std"] if key in row else 0.0 for key, _ in metrics]
        axes.bar(positions, means, width, yerr=errors, capsize=3, label=row["name"])
    axes.set_xticks(range(len(metrics)), [label for _, label in metrics])
    axes.set_ylabel("top-1 accuracy (%), mean ± std over seeds")
    seeds = summary.get("seeds", [])
    axes.set_title(f"CIFAR-10, {len(seeds)} pre-training seeds")
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(output_path)
    return output_path


def plot_loss_curves(run_dirs: Sequence[str], output_path: str, names: Sequence[str] | None = None) -> str:
    """One panel per run: every logged loss (`loss`, `patch_loss`, `image_loss`, ...) against the step, read from
    the run's `train_results.json`. Returns `output_path`."""
    names = list(names) if names is not None else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    figure = _figure(4.2 * len(run_dirs), 3.4)
    for index, (run_dir, name) in enumerate(zip(run_dirs, names)):
        with open(os.path.join(run_dir, "train_results.json")) as file:
            history = json.load(file)["log_history"]
        axes = figure.add_subplot(1, len(run_dirs), index + 1)
        keys = sorted({key for entry in history for key in entry if key.endswith("loss")})
        for key in keys:
            points = [(entry["step"], entry[key]) for entry in history if key in entry]
            axes.plot([step for step, _ in points], [value for _, value in points], label=key)
        axes.set_title(name)
        axes.set_xlabel("step")
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output_path)
    return output_path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="figure", required=True)
    seeds = commands.add_parser("seeds", help="the reproduction's seed summary as bars with error bars")
    seeds.add_argument("summary_file")
    seeds.add_argument("output_path")
    losses = commands.add_parser("losses", help="loss curves of pre-training runs")
    losses.add_argument("output_path")
    losses.add_argument("run_dirs", nargs="+")
    args = parser.parse_args(argv)
    if args.figure == "seeds":
        with open(args.summary_file) as file:
            return plot_seed_summary(json.load(file), args.output_path)
    return plot_loss_curves(args.run_dirs, args.output_path)


if __name__ == "__main__":
    print(main())
