"""A dense task that runs on a CPU: which pre-training gives the best frozen features for per-pixel labels?

    python scripts/dense_transfer.py --output_dir outputs/dense_transfer

1. Data: the built-in `digit-canvas` set (`data.segmentation.load_digit_canvas_dataset`): digits pasted at random
   positions and scales on cluttered 64-px canvases, per-pixel labels background + 10 digits, deterministic by seed.
   Pre-training sees only canvas images (no labels); the dense head sees labelled canvases whose digits are the
   digits' training images, the test canvases the digits' test images.
2. Per seed, four backbones of one shape (the demo's tiny ViT, 4 layers, 64 wide, at 64 px with 8-px patches:
   preset `tiny-64`): a MimCo
   teacher (stage 1, MoCo v3), the MimCo student (stage 2) against it, a pixel-MIM model (SimMIM:
   `ViTForMaskedImageModeling`, trained through the same stage-2 pipeline and loop as the student, as
   `experiments/reproduction_pretraining.py` does) and a random init; the pre-training seed is the run's seed.
3. Dense transfer: a linear per-patch head (a 1x1 convolution from the frozen, standardised patch tokens to the 11
   classes, logits upsampled bilinearly to the pixels, pixel cross-entropy weighted by 1 / sqrt(class frequency)) on each frozen backbone, same epochs and
   learning rate for all; mean IoU on the test canvases (`evaluation.segmentation_metrics`). A linear head on
   frozen features, not UperNet fine-tuning: the whole study has to fit in about 15 CPU minutes on 2 cores, and a
   frozen probe measures the features themselves.

The mean and sample standard deviation over the seeds go to `OUTPUT_DIR/dense_transfer_results.json` and a Markdown
table is printed (docs/results.md has the run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from torch import nn

from modeling_mimco.commands import reports_errors, run_command, run_contrastive_pretraining, run_pretraining
from modeling_mimco.data.segmentation import (
    DIGIT_CANVAS_CLASSES,
    IGNORE_INDEX,
    load_digit_canvas_dataset,
)
from modeling_mimco.data.sources import DataArguments
from modeling_mimco.evaluation.segmentation_metrics import confusion_matrix, scores_from_confusion
from modeling_mimco.training.host_memory import keep_freed_memory


PRESET = "tiny-64"
CANVAS_SIZE = 64
"""The backbone shape of every row: the demo's tiny ViT (4 layers, 64 wide) at 64 px with 8-px patches."""
ROWS = [
    ("random_init", "random init"),
    ("pixel_mim", "pixel MIM (SimMIM)"),
    ("teacher", "MimCo teacher (MoCo v3, stage 1)"),
    ("student", "MimCo student (stage 2)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/dense_transfer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain_images", type=int, default=2048, help="Unlabelled canvases for pre-training.")
    parser.add_argument("--train_images", type=int, default=512, help="Labelled canvases for the dense head.")
    parser.add_argument("--test_images", type=int, default=256)
    parser.add_argument("--stage1_steps", type=int, default=100)
    parser.add_argument("--stage2_steps", type=int, default=150, help="Steps of the student and of pixel MIM.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--stage1_learning_rate", type=float, default=5e-3)
    parser.add_argument("--stage2_learning_rate", type=float, default=1.5e-3)
    parser.add_argument("--head_epochs", type=int, default=30)
    parser.add_argument("--head_learning_rate", type=float, default=1e-2)
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--dataloader_num_workers", type=int, default=1)
    return parser.parse_args(argv)


# --- data ----------------------------------------------------------------------------------------------------------


def write_pretraining_images(args: argparse.Namespace, seed: int, path: str) -> str:
    """The unlabelled canvases of pre-training as a parquet file with one `image` column (another stream of scenes
    than the labelled ones: `seed + 1000`)."""
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        scenes = load_digit_canvas_dataset("train", args.pretrain_images, CANVAS_SIZE, seed=seed + 1000)
        scenes.remove_columns("annotation").to_parquet(path)
    return path


def labelled_arrays(split: str, num_images: int, canvas_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    scenes = load_digit_canvas_dataset(split, num_images, canvas_size, seed=seed)
    images = np.stack([np.asarray(image, dtype=np.uint8) for image in scenes["image"]])
    masks = np.stack([np.asarray(mask, dtype=np.int64) for mask in scenes["annotation"]])
    return images, masks


# --- pre-training ----------------------------------------------------------------------------------------------------


def _loop_settings(arguments_class: type, args: argparse.Namespace, output_dir: str, seed: int, **settings):
    return arguments_class(
        output_dir=output_dir,
        seed=seed,
        per_device_train_batch_size=args.batch_size,
        logging_steps=25,
        report_to="none",
        warmup_ratio=0.05,
        checkpointing_steps=10_000,
        dataloader_num_workers=args.dataloader_num_workers,
        mixed_precision="no",
        **settings,
    )


def pretrain_teacher(args: argparse.Namespace, data_file: str, output_dir: str, seed: int) -> None:
    """Stage 1 as the demo trains it (tiny shape, narrow projector, no flip: a mirrored digit is no digit)."""
    model_args = run_contrastive_pretraining.ModelArguments(
        model_preset=PRESET,
        projector_hidden_size=512,
        projection_size=128,
        crop_min_scale=0.6,
        horizontal_flip=False,
    )
    training_args = _loop_settings(
        run_contrastive_pretraining.ContrastivePreTrainingArguments,
        args,
        output_dir,
        seed,
        max_train_steps=args.stage1_steps,
        learning_rate=args.stage1_learning_rate,
    )
    run_contrastive_pretraining.run_contrastive_pretraining(
        model_args, DataArguments(data_files=[data_file]), training_args
    )


def student_arguments(args: argparse.Namespace, data_file: str, output_dir: str, teacher_dir: str, seed: int):
    """`run_pretraining`'s arguments of the student, which pixel MIM shares (same data, masks, loop, schedule)."""
    model_args = run_pretraining.ModelArguments(
        teacher_name_or_path=teacher_dir,
        model_preset=PRESET,
        head_hidden_size=256,
        image_temperature=0.01,
        crop_min_scale=0.67,
        horizontal_flip=False,
    )
    training_args = _loop_settings(
        run_pretraining.MimCoPreTrainingArguments,
        args,
        output_dir,
        seed,
        max_train_steps=args.stage2_steps,
        learning_rate=args.stage2_learning_rate,
    )
    return model_args, DataArguments(data_files=[data_file]), training_args


def pretrain_pixel_mim(args: argparse.Namespace, data_file: str, output_dir: str, teacher_dir: str, seed: int) -> None:
    """SimMIM (`experiments.pixel_mim`) with the student's arguments: same shape, data, masks, loop and schedule."""
    from modeling_mimco.experiments.pixel_mim import run_pixel_mim

    run_pixel_mim(*student_arguments(args, data_file, output_dir, teacher_dir, seed))


def pretrain_all(args: argparse.Namespace, seed: int, seed_dir: str) -> dict[str, str]:
    """The four backbones of one seed (each skipped when its folder is complete); returns their folders."""
    from modeling_mimco import MimCoConfig, MimCoModel
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs
    from modeling_mimco.interop.model_folders import save_image_processor

    data_file = write_pretraining_images(args, seed, os.path.join(args.output_dir, "data", f"pretrain-{seed}.parquet"))
    folders = {key: os.path.join(seed_dir, key) for key, _ in ROWS}
    done = lambda key: os.path.isfile(os.path.join(folders[key], "config.json"))  # noqa: E731
    if not done("teacher"):
        pretrain_teacher(args, data_file, folders["teacher"], seed)
    if not done("student"):
        run_pretraining.run_pretraining(
            *student_arguments(args, data_file, folders["student"], folders["teacher"], seed)
        )
    if not done("pixel_mim"):
        pretrain_pixel_mim(args, data_file, folders["pixel_mim"], folders["teacher"], seed)
    if not done("random_init"):
        config = MimCoConfig(**preset_backbone_kwargs(PRESET))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            MimCoModel(config).save_pretrained(folders["random_init"])
        save_image_processor(folders["random_init"], config.image_size, config.image_mean, config.image_std)
    return folders


# --- dense transfer --------------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_features(checkpoint: str, images: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    """Frozen patch tokens of a checkpoint as a grid `(N, D, H/p, W/p)` (`interop.load_backbone`: any MimCo folder, a
    stage-2 folder's student, or a ViT such as pixel MIM's)."""
    from modeling_mimco.interop.model_folders import load_backbone

    backbone = load_backbone(checkpoint)
    mean = torch.tensor(backbone.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.image_std).view(1, 3, 1, 1)
    grids = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 255.0
        tokens = backbone.model(pixel_values=(pixels - mean) / std).last_hidden_state[:, backbone.num_prefix_tokens :]
        side = int(round(tokens.shape[1] ** 0.5))
        grids.append(tokens.transpose(1, 2).reshape(len(pixels), -1, side, side))
    return torch.cat(grids)


def train_linear_head(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_labels: int,
    epochs: int,
    learning_rate: float,
    seed: int,
    batch_size: int = 64,
) -> nn.Module:
    """A 1x1 convolution on the patch grid, its logits upsampled bilinearly to the mask size; AdamW with a cosine
    schedule, pixel cross-entropy weighted by 1 / sqrt(class frequency) (ignore index 255). The seed sets the initialisation and the batch order."""
    generator = torch.Generator().manual_seed(seed)
    # background covers most pixels; weights of 1 / sqrt(class frequency) keep the head from predicting only it
    counts = torch.bincount(train_y[train_y != IGNORE_INDEX].flatten(), minlength=num_labels).float()
    weights = (counts.sum() / counts.clamp(min=1)).sqrt()
    weights = weights / weights.mean()
    head = nn.Conv2d(train_x.shape[1], num_labels, kernel_size=1)
    with torch.no_grad():
        nn.init.normal_(head.weight, std=0.01, generator=generator)
        head.bias.zero_()
    steps = epochs * -(-len(train_x) // batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            logits = nn.functional.interpolate(head(train_x[index]), size=train_y.shape[-2:], mode="bilinear")
            loss = nn.functional.cross_entropy(logits, train_y[index], weight=weights, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head


@torch.no_grad()
def dense_scores(head: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, num_labels: int) -> dict:
    logits = nn.functional.interpolate(head(test_x), size=test_y.shape[-2:], mode="bilinear")
    confusion = confusion_matrix(logits.argmax(1).numpy(), test_y.numpy(), num_labels, IGNORE_INDEX)
    scores = scores_from_confusion(confusion)
    result = {key: float(scores[key]) for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}
    # what the mean hides: the background (most pixels) and the digits apart
    result["background_iou"] = float(scores["per_category_iou"][0])
    result["digit_mean_iou"] = float(np.nanmean(scores["per_category_iou"][1:]))
    return result


def transfer(folder: str, data: dict, args: argparse.Namespace, seed: int) -> dict:
    """Frozen features of one backbone, standardised with the training features' per-channel statistics (so that
    one learning rate suits every backbone), and the linear head's test scores."""
    train_x = patch_features(folder, data["train_images"])
    test_x = patch_features(folder, data["test_images"])
    mean, std = train_x.mean(dim=(0, 2, 3), keepdim=True), train_x.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_labels = len(DIGIT_CANVAS_CLASSES)
    head = train_linear_head(train_x, data["train_masks"], num_labels, args.head_epochs, args.head_learning_rate, seed)
    return dense_scores(head, test_x, data["test_masks"], num_labels)


# --- report ----------------------------------------------------------------------------------------------------------


METRICS = ("mean_iou", "mean_accuracy", "digit_mean_iou", "background_iou")


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    summary = {}
    for key, _ in ROWS:
        values = {metric: [per_seed[seed][key][metric] for seed in per_seed] for metric in METRICS}
        summary[key] = {
            metric: {
                "mean": statistics.fmean(found),
                "std": statistics.stdev(found) if len(found) > 1 else 0.0,
                "values": found,
            }
            for metric, found in values.items()
        }
    return summary


def markdown_table(summary: dict[str, dict], num_seeds: int) -> str:
    lines = [
        f"| backbone (frozen) | mIoU % (mean ± std, {num_seeds} seeds) | per-seed mIoU % | mean accuracy % | "
        "digits' mean IoU % | background IoU % |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in ROWS:
        row = summary[key]
        cells = {metric: f"{100 * row[metric]['mean']:.1f} ± {100 * row[metric]['std']:.1f}" for metric in METRICS}
        seeds = ", ".join(f"{100 * value:.1f}" for value in row["mean_iou"]["values"])
        lines.append(
            f"| {name} | {cells['mean_iou']} | {seeds} | {cells['mean_accuracy']} | {cells['digit_mean_iou']} | "
            f"{cells['background_iou']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    per_seed: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        folders = pretrain_all(args, seed, os.path.join(args.output_dir, f"seed-{seed}"))
        train_images, train_masks = labelled_arrays("train", args.train_images, CANVAS_SIZE, seed)
        test_images, test_masks = labelled_arrays("test", args.test_images, CANVAS_SIZE, seed)
        data = {
            "train_images": train_images,
            "train_masks": torch.from_numpy(train_masks),
            "test_images": test_images,
            "test_masks": torch.from_numpy(test_masks),
        }
        per_seed[seed] = {key: transfer(folders[key], data, args, seed) for key, _ in ROWS}
        print(
            f"seed {seed}: " + ", ".join(f"{key} {100 * row['mean_iou']:.1f}" for key, row in per_seed[seed].items())
        )
    summary = summarize(per_seed)
    report = {
        "settings": vars(args),
        "per_seed": {str(seed): rows for seed, rows in per_seed.items()},
        "summary": summary,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "dense_transfer_results.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print()
    print(markdown_table(summary, len(args.seeds)))
    print(f"\nwall time {report['wall_seconds']:.0f} s; results in {args.output_dir}/dense_transfer_results.json")
    return report


def cli() -> int:
    """The console entry point: `main` on the process's arguments, an expected error as one `error:` line."""
    return run_command(reports_errors(main))
