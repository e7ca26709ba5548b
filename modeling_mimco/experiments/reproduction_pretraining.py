"""The reproduction's pre-training: where each row trains, the settings of the shared training loop, the teacher
(stage 1), the MimCo students (stage 2), pixel MIM, the random initialisation, and what a finished run logged."""

from __future__ import annotations

import json
import os
import time

from modeling_mimco.experiments.reproduction_arguments import (
    HEAD_HIDDEN_SIZE,
    PROJECTION_SIZE,
    PROJECTOR_HIDDEN_SIZE,
    ROW_KINDS,
    backbone_kwargs,
    given_teacher,
    log,
    set_threads,
)
from modeling_mimco.experiments.reproduction_results import load_state, write_json


def teacher_directory(args) -> str:
    """Where the teacher is trained: `--seeds` runs share one teacher beside the seeds' folders."""
    return given_teacher(args) or getattr(args, "teacher_dir", None) or os.path.join(args.output_dir, "teacher")


def row_directory(args, key: str) -> str:
    return teacher_directory(args) if key == "teacher" else os.path.join(args.output_dir, key)


# The wall time of a row's pre-training, kept next to its checkpoints so that a rerun that finds the final model
# (say, after a crash during evaluation) still reports it.
PRETRAINING_TIME_NAME = "reproduce_pretraining_time.json"


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


def pretrain_row(args, key: str, steps: int) -> tuple[float | None, bool]:
    """Pre-trains one row into `OUTPUT_DIR/<key>` unless its final model is there; returns the pre-training's wall
    time (kept beside the checkpoints, so a rerun still knows it) and whether it resumed from a checkpoint."""
    name, kind, overrides = ROW_KINDS[key]
    row_dir = row_directory(args, key)
    teacher_dir = teacher_directory(args)
    row_start = time.perf_counter()
    resumed = False
    timing_file = os.path.join(row_dir, PRETRAINING_TIME_NAME)
    if kind == "pixels" or (kind == "contrastive" and given_teacher(args)):
        return None, False  # nothing to pre-train: the pixels, or the teacher the run was given
    if kind == "random":
        save_random_init(args, row_dir)
    elif finished(row_dir, steps):
        log(f"{name}: the final model of {steps} steps is already in {row_dir}.")
    else:
        resumed = os.path.isdir(os.path.join(row_dir, "checkpoints"))
        if kind == "mimco" and not given_teacher(args) and not finished(teacher_dir, steps):
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


def count_pretraining_images(args) -> int:
    from modeling_mimco.data.sources import load_training_images

    dataset, _ = load_training_images(pretraining_data(args), backbone_kwargs(args)["image_size"], seed=args.seed)
    return len(dataset)
