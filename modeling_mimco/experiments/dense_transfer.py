"""A dense task that runs on a CPU: which pre-training transfers best to per-pixel labels, fine-tuned and frozen?

    python scripts/dense_transfer.py --output_dir outputs/dense_transfer

1. Data: the `digit-canvas` scenes (`data.segmentation.load_digit_canvas_dataset`) in the shipped teacher's family:
   one digit (`--max_digits` 1) of `--digit_scale` 0.45-0.75 of the side, at a random position, on a `--background`
   plain dark 32-px canvas (the size of `--model_preset`), per-pixel labels background + 10 digits (the digit's
   strokes, widened by a pixel), deterministic by seed. The task is calibrated (docs/history.md) so that even the
   random init finds digits (`mimco-segment`'s built-in set, 3 digits on clutter, is one where a fine-tune of this
   budget from random init finds none). Pre-training sees only canvas images (no labels); the dense heads see
   labelled canvases whose digits are the digits' training images, the test canvases the digits' test images.
2. Per seed, four backbones of one shape (`--model_preset`: by default `tiny`, the demo's ViT, 4 layers, 64 wide, 32
   px with 4-px patches; `tiny-64` is the same at 64 px with 8-px patches): the MimCo teacher (stage 1, MoCo v3; by
   default the shipped `model_cards/teachers/canvas-digits`, trained to convergence by `make teachers`, as every
   seed's teacher; `--teacher_name_or_path` gives another, `--train_teacher` trains one per seed), the MimCo student
   (stage 2) against it, a pixel-MIM model (SimMIM: `ViTForMaskedImageModeling`, trained through the same stage-2
   pipeline, loop and number of steps as the student, as `experiments/reproduction_pretraining.py` does) and a random
   init; the pre-training seed is the run's seed.
3. Dense transfer, twice per backbone, on the same labelled canvases (written as parquet files with an
   `id2label.json` to `OUTPUT_DIR/seed-S/data`):
   - UperNet fine-tuned end to end by `mimco-segment` (the paper's protocol, run as a subprocess of the real command),
     with the CPU-sized recipe of docs/finetuning.md (crop = the canvas, a 64-channel decoder, no auxiliary head, no
     flip), the paper's layer decay 0.65 and the calibrated budget (`--finetune_steps` 600 of batch 16, lr 2e-3);
     pixel MIM's ViT folder is first renamed to a MimCo folder (`pixel_mim_as_mimco`, exact);
   - a linear per-patch head on the frozen backbone (a 1x1 convolution from the standardised patch tokens to the 11
     classes, logits upsampled bilinearly to the pixels, pixel cross-entropy weighted by
     (1 / class frequency) ** `--head_class_weight_power` 0.5), same epochs and learning rate for all, which
     measures the features themselves.
   Mean IoU on the test canvases (`evaluation.segmentation_metrics`), with the digits' mean IoU apart (background
   covers most pixels, so a head that predicts only background still scores its IoU / 11).

The mean and sample standard deviation over the seeds go to `OUTPUT_DIR/dense_transfer_results.json` (the linear
head's scores under the keys they always had, UperNet's as `upernet_*`, the wall and CPU time of the whole command),
and a Markdown table is printed (docs/results.md has the run). Finished backbones and fine-tunes are reused when the
command runs again on the same `--output_dir` with the same settings (recorded in its `run_settings.json`; other
settings are refused there), so seeds may also run as separate commands, in parallel, and one run of all of them
then only adds the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from modeling_mimco.commands import reports_errors, run_command, run_contrastive_pretraining, run_pretraining
from modeling_mimco.data.digits import CANVAS_DIGITS_DATASET
from modeling_mimco.data.segmentation import (
    DIGIT_CANVAS_BACKGROUNDS,
    DIGIT_CANVAS_CLASSES,
    IGNORE_INDEX,
    load_digit_canvas_dataset,
)
from modeling_mimco.data.sources import DataArguments
from modeling_mimco.evaluation.segmentation_metrics import confusion_matrix, scores_from_confusion
from modeling_mimco.experiments.reproduction_evaluation import spread
from modeling_mimco.experiments.teachers import choose_teacher_folder
from modeling_mimco.training.host_memory import keep_freed_memory


SHIPPED_TEACHER = CANVAS_DIGITS_DATASET
"""The shipped teacher (`make teachers`, `model_cards/teachers/`) every seed starts from by default."""
PRESET = "tiny"
PRESETS = ("tiny", "tiny-64")
"""The backbone shape of every row (`--model_preset`): the demo's tiny ViT (4 layers, 64 wide) with 8x8 tokens, at
32 px with 4-px patches (`tiny`, the shape of the shipped canvas-digits teacher) or at 64 px with 8-px patches
(`tiny-64`); the canvases have the preset's image size."""
MAX_DIGITS = 1
DIGIT_SCALE = (0.45, 0.75)
BACKGROUND = "plain"
"""The labelled and unlabelled canvases' task: 1 to `MAX_DIGITS` digits, each `DIGIT_SCALE` of the canvas side, on a
`BACKGROUND` canvas: the shipped teacher's data (`canvas-digits`: one digit of 0.45-0.75 on a plain canvas)."""
FINETUNE = {
    "steps": 600,
    "batch_size": 16,
    "learning_rate": 2e-3,
    "warmup_steps": 30,
    "decoder_hidden_size": 64,
    "layer_decay": 0.65,
}
"""The UperNet fine-tuning budget of every backbone (docs/history.md has the calibration)."""
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
    parser.add_argument(
        "--stage2_steps", type=int, default=400, help="Steps of the student and of pixel MIM (the demo's 400)."
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--stage1_learning_rate", type=float, default=5e-3)
    parser.add_argument("--stage2_learning_rate", type=float, default=1.5e-3)
    parser.add_argument("--head_epochs", type=int, default=30)
    parser.add_argument("--head_learning_rate", type=float, default=1e-2)
    parser.add_argument(
        "--head_class_weight_power",
        type=float,
        default=0.5,
        help="The linear head's class weights are (1 / class frequency) ** this (0: unweighted, 0.5: 1 / sqrt).",
    )
    parser.add_argument(
        "--teacher_name_or_path",
        default=None,
        help="A stage-1 teacher folder every seed starts from (its row is this teacher). Default: the shipped "
        f"{SHIPPED_TEACHER} teacher (`make teachers`) where it exists and has the --model_preset's shape.",
    )
    parser.add_argument(
        "--train_teacher",
        action="store_true",
        help="Train one teacher per seed for --stage1_steps instead of starting from the shipped one.",
    )
    parser.add_argument(
        "--model_preset", choices=PRESETS, default=PRESET, help="The backbone shape; the canvases take its image size."
    )
    parser.add_argument("--max_digits", type=int, default=MAX_DIGITS, help="Canvases hold 1 to this many digits.")
    parser.add_argument(
        "--background",
        choices=DIGIT_CANVAS_BACKGROUNDS,
        default=BACKGROUND,
        help="The canvases: 'plain' (dark grey and pixel noise) or 'clutter' (the built-in set of mimco-segment: "
        "colour fields, lines, boxes and pieces of digits).",
    )
    parser.add_argument(
        "--digit_scale",
        type=float,
        nargs=2,
        default=list(DIGIT_SCALE),
        metavar=("MIN", "MAX"),
        help="A digit's side as fractions of the canvas side (the built-in set: 0.375 0.625).",
    )
    parser.add_argument("--finetune_steps", type=int, default=FINETUNE["steps"], help="UperNet steps; 0: no UperNet.")
    parser.add_argument("--finetune_batch_size", type=int, default=FINETUNE["batch_size"])
    parser.add_argument("--finetune_learning_rate", type=float, default=FINETUNE["learning_rate"])
    parser.add_argument("--finetune_warmup_steps", type=int, default=FINETUNE["warmup_steps"])
    parser.add_argument("--decoder_hidden_size", type=int, default=FINETUNE["decoder_hidden_size"])
    parser.add_argument(
        "--finetune_layer_decay",
        type=float,
        default=FINETUNE["layer_decay"],
        help="mimco-segment's --layer_decay: each backbone layer's learning rate is this times the one above it's.",
    )
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--dataloader_num_workers", type=int, default=1)
    args = parser.parse_args(argv)
    teacher = args.teacher_name_or_path
    if teacher is not None and args.train_teacher:
        parser.error("give --teacher_name_or_path or --train_teacher, not both.")
    if teacher is not None and not os.path.isfile(os.path.join(teacher, "config.json")):
        # without this check a mistyped folder would be taken for an unfinished teacher and trained into
        parser.error(f"--teacher_name_or_path {teacher}: no config.json there; give a stage-1 teacher's folder.")
    if teacher is not None:
        with open(os.path.join(teacher, "config.json")) as handle:
            mismatch = _shape_mismatch(json.load(handle), args.model_preset)
        if mismatch:
            parser.error(f"--teacher_name_or_path {teacher}: {mismatch}; give a teacher of that shape.")
    args.teacher_name_or_path, args.teacher_source = choose_teacher(args)
    return args


def choose_teacher(args: argparse.Namespace) -> tuple[str | None, str]:
    """The teacher every seed starts from (`None`: one is trained per seed for `--stage1_steps`) and a line that says
    which and why: a given folder, else the shipped canvas-digits teacher (the canvases' family, trained to
    convergence) where it exists and has the preset's shape."""

    def unfit(config: dict) -> str:
        mismatch = _shape_mismatch(config, args.model_preset)
        return f"has {mismatch}" if mismatch else ""

    return choose_teacher_folder(
        "Teacher",
        args.teacher_name_or_path,
        args.train_teacher,
        SHIPPED_TEACHER,
        unfit,
        trained_here=f"one teacher per seed is trained here for {args.stage1_steps} steps",
        trained_instead="trains one per seed instead",
    )


def _shape_mismatch(config: dict, model_preset: str) -> str:
    """What in a teacher's config (its `config.json` as a dict) differs from `model_preset`'s backbone shape ("" when
    nothing does): the student and the canvases follow the preset, so a teacher of another shape could not be
    distilled."""
    from modeling_mimco.configuration_mimco import MODEL_PRESETS

    differing = [
        f"{field} {config.get(field)} where --model_preset {model_preset} has {value}"
        for field, value in MODEL_PRESETS[model_preset].items()
        if field != "mask_patch_size" and config.get(field) != value
    ]
    return ", ".join(differing)


# --- the output folder -----------------------------------------------------------------------------------------------


RUN_SETTINGS_FILE = "run_settings.json"
NOT_RUN_SETTINGS = ("output_dir", "seeds", "num_threads", "dataloader_num_workers", "teacher_source")
"""Arguments that do not change what a seed's backbones and heads are (the rest are recorded per output folder)."""


def check_run_settings(args: argparse.Namespace) -> None:
    """Records the settings of a run in `OUTPUT_DIR/run_settings.json`, or refuses (`ValueError`, naming the folder and
    each differing setting) an output folder that holds a run with other settings: finished backbones and fine-tunes
    are reused, so a run with changed settings would otherwise mix their results with the earlier ones."""
    current = json.loads(json.dumps({key: value for key, value in vars(args).items() if key not in NOT_RUN_SETTINGS}))
    path = os.path.join(args.output_dir, RUN_SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as handle:
            recorded = json.load(handle)
        differing = [
            f"--{key} {recorded.get(key)!r} there, {current.get(key)!r} now"
            for key in sorted(set(recorded) | set(current))
            if recorded.get(key) != current.get(key)
        ]
        if differing:
            raise ValueError(
                f"--output_dir {args.output_dir} holds a run with other settings ({'; '.join(differing)}); give a "
                "new --output_dir, or the same settings to resume that run."
            )
        return
    if os.path.isdir(args.output_dir) and any(name.startswith("seed-") for name in os.listdir(args.output_dir)):
        raise ValueError(
            f"--output_dir {args.output_dir} holds a run whose settings were not recorded (an earlier version of this "
            "study); give a new --output_dir."
        )
    os.makedirs(args.output_dir, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(current, handle, indent=2)


# --- data ----------------------------------------------------------------------------------------------------------


def canvas_size(args: argparse.Namespace) -> int:
    """The side of every canvas: the image size of the run's `--model_preset`."""
    from modeling_mimco.configuration_mimco import MODEL_PRESETS

    return MODEL_PRESETS[args.model_preset]["image_size"]


def task_settings(args: argparse.Namespace) -> dict:
    """`load_digit_canvas_dataset`'s task arguments of the run (`--max_digits`, `--digit_scale`, `--background`)."""
    return {"max_digits": args.max_digits, "digit_scale": tuple(args.digit_scale), "background": args.background}


def write_pretraining_images(args: argparse.Namespace, seed: int, path: str) -> str:
    """The unlabelled canvases of pre-training as a parquet file with one `image` column (another stream of scenes
    than the labelled ones: `seed + 1000`)."""
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        scenes = load_digit_canvas_dataset(
            "train", args.pretrain_images, canvas_size(args), seed=seed + 1000, **task_settings(args)
        )
        scenes.remove_columns("annotation").to_parquet(path)
    return path


def labelled_arrays(
    split: str, num_images: int, canvas_size: int, seed: int, parquet_path: str | None = None, **task
) -> tuple[np.ndarray, np.ndarray]:
    """Images `(N, S, S, 3)` uint8 and masks `(N, S, S)` int64 of `load_digit_canvas_dataset` (`task`: its
    `max_digits`, `digit_scale` and `background`), also written to `parquet_path` when given (the rows `mimco-segment`
    reads)."""
    scenes = load_digit_canvas_dataset(split, num_images, canvas_size, seed=seed, **task)
    if parquet_path is not None:
        os.makedirs(os.path.dirname(parquet_path), exist_ok=True)
        scenes.to_parquet(parquet_path)
    images = np.stack([np.asarray(image, dtype=np.uint8) for image in scenes["image"]])
    masks = np.stack([np.asarray(mask, dtype=np.int64) for mask in scenes["annotation"]])
    return images, masks


def labelled_data(args: argparse.Namespace, seed: int, seed_dir: str) -> dict:
    """The labelled canvases of one seed, in memory for the linear head and as parquet files (with an
    `id2label.json`) in `seed_dir/data` for `mimco-segment`: the same rows for both."""
    folder = os.path.join(seed_dir, "data")
    files = {name: os.path.join(folder, f"{name}.parquet") for name in ("train", "test")}
    train_images, train_masks = labelled_arrays(
        "train", args.train_images, canvas_size(args), seed, files["train"], **task_settings(args)
    )
    test_images, test_masks = labelled_arrays(
        "test", args.test_images, canvas_size(args), seed, files["test"], **task_settings(args)
    )
    files["id2label"] = os.path.join(folder, "id2label.json")
    with open(files["id2label"], "w") as handle:
        json.dump(dict(enumerate(DIGIT_CANVAS_CLASSES)), handle)
    return {
        "train_images": train_images,
        "train_masks": torch.from_numpy(train_masks),
        "test_images": test_images,
        "test_masks": torch.from_numpy(test_masks),
        "files": files,
    }


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
        model_preset=args.model_preset,
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
        model_preset=args.model_preset,
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
    if args.teacher_name_or_path is not None:
        folders["teacher"] = args.teacher_name_or_path
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
        config = MimCoConfig(**preset_backbone_kwargs(args.model_preset))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            MimCoModel(config).save_pretrained(folders["random_init"])
        save_image_processor(folders["random_init"], config.image_size, config.image_mean, config.image_std)
    return folders


def pixel_mim_as_mimco(vit_folder: str, output_dir: str, model_preset: str = PRESET) -> str:
    """Pixel MIM's `ViTForMaskedImageModeling` folder as a MimCo folder of the same backbone (`model_preset`, what
    `mimco-segment` loads), through `interop.vit_export.vit_to_mimco_state_dict`, loaded strictly."""
    from transformers import ViTForMaskedImageModeling

    from modeling_mimco import MimCoConfig, MimCoModel
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs
    from modeling_mimco.interop.model_folders import save_image_processor
    from modeling_mimco.interop.vit_export import vit_to_mimco_state_dict

    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return output_dir
    vit = ViTForMaskedImageModeling.from_pretrained(vit_folder).vit.state_dict()
    config = MimCoConfig(**preset_backbone_kwargs(model_preset))
    model = MimCoModel(config)
    state = vit_to_mimco_state_dict(vit, list(model.state_dict()))
    model.load_state_dict(state, strict=True)
    model.save_pretrained(output_dir)
    save_image_processor(output_dir, config.image_size, config.image_mean, config.image_std)
    return output_dir


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
    class_weight_power: float = 0.5,
) -> nn.Module:
    """A 1x1 convolution on the patch grid, its logits upsampled bilinearly to the mask size; AdamW with a cosine
    schedule, pixel cross-entropy weighted by (1 / class frequency) ** `class_weight_power` (ignore index 255). The
    seed sets the initialisation and the batch order."""
    generator = torch.Generator().manual_seed(seed)
    # background covers most pixels; weights of 1 / sqrt(class frequency) keep the head from predicting only it
    counts = torch.bincount(train_y[train_y != IGNORE_INDEX].flatten(), minlength=num_labels).float()
    weights = (counts.sum() / counts.clamp(min=1)) ** class_weight_power
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
    head = train_linear_head(
        train_x,
        data["train_masks"],
        num_labels,
        args.head_epochs,
        args.head_learning_rate,
        seed,
        class_weight_power=args.head_class_weight_power,
    )
    return dense_scores(head, test_x, data["test_masks"], num_labels)


def finetune_command(
    args: argparse.Namespace, folder: str, files: dict[str, str], output_dir: str, seed: int
) -> list[str]:
    """`mimco-segment` (the real command, in a subprocess) on the seed's labelled canvases: the CPU-sized recipe of
    docs/finetuning.md (crop 64, no auxiliary head, no layer decay, no flip, one evaluation at the end) with this
    run's budget."""
    return [
        sys.executable, "-m", "modeling_mimco.commands.run_semantic_segmentation",
        "--model_name_or_path", folder, "--output_dir", output_dir,
        "--train_file", files["train"], "--validation_file", files["test"], "--id2label_file", files["id2label"],
        "--crop_size", str(canvas_size(args)), "--decoder_hidden_size", str(args.decoder_hidden_size),
        "--auxiliary_head", "false", "--max_steps", str(args.finetune_steps),
        "--warmup_steps", str(args.finetune_warmup_steps), "--per_device_train_batch_size", str(args.finetune_batch_size),
        "--per_device_eval_batch_size", "64", "--learning_rate", str(args.finetune_learning_rate),
        "--layer_decay", str(args.finetune_layer_decay), "--eval_strategy", "no", "--do_eval", "--save_strategy", "no", "--no_horizontal_flip",
        "--seed", str(seed), "--report_to", "none", "--logging_steps", "50",
        "--dataloader_num_workers", str(args.dataloader_num_workers),
    ]  # fmt: skip


def finetune(args: argparse.Namespace, folder: str, files: dict[str, str], output_dir: str, seed: int) -> dict:
    """UperNet fine-tuned from one backbone through `mimco-segment` (skipped when `output_dir` already holds its
    `eval_results.json`); its test scores as `upernet_*` keys and the command's wall time (kept in `output_dir`, so
    that a reused fine-tune reports the time it took)."""
    results_file = os.path.join(output_dir, "eval_results.json")
    wall_file = os.path.join(output_dir, "dense_transfer_wall_seconds.json")
    start = time.perf_counter()
    if not os.path.isfile(results_file):
        env = dict(os.environ)
        if args.num_threads > 0:
            env["OMP_NUM_THREADS"] = str(args.num_threads)
        process = subprocess.run(
            finetune_command(args, folder, files, output_dir, seed), env=env, capture_output=True, text=True
        )
        if process.returncode != 0:
            raise RuntimeError(f"mimco-segment failed on {folder}:\n{process.stderr[-3000:]}")
        with open(wall_file, "w") as handle:
            json.dump(round(time.perf_counter() - start, 1), handle)
    with open(results_file) as handle:
        metrics = json.load(handle)
    wall_seconds = math.nan
    if os.path.isfile(wall_file):
        with open(wall_file) as handle:
            wall_seconds = json.load(handle)
    digits = [metrics.get(f"eval_iou_{name}", math.nan) for name in DIGIT_CANVAS_CLASSES[1:]]
    return {
        "upernet_mean_iou": float(metrics["eval_mean_iou"]),
        "upernet_mean_accuracy": float(metrics["eval_mean_accuracy"]),
        "upernet_digit_mean_iou": float(np.nanmean(digits)),
        "upernet_background_iou": float(metrics["eval_iou_background"]),
        "upernet_wall_seconds": wall_seconds,
    }


# --- report ----------------------------------------------------------------------------------------------------------


METRICS = ("mean_iou", "mean_accuracy", "digit_mean_iou", "background_iou")
"""The frozen linear head's scores (the keys the results file has always had)."""
UPERNET_METRICS = ("upernet_mean_iou", "upernet_mean_accuracy", "upernet_digit_mean_iou", "upernet_background_iou")
"""The fine-tuned UperNet's scores, present when `--finetune_steps` > 0."""


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per backbone and metric: the mean, the sample standard deviation (0 for one seed) and the per-seed values."""
    summary = {}
    for key, _ in ROWS:
        found_metrics = [
            metric for metric in METRICS + UPERNET_METRICS if metric in next(iter(per_seed.values()))[key]
        ]
        values = {metric: [per_seed[seed][key][metric] for seed in per_seed] for metric in found_metrics}
        summary[key] = {metric: spread(found) for metric, found in values.items()}
    return summary


def _cell(row: dict, metric: str) -> str:
    """`mean ± std` in % of one metric of a summary row, or "-" where it was not measured."""
    return f"{100 * row[metric]['mean']:.1f} ± {100 * row[metric]['std']:.1f}" if metric in row else "-"


def _seeds(row: dict, metric: str) -> str:
    """The per-seed values in % of one metric of a summary row, or "-" where it was not measured."""
    return ", ".join(f"{100 * value:.1f}" for value in row[metric]["values"]) if metric in row else "-"


def markdown_table(summary: dict[str, dict], num_seeds: int) -> str:
    """backbone | UperNet mIoU | UperNet digits' mIoU | linear mIoU | linear digits' mIoU | per-seed mIoU (UperNet;
    linear), all in %, mean ± sample std over the seeds; the UperNet columns read "-" when it was not run."""
    lines = [
        f"| backbone | fine-tuned UperNet mIoU % (mean ± std, {num_seeds} seeds) | digits' mIoU % (UperNet) | "
        "frozen linear-head mIoU % | digits' mIoU % (linear) | per-seed mIoU % (UperNet; linear) |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in ROWS:
        row = summary[key]
        lines.append(
            f"| {name} | {_cell(row, 'upernet_mean_iou')} | {_cell(row, 'upernet_digit_mean_iou')} | "
            f"{_cell(row, 'mean_iou')} | {_cell(row, 'digit_mean_iou')} | "
            f"{_seeds(row, 'upernet_mean_iou')}; {_seeds(row, 'mean_iou')} |"
        )
    return "\n".join(lines)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the `mimco-segment` runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, dict]:
    """One seed: its four backbones, then per backbone the frozen linear head and (unless `--finetune_steps 0`)
    UperNet fine-tuned through `mimco-segment`, on the same labelled canvases."""
    seed_dir = os.path.join(args.output_dir, f"seed-{seed}")
    folders = pretrain_all(args, seed, seed_dir)
    data = labelled_data(args, seed, seed_dir)
    rows = {}
    for key, _ in ROWS:
        rows[key] = transfer(folders[key], data, args, seed)
        if args.finetune_steps > 0:
            folder = folders[key]
            if key == "pixel_mim":
                folder = pixel_mim_as_mimco(folder, os.path.join(seed_dir, "pixel_mim_as_mimco"), args.model_preset)
            rows[key].update(finetune(args, folder, data["files"], os.path.join(seed_dir, f"upernet-{key}"), seed))
    print(
        f"seed {seed}: "
        + ", ".join(
            f"{key} linear {100 * row['mean_iou']:.1f} / UperNet {100 * row.get('upernet_mean_iou', math.nan):.1f}"
            for key, row in rows.items()
        ),
        flush=True,
    )
    return rows


def main(argv: list[str] | None = None) -> dict:
    """The study: every seed, the summary, `dense_transfer_results.json` and the printed table; returns the report."""
    args = parse_args(argv)
    keep_freed_memory()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    check_run_settings(args)
    print(args.teacher_source, flush=True)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    per_seed = {seed: run_seed(args, seed) for seed in args.seeds}
    summary = summarize(per_seed)
    report = {
        "settings": vars(args),
        "per_seed": {str(seed): rows for seed, rows in per_seed.items()},
        "summary": summary,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(cpu_seconds() - cpu_start, 1),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "dense_transfer_results.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print()
    print(markdown_table(summary, len(args.seeds)))
    print(
        f"\nwall time {report['wall_seconds']:.0f} s, CPU time {report['cpu_seconds']:.0f} s; results in "
        f"{args.output_dir}/dense_transfer_results.json"
    )
    return report


def cli() -> int:
    """The console entry point: `main` on the process's arguments, an expected error as one `error:` line."""
    return run_command(reports_errors(main))
