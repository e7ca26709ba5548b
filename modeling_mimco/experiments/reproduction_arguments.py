"""`make reproduce`: MimCo's claim at small scale — the comparison table on CIFAR-10, one command, on CPUs.

    python scripts/reproduce.py --seeds 0 1 2            # `make reproduce`: 3 seeds, one teacher, about 2 hours
    python scripts/reproduce.py                          # one seed, every row, in the default budget
    python scripts/reproduce.py --budget_minutes 60      # a shorter run (fewer pre-training steps)
    python scripts/reproduce.py --smoke                  # every row end to end on a few hundred images (15-40 s)

Rows (same data, same model shape, same batch size, and the same number of pre-training steps for every pre-trained
row but the compute-matched one):

0. the normalised pixels themselves (the baseline every learned feature must beat; no fine-tune);
1. random initialisation (no pre-training);
2. the stage-1 contrastive teacher (MoCo v3, `run_contrastive_pretraining.py`);
3. pixel MIM: transformers' own `ViTForMaskedImageModeling` (SimMIM: L1 on the masked pixels) trained by the shared
   training loop of `modeling_mimco.training.loop` with the optimizer, schedule, steps, batch, augmentation and masks
   (`MimCoMaskGenerator`, same settings) of the MimCo student;
4. pixel MIM at MimCo's compute: the same model trained for as many steps as MimCo's teacher and student cost
   together (`compute_matched_steps`, from the measured seconds per step of the three objectives), so that pixel MIM
   is not handicapped by the teacher's pre-training that MimCo builds on;
5. the MimCo student (patch + image InfoNCE) with that teacher (`run_pretraining.py`);
6. ablations: patch loss only, image loss only, smooth-L1 feature regression instead of InfoNCE.

Columns: linear-probe and weighted k-NN top-1 on frozen features (CLS token and mean of the patch tokens, on a seeded
subset of the training and test splits), top-1 of a short fine-tune (`run_finetuning.py`, same recipe for every row)
on the test subset, and the pre-training wall time and throughput. The CLS linear probe and kNN are repeated for
`--eval_repeats` evaluation seeds (other training and test subsets, other probe initialisation and batch order); the
table shows their standard deviation. `--seeds` repeats every student row per pre-training seed (the evaluation
subsets stay those of `--eval_seed`) with one teacher, trained and evaluated with the first seed and shared by every
seed's students (stage 1 is most of a run's cost), and adds a table of mean ± standard deviation over the seeds and a
table that says, for MimCo against each other row, whether the difference is larger than the two rows' seed spreads.

The number of pre-training steps is derived from `--budget_minutes` (for all seeds together): a few synthetic steps of
each pre-training objective are timed, the evaluation's share is set aside, and the rest is divided among the
pre-training rows (the teacher once, the others once per seed). The
plan is stored in the results JSON, so a rerun uses the same step count. Rerunning skips every row already in the
results JSON (with the same settings); an interrupted pre-training run continues from its last checkpoint
(`--resume_from_checkpoint latest`). The results JSON is rewritten after each row; at the end come the Markdown table,
a t-SNE figure of the teacher / pixel-MIM / MimCo test features and a model card of the MimCo student.

Data: `../shared/datasets/cifar10` beside the repository root when present, else the Hub's `uoft-cs/cifar10`
(`--dataset_name` overrides). `--smoke` uses CIFAR-10 when the local copy is present and the built-in digits data
otherwise, so it runs everywhere without a network.
"""


# This module's docstring is the `--help` text of `scripts/reproduce.py`. The module holds what a run is made of: the
# rows of the table, the model shape every row shares, the time the step plan sets aside for evaluation, and the
# command line that chooses among them. `reproduction.py` runs it.

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone


HUB_CIFAR10 = "uoft-cs/cifar10"


# (key, display name, kind, stage-2 `ModelArguments` overrides). The order is the order of the table.
ROWS = [
    ("pixels", "raw pixels (normalised)", "pixels", {}),
    ("random_init", "random initialisation", "random", {}),
    ("teacher", "MoCo v3 teacher (stage 1)", "contrastive", {}),
    ("pixel_mim", "pixel MIM (ViTForMaskedImageModeling, SimMIM)", "simmim", {}),
    ("pixel_mim_matched", "pixel MIM at MimCo's compute (teacher + student)", "simmim", {}),
    ("mimco", "MimCo student (patch + image InfoNCE)", "mimco", {}),
    ("mimco_patch_only", "MimCo, patch loss only", "mimco", {"image_loss_weight": 0.0}),
    ("mimco_image_only", "MimCo, image loss only", "mimco", {"patch_loss_weight": 0.0}),
    (
        "mimco_smooth_l1",
        "MimCo, smooth-L1 regression",
        "mimco",
        {"patch_loss_type": "smooth_l1", "image_loss_type": "smooth_l1"},
    ),
]
# Rows run in this order, so that an interrupted run has the main comparison first.
RUN_ORDER = [
    "pixels",
    "teacher",
    "mimco",
    "pixel_mim",
    "pixel_mim_matched",
    "random_init",
    "mimco_patch_only",
    "mimco_image_only",
    "mimco_smooth_l1",
]
TSNE_ROWS = ["teacher", "pixel_mim", "mimco"]
# key -> (display name, kind, overrides)
ROW_KINDS = {key: (name, kind, overrides) for key, name, kind, overrides in ROWS}
POOLINGS = ("cls", "mean")
# Rows that are not pre-trained (no step cost, no fine-tune for the pixels).
UNTRAINED_KINDS = ("pixels", "random")
# The row that trains for as long as MimCo's teacher and student together, not for the shared step count.
COMPUTE_MATCHED_ROW = "pixel_mim_matched"
# The comparisons of the seed summary: the MimCo student against each of these rows.
COMPARED_ROWS = ("pixels", "random_init", "teacher", "pixel_mim", "pixel_mim_matched")


# The teacher's smallest crop on 32-px CIFAR-10: 25 % instead of MoCo v3's 8 %, which at 32 px leaves a 9-px patch
# of the image. Measured at 600 steps (docs/results.md): the MimCo row's linear probe gained 0.9 to 2.0 points on
# both seeds tried, at no cost.
STAGE1_CROP_MIN_SCALE = 0.25


# Seconds set aside per row for evaluation at the default sizes, and once for startup, t-SNE and the card. Measured on
# 2 CPU cores with 1,370-step rows: a row's frozen-feature evaluation took ~20 s and its fine-tune (4 epochs on 20,000
# images) ~130 s; the t-SNE, the card and loading the data take a minute or two in all.
EVAL_SECONDS_PER_ROW = 160.0
FIXED_SECONDS = 180.0


def local_copy(local_dataset: str | None) -> str | None:
    """`local_dataset` as a path relative to the working folder, or None where no such folder exists."""
    return os.path.relpath(local_dataset) if local_dataset and os.path.isdir(local_dataset) else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--budget_minutes", type=float, default=120.0, help="Wall-time budget of the whole run (all seeds)."
    )
    parser.add_argument("--smoke", action="store_true", help="Every row on a few hundred images, a few steps.")
    parser.add_argument("--dataset_name", default=None, help="Default: local CIFAR-10 copy, else uoft-cs/cifar10.")
    parser.add_argument("--output_dir", default=None, help="Checkpoints and features (default outputs/reproduce).")
    parser.add_argument("--results_dir", default=None, help="JSON, t-SNE PNG, card (default docs/results).")
    parser.add_argument("--model_preset", default="tiny", help="Backbone shape of every row (tiny: 32 px, patch 4).")
    parser.add_argument("--seed", type=int, default=0, help="Pre-training seed (init, augmentation, masks).")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="Run every row once per pre-training seed (in seed-<S> subfolders) and add a mean ± std table.",
    )
    parser.add_argument(
        "--eval_seed", type=int, default=0, help="Seed of the evaluation subsets, probe and fine-tune (every row)."
    )
    parser.add_argument(
        "--eval_repeats",
        type=int,
        default=3,
        help="Evaluation seeds (--eval_seed, +1, ...) for the spread of the CLS linear probe and kNN of every row.",
    )
    parser.add_argument(
        "--stage1_crop_min_scale",
        type=float,
        default=STAGE1_CROP_MIN_SCALE,
        help="Smallest crop of the teacher's views (MoCo v3's ImageNet recipe: 0.08; see docs/results.md).",
    )
    parser.add_argument("--batch_size", type=int, default=128, help="Pre-training batch of every row.")
    parser.add_argument("--learning_rate", type=float, default=1.5e-3, help="Base lr for batch 256 (scaled).")
    parser.add_argument("--pretrain_steps", type=int, default=None, help="Override the budget-derived step count.")
    parser.add_argument("--probe_train_samples", type=int, default=10000)
    parser.add_argument("--eval_samples", type=int, default=5000, help="Test images for probe, k-NN and fine-tune.")
    parser.add_argument("--probe_epochs", type=int, default=100)
    parser.add_argument("--finetune_samples", type=int, default=20000)
    parser.add_argument("--finetune_epochs", type=float, default=4.0, help="0 skips the fine-tune column.")
    parser.add_argument("--finetune_learning_rate", type=float, default=2e-3)
    parser.add_argument("--tsne_points", type=int, default=1500)
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores).")
    parser.add_argument(
        "--eval_device",
        choices=["cpu", "auto"],
        default="cpu",
        help="Where the probe's features are extracted and the fine-tune runs: cpu, or auto (the GPU when there is "
        "one). Pre-training always runs on Accelerate's default device.",
    )
    parser.add_argument(
        "--eval_seconds_per_row",
        type=float,
        default=None,
        help=f"Seconds the step plan sets aside for each row's evaluation (default {EVAL_SECONDS_PER_ROW:g}, "
        "measured on 2 CPU cores).",
    )
    parser.add_argument(
        "--fixed_seconds",
        type=float,
        default=None,
        help=f"Seconds the step plan sets aside once, for loading the data, the t-SNE and the card (default "
        f"{FIXED_SECONDS:g}, measured on 2 CPU cores).",
    )
    parser.add_argument("--num_workers", type=int, default=1, help="Data-loading worker processes.")
    parser.add_argument("--rows", nargs="+", default=None, help="Only these rows (keys); default all.")
    parser.add_argument(
        "--teacher_name_or_path",
        default=None,
        help="The paper's setting: every student starts from this trained stage-1 teacher (a MimCo folder such as "
        "model_cards/teachers/cifar10), which the teacher row evaluates instead of training; the compute-matched "
        "pixel-MIM row then matches the student's compute alone.",
    )
    return parser


def apply_smoke_limits(args: argparse.Namespace, local_dataset: str | None = None) -> None:
    """`--smoke`: every row on a few hundred images for a few steps, on CIFAR-10 if present, else the digits."""
    args.dataset_name = args.dataset_name or local_copy(local_dataset) or "digits"
    args.output_dir = args.output_dir or os.path.join("outputs", "reproduce-smoke")
    args.results_dir = args.results_dir or os.path.join(args.output_dir, "results")
    args.pretrain_steps = args.pretrain_steps or 3
    args.batch_size = min(args.batch_size, 32)
    args.probe_train_samples = min(args.probe_train_samples, 200)
    args.eval_samples = min(args.eval_samples, 100)
    args.probe_epochs = min(args.probe_epochs, 5)
    args.finetune_samples = min(args.finetune_samples, 64)
    args.finetune_epochs = min(args.finetune_epochs, 1.0)
    args.tsne_points = min(args.tsne_points, 100)
    args.num_workers = 0


def parse_args(argv: list[str] | None = None, local_dataset: str | None = None) -> argparse.Namespace:
    """The command line, with the defaults filled in; `local_dataset` is a local CIFAR-10 copy (Hub layout) that
    replaces the Hub's `uoft-cs/cifar10` as the default data where it exists."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke_limits(args, local_dataset)
    args.dataset_name = args.dataset_name or local_copy(local_dataset) or HUB_CIFAR10
    args.output_dir = args.output_dir or os.path.join("outputs", "reproduce")
    args.results_dir = args.results_dir or os.path.join("docs", "results")
    unknown = set(args.rows or []) - {key for key, *_ in ROWS}
    if unknown:
        parser.error(f"--rows: unknown rows {sorted(unknown)}; known: {[key for key, *_ in ROWS]}")
    if args.budget_minutes <= 0:
        parser.error("--budget_minutes must be positive.")
    for name in ("eval_seconds_per_row", "fixed_seconds"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 or more, got {getattr(args, name)}.")
    if args.eval_repeats < 1:
        parser.error("--eval_repeats must be at least 1.")
    if args.finetune_epochs < 0:
        parser.error("--finetune_epochs must be 0 (no fine-tune) or more.")
    if args.teacher_name_or_path is not None and not os.path.isfile(
        os.path.join(args.teacher_name_or_path, "config.json")
    ):  # an OSError, not a usage error: the flag is right, the folder is not on this machine
        raise FileNotFoundError(
            f"--teacher_name_or_path: {args.teacher_name_or_path} not found (a saved model folder with a config.json)."
        )
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}.")
    return args


def set_threads(args: argparse.Namespace) -> None:
    """torch's CPU threads as `--num_threads` asks (0: leave them); the commands and their libraries may change them."""
    import torch

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)


def log(message: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"[reproduce {stamp}] {message}", flush=True)


def backbone_kwargs(args) -> dict:
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs

    return preset_backbone_kwargs(args.model_preset)


# Stage-1 and stage-2 heads sized for the small backbone (the ImageNet defaults, 4096 and 2048, are far too wide).
PROJECTOR_HIDDEN_SIZE, PROJECTION_SIZE, HEAD_HIDDEN_SIZE = 512, 128, 256


def given_teacher(args) -> str | None:
    """The trained teacher every student starts from (`--teacher_name_or_path`), or `None` when the run trains its own."""
    return getattr(args, "teacher_name_or_path", None)


def row_name(args, key: str) -> str:
    """A row's display name; with a given teacher, the teacher row and the compute-matched row say what they are."""
    if given_teacher(args) and key == "teacher":
        return f"MoCo v3 teacher (given: {os.path.basename(os.path.normpath(given_teacher(args)))})"
    if given_teacher(args) and key == COMPUTE_MATCHED_ROW:
        return "pixel MIM at the student's compute"
    return ROW_KINDS[key][0]


def wanted_rows(args) -> list[str]:
    """The row keys this run evaluates, in table order."""
    return [key for key, *_ in ROWS if args.rows is None or key in args.rows]
