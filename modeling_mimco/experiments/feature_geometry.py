"""How spread out a model's frozen features are: the mean pairwise cosine similarity of the image features.

    python scripts/feature_geometry.py outputs/reproduce-seeds/seed-0/features/teacher.pt \\
        outputs/reproduce-seeds/seed-0/features/mimco.pt

Each file is a features file that `scripts/reproduce.py` writes for the t-SNE: `{"features": (N, D), "labels": (N,)}`,
the CLS tokens of the test images. A mean cosine near 1 means that, once L2-normalised (as the image-level InfoNCE
target is), nearly every image gives the same vector.
"""

from __future__ import annotations

import argparse
import os

import torch

from modeling_mimco.commands import reports_errors, run_command
from modeling_mimco.evaluation.frozen_features import mean_pairwise_cosine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("features_files", nargs="+", help="Features files written by scripts/reproduce.py.")
    return parser.parse_args(argv)


def load_features(path: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such features file.")
    try:
        saved = torch.load(path, weights_only=True)
        features = saved["features"]
    except Exception as error:  # a pickle, zip or key error: all mean the file is not one of ours
        raise ValueError(f"{path}: not a features file of reproduce.py ({type(error).__name__}: {error}).") from error
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{path}: 'features' must be an (N, D) tensor with N >= 2.")
    return features


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    print("| features | images | dim | mean pairwise cosine |")
    print("|---|---:|---:|---:|")
    for path in args.features_files:
        features = load_features(path)
        row = {
            "file": path,
            "num_images": features.shape[0],
            "feature_dim": features.shape[1],
            "mean_pairwise_cosine": mean_pairwise_cosine(features),
        }
        rows.append(row)
        print(f"| {path} | {row['num_images']} | {row['feature_dim']} | {row['mean_pairwise_cosine']:.3f} |")
    return rows


def cli() -> int:
    """The console entry point: `main` on the process's arguments, an expected error as one `error:` line."""
    return run_command(reports_errors(main))
