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

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone


HUB_CIFAR10 = "uoft-cs/cifar10"
RESULTS_VERSION = 2

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


# --- models and configs ------------------------------------------------------------------------------------------


def backbone_kwargs(args) -> dict:
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs

    return preset_backbone_kwargs(args.model_preset)


# Stage-1 and stage-2 heads sized for the small backbone (the ImageNet defaults, 4096 and 2048, are far too wide).
PROJECTOR_HIDDEN_SIZE, PROJECTION_SIZE, HEAD_HIDDEN_SIZE = 512, 128, 256


def time_pretraining_steps(args, repeats: int = 3) -> dict[str, float]:
    """Seconds per optimizer step of each objective at the run's batch size, on synthetic tensors (1 warm-up step), on
    the device pre-training will use (the GPU when there is one, as Accelerate picks it)."""
    import torch
    from transformers import ViTForMaskedImageModeling

    from modeling_mimco import (
        MimCoConfig,
        MimCoContrastiveConfig,
        MimCoForContrastivePreTraining,
        MimCoForPreTraining,
    )
    from modeling_mimco.experiments.pixel_mim import vit_config_like

    shape = backbone_kwargs(args)
    batch = args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pixels = torch.randn(batch, 3, shape["image_size"], shape["image_size"], device=device)
    contrastive = MimCoForContrastivePreTraining(
        MimCoContrastiveConfig(
            backbone_config=MimCoConfig(**shape, position_embedding_type="sincos"),
            projector_hidden_size=PROJECTOR_HIDDEN_SIZE,
            projection_size=PROJECTION_SIZE,
        )
    )
    student = MimCoForPreTraining(
        MimCoConfig(**shape, head_hidden_size=HEAD_HIDDEN_SIZE, teacher_config=MimCoConfig(**shape))
    )
    simmim = ViTForMaskedImageModeling(vit_config_like(MimCoConfig(**shape)))
    for model in (contrastive, student, simmim):
        model.to(device)
    mask = student.mask_generator.batch(batch).to(device)
    objectives = {
        "contrastive": (contrastive, lambda: contrastive(pixel_values_1=pixels, pixel_values_2=pixels).loss),
        "mimco": (student, lambda: student(pixels, bool_masked_pos=mask).loss),
        "simmim": (simmim, lambda: simmim(pixels, bool_masked_pos=mask).loss),
    }
    seconds = {}
    for name, (model, loss_fn) in objectives.items():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for step in range(repeats + 1):
            if step == 1:
                _synchronize(device)
                start = time.perf_counter()
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        seconds[name] = (time.perf_counter() - start) / repeats
    return seconds


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Seconds set aside per row for evaluation at the default sizes, and once for startup, t-SNE and the card. Measured on
# 2 CPU cores with 1,370-step rows: a row's frozen-feature evaluation took ~20 s and its fine-tune (4 epochs on 20,000
# images) ~130 s; the t-SNE, the card and loading the data take a minute or two in all.
EVAL_SECONDS_PER_ROW = 160.0
FIXED_SECONDS = 180.0


def wanted_rows(args) -> list[str]:
    """The row keys this run evaluates, in table order."""
    return [key for key, *_ in ROWS if args.rows is None or key in args.rows]


def compute_matched_steps(steps: int, step_seconds: dict[str, float]) -> int:
    """The pixel-MIM steps that cost what MimCo's teacher and student cost together at `steps` steps each, from the
    measured seconds per step of the three objectives (same batch, same backbone)."""
    ratio = (step_seconds["contrastive"] + step_seconds["mimco"]) / step_seconds["simmim"]
    return max(int(round(steps * ratio)), 1)


def plan_steps(args, step_seconds: dict[str, float], num_seeds: int = 1) -> dict:
    """Derives the pre-training step count (the same for every pre-trained row but the compute-matched one) from the
    budget, for `num_seeds` pre-training seeds that share one teacher (trained and evaluated once).

    The synthetic step timings are used as they are: real steps also decode and augment images, but one loader worker
    on the second core hides that (real steps took 0.9-0.95x the synthetic timing, which includes warm-up)."""
    selected = wanted_rows(args)
    matched_ratio = compute_matched_steps(1000, step_seconds) / 1000
    per_step = 0.0
    for key in selected:
        kind = ROW_KINDS[key][1]
        if kind in UNTRAINED_KINDS:
            continue
        cost = step_seconds[kind] * (matched_ratio if key == COMPUTE_MATCHED_ROW else 1.0)
        per_step += cost if key == "teacher" else cost * num_seeds
    evaluated = len(selected) * num_seeds - ((num_seeds - 1) if "teacher" in selected else 0)
    per_row = args.eval_seconds_per_row if args.eval_seconds_per_row is not None else EVAL_SECONDS_PER_ROW
    fixed = args.fixed_seconds if args.fixed_seconds is not None else FIXED_SECONDS
    reserve = fixed + per_row * evaluated
    available = max(args.budget_minutes * 60.0 - reserve, 0.0)
    steps = max(int(available / per_step) // 10 * 10, 20) if per_step > 0 else 20
    return {
        "pretrain_steps": steps,
        "matched_pixel_mim_steps": compute_matched_steps(steps, step_seconds),
        "num_seeds": num_seeds,
        "measured_seconds_per_step": {k: round(v, 4) for k, v in step_seconds.items()},
        "seconds_reserved_for_evaluation": reserve,
        "estimated_pretraining_minutes": round(steps * per_step / 60.0, 1),
    }


def row_steps(settings: dict, key: str) -> int:
    """A row's pre-training steps: the shared count, or the compute-matched count for the matched pixel-MIM row."""
    if key == COMPUTE_MATCHED_ROW:
        return settings["matched_pixel_mim_steps"]
    return settings["pretrain_steps"]


def teacher_directory(args) -> str:
    """Where the teacher is trained: `--seeds` runs share one teacher beside the seeds' folders."""
    return getattr(args, "teacher_dir", None) or os.path.join(args.output_dir, "teacher")


def row_directory(args, key: str) -> str:
    return teacher_directory(args) if key == "teacher" else os.path.join(args.output_dir, key)


# The wall time of a row's pre-training, kept next to its checkpoints so that a rerun that finds the final model
# (say, after a crash during evaluation) still reports it.
PRETRAINING_TIME_NAME = "reproduce_pretraining_time.json"


# --- pre-training ------------------------------------------------------------------------------------------------


def pretraining_arguments(arguments_class: type, args, steps: int, output_dir: str, weight_decay: float):
    """The pre-training loop's settings of every pre-trained row (`arguments_class` is a stage's subclass of
    `training.PreTrainingArguments`)."""
    return arguments_class(
        output_dir=output_dir,
        seed=args.seed,
        per_device_train_batch_size=args.batch_size,
        max_train_steps=steps,
        learning_rate=args.learning_rate,
        warmup_ratio=0.05,
        weight_decay=weight_decay,
        dataloader_num_workers=args.num_workers,
        report_to="none",
        mixed_precision="no",
        logging_steps=max(min(50, steps // 5), 1),
        checkpointing_steps=max(steps // 4, 1),
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
    )


def pretraining_data(args):
    from modeling_mimco.data.sources import DataArguments

    return DataArguments(dataset_name=args.dataset_name, max_train_samples=256 if args.smoke else None)


def finished(output_dir: str, steps: int) -> bool:
    """Whether a pre-training run already wrote its final model after `steps` steps."""
    path = os.path.join(output_dir, "train_results.json")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(output_dir, "config.json"))):
        return False
    with open(path) as handle:
        return json.load(handle).get("global_step") == steps


def pretrain_contrastive(args, steps: int, output_dir: str):
    from modeling_mimco.commands import run_contrastive_pretraining as stage1

    model_args = stage1.ModelArguments(
        model_preset=args.model_preset,
        projector_hidden_size=PROJECTOR_HIDDEN_SIZE,
        projection_size=PROJECTION_SIZE,
        crop_min_scale=args.stage1_crop_min_scale,
    )
    training_args = pretraining_arguments(
        stage1.ContrastivePreTrainingArguments, args, steps, output_dir, weight_decay=0.1
    )
    return stage1.run_contrastive_pretraining(model_args, pretraining_data(args), training_args)


def mimco_arguments(args, steps: int, output_dir: str, teacher_dir: str, overrides: dict) -> tuple:
    """`run_pretraining`'s arguments for a MimCo row: the shared settings, the small heads and the row's overrides."""
    from modeling_mimco.commands import run_pretraining as stage2

    model_args = stage2.ModelArguments(
        teacher_name_or_path=teacher_dir,
        model_preset=args.model_preset,
        head_hidden_size=HEAD_HIDDEN_SIZE,
        **overrides,
    )
    training_args = pretraining_arguments(stage2.MimCoPreTrainingArguments, args, steps, output_dir, weight_decay=0.05)
    return model_args, pretraining_data(args), training_args


def pretrain_mimco(args, steps: int, output_dir: str, teacher_dir: str, overrides: dict):
    from modeling_mimco.commands import run_pretraining

    return run_pretraining.run_pretraining(*mimco_arguments(args, steps, output_dir, teacher_dir, overrides))


def pretrain_simmim(args, steps: int, output_dir: str, teacher_dir: str):
    """Pixel MIM (`experiments.pixel_mim`: transformers' `ViTForMaskedImageModeling`, SimMIM) trained with the MimCo
    row's own arguments: same shape, data, augmentation, masks, optimizer, schedule and loop."""
    from modeling_mimco.experiments.pixel_mim import run_pixel_mim

    return run_pixel_mim(*mimco_arguments(args, steps, output_dir, teacher_dir, {}))


def save_random_init(args, output_dir: str) -> None:
    """An untrained `MimCoModel` of the shared shape (seeded), saved like a checkpoint so that the probe and the
    fine-tune load it the same way as the others."""
    import torch

    from modeling_mimco import MimCoConfig, MimCoModel
    from modeling_mimco.interop.model_folders import save_image_processor

    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return
    config = MimCoConfig(**backbone_kwargs(args))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = MimCoModel(config)
    model.save_pretrained(output_dir)
    save_image_processor(output_dir, config.image_size, list(config.image_mean), list(config.image_std))


def final_losses(output_dir: str) -> dict:
    """The losses of the last logging window of a finished pre-training run (from its `train_results.json`)."""
    state = load_state(os.path.join(output_dir, "train_results.json")) or {}
    history = state.get("log_history") or [{}]
    return {k: round(v, 4) for k, v in history[-1].items() if k.endswith("loss")}


def pretraining_throughput(output_dir: str) -> float | None:
    """Mean training images per second over the logging windows of a finished pre-training run (`None` if none):
    where a row's pre-training time went, next to its steps and epochs."""
    state = load_state(os.path.join(output_dir, "train_results.json")) or {}
    rates = [entry["images_per_second"] for entry in state.get("log_history") or [] if "images_per_second" in entry]
    return round(sum(rates) / len(rates), 1) if rates else None


# --- evaluation --------------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1) of repeated measurements, with the values themselves."""
    import statistics

    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def frozen_feature_scores(args, splits: list, checkpoint: str, key: str, features_dir: str) -> dict:
    """Linear probe and k-NN top-1 with CLS and mean-patch features on the first evaluation seed's subsets (the test
    features are saved for the t-SNE), and the spread of the CLS scores over every evaluation seed in `splits`: each
    draws its own training and test subsets and its own probe initialisation and batch order."""
    import torch

    from modeling_mimco.evaluation.frozen_features import LinearProbeConfig, evaluate_frozen_features, extract_features
    from modeling_mimco.interop.model_folders import load_backbone

    backbone = load_backbone(checkpoint, model_preset=args.model_preset, seed=args.seed)
    scores = {"feature_source": backbone.source, "feature_dim": backbone.feature_dim}
    eval_seeds = evaluation_seeds(args)
    probe_scores: dict[str, list[float]] = {"linear_probe_top1_cls": [], "knn_top1_cls": []}
    for index, (eval_seed, data) in enumerate(zip(eval_seeds, splits)):
        probe = LinearProbeConfig(epochs=args.probe_epochs, seed=eval_seed)
        for pooling in POOLINGS if index == 0 else ("cls",):
            common = dict(
                pooling=pooling, batch_size=256, num_workers=args.num_workers, device=evaluation_device(args)
            )
            train_x, train_y = extract_features(backbone, data.train, data.image_column, data.label_column, **common)
            test_x, test_y = extract_features(backbone, data.eval, data.image_column, data.label_column, **common)
            result = evaluate_frozen_features(train_x, train_y, test_x, test_y, data.num_labels, probe)
            if pooling == "cls":
                probe_scores["linear_probe_top1_cls"].append(result["linear_probe_top1"])
                probe_scores["knn_top1_cls"].append(result["knn_top1"])
            if index > 0:
                continue
            scores[f"linear_probe_top1_{pooling}"] = result["linear_probe_top1"]
            scores[f"knn_top1_{pooling}"] = result["knn_top1"]
            if pooling == "cls":
                os.makedirs(features_dir, exist_ok=True)
                torch.save({"features": test_x, "labels": test_y}, os.path.join(features_dir, f"{key}.pt"))
            scores["num_probe_train_images"], scores["num_test_images"] = len(train_y), len(test_y)
    scores["evaluation_seeds"] = eval_seeds
    scores["evaluation_spread"] = {metric: spread(values) for metric, values in probe_scores.items()}
    return scores


def evaluation_device(args) -> str:
    """`--eval_device` resolved: "cpu", or "cuda" when `auto` finds a GPU."""
    import torch

    return "cuda" if args.eval_device == "auto" and torch.cuda.is_available() else "cpu"


def evaluation_seeds(args) -> list[int]:
    return [args.eval_seed + offset for offset in range(args.eval_repeats)]


def load_evaluation_splits(args) -> list:
    """The probe's training subset and the test subset for every evaluation seed (the first is the table's)."""
    from modeling_mimco.data.sources import load_classification_splits

    return [
        load_classification_splits(
            dataset_name=args.dataset_name,
            eval_split="test",
            max_train_samples=args.probe_train_samples,
            max_eval_samples=args.eval_samples,
            seed=eval_seed,
        )
        for eval_seed in evaluation_seeds(args)
    ]


def finetune_arguments(args, checkpoint: str, output_dir: str) -> tuple:
    """`run_finetuning`'s arguments: the same short recipe for every row."""
    from modeling_mimco.commands import run_finetuning

    model_args = run_finetuning.ModelArguments(
        model_name_or_path=checkpoint, layer_decay=0.75, drop_path_rate=0.0, pooling="cls"
    )
    # a short schedule: light augmentation (crop + flip), no MixUp / CutMix / erasing, which need long runs
    data_args = run_finetuning.DataTrainingArguments(
        dataset_name=args.dataset_name,
        max_train_samples=args.finetune_samples,
        max_eval_samples=args.eval_samples,
        rand_augment_num_ops=0,
        random_erasing=0.0,
        mixup=0.0,
        cutmix=0.0,
        crop_min_scale=0.35,
    )
    training_args = run_finetuning.FineTuningArguments(
        output_dir=output_dir,
        num_train_epochs=args.finetune_epochs,
        per_device_train_batch_size=128,
        per_device_eval_batch_size=256,
        learning_rate=args.finetune_learning_rate,
        warmup_steps=0.1,
        label_smoothing_factor=0.1,
        weight_decay=0.05,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=args.eval_seed,
        dataloader_num_workers=args.num_workers,
        logging_steps=20,
        use_cpu=evaluation_device(args) == "cpu",
        disable_tqdm=True,
    )
    return model_args, data_args, training_args


def finetune_top1(args, checkpoint: str, output_dir: str) -> float:
    from modeling_mimco.commands import run_finetuning

    metrics = run_finetuning.run_finetuning(*finetune_arguments(args, checkpoint, output_dir))
    return float(metrics["eval_accuracy"])


# --- results -----------------------------------------------------------------------------------------------------


def settings_of(args, plan: dict) -> dict:
    from modeling_mimco.configuration_mimco import MODEL_PRESETS

    return {
        "version": RESULTS_VERSION,
        "dataset": args.dataset_name,
        "smoke": args.smoke,
        "budget_minutes": args.budget_minutes,
        "model_preset": args.model_preset,
        "backbone": MODEL_PRESETS.get(args.model_preset),
        "seed": args.seed,
        "eval_seed": args.eval_seed,
        "eval_repeats": args.eval_repeats,
        "stage1_crop_min_scale": args.stage1_crop_min_scale,
        "batch_size": args.batch_size,
        "base_learning_rate": args.learning_rate,
        "pretrain_steps": plan["pretrain_steps"],
        "matched_pixel_mim_steps": plan.get("matched_pixel_mim_steps"),
        "shared_teacher": getattr(args, "teacher_dir", None) is not None,
        "probe_train_samples": args.probe_train_samples,
        "eval_samples": args.eval_samples,
        "probe_epochs": args.probe_epochs,
        "finetune_samples": args.finetune_samples,
        "finetune_epochs": args.finetune_epochs,
        "finetune_learning_rate": args.finetune_learning_rate,
        "projector_hidden_size": PROJECTOR_HIDDEN_SIZE,
        "projection_size": PROJECTION_SIZE,
        "head_hidden_size": HEAD_HIDDEN_SIZE,
    }


# The settings that the checkpoints under --output_dir depend on; resuming them under others would mix two runs.
PRETRAINING_SETTINGS = (
    "dataset",
    "smoke",
    "model_preset",
    "seed",
    "stage1_crop_min_scale",
    "batch_size",
    "base_learning_rate",
    "pretrain_steps",
    "matched_pixel_mim_steps",
    "projector_hidden_size",
    "projection_size",
    "head_hidden_size",
)


# The settings the shared teacher of `--seeds` depends on (it is trained with the first seed): all but the students'.
TEACHER_SETTINGS = tuple(
    key for key in PRETRAINING_SETTINGS if key not in ("matched_pixel_mim_steps", "head_hidden_size")
)


def check_pretraining_settings(
    output_dir: str, settings: dict, keys: tuple[str, ...] = PRETRAINING_SETTINGS, name: str = "pretraining_settings"
) -> None:
    """Records the pre-training settings in `output_dir`, or refuses to reuse a folder trained under other ones."""
    wanted = {key: settings[key] for key in keys}
    path = os.path.join(output_dir, f"{name}.json")
    stored = load_state(path)
    if stored is not None and stored != wanted:
        changed = sorted(key for key in wanted if stored.get(key) != wanted[key])
        raise SystemExit(
            f"reproduce.py: {output_dir} holds checkpoints pre-trained with other settings ({', '.join(changed)}); "
            "pass another --output_dir or delete that folder."
        )
    write_json(path, wanted)


def load_state(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def write_json(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(state, handle, indent=2)
    os.replace(temporary, path)


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
            f"| {name} | {percent(row.get('linear_probe_top1_cls'))} | {percent(row.get('linear_probe_top1_mean'))} "
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
        summary = {"name": name}
        for metric in (*SEED_METRICS, "pretraining_seconds"):
            values = [run.get(metric) for run in runs]
            if all(value is not None for value in values):
                summary[metric] = spread(values)
        rows[key] = summary
    return {"seeds": sorted(states), "rows": rows}


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
            f"| {ROW_KINDS[item['row']][0]} | {item['metric']} | {100 * item['difference']:+.1f} "
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
        title = f"{dict((k, n) for k, n, _, _ in ROWS)[key]}\nlinear (CLS) {percent(row['linear_probe_top1_cls'])}%"
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
            "teacher": f"MoCo v3 {args.model_preset} ViT trained by stage 1 of this run ({steps} steps)",
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


# --- main --------------------------------------------------------------------------------------------------------


def start_results(args, results_path: str) -> tuple[dict, dict]:
    """The results state to continue (or a fresh one when the settings changed) and the step plan; both written."""
    state = load_state(results_path)
    # the plan: the first seed's (`--seeds`), or a stored one for the same budget, so that a rerun trains the same
    # number of steps
    plan = getattr(args, "plan", None)
    if plan is None and state is not None and state.get("settings", {}).get("budget_minutes") == args.budget_minutes:
        plan = state.get("plan")
        if args.pretrain_steps is not None and (plan or {}).get("pretrain_steps") != args.pretrain_steps:
            plan = None
    if plan is None and args.pretrain_steps is not None:
        plan = {"pretrain_steps": args.pretrain_steps, "source": "--pretrain_steps"}
        if COMPUTE_MATCHED_ROW in wanted_rows(args):
            log("Timing a few pre-training steps of each objective for the compute-matched pixel-MIM row ...")
            seconds = time_pretraining_steps(args)
            plan["measured_seconds_per_step"] = {k: round(v, 4) for k, v in seconds.items()}
            plan["matched_pixel_mim_steps"] = compute_matched_steps(args.pretrain_steps, seconds)
    if plan is None:
        log("Timing a few pre-training steps of each objective to size the run ...")
        plan = plan_steps(args, time_pretraining_steps(args), len(args.seeds or [args.seed]))
        plan["source"] = f"--budget_minutes {args.budget_minutes:g}"
    settings = settings_of(args, plan)
    if state is not None and state.get("settings") != settings:
        backup = results_path + ".previous"
        shutil.copyfile(results_path, backup)
        log(f"{results_path} holds results for other settings; starting afresh (old file kept as {backup}).")
        state = None
    if state is None:
        state = {"settings": settings, "plan": plan, "rows": {}}
    write_json(results_path, state)
    return state, plan


def pretrain_row(args, key: str, steps: int) -> tuple[float | None, bool]:
    """Pre-trains one row into `OUTPUT_DIR/<key>` unless its final model is there; returns the pre-training's wall
    time (kept beside the checkpoints, so a rerun still knows it) and whether it resumed from a checkpoint."""
    name, kind, overrides = ROW_KINDS[key]
    row_dir = row_directory(args, key)
    teacher_dir = teacher_directory(args)
    row_start = time.perf_counter()
    resumed = False
    timing_file = os.path.join(row_dir, PRETRAINING_TIME_NAME)
    if kind == "pixels":
        return None, False
    if kind == "random":
        save_random_init(args, row_dir)
    elif finished(row_dir, steps):
        log(f"{name}: the final model of {steps} steps is already in {row_dir}.")
    else:
        resumed = os.path.isdir(os.path.join(row_dir, "checkpoints"))
        if kind == "mimco" and not finished(teacher_dir, steps):
            raise RuntimeError(f"{name} needs the teacher: run the 'teacher' row first.")
        if kind == "contrastive":
            pretrain_contrastive(args, steps, row_dir)
        elif kind == "simmim":
            pretrain_simmim(args, steps, row_dir, teacher_dir)
        else:
            pretrain_mimco(args, steps, row_dir, teacher_dir, overrides)
        set_threads(args)
        write_json(timing_file, {"seconds": time.perf_counter() - row_start, "resumed": resumed})
    timing = load_state(timing_file) or {}
    return timing.get("seconds"), timing.get("resumed", resumed)


def run_row(args, key: str, state: dict, splits: list, results_path: str, start: float) -> bool:
    """Pre-trains and evaluates one row and writes it to the results; `False` when the results already hold it."""
    name, kind, overrides = ROW_KINDS[key]
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
    trained = kind not in UNTRAINED_KINDS
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


def count_pretraining_images(args) -> int:
    from modeling_mimco.data.sources import load_training_images

    dataset, _ = load_training_images(pretraining_data(args), backbone_kwargs(args)["image_size"], seed=args.seed)
    return len(dataset)


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
    if state["settings"]["shared_teacher"] and "teacher" not in getattr(args, "shared_rows", {}):
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
    written to `RESULTS_DIR/seed_summary.json` and `.md`."""
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
    summary = seed_summary(states)
    summary["comparisons"] = compare_with_seed_spread(summary)
    summary["table_markdown"] = seed_summary_table(summary) + "\n\n" + comparison_table(summary["comparisons"])
    summary["settings"] = {k: v for k, v in states[args.seeds[0]]["settings"].items() if k != "seed"}
    write_json(os.path.join(args.results_dir, "seed_summary.json"), summary)
    with open(os.path.join(args.results_dir, "seed_summary.md"), "w") as handle:
        handle.write(summary["table_markdown"] + "\n")
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
