"""Frozen-feature evaluation: linear probe and weighted k-NN accuracy of one or several backbones.

    python scripts/run_linear_probe.py --model_name_or_path outputs/demo/teacher outputs/demo/student random-init \\
        --output_dir outputs/linear_probe --plot

Each model's features (CLS token by default; `--pooling mean` or `pooler`) of the training and evaluation images are
extracted once, then (a) a linear probe (MAE's protocol: BatchNorm without affine parameters + Linear, trained on the
cached features) and (b) a weighted k-NN classifier (DINO's: k=20, T=0.07, cosine similarity) are measured on them.
`--model_name_or_path` takes MimCo checkpoints (pre-training, classification, `MimCoModel`, a stage-1 output folder),
any `AutoModel` vision backbone, `random-init` (an untrained `MimCoModel` shaped like `--random_init_config` or
`--model_preset`) and `pixels` (the normalised pixels at that shape's image size: the baseline that learned features
must beat). The results go to `OUTPUT_DIR/linear_probe_results.json`; with `--plot`, a t-SNE of the evaluation
features, one panel per model, goes to `OUTPUT_DIR/tsne.png`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from modeling_mimco.commands import argument_parser, reports_errors, run_command
from modeling_mimco.data.arguments import LabelledDataArguments
from modeling_mimco.errors import EXPECTED_ERRORS, describe_load_error


# torch, the models and the evaluation code are imported by the functions that use them, so that `--help` and a bad
# flag answer without loading them
if TYPE_CHECKING:
    from modeling_mimco.data.sources import ClassificationData
    from modeling_mimco.evaluation.frozen_features import FrozenFeatureResult, LinearProbeConfig
    from modeling_mimco.interop.model_folders import Backbone


RESULTS_NAME = "linear_probe_results.json"
PLOT_NAME = "tsne.png"


@dataclass
class ModelArguments:
    """The backbones to compare."""

    model_name_or_path: list[str] = field(
        metadata={"help": "One or more checkpoints (local folders or Hub ids), 'random-init' or 'pixels'."}
    )
    model_names: list[str] | None = field(
        default=None, metadata={"help": "Display names, one per model; default: the folder names."}
    )
    pooling: str = field(default="cls", metadata={"help": "Feature: cls, mean (patch tokens) or pooler."})
    random_init_config: str | None = field(
        default=None, metadata={"help": "For random-init: a checkpoint folder or config.json to copy the shape of."}
    )
    model_preset: str = field(default="tiny", metadata={"help": "For random-init without --random_init_config."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code for AutoModel checkpoints."})


@dataclass
class DataArguments(LabelledDataArguments):
    """The labelled images (see `LabelledDataArguments`) and the evaluation transform."""

    crop_pct: float = field(default=0.875, metadata={"help": "Eval transform: resize to size/crop_pct, center crop."})
    cache_dir: str | None = field(default=None)


@dataclass
class EvaluationArguments:
    """Feature extraction, the two classifiers and the outputs."""

    output_dir: str = field(default="outputs/linear_probe", metadata={"help": "Where the JSON (and PNG) go."})
    batch_size: int = field(default=128, metadata={"help": "Images per forward pass when extracting features."})
    dataloader_num_workers: int = field(default=0)
    device: str | None = field(default=None, metadata={"help": "Default: cuda when available, else cpu."})
    seed: int = field(default=0, metadata={"help": "Seed of random-init models, the probe and the data subsets."})
    probe_epochs: int = field(default=100, metadata={"help": "Linear-probe epochs over the cached features."})
    probe_batch_size: int = field(default=256)
    probe_optimizer: str = field(default="sgd", metadata={"help": "sgd (momentum 0.9) or adamw."})
    probe_learning_rate: float = field(default=0.5, metadata={"help": "Peak learning rate (cosine, with warmup)."})
    probe_weight_decay: float = field(default=0.0)
    knn_k: int = field(default=20, metadata={"help": "Neighbours that vote in the k-NN classifier."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Vote weight: exp(cosine similarity / T)."})
    plot: bool = field(default=False, metadata={"help": "Also write a t-SNE of the eval features (PNG)."})
    tsne_max_points: int = field(default=2000, metadata={"help": "At most this many eval images in the t-SNE."})


def _display_names(paths: list[str], names: list[str] | None) -> list[str]:
    from modeling_mimco.interop.model_folders import PIXELS, RANDOM_INIT

    if names is not None:
        if len(names) != len(paths):
            raise ValueError(f"--model_names has {len(names)} names for {len(paths)} models.")
        return list(names)
    short = [
        path if path in (RANDOM_INIT, PIXELS) else os.path.basename(os.path.normpath(path)) or path for path in paths
    ]
    return [s if short.count(s) == 1 else path for s, path in zip(short, paths)]


def _load_backbone(path: str, model_args: ModelArguments, seed: int, cache_dir: str | None) -> Backbone:
    """`load_backbone` for one `--model_name_or_path` entry; a checkpoint that does not load fails with a message
    naming the flag and the path (a missing folder, tried as a Hub id too; a damaged weights file)."""
    from modeling_mimco.interop.model_folders import PIXELS, RANDOM_INIT, load_backbone

    try:
        return load_backbone(
            path,
            random_init_config=model_args.random_init_config,
            model_preset=model_args.model_preset,
            trust_remote_code=model_args.trust_remote_code,
            seed=seed,
            cache_dir=cache_dir,
        )
    except EXPECTED_ERRORS as error:
        if path in (RANDOM_INIT, PIXELS):  # only --random_init_config is read from disk
            flag, name = "--random_init_config", model_args.random_init_config
        else:
            flag, name = "--model_name_or_path", path
        if name is None or str(error).startswith(flag):  # nothing was loaded, or the message names it already
            raise
        raise ValueError(describe_load_error(flag, name, error)) from error


def build_probe_config(eval_args: EvaluationArguments) -> LinearProbeConfig:
    """The linear probe's training settings from the `--probe_*` flags."""
    from modeling_mimco.evaluation.frozen_features import LinearProbeConfig

    return LinearProbeConfig(
        epochs=eval_args.probe_epochs,
        batch_size=eval_args.probe_batch_size,
        optimizer=eval_args.probe_optimizer,
        learning_rate=eval_args.probe_learning_rate,
        weight_decay=eval_args.probe_weight_decay,
        seed=eval_args.seed,
    )


def evaluate_model(
    name: str,
    path: str,
    data: ClassificationData,
    model_args: ModelArguments,
    data_args: DataArguments,
    eval_args: EvaluationArguments,
    probe_config: LinearProbeConfig,
    device: str,
) -> FrozenFeatureResult:
    """Loads one `--model_name_or_path` entry and measures its frozen features (`evaluation.evaluate_backbone`)."""
    from modeling_mimco.evaluation.frozen_features import evaluate_backbone

    backbone = _load_backbone(path, model_args, eval_args.seed, data_args.cache_dir)
    result = evaluate_backbone(
        backbone,
        data,
        name=name,
        model_name_or_path=path,
        pooling=model_args.pooling,
        probe_config=probe_config,
        knn_k=eval_args.knn_k,
        knn_temperature=eval_args.knn_temperature,
        batch_size=eval_args.batch_size,
        crop_pct=data_args.crop_pct,
        num_workers=eval_args.dataloader_num_workers,
        device=device,
        max_image_pixels=data_args.max_image_pixels,
    )
    print(f"{name}: linear probe {result.linear_probe_top1:.2%}, k-NN {result.knn_top1:.2%}")
    return result


def write_report(
    results: list[FrozenFeatureResult],
    data: ClassificationData,
    data_args: DataArguments,
    eval_args: EvaluationArguments,
    probe_config: LinearProbeConfig,
) -> dict:
    """Writes `OUTPUT_DIR/linear_probe_results.json` (the data, the settings, one record per model) and returns its
    content with `results_file`, the path written."""
    os.makedirs(eval_args.output_dir, exist_ok=True)
    report = {
        "dataset": data_args.dataset_name or data_args.train_dir or data_args.data_files or "digits",
        "train_split": data_args.train_split,
        "eval_split": data.eval_split,
        "num_classes": data.num_labels,
        "linear_probe": asdict(probe_config),
        "knn": {"k": eval_args.knn_k, "temperature": eval_args.knn_temperature},
        "models": [result.to_json() for result in results],
    }
    results_path = os.path.join(eval_args.output_dir, RESULTS_NAME)
    with open(results_path, "w") as handle:
        json.dump(report, handle, indent=2)
    report["results_file"] = results_path
    return report


def plot_results(results: list[FrozenFeatureResult], data: ClassificationData, eval_args: EvaluationArguments) -> str:
    """Writes `OUTPUT_DIR/tsne.png`, one t-SNE panel of the eval features per model; returns its path."""
    from modeling_mimco.evaluation.frozen_features import plot_tsne

    panels = [
        (f"{r.name}\nlinear {r.linear_probe_top1:.1%} · kNN {r.knn_top1:.1%}", r.test_features, r.test_labels)
        for r in results
    ]
    return plot_tsne(
        panels,
        os.path.join(eval_args.output_dir, PLOT_NAME),
        class_names=data.class_names,
        max_points=eval_args.tsne_max_points,
        seed=eval_args.seed,
    )


def _check_pooling(model_args: ModelArguments) -> None:
    from modeling_mimco.evaluation.frozen_features import FEATURE_POOLINGS

    if model_args.pooling not in FEATURE_POOLINGS:
        raise ValueError(f"--pooling must be one of {FEATURE_POOLINGS}, got {model_args.pooling!r}.")


def measure_models(
    model_args: ModelArguments,
    data_args: DataArguments,
    eval_args: EvaluationArguments,
    data: ClassificationData | None = None,
) -> list[FrozenFeatureResult]:
    """Measures every `--model_name_or_path` entry on `data` (default: the splits `data_args` names) and returns the
    results, in order, writing nothing. Results measured apart (in another process, say) with the same data and
    settings make one report together (`report_results`)."""
    import torch

    from modeling_mimco.data.sources import load_labelled_splits

    _check_pooling(model_args)
    names = _display_names(model_args.model_name_or_path, model_args.model_names)
    probe_config = build_probe_config(eval_args)
    if data is None:
        data = load_labelled_splits(data_args, eval_args.seed, cache_dir=data_args.cache_dir)
    device = eval_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return [
        evaluate_model(name, path, data, model_args, data_args, eval_args, probe_config, device)
        for name, path in zip(names, model_args.model_name_or_path)
    ]


def report_results(
    results: Sequence[FrozenFeatureResult],
    data: ClassificationData,
    data_args: DataArguments,
    eval_args: EvaluationArguments,
) -> dict:
    """Writes `linear_probe_results.json` (and, with `--plot`, the t-SNE) for `results` and prints their table;
    returns the report, with `results_file` and, with `--plot`, `plot_file`."""
    from modeling_mimco.evaluation.frozen_features import results_table

    results = list(results)
    report = write_report(results, data, data_args, eval_args, build_probe_config(eval_args))
    if eval_args.plot:
        report["plot_file"] = plot_results(results, data, eval_args)
    print()
    print(results_table(results, knn_k=eval_args.knn_k, knn_temperature=eval_args.knn_temperature))
    print(f"Results: {report['results_file']}" + (f"; t-SNE: {report['plot_file']}" if eval_args.plot else ""))
    return report


def run_linear_probe(model_args: ModelArguments, data_args: DataArguments, eval_args: EvaluationArguments) -> dict:
    """Evaluates every model as `mimco-probe` does (`measure_models`, then `report_results`); returns the report
    written to `linear_probe_results.json`, with `results_file` and, with `--plot`, `plot_file`."""
    from modeling_mimco.data.sources import load_labelled_splits

    _check_pooling(model_args)  # before the data loads
    data = load_labelled_splits(data_args, eval_args.seed, cache_dir=data_args.cache_dir)
    return report_results(measure_models(model_args, data_args, eval_args, data), data, data_args, eval_args)


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser((ModelArguments, DataArguments, EvaluationArguments))
    return run_linear_probe(*parser.parse_args_into_dataclasses(args=argv))


def cli() -> int:
    """The `mimco-probe` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
